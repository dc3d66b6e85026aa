"""Crash safety of the engine itself, for every task kind: a Ferry process killed with SIGKILL
mid-task leaves its task interrupted (never "running"), its helper processes dead or found and
stopped before the task goes on, and every file it recorded found again: removed by a rollback,
by its success (temporary ones), or by `ferry gc` once the task is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import harness.kinds  # noqa: F401  (registers test.helpers)
from harness.chaos import at_fraction, helpers_of, kill_at, workspace_id
from harness.cli import ROOT, ferry
from harness.waiting import until, until_sync

from ferry.engine.client import EngineClient
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import harness.kinds
    from pathlib import Path
    from ferry.engine.client import EngineClient
    from ferry.engine.transport import TransportPool
    from ferry.engine.workspace import Workspace

    async def main():
        ws = Workspace(Path({ws!r}))
        site = ws.load_config()
        pool = TransportPool(site, ws, **{pool!r}) if {pool!r} is not None else None
        client = EngineClient(ws, site, adopt=False, transports=pool)
        await client.start()
        tid = await client.submit("test.helpers", {params!r})
        print(tid, flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def start_child(ws: Path, params: dict, pool: dict | None = None) -> tuple[subprocess.Popen, int]:
    """A Ferry process (engine and client, as the CLI has them) running a test.helpers task;
    `pool`: the keywords of its TransportPool (how it reaches ssh hosts)."""
    code = CHILD.format(tests=str(TESTS), root=str(ROOT), ws=str(ws), params=params, pool=pool)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return child, int(child.stdout.readline())


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    Workspace(ws).write_lab_config()
    return ws


def killed_after_its_files(tmp_path: Path) -> tuple[Path, Path, int]:
    """A workspace, a folder, and a test.helpers task in it whose Ferry process was killed once the
    task had made its files."""
    ws = workspace(tmp_path)
    folder = tmp_path / "work"
    folder.mkdir()
    child, tid = start_child(ws, {"folder": str(folder)})
    try:
        until_sync(lambda: (folder / f".made.img.ferry-task{tid}").exists(), what="the task's files")
    finally:
        kill(child)
    return ws, folder, tid


def tasks_json(ws: Path) -> dict[int, dict]:
    r = ferry(ws, "tasks", "--json")
    assert r.code == 0, r.err
    return {t["id"]: t for t in r.json}


def test_killed_ferry_task_is_interrupted_and_its_helper_dies_with_it(tmp_path, monkeypatch):
    ws = workspace(tmp_path)
    folder = tmp_path / "work"
    folder.mkdir()
    child, tid = start_child(ws, {"folder": str(folder)})
    try:
        wid = until_sync(lambda: workspace_id(ws), what="the workspace id")
        helpers = until_sync(lambda: [p for p in helpers_of(wid, tid) if alive(p)], what="the task's helper")
    finally:
        kill(child)
    # The helper (sleep 300) got its parent-death signal: it does not go on alone.
    until_sync(lambda: not any(alive(p) for p in helpers), timeout=10, what="the helper to die with Ferry")

    # The next Ferry command, whatever it is, shows the task interrupted, not running. (Its engine
    # here does not know the test's task kind, so it cannot resume it, as it otherwise would.)
    monkeypatch.setenv("FERRY_TASK_KINDS", "")
    t = tasks_json(ws)[tid]
    assert t["state"] == "interrupted" and t["owner"] is None
    r = ferry(ws, "tasks")
    assert "↯ interrupted" in r.out and "ferry task resume ID" in r.out
    shown = ferry(ws, "task", "show", str(tid))
    assert "interrupted" in shown.out and f"ferry task cancel {tid}" in shown.out
    assert f"made      local:{folder}/made.img" in shown.out


def test_a_helper_on_an_ssh_host_carries_its_tag_and_dies_with_the_session(ssh_site, tmp_path):
    ws = ssh_site.workspace.root
    folder = tmp_path / "work"
    folder.mkdir()
    pool = {"ssh_config_paths": [str(ssh_site.ssh_config)], "user_known_hosts": str(ssh_site.user_known_hosts),
            "use_agent": False}
    child, tid = start_child(ws, {"folder": str(folder), "host": "ssh1"}, pool)
    try:
        wid = until_sync(lambda: workspace_id(ws), what="the workspace id")
        # The sshd is on this machine: the helper it runs for the task is found by its tag here.
        helpers = until_sync(lambda: [p for p in helpers_of(wid, tid) if alive(p)], what="the remote helper")
    finally:
        kill(child)
    until_sync(lambda: not any(alive(p) for p in helpers), timeout=20,
               what="the remote helper to die once its SSH session is gone")


async def test_resume_stops_a_helper_that_outlived_its_task_then_cancel_rolls_back(tmp_path):
    ws = workspace(tmp_path)
    folder = tmp_path / "work"
    folder.mkdir()
    child, tid = start_child(ws, {"folder": str(folder), "escape": True})
    try:
        pidfile = folder / "escaped.pid"
        until_sync(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the escaping helper")
    finally:
        kill(child)
    escaped = int(pidfile.read_text())
    # A background child of the helper's shell: the parent-death signal does not reach it. It lives on.
    await asyncio.sleep(0.5)
    assert alive(escaped)

    client = EngineClient.open(Workspace(ws), adopt=False)
    await client.start()
    try:
        assert (await client.get_task(tid)).state == TaskState.INTERRUPTED
        pidfile.unlink()
        await client.resume(tid)
        # Before the task runs again, what its earlier run left is found by its tag and stopped.
        await until(lambda: not alive(escaped), timeout=20, what="the outliving helper to be stopped")
        await until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the resumed run's helper")
        logs = [e.message for e in await client.task_log(tid)]
        assert any("stopped 1 helper process(es) an earlier run left on local" in m for m in logs), logs
        second = int(pidfile.read_text())

        info = await client.cancel(tid)
        info = await client.wait_task(tid, timeout=30)
        assert info.state == TaskState.CANCELLED
        # Rolled back: the kind's rollback ran, and every file it recorded is gone, made or temporary.
        assert (folder / "rolled-back").read_text() == str(tid)
        assert not (folder / "made.img").exists()
        assert not (folder / f".made.img.ferry-task{tid}").exists()
        assert await client.task_files(tid) == []
        await until(lambda: not alive(second), timeout=10, what="the cancelled run's helper to die")
    finally:
        await client.close()


def test_cancel_of_an_interrupted_task_rolls_it_back_from_another_process(tmp_path):
    ws, folder, tid = killed_after_its_files(tmp_path)
    # The CLI in another process: the task is interrupted, nobody runs it; cancel rolls it back here.
    r = ferry(ws, "task", "cancel", str(tid))
    assert r.code == 0, r.err
    assert "cancel -> cancelled" in r.out
    assert not (folder / "made.img").exists() and not (folder / f".made.img.ferry-task{tid}").exists()
    assert (folder / "rolled-back").exists()
    assert tasks_json(ws)[tid]["state"] == "cancelled"


async def test_success_removes_temporary_files_and_keeps_what_it_made(tmp_path):
    ws = workspace(tmp_path)
    folder = tmp_path / "work"
    folder.mkdir()
    client = EngineClient.open(Workspace(ws), adopt=False)
    await client.start()
    try:
        tid = await client.submit("test.helpers", {"folder": str(folder), "finish": True})
        info = await client.wait_task(tid, timeout=30)
        assert info.state == TaskState.SUCCEEDED
        assert (folder / "made.img").stat().st_size == 65536
        assert not (folder / f".made.img.ferry-task{tid}").exists()
        assert await client.task_files(tid) == []   # what it made is no longer the task's

        # A permanent failure of a kind that rolls back on failure leaves nothing either.
        (folder / "made.img").unlink()
        tid = await client.submit("test.helpers", {"folder": str(folder), "fail": True})
        info = await client.wait_task(tid, timeout=30)
        assert info.state == TaskState.FAILED and info.error == "the helper failed"
        assert not (folder / "made.img").exists() and (folder / "rolled-back").exists()
        assert await client.task_files(tid) == []
    finally:
        await client.close()


def test_gc_lists_and_removes_what_tasks_that_are_gone_left(tmp_path):
    ws, folder, tid = killed_after_its_files(tmp_path)
    # A leftover of an earlier Ferry version in a datastore, and one of a task that no longer exists.
    ds = Path(Workspace(ws).load_config().datastores["lab1-local"].path)
    (ds / "old").mkdir(parents=True)
    (ds / "old" / ".ferry-import-0a1b2c3d").mkdir()
    (ds / "old" / ".ferry-import-0a1b2c3d" / "disk.vhd").write_bytes(b"y" * 200_000)
    (ds / "old" / "disk0.qcow2.ferry-task999.part").write_bytes(b"z" * 100_000)

    # Interrupted: its files are its own, kept with the way to release them.
    r = ferry(ws, "gc", "--dry-run", "--json")
    assert r.code == 0, r.err
    items = {i["path"]: i for i in r.json}
    assert items[f"{folder}/made.img"]["kept"].startswith(f"held by task {tid} (")
    assert items[f"{ds}/old/.ferry-import-0a1b2c3d"]["bytes"] >= 200_000
    assert items[f"{ds}/old/disk0.qcow2.ferry-task999.part"]["what"] == "temporary of task 999 (gone)"
    assert (ds / "old" / ".ferry-import-0a1b2c3d").exists()     # a dry run removes nothing

    # The task's row disappears (an old workspace, a hand-edited database): its files are leftovers.
    assert ferry(ws, "engine", "stop", "--now").code == 0
    import sqlite3
    con = sqlite3.connect(ws / "state.db")
    con.execute("DELETE FROM tasks WHERE id=?", (tid,))
    con.commit()
    con.close()
    r = ferry(ws, "gc")
    assert r.code == 0, r.out + r.err
    assert "removed 4 leftover(s)" in r.out
    for p in (folder / "made.img", folder / f".made.img.ferry-task{tid}", ds / "old" / ".ferry-import-0a1b2c3d",
              ds / "old" / "disk0.qcow2.ferry-task999.part"):
        assert not p.exists(), p
    assert ferry(ws, "gc", "--dry-run").out.strip() == "nothing left behind by tasks"


def test_a_cancelled_file_replication_leaves_no_partly_written_file(tmp_path):
    ws = workspace(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(48 << 20))
    k = kill_at(ws, "replicate", "files", f"local:{src}", f"local:{dst}", "--bwlimit", "16M",
                when=at_fraction(0.3))
    assert k.killed, (k.out, k.err)
    parts = [p for p in dst.rglob(".ferry-part.*")]
    assert parts, "the killed round left its partly written file (kept for a resume)"
    r = ferry(ws, "task", "cancel", str(k.task_id))
    assert r.code == 0, r.err
    assert not list(dst.rglob(".ferry-part.*"))
    assert tasks_json(ws)[k.task_id]["state"] == "cancelled"


def test_gc_finds_staging_folders_left_next_to_an_export_outside_the_datastores(tmp_path):
    """An export stages its package next to its output, wherever that is. A staging folder there that no
    task tracks (its task's records lost, or an earlier Ferry's, named at random) is found through the
    output path the store records for that export, and removed; nothing else in the folder is touched."""
    ws = workspace(tmp_path)
    out = tmp_path / "exports"
    out.mkdir()
    assert ferry(ws, "vm", "create", "gx", "--host", "lab1", "--disk", "16M").code == 0
    r = ferry(ws, "vm", "export", "gx", "--out", str(out / "gx.ova"))
    assert r.code == 0, r.err
    gone, old = out / ".gx.ova.ferry-task999", out / ".gx.ova.ferry-tmp-0a1b2c3d"
    for d in (gone, old):
        d.mkdir()
        (d / "gx-disk0.vhd").write_bytes(b"v" * 300_000)
    (out / "notes.txt").write_text("the operator's own file")

    r = ferry(ws, "gc", "--dry-run", "--json")
    assert r.code == 0, r.err
    items = {i["path"]: i for i in r.json}
    assert set(items) == {str(gone), str(old)}, items
    assert items[str(gone)]["what"] == "temporary of task 999 (gone)" and not items[str(gone)]["kept"]
    assert items[str(old)]["what"] == "temporary file of an earlier Ferry version"
    assert all(i["bytes"] >= 300_000 for i in items.values())

    r = ferry(ws, "gc")
    assert r.code == 0 and "removed 2 leftover(s)" in r.out, r.out + r.err
    assert sorted(p.name for p in out.iterdir()) == ["gx.ova", "notes.txt"]
