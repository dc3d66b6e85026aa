"""The task engine: durable checkpoints, resume after kill -9, pause/resume/cancel, retries, limits, events, audit."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import engine.tasks as tasks_mod
from engine.config import EngineLimits, SiteConfig, lab_config
from engine.errors import PermanentError
from engine.events import Event, EventBus
from engine.store import SCHEMA_VERSION, Store
from engine.taskmodel import Progress, TaskState
from engine.tasks import Engine
from harness.kinds import expected_sha256

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def lab(tmp_path: Path, **limits) -> SiteConfig:
    site = lab_config(tmp_path)
    if limits:
        site = SiteConfig(site.name, site.clusters, site.hosts, site.datastores,
                          EngineLimits(**{**EngineLimits().__dict__, **limits}), site.production, site.theme, None)
    return site


@pytest.fixture
async def engine(tmp_path):
    eng = Engine(Store(tmp_path / "state.db"), lab(tmp_path), adopt=False)
    await eng.start()
    yield eng
    await eng.stop()
    eng.store.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(tasks_mod, "BACKOFF_BASE_S", 0.05)


def checkpoint_of(db: Path, tid: int) -> dict | None:
    import json
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT checkpoint FROM tasks WHERE id=?", (tid,)).fetchone()
    finally:
        con.close()
    return json.loads(row[0]) if row and row[0] else None


CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import harness.kinds
    from pathlib import Path
    from engine.config import lab_config
    from engine.store import Store
    from engine.tasks import Engine

    async def main():
        eng = Engine(Store(Path({db!r})), lab_config(Path({ws!r})))
        await eng.start()
        tid = await eng.submit("test.write", {{"path": {out!r}, "chunks": 60, "chunk_size": 65536, "delay": 0.05}})
        print(tid, flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


async def test_sigkill_mid_task_then_new_engine_resumes_from_checkpoint(tmp_path):
    db, out = tmp_path / "state.db", tmp_path / "out.bin"
    code = CHILD.format(tests=str(TESTS), root=str(ROOT), db=str(db), ws=str(tmp_path), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        tid = int(child.stdout.readline())
        deadline = time.monotonic() + 30
        while (checkpoint_of(db, tid) or {}).get("done", 0) < 20:
            assert time.monotonic() < deadline, "child made no progress"
            await asyncio.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    done_at_kill = checkpoint_of(db, tid)["done"]
    assert 20 <= done_at_kill < 60

    eng = Engine(Store(db), lab(tmp_path), adopt=True)
    await eng.start()
    try:
        info = await eng.wait(tid, timeout=30)
    finally:
        await eng.stop()
        eng.store.close()
    assert info.state == TaskState.SUCCEEDED
    assert info.result["sha256"] == expected_sha256(60, 65536)
    # It continued from the checkpoint, not from scratch, and not past what was durable.
    assert done_at_kill <= info.result["resumed_from"] <= done_at_kill + 1
    assert out.stat().st_size == 60 * 65536


async def test_pause_keeps_checkpoint_and_resume_continues(engine, tmp_path):
    out = tmp_path / "p.bin"
    tid = await engine.submit("test.write", {"path": str(out), "chunks": 40, "chunk_size": 4096, "delay": 0.02})
    while (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) < 5:
        await asyncio.sleep(0.02)
    info = await engine.pause(tid)
    info = await engine.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=5)
    assert info.state == TaskState.PAUSED
    at_pause = checkpoint_of(tmp_path / "state.db", tid)["done"]
    await asyncio.sleep(0.2)
    assert checkpoint_of(tmp_path / "state.db", tid)["done"] == at_pause, "a paused task makes no progress"
    await engine.resume(tid)
    info = await engine.wait(tid, timeout=10)
    assert info.state == TaskState.SUCCEEDED
    assert info.result["resumed_from"] == at_pause
    assert info.result["sha256"] == expected_sha256(40, 4096)


async def test_cancel_running_and_queued(engine, tmp_path):
    a = await engine.submit("test.hold", {"title": "a"})
    await asyncio.sleep(0.1)
    assert (await engine.get(a)).state == TaskState.RUNNING
    await engine.cancel(a)
    info = await engine.wait(a, timeout=5)
    assert info.state == TaskState.CANCELLED and info.finished
    with pytest.raises(PermanentError, match="already cancelled"):
        await engine.resume(a)


async def test_transient_errors_retry_with_backoff_then_succeed(engine):
    tid = await engine.submit("test.flaky", {"failures": 2})
    info = await engine.wait(tid, timeout=10)
    assert info.state == TaskState.SUCCEEDED and info.result == {"attempts": 3}
    assert info.progress.fraction == 1.0, "a task that reported no progress still shows complete when done"
    log = await engine.store.call(engine.store.task_log, tid)
    retries = [e["message"] for e in log if "retrying" in e["message"]]
    assert len(retries) == 2 and "connection lost" in retries[0]


async def test_transient_errors_give_up_after_limit(engine):
    tid = await engine.submit("test.flaky", {"failures": 99})
    info = await engine.wait(tid, timeout=10)
    assert info.state == TaskState.FAILED
    assert "gave up after 4 attempts" in info.error and info.hint


async def test_permanent_error_fails_with_message_and_hint(engine):
    tid = await engine.submit("test.flaky", {"permanent": True})
    info = await engine.wait(tid, timeout=5)
    assert info.state == TaskState.FAILED
    assert info.error == "the disk is full on target:/data"
    assert info.hint == "free space and resume the task"
    # A failed task can be resumed once the cause is fixed (here it fails again the same way).
    await engine.resume(tid)
    assert (await engine.wait(tid, timeout=5)).state == TaskState.FAILED


async def test_per_host_and_global_limits(tmp_path):
    eng = Engine(Store(tmp_path / "state.db"), lab(tmp_path, max_tasks=3, max_tasks_per_host=2))
    await eng.start()
    try:
        on_lab1 = [await eng.submit("test.hold", {"hosts": ["lab1"]}) for _ in range(3)]
        on_lab2 = [await eng.submit("test.hold", {"hosts": ["lab2"]}) for _ in range(2)]
        await asyncio.sleep(0.2)
        states = {t.id: t.state for t in await eng.list()}
        assert [states[i] for i in on_lab1] == [TaskState.RUNNING, TaskState.RUNNING, TaskState.QUEUED]
        assert [states[i] for i in on_lab2] == [TaskState.RUNNING, TaskState.QUEUED]  # global limit 3
        await eng.cancel(on_lab1[0])
        await asyncio.sleep(0.2)
        states = {t.id: t.state for t in await eng.list()}
        assert states[on_lab1[2]] == TaskState.RUNNING  # its host had room again, and it came first
        assert states[on_lab2[1]] == TaskState.QUEUED
    finally:
        await eng.stop()
        eng.store.close()


async def test_control_from_another_process_goes_through_the_owner(tmp_path):
    """A second engine (as the CLI would be) pauses/cancels a task the first one runs."""
    site = lab(tmp_path)
    owner = Engine(Store(tmp_path / "state.db"), site)
    other = Engine(Store(tmp_path / "state.db"), site)
    await owner.start()
    await other.start()
    try:
        tid = await owner.submit("test.hold", {})
        await asyncio.sleep(0.1)
        await other.pause(tid)
        info = await other.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=5)
        assert info.owner == owner.owner
        await other.resume(tid)
        await other.wait(tid, until=frozenset({TaskState.RUNNING}), timeout=5)
        await other.cancel(tid)
        assert (await other.wait(tid, timeout=5)).state == TaskState.CANCELLED
    finally:
        await owner.stop()
        await other.stop()
        owner.store.close()
        other.store.close()


async def test_engine_stop_leaves_task_resumable(tmp_path):
    site = lab(tmp_path)
    out = tmp_path / "s.bin"
    first = Engine(Store(tmp_path / "state.db"), site)
    await first.start()
    tid = await first.submit("test.write", {"path": str(out), "chunks": 30, "chunk_size": 4096, "delay": 0.02})
    while (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) < 3:
        await asyncio.sleep(0.02)
    await first.stop()
    first.store.close()
    info = Store(tmp_path / "state.db").task_row(tid)
    assert info["state"] == "queued" and info["owner"] is None

    second = Engine(Store(tmp_path / "state.db"), site, adopt=True)
    await second.start()
    try:
        done = await second.wait(tid, timeout=10)
    finally:
        await second.stop()
        second.store.close()
    assert done.state == TaskState.SUCCEEDED and done.result["resumed_from"] >= 3
    assert done.result["sha256"] == expected_sha256(30, 4096)


async def test_confirmation_waits_for_the_typed_name(engine):
    tid = await engine.submit("test.confirm", {"name": "web01"})
    info = await engine.wait(tid, until=frozenset({TaskState.WAITING}), timeout=5)
    assert info.waiting["prompt"] == "type web01 to go on"
    with pytest.raises(PermanentError, match="does not match"):
        await engine.confirm(tid, "web02")
    assert (await engine.get(tid)).state == TaskState.WAITING
    await engine.confirm(tid, "web01")
    assert (await engine.wait(tid, timeout=5)).state == TaskState.SUCCEEDED


async def test_progress_events_are_coalesced_and_rate_eta_derived(engine):
    sub = engine.subscribe()
    out = Path(engine.store.path).parent / "c.bin"
    tid = await engine.submit("test.write", {"path": str(out), "chunks": 50, "chunk_size": 1024})
    await engine.wait(tid, timeout=10)
    await asyncio.sleep(0.1)  # the final state event follows the store update
    events = sub.drain()
    progress = [e for e in events if e.type == "progress" and e.task_id == tid]
    assert len(progress) == 1, "a reader that did not keep up sees only the newest progress"
    assert progress[0].data.units_done == 50
    states = [e.data.state for e in events if e.type == "state" and e.task_id == tid]
    assert states[0] == TaskState.RUNNING and states[-1] == TaskState.SUCCEEDED


def test_subscription_keeps_order_and_replaces_progress():
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish(Event("progress", 1, Progress(units_done=1)))
    bus.publish(Event("state", 1, "running"))
    for i in range(1000):
        bus.publish(Event("progress", 1, Progress(units_done=i)))
    bus.publish(Event("progress", 2, Progress(units_done=7)))
    got = sub.drain()
    assert [(e.type, e.task_id) for e in got] == [("state", 1), ("progress", 1), ("progress", 2)]
    assert got[1].data.units_done == 999


async def test_audit_records_who_what_result_without_secrets(engine):
    tid = await engine.submit("test.hold", {"title": "x", "password": "hunter2", "nested": {"api_key": "k"}})
    await engine.cancel(tid)
    with pytest.raises(PermanentError):
        await engine.pause(tid)
    rows = engine.store.audit_rows()
    actions = [(r["action"], r["result"]) for r in reversed(rows)]
    assert actions[0] == ("task.create", "ok")
    assert ("task.cancel", "ok") in actions
    assert any(a == "task.pause" and r.startswith("refused") for a, r in actions)
    create = rows[-1]
    assert create["actor"] and create["target"] == f"task {tid} (test.hold)"
    assert create["params"]["password"] == "<redacted>" and create["params"]["nested"]["api_key"] == "<redacted>"
    assert all("hunter2" not in str(r) for r in rows)


def test_state_db_schema_is_versioned(tmp_path):
    s = Store(tmp_path / "state.db")
    assert s.schema_version == SCHEMA_VERSION
    assert s._q("PRAGMA journal_mode")[0][0] == "wal"
    s.close()
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(PermanentError, match="newer than this Ferry"):
        Store(tmp_path / "state.db")


def test_engine_never_imports_textual():
    code = ("import sys, engine, engine.client, engine.tasks, engine.transport, engine.hostfacts, engine.probe\n"
            "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"engine loaded textual: {r.stdout} {r.stderr}"
    cli = ("import sys, console.cli\n"
           "sys.exit(1 if any(m.startswith('textual') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", cli], cwd=ROOT).returncode == 0, "headless CLI loads textual"
