"""Issue 11: the engine as a service. One engine process per workspace, started on demand, private to
its user, refusing front ends of another version; tasks run there, so killing every front end never
stops one; `ferry engine stop` lets a task reach a checkpoint and the next start resumes it; several
front ends see the same tasks live; a console whose engine restarts says so and carries on."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ferry.engine import api
from ferry.engine.protocol import frame, hello, recv_frame, short_path
from ferry.engine.remote import RemoteEngine, connect
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.cli import engine_pid, ferry, ferry_process
from harness.tmux import alive
from harness.waiting import until, until_sync

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path, files: int, size: int) -> dict[str, str]:
    root.mkdir(parents=True)
    out = {}
    for i in range(files):
        p = root / f"f{i:03d}.bin"
        p.write_bytes(os.urandom(size))
        out[p.name] = sha(p)
    return out


def hashes(root: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(root.iterdir())}


def task_row(ws: Path, tid: int) -> dict:
    con = sqlite3.connect(f"file:{ws / 'state.db'}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        try:
            r = con.execute("SELECT * FROM tasks WHERE id=?", (tid,)).fetchone()
        except sqlite3.OperationalError:     # the engine has not made its tables yet
            r = None
        if r is None:
            return {"state": None, "progress": {}}
        return {**dict(r), "progress": json.loads(r["progress"] or "{}")}
    finally:
        con.close()


def raw_hello(sock_path: Path, message: dict) -> dict:
    """Speak the protocol's first frame by hand, as another program (or another Ferry) would."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(sock_path))
    s.sendall(frame(api.encode(message)))
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    s.close()
    return json.loads(body)


# ------------------------------------------------------------------ one engine per workspace

