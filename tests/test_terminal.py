"""Terminal safety: text that comes from hosts and guests never drives the operator's terminal.

Real sources: an ssh host (a real sshd, in a mount namespace of its own) whose /etc/os-release
carries escape sequences, and a file with such a name that Ferry cannot read, so that the
replication's error, log and task record quote it. The command line and the console must show
that text with its control characters escaped, and JSON must carry it exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

import harness.sshd
from ferry.engine import textsafe
from harness.cli import ferry, ferry_process, isolate_ssh
from harness.pilot import text_of, until
from harness.trees import describe, diff, write
from harness.waiting import running, until_sync
from test_vm import _guest, ok, ws  # noqa: F401  (ws: a lab workspace with the live image, for this module)

# Retitles the terminal (OSC 0), clears it, a C1 CSI, switches to the alternate screen.
HOSTILE = "Evil\x1b]0;PWNED\x07\x1b[2J\u009b31m\x1b[?1049hOS"
SHOWN = "Evil\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\x1b[?1049hOS"
# A file name with those and a carriage return, which would overwrite the line it is on.
HOSTILE_FILE = "report\x1b]0;PWNED\x07\x1b[2J\u009b31m\rname"
SHOWN_FILE = "report\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\rname"
# What a terminal acts on: C0 controls but tab and newline, DEL, C1.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def assert_safe(*texts: str) -> None:
    for text in texts:
        found = RAW.search(text)
        assert found is None, f"raw {found.group()!r} reaches the terminal in {text!r}"


def test_escapes_are_visible_and_the_rest_is_untouched():
    assert textsafe.line(HOSTILE) == SHOWN
    assert textsafe.line("a\nb\tc\x7f") == "a\\nb\\tc\\x7f"          # one line stays one line
    assert textsafe.lines("a\nb\tc\r") == "a\nb\tc\\r"               # several lines keep their breaks
    assert textsafe.line("\u202egnp.exe") == "\\u202egnp.exe"        # a right-to-left override
    assert textsafe.line(os.fsdecode(b"caf\xe9")) == "caf\\xe9"      # a byte that was not UTF-8
    plain = "Debian GNU/Linux 12 (bookworm) ✔ café 日本 [b]"
    assert textsafe.line(plain) == plain


# --------------------------------------------------------------------------- real sources


def _private_mounts_work() -> bool:
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def hostile_site(sshd_factory, tmp_path, monkeypatch):
    """A site whose ssh host ssh1 reports HOSTILE as its OS name (its sshd sees its own
    /etc/os-release, bind-mounted in a private mount namespace), and a task that failed on a
    file named HOSTILE_FILE that Ferry could not read."""
    if shutil.which("unshare") is None or not _private_mounts_work():
        pytest.skip("needs unshare --mount (root) for a host with its own /etc/os-release")
    isolate_ssh(monkeypatch, tmp_path / "home")
    os_release = tmp_path / "os-release"
    os_release.write_text(f'NAME="Evil"\nPRETTY_NAME="{HOSTILE}"\nID=evil\n')
    wrapper = tmp_path / "sshd-in-namespace"
    wrapper.write_text("#!/bin/sh\nexec unshare --mount --propagation private sh -c "
                       f"'mount --bind {os_release} /etc/os-release && exec {harness.sshd.SSHD} \"$@\"' sshd \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(harness.sshd, "SSHD", str(wrapper))
    site = sshd_factory.site(tmp_path, 1)

    src = tmp_path / "src"
    src.mkdir()
    write(src / "readable", b"fine")
    write(src / HOSTILE_FILE, b"secret", mode=0o000)
    # Root reads anything; without these capabilities the file is unreadable, as for an ordinary account.
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    proc = ferry_process(site.workspace.root, "replicate", "files", f"local:{src}", f"local:{tmp_path / 'dst'}",
                         prefix=drop, env={"HOME": os.environ["HOME"]})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    site.replicate_out, site.replicate_err = out, err
    return site


def test_cli_shows_a_hostile_os_name_escaped_and_json_carries_it_exactly(hostile_site):
    root = hostile_site.workspace.root
    r = ferry(root, "hosts")
    assert r.code == 0, r.err
    assert_safe(r.out, r.err)
    row = next(line for line in r.out.splitlines() if line.startswith("ssh1 "))
    assert SHOWN in row   # one row, whatever the host wrote

    r = ferry(root, "hosts", "--json")
    assert_safe(r.out)    # JSON escapes control characters itself...
    assert next(h for h in r.json if h["host"] == "ssh1")["os_name"] == HOSTILE   # ...and keeps the value


def test_cli_shows_a_hostile_file_name_in_errors_escaped(hostile_site):
    root = hostile_site.workspace.root
    err = hostile_site.replicate_err
    assert_safe(hostile_site.replicate_out, err)
    assert SHOWN_FILE in err and "Permission denied" in err
    failure = [line for line in err.splitlines() if line.startswith("ferry: task ")]
    assert len(failure) == 1 and SHOWN_FILE in failure[0]   # the carriage return did not split it

    tid = str(ferry(root, "tasks", "--json").json[0]["id"])
    for args in (["task", "show", tid], ["tasks"], ["audit"]):
        r = ferry(root, *args)
        assert r.code == 0, r.err
        assert_safe(r.out, r.err)
    shown = ferry(root, "task", "show", tid).out
    error_line = next(line for line in shown.splitlines() if line.lstrip().startswith("error "))
    assert SHOWN_FILE in error_line
    assert any(SHOWN_FILE in line and "Permission denied" in line for line in shown.splitlines()
               if not line.lstrip().startswith("error "))   # the task's log quotes it too

    r = ferry(root, "task", "show", tid, "--json")
    assert_safe(r.out)
    assert HOSTILE_FILE in r.json["error"]


def screen_text(app) -> str:
    """What the console puts on the terminal now: the text of every line of the screen."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def test_console_shows_hostile_names_escaped(hostile_site):
    from ferry.console.app import FerryApp
    from ferry.engine.client import EngineClient

    site = hostile_site
    client = EngineClient(site.workspace, site.config(), adopt=False, transports=site.pool())
    await client.start()
    try:
        tid = (await client.list_tasks())[0].id
        app = FerryApp(client, first_view="inventory")
        async with app.run_test(size=(200, 40)) as pilot:
            await pilot.press("down", "down")   # site -> cluster lab -> ssh1
            assert app.inventory.selected.name == "ssh1"
            await until(pilot, lambda: "PWNED" in text_of(app, "#detail-body"), timeout=30, what="facts of ssh1")
            screen = screen_text(app)
            assert_safe(screen)
            assert SHOWN in screen

            await pilot.press("2")
            app.tasks_view.select_task(tid)
            await until(pilot, lambda: "Permission denied" in text_of(app, "#task-detail"), timeout=30,
                        what="the failed task's detail")
            await until(pilot, lambda: "│" in text_of(app, "#task-detail"), timeout=30, what="its log")
            screen = screen_text(app)
            assert_safe(screen)
            assert SHOWN_FILE in screen
    finally:
        await client.close()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_a_guest_os_name_with_escapes_is_shown_escaped(ws):
    """The guest writes its own /etc/os-release; its agent reports it as the OS name."""
    ok(ws, "vm", "create", "evil", "--host", "lab1", "--disk", "16M")
    ok(ws, "vm", "start", "evil")
    try:
        _guest(ws, "evil", f"cat > /etc/os-release <<'EOF'\nNAME=Evil\nPRETTY_NAME=\"{HOSTILE}\"\nEOF\n")
        assert ok(ws, "vm", "agent", "info", "evil")["os"] == HOSTILE   # JSON: exactly what the guest said
        for args in (["vm", "agent", "info", "evil"], ["vm", "show", "evil"], ["vm", "list", "--agents"]):
            r = ferry(ws, *args)
            assert r.code == 0, r.err
            assert_safe(r.out, r.err)
        info = ferry(ws, "vm", "agent", "info", "evil").out
        assert any(line.split() == ["OS", SHOWN] for line in info.splitlines()), info
    finally:
        ok(ws, "vm", "stop", "evil", "--force")


