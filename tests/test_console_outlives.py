"""Issue 11: tasks outlive the console. A real `ferry` console in a terminal (tmux) exports a stopped VM
while a throttled file replication a command line started runs; both front ends are killed with
`kill -9` while both tasks run. With no front end left, the engine service finishes both; a new
console then shows them succeeded, the replica holds the source's bytes and the .ova imports back
to the VM's disk. Real files, a real qcow2 with data on it, the folder lab."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.chaos import task_rows
from harness.cli import ROOT, engine_pid, ferry_process
from harness.lab import ok, vms
from harness.qemu import sha256
from harness.tmux import Terminal, alive
from harness.waiting import running, until_sync

pytestmark = pytest.mark.skipif(not all(map(shutil.which, ("tmux", "qemu-io", "qemu-img"))),
                                reason="needs tmux, qemu-io and qemu-img")
MiB = 1 << 20
FINAL = ("succeeded", "failed", "cancelled")


def hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(root.iterdir())}


def row_of(ws: Path, kind: str) -> dict | None:
    """The one task of `kind` as state.db holds it (read as another process reads it: no front end of
    Ferry), or None."""
    rows = [r for r in task_rows(ws) if r["kind"] == kind]
    assert len(rows) <= 1, f"{len(rows)} tasks of kind {kind}"
    return rows[0] if rows else None


def under_way(row: dict | None) -> bool:
    """The task runs and has moved bytes; a task that ended already fails the test at once."""
    if row is None:
        return False
    assert row["state"] not in FINAL, f"task {row['id']} ({row['title']}) ended before the kill: {row['state']}"
    return row["state"] == "running" and (row["progress"] or {}).get("bytes_done", 0) > 0


def console_in_tmux(ws: Path) -> Terminal:
    """`ferry --workspace W` in a terminal of its own, with the suite's settings (a tmux server started
    earlier by someone else would not pass them on)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FERRY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return Terminal([sys.executable, "-m", "ferry.console.cli", "--workspace", str(ws)], width=160, height=40,
                    env=env)


def showing(term: Terminal, cond, what: str) -> None:
    """Wait for `cond`; when it never holds, say so with what the terminal shows then."""
    try:
        until_sync(cond, timeout=60, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the console shows:\n{term.screen()}") from None


def field(screen: str, label: str) -> str | None:
    """The text of a form's field `label` on the screen (between the label and the form's frame)."""
    for line in screen.splitlines():
        if label in line:
            return line.split(label, 1)[1].split("█", 1)[0].strip()
    return None


def task_line(screen: str, tid: int) -> str:
    """The Tasks view's row of task `tid` (its ID is the first column), or ""."""
    return next((line for line in screen.splitlines() if re.match(rf"\s*{tid}\s", line)), "")


@pytest.fixture
def terminals():
    made: list[Terminal] = []
    yield made
    for term in made:
        term.close()
    left = subprocess.run(["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True).stdout
    assert not {t.name for t in made} & set(left.split()), "a tmux session of this test was left"


def test_killing_the_console_and_the_command_line_mid_export_and_mid_replication_stops_neither(
        tmp_path, monkeypatch, terminals):
    # progress reaches state.db often: the test reads there when both tasks are under way
    monkeypatch.setenv("FERRY_PROGRESS_PERSIST_S", "0.02")
    ws = tmp_path / "ws"
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(8):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(4 * MiB))
    want = hashes(src)
    disk = ok(ws, "vm", "create", "ex", "--host", "lab1", "--disk", "320M")["disks"][0]
    for cmd in ("write -P 0x3c 0 128M", "write -P 0xc3 192M 64M"):       # 192 MiB of data on the VM's disk
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, disk], check=True, capture_output=True)
    ova = tmp_path / "killed-console.ova"

    first = console_in_tmux(ws)
    terminals.append(first)
    console_pid = first.pid()
    assert b"ferry.console.cli" in Path(f"/proc/{console_pid}/cmdline").read_bytes()
    first.wait_for("engine ▶ running", timeout=60)
    first.keys("1")                                        # the Inventory, the cursor onto the stopped VM
    first.wait_for("■ ex")
    first.keys("Down", "Down", "Down")
    first.wait_for("inventory › lab › lab1 › ex")

    cli = ferry_process(ws, "replicate", "files", f"local:{src}", f"local:{dst}", "--bwlimit", "8M")
    until_sync(lambda: running(cli) and under_way(row_of(ws, "replicate.files")), timeout=60,
               what="the replication under way")
    first.keys("e")                                        # the console exports the VM
    first.wait_for("Output path")
    first.keys("C-u")                                      # cleared (as shown) before the new path is typed:
    until_sync(lambda: field(first.screen(), "Output path") == "", what="the output path cleared")
    first.keys("-l", str(ova))                             # the key's action runs after typed text is in
    first.wait_for("killed-console.ova")
    first.keys("Enter")
    showing(first, lambda: under_way(row_of(ws, "vm.export")) and under_way(row_of(ws, "replicate.files")),
            "the export and the replication under way")
    engine = engine_pid(ws)
    assert engine not in (None, console_pid, cli.pid), "the tasks run in an engine of their own"
    killed_at = time.time()
    os.kill(console_pid, signal.SIGKILL)
    os.kill(cli.pid, signal.SIGKILL)
    cli.communicate()
    until_sync(lambda: not alive(console_pid), what="the console gone")

    # No front end of Ferry from here on until both tasks ended: only state.db is read.
    until_sync(lambda: all(row_of(ws, k)["state"] in FINAL for k in ("replicate.files", "vm.export")),
               timeout=120, what="both tasks finished with no front end attached")
    rep, exp = row_of(ws, "replicate.files"), row_of(ws, "vm.export")
    for kind, row in (("replicate.files", rep), ("vm.export", exp)):
        assert row["state"] == "succeeded", (kind, row["error"], row["hint"])
        assert row["attempts"] == 1, f"{kind} was run again rather than carried on"
        assert row["finished"] > killed_at, f"{kind} ended before its front end was killed"
    assert engine_pid(ws) in (engine, None), "another engine took the tasks over"

    second = console_in_tmux(ws)
    terminals.append(second)
    second.wait_for("engine ▶ running", timeout=60)
    second.keys("2")                                       # the Tasks view
    rows = {rep["id"]: "files local:", exp["id"]: "export ex ->"}
    showing(second, lambda: all("✔ succeeded" in task_line(second.screen(), tid) for tid in rows),
            "both tasks succeeded in the new console")
    screen = second.screen()
    for tid, title in rows.items():
        assert title in task_line(screen, tid), screen

    assert hashes(dst) == want
    ok(ws, "vm", "import", str(ova), "--host", "lab2", "--name", "ex-back")
    back = vms(ws)["ex-back"]["disks"][0]["path"]
    assert subprocess.run(["qemu-img", "compare", "-U", disk, back], capture_output=True).returncode == 0