def test_a_command_starts_the_engine_which_outlives_it_is_private_and_alone(tmp_path):
    ws = tmp_path / "ws"
    r = ferry(ws, "engine", "status")
    assert r.code == 1 and "no engine runs" in r.out
    r = ferry(ws, "tasks")
    assert r.code == 0 and "no tasks" in r.out, r.err
    pid = engine_pid(ws)
    assert pid and pid != os.getpid(), "the command started an engine of its own, which outlived it"
    assert stat.S_IMODE(os.stat(ws / "engine.sock").st_mode) == 0o600
    st = json.loads(ferry(ws, "engine", "status", "--json").out)
    assert st["running"] and st["pid"] == pid and st["version"] == api.VERSION and st["workspace"] == str(ws)

    second = subprocess.run([sys.executable, "-m", "ferry.engine.service", "--workspace", str(ws)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "an engine already runs" in second.stderr and str(pid) in second.stderr

    r = ferry(ws, "engine", "stop")
    assert r.code == 0 and f"engine stopped (pid {pid})" in r.out, r.err
    assert not alive(pid) and not (ws / "engine.sock").exists()
    assert ferry(ws, "engine", "stop").out.startswith("no engine runs")


def test_an_engine_left_idle_in_tests_is_not_stopped_while_commands_keep_coming(tmp_path, monkeypatch):
    """The suite's engines stop once idle (FERRY_ENGINE_IDLE_EXIT): a command line's visit, shorter than
    the watcher's look every second, still counts, so a test's next command never meets an engine that
    is stopping ("the engine went away")."""
    import time
    ws = tmp_path / "ws"
    monkeypatch.setenv("FERRY_ENGINE_IDLE_EXIT", "2")
    assert ferry(ws, "tasks").code == 0
    pid = engine_pid(ws)
    assert pid
    end = time.monotonic() + 7
    while time.monotonic() < end:
        assert raw_hello(ws / "engine.sock", hello("cli"))["op"] == "hello"
        time.sleep(0.3)
    assert engine_pid(ws) == pid, "the engine stopped while front ends kept coming"
    until_sync(lambda: not alive(pid), timeout=20, what="the engine to stop once idle")


@pytest.fixture
def open_dir():
    """A folder other users may pass through (pytest's own tmp folders are private to root)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="fsvc-", dir="/tmp"))
    os.chmod(d, 0o711)
    yield d
    from harness.cli import kill_engines
    kill_engines(d)
    shutil.rmtree(d, ignore_errors=True)


def test_a_front_end_of_another_version_or_another_user_is_refused(open_dir):
    ws = open_dir / "ws"
    assert ferry(ws, "tasks").code == 0
    reply = raw_hello(ws / "engine.sock", {**hello("cli"), "version": "0.0.1"})
    assert reply["op"] == "refused"
    assert "0.0.1" in reply["message"] and api.VERSION in reply["message"]
    assert "ferry engine stop" in reply["hint"]
    # a ferry of the same version but another protocol (a build in between) hears which one differs
    reply = raw_hello(ws / "engine.sock", {**hello("cli"), "protocol": api.PROTOCOL - 1})
    assert reply["op"] == "refused" and f"(protocol {api.PROTOCOL - 1})" in reply["message"]
    assert f"(protocol {api.PROTOCOL})" in reply["message"] and f"kill {engine_pid(ws)}" in reply["hint"]

    # The socket is 0600, so the kernel already keeps other users out. Opened up by mistake, the
    # engine itself still refuses them: it asks the kernel who is at the other end (SO_PEERCRED).
    os.chmod(ws, 0o711)
    os.chmod(ws / "engine.sock", 0o666)
    script = textwrap.dedent(f"""
        import json, socket, struct
        s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect({str(ws / 'engine.sock')!r})
        body = json.dumps({json.dumps(hello('cli'))}).encode()
        s.sendall(struct.pack('>I', len(body)) + body)
        data = b''
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
        print(data[4:].decode())
    """)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                        script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["op"] == "refused" and "may not use the engine" in reply["message"], reply
    log = (ws / "logs" / "ferry.log").read_text()
    assert "refused a connection from" in log and "uid 65534" in log


def test_engine_unit_is_a_systemd_unit_for_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    r = ferry(ws, "engine", "unit", "--user", "ops")
    assert r.code == 0, r.err
    unit = r.out
    for line in ("User=ops", f"--workspace {ws}", "Restart=on-failure", "KillMode=process",
                 "[Install]", "WantedBy=multi-user.target"):
        assert line in unit, unit
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert Path(exec_start.split("=", 1)[1].split()[0]).exists(), exec_start
    if shutil.which("systemd-analyze"):
        f = tmp_path / "ferry-engine.service"
        f.write_text(unit.replace("User=ops", "User=root"))
        v = subprocess.run(["systemd-analyze", "verify", str(f)], capture_output=True, text=True)
        assert "ferry-engine.service:" not in v.stderr, v.stderr


# ------------------------------------------------------------------ tasks outlive their front ends

def test_killing_the_command_that_started_a_task_never_stops_it(tmp_path):
    ws = tmp_path / "ws"
    src, dst = tmp_path / "src", tmp_path / "dst"
    want = tree(src, 12, 4 * MiB)
    proc = ferry_process(ws, "replicate", "files", f"local:{src}", f"local:{dst}", "--bwlimit", "12M")
    until_sync(lambda: (ws / "state.db").exists() and task_row(ws, 1)["progress"].get("bytes_done", 0) > 4 * MiB,
               timeout=120, what="the replication under way")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert task_row(ws, 1)["state"] == "running"
    r = ferry(ws, "task", "resume", "1")      # the task is running in the engine: this follows it
    assert r.code == 0, r.err
    assert "is running in the engine; following it" in r.err
    assert task_row(ws, 1)["state"] == "succeeded"
    assert hashes(dst) == want


def test_engine_stop_lets_a_task_reach_a_checkpoint_and_the_next_start_resumes_it(tmp_path):
    ws = tmp_path / "ws"
    src, dst = tmp_path / "src", tmp_path / "dst"
    want = tree(src, 16, 4 * MiB)
    proc = ferry_process(ws, "replicate", "files", f"local:{src}", f"local:{dst}", "--bwlimit", "10M")
    until_sync(lambda: (ws / "state.db").exists() and task_row(ws, 1)["progress"].get("bytes_done", 0) > 12 * MiB,
               timeout=120, what="the replication under way")
    r = ferry(ws, "engine", "stop")
    assert r.code == 0 and "stop at their next checkpoint" in r.err and "engine stopped" in r.out, r.out + r.err
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "the engine went away" in err and len(err.strip().splitlines()) == 1, err
    row = task_row(ws, 1)
    assert row["state"] == "interrupted" and row["checkpoint"], row
    done_at_stop = row["progress"]["bytes_done"]
    assert 0 < done_at_stop < 64 * MiB

    r = ferry(ws, "engine", "start")
    assert r.code == 0 and "engine started" in r.out, r.err
    until_sync(lambda: task_row(ws, 1)["state"] in ("succeeded", "failed"), timeout=120, what="the task resumed")
    row = task_row(ws, 1)
    assert row["state"] == "succeeded", row["error"]
    result = json.loads(row["result"])
    assert result["resumed"] is True and result["bytes_sent"] <= 64 * MiB - done_at_stop + 8 * MiB, result
    assert hashes(dst) == want


async def test_two_front_ends_see_the_same_task_and_each_others_actions(tmp_path):
    ws = Workspace(tmp_path / "ws")
    src, dst = tmp_path / "src", tmp_path / "dst"
    want = tree(src, 8, 4 * MiB)
    a = await connect(ws, client="console")
    b = await connect(ws, client="console")
    try:
        assert a.engine_pid == b.engine_pid
        seen_b = b.subscribe()
        seen_a = a.subscribe()
        await asyncio.sleep(0)    # the subscriptions reach the engine before the task exists
        tid, _ = await a.replicate("files", {"src": f"local:{src}", "dst": f"local:{dst}", "bwlimit": 8 * MiB})
        got: list = []

        async def b_sees(pred) -> None:
            async def look():
                got.extend(await seen_b.wait(timeout=0.1))
                return any(pred(e) for e in got)
            await until(look, timeout=60, what="the event at the other front end")

        await b_sees(lambda e: e.type == "created" and e.task_id == tid)
        await b_sees(lambda e: e.type == "progress" and e.task_id == tid and e.data.bytes_done > 0)
        paused = await b.pause(tid)                       # b acts; a sees it
        assert paused.state in (TaskState.PAUSED, TaskState.RUNNING)
        mine: list = []

        async def a_sees_paused():
            mine.extend(await seen_a.wait(timeout=0.1))
            return any(e.type == "state" and e.task_id == tid and e.data.state == TaskState.PAUSED for e in mine)
        await until(a_sees_paused, timeout=60, what="a sees the pause b asked for")
        await a.resume(tid)
        info = await b.wait_task(tid, timeout=300)
        assert info.state == TaskState.SUCCEEDED, info.error
        assert hashes(dst) == want
        audit = await a.audit_log(limit=20)
        assert {"task.pause", "task.resume"} <= {e.action for e in audit}
        assert all(isinstance(e, api.AuditEntry) for e in audit)
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ a front end that stops reading

def rss_mib(pid: int) -> float:
    """The resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


async def test_a_front_end_that_stops_reading_slows_no_task_and_is_told_to_read_the_task_list_again(
        tmp_path, monkeypatch):
    """A front end subscribes and then reads nothing from its socket while 400 quick tasks run: all
    of them finish meanwhile, the engine's memory stays bounded, and when it reads again its
    events (with the task list read again where it is told to) give it the engine's view."""
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv("FERRY_EVENT_BACKLOG", "64")       # the engine holds 64 events for a client
    other = await connect(ws, client="cli")
    s = socket.socket(socket.AF_UNIX)
    try:
        pid = other.engine_pid
        s.settimeout(60)
        with short_path(ws.root / "engine.sock") as where:
            s.connect(where)
        s.sendall(frame(api.encode(hello("console"))) + frame(api.encode({"op": "subscribe"})))
        assert api.decode(recv_frame(s))["op"] == "hello"
        first = await other.submit("test.flaky", {})
        while (msg := api.decode(recv_frame(s)))["type"] != "created":      # subscribed: it sees the task come
            pass
        assert msg["task_id"] == first and (await other.wait_task(first, timeout=60)).state == TaskState.SUCCEEDED
        before = rss_mib(pid)

        # From here on the front end reads nothing.
        tids = [await other.submit("test.flaky", {}) for _ in range(400)]
        for tid in tids:
            assert (await other.wait_task(tid, timeout=120)).state == TaskState.SUCCEEDED
        grew = rss_mib(pid) - before
        assert grew < 16, f"the engine grew by {grew:.0f} MiB while a front end read nothing"

        # It reads again: created/state events carry the whole task; "resync" says read the task list.
        view: dict[int, api.TaskInfo] = {}
        told = []

        async def caught_up() -> bool:
            while select.select([s], [], [], 0)[0]:
                msg = api.decode(recv_frame(s))
                if msg["type"] in ("created", "state"):
                    info = api.convert(msg["data"], api.TaskInfo)
                    if info.id not in view or info.updated >= view[info.id].updated:
                        view[info.id] = info
                elif msg["type"] in ("resync", "lagged"):
                    told.append(msg["type"])
                    if msg["type"] == "resync":
                        view.clear()
                        view.update((t.id, t) for t in await other.list_tasks(limit=1000))
            engine = {t.id: t.state for t in await other.list_tasks(limit=1000)}
            return {tid: t.state for tid, t in view.items()} == engine

        await until(caught_up, timeout=60, what="the front end's view of the tasks the engine's")
        assert "resync" in told       # it was far behind: more than the engine holds for it
        assert len(view) == 401 and all(t.state == TaskState.SUCCEEDED for t in view.values())
    finally:
        s.close()
        await other.close()


async def test_a_console_that_fell_behind_reads_the_task_list_again_when_told(tmp_path, monkeypatch):
    """The console's task feed (console/feed.py) stops reading its socket (its event loop blocked)
    while another process's 300 tasks run: the engine drops state changes for it and tells it to
    resynchronise; the feed, which polls nothing here, then has every task as the engine has it and
    says in :events that it fell behind."""
    import threading

    from ferry.console.feed import TaskFeed
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv("FERRY_EVENT_BACKLOG", "32")
    c = await connect(ws, client="console")
    feed = TaskFeed(c, lambda: None)
    reader = asyncio.create_task(feed.run_events())      # its events only: no poll of the task list
    done = threading.Event()

    def other_process() -> None:
        async def run() -> None:
            o = await connect(ws, client="cli")
            try:
                for tid in [await o.submit("test.flaky", {}) for _ in range(300)]:
                    assert (await o.wait_task(tid, timeout=120)).state == TaskState.SUCCEEDED
            finally:
                await o.close()
                done.set()
        asyncio.run(run())
    try:
        first = await c.submit("test.flaky", {})
        await until(lambda: first in feed.tasks and feed.tasks[first].state == TaskState.SUCCEEDED, timeout=60,
                    what="the feed following its first task")
        worker = threading.Thread(target=other_process)
        worker.start()
        assert done.wait(timeout=300)            # (blocks this loop: the feed reads nothing meanwhile)
        worker.join()

        async def caught_up() -> bool:
            engine = {t.id: t.state for t in await c.list_tasks(limit=1000)}
            return len(engine) == 301 and {t: i.state for t, i in feed.tasks.items()} == engine
        await until(caught_up, timeout=60, what="the feed's tasks the engine's")
        assert any(e.type == "resync" and "fell behind" in e.text for e in feed.session_events)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await c.close()


# ------------------------------------------------------------------ a console whose engine restarts

def console_of(root: Path):
    """A console attached to the engine service of workspace `root`, as `ferry` opens it: (the
    workspace, its RemoteEngine, the app, a function giving the header's engine text)."""
    from ferry.console.app import FerryApp
    from ferry.console.widgets.header import FerryHeader

    ws = Workspace(root).ensure()
    client = RemoteEngine(ws, client="console", reconnect=True, site=ws.load_config())
    app = FerryApp(client, own_client=True)
    return ws, client, app, lambda: str(app.query_one(FerryHeader).query_one("#engine").render())


async def test_console_says_reconnecting_while_its_engine_is_away_and_carries_on(tmp_path):
    ws, client, app, header = console_of(tmp_path / "ws")
    async with app.run_test(size=(120, 32)) as pilot:
        await until(lambda: client.engine_state == "running" and "running" in header(), pause=pilot.pause,
                    what="the console attached")
        first = client.engine_pid
        lock = os.open(ws.root / "engine.lock", os.O_RDWR)
        try:
            os.kill(first, signal.SIGKILL)
            fcntl.flock(lock, fcntl.LOCK_EX)        # held here: no engine can start for now
            await until(lambda: "reconnecting…" in header(), pause=pilot.pause, what="reconnecting… shown")
            await pilot.pause(1.0)
            assert app.is_running and "reconnecting…" in header()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        await until(lambda: client.engine_state == "running" and "running" in header(), timeout=60,
                    pause=pilot.pause, what="the console attached again")
        assert client.engine_pid != first
        tid = await client.submit("probe", {"host": "lab1", "pings": 2, "size_mib": 1})
        await until(lambda: tid in app.feed.tasks and app.feed.tasks[tid].state.final, timeout=60,
                    pause=pilot.pause, what="the new engine's task in the console")


async def test_a_console_waits_for_an_engine_stopped_on_purpose_instead_of_starting_one(tmp_path):
    ws, client, app, header = console_of(tmp_path / "ws")
    async with app.run_test(size=(120, 32)) as pilot:
        await until(lambda: client.engine_state == "running", pause=pilot.pause, what="the console attached")
        first = client.engine_pid
        r = await asyncio.to_thread(ferry, ws.root, "engine", "stop")
        assert r.code == 0, r.err
        await until(lambda: "reconnecting…" in header(), pause=pilot.pause, what="reconnecting… shown")
        # the stopped engine's process gone (it may take a while on a busy machine), and then ...
        await until(lambda: engine_pid(ws.root) is None, timeout=60, pause=pilot.pause, what="the engine gone")
        await pilot.pause(3.0)       # ... the console's reconnect attempts meanwhile start no engine
        assert engine_pid(ws.root) is None and "reconnecting…" in header()
        r = await asyncio.to_thread(ferry, ws.root, "engine", "start")
        assert r.code == 0 and "engine started" in r.out, r.err
        await until(lambda: client.engine_state == "running" and "running" in header(), timeout=60,
                    pause=pilot.pause, what="the console attached to the engine started by hand")
        assert client.engine_pid not in (None, first)