# --------------------------------------------------------------------------- ctrl-c


def _task_row(root: Path) -> tuple[int, str, dict]:
    """The newest task's id, state and checkpoint, read straight from state.db (0, "", {}: none yet)."""
    if not (root / "state.db").exists():
        return 0, "", {}
    con = sqlite3.connect(root / "state.db", timeout=10)
    try:
        row = con.execute("SELECT id, state, checkpoint FROM tasks ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:   # the command has not created its tables yet
        row = None
    finally:
        con.close()
    return (row[0], row[1], json.loads(row[2]) if row[2] else {}) if row else (0, "", {})


def test_ctrl_c_mid_copy_exits_130_and_the_task_goes_on(tmp_path):
    """Ctrl-C (SIGINT) while a replication copies: exit status 130, one line saying the task goes on
    in the engine, and the same command then follows that task to its end instead of starting over."""
    root, src, dst = tmp_path / "ws", tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(4):
        write(src / f"big-{i}.bin", os.urandom(4 << 20))
    total = 16 << 20
    argv = ["replicate", "files", f"local:{src}", f"lab1:{dst}", "--streams", "1"]
    # 8 s at 2 MiB/s: a file (a checkpoint) every 2 s, so Ctrl-C lands mid-copy even on a loaded machine
    # (SIGINT as a terminal has it: a test worker may run with it ignored, and a child inherits that)
    proc = ferry_process(root, *argv, "--bwlimit", "2M",
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        until_sync(lambda: running(proc) and _task_row(root)[2].get("bytes_durable"), timeout=60,
                   what="some data durable on the target: mid-copy")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    tid, state, checkpoint = _task_row(root)
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == [f"ferry: stopped following task {tid}; it goes on in the engine (hint: "
                                f"`ferry task resume {tid}` follows it again, `ferry task pause {tid}` pauses it)"], err
    assert state == "running" and 0 < checkpoint["bytes_durable"] < total

    r = ferry(root, *argv, "--json")
    assert r.code == 0, r.err
    assert f"task {tid} (" in r.err and "already does this job; following it" in r.err
    assert r.json["task"] == tid and r.json["state"] == "succeeded"
    assert r.json["bytes_sent"] <= total     # one copy, never started over
    assert diff(describe(src), describe(dst)) == []


def test_the_log_file_escapes_text_from_outside(tmp_path):
    """logs/ferry.log is read with tail -f on a terminal: a hostile name in a log line arrives
    escaped, one record per line."""
    import logging

    from ferry.engine.logs import setup_logging
    from ferry.engine.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure()
    path = setup_logging(ws)
    logging.getLogger("ferry.test").warning("copying %s", "evil\x1b]0;pwned\x07\x1b[2J\nname\x9b")
    for h in logging.getLogger("ferry").handlers:
        h.flush()
    text = open(path, encoding="utf-8").read()
    assert "\x1b" not in text and "\x9b" not in text and "\x07" not in text
    assert "copying evil\\x1b]0;pwned\\x07\\x1b[2J\\nname\\x9b" in text
