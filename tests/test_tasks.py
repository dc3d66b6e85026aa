"""The task engine: durable checkpoints, resume after kill -9, pause/resume/cancel, retries, limits, events, audit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import ferry.engine.tasks as tasks_mod
from ferry.engine import fmt
from ferry.engine.config import EngineLimits, SiteConfig, lab_config
from ferry.engine.errors import PermanentError
from ferry.engine.events import Event, EventBus
from ferry.engine.store import SCHEMA_VERSION, Store, current_user
from ferry.engine.taskmodel import Progress, TaskState
from ferry.engine.tasks import Backoff, Engine, TaskContext, TaskKind, TaskRunsElsewhere, register
from harness.cli import ferry
from harness.kinds import expected_sha256
from harness.waiting import until

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
    eng = Engine(Store(tmp_path / "state.db"), lab(tmp_path), adopt=False, backoff=Backoff(base=0.05))
    await eng.start()
    yield eng
    await eng.stop()
    eng.store.close()


@contextlib.asynccontextmanager
async def engines(tmp_path: Path, count: int = 2):
    """`count` started engines on one state.db, as separate Ferry processes would have; stopped after."""
    site = lab(tmp_path)
    engs = [Engine(Store(tmp_path / "state.db"), site) for _ in range(count)]
    for e in engs:
        await e.start()
    try:
        yield engs
    finally:
        for e in engs:
            await e.stop()
            e.store.close()


async def running(eng: Engine, *tids: int) -> None:
    for tid in tids:
        await eng.wait(tid, until=frozenset({TaskState.RUNNING}), timeout=30)


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
    from ferry.engine.config import lab_config
    from ferry.engine.store import Store
    from ferry.engine.tasks import Engine

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
        await until(lambda: (checkpoint_of(db, tid) or {}).get("done", 0) >= 20, what="the child's progress")
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
    await until(lambda: (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) >= 5, what="5 chunks")
    info = await engine.pause(tid)
    info = await engine.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=30)
    assert info.state == TaskState.PAUSED
    # Its run ends once the paused state is written: nothing of it runs on.
    await until(lambda: tid not in engine._running, timeout=10, what="the paused task's run to end")
    at_pause = checkpoint_of(tmp_path / "state.db", tid)["done"]
    await engine.resume(tid)
    info = await engine.wait(tid, timeout=30)
    assert info.state == TaskState.SUCCEEDED
    assert info.result["resumed_from"] == at_pause, "a paused task made no progress"
    assert info.result["sha256"] == expected_sha256(40, 4096)


async def test_cancel_running_and_queued(tmp_path):
    eng = Engine(Store(tmp_path / "state.db"), lab(tmp_path, max_tasks=1))
    await eng.start()
    try:
        a = await eng.submit("test.hold", {"title": "a"})
        b = await eng.submit("test.write", {"path": str(tmp_path / "b.bin"), "chunks": 4, "chunk_size": 4096})
        await running(eng, a)
        assert (await eng.get(b)).state == TaskState.QUEUED     # one task at a time
        await eng.cancel(b)
        info = await eng.wait(b, timeout=30)
        assert info.state == TaskState.CANCELLED and info.finished
        await eng.cancel(a)
        info = await eng.wait(a, timeout=30)
        assert info.state == TaskState.CANCELLED and info.finished
        with pytest.raises(PermanentError, match="already cancelled"):
            await eng.resume(a)
        # The room a left is not given to the cancelled b: it never ran and wrote nothing.
        c = await eng.submit("test.write", {"path": str(tmp_path / "c.bin"), "chunks": 2, "chunk_size": 4096})
        assert (await eng.wait(c, timeout=30)).state == TaskState.SUCCEEDED
        b_info = await eng.get(b)
        assert b_info.state == TaskState.CANCELLED and b_info.started is None and b_info.attempts == 0
        assert not (tmp_path / "b.bin").exists()
    finally:
        await eng.stop()
        eng.store.close()


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


def test_backoff_schedule_doubles_up_to_the_cap_and_jitter_stays_in_bounds():
    b = Backoff(base=1.0, cap=60.0, jitter=0.2)
    assert [b.delay(n, 0.0) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert [b.delay(n, 1.0) for n in range(1, 4)] == pytest.approx([0.8, 1.6, 3.2])
    rng = random.Random(7)
    delays = [(n, b.delay(n, rng.random())) for n in range(1, 12) for _ in range(50)]
    for n, d in delays:
        nominal = min(60.0, 2.0 ** (n - 1))
        assert 0.8 * nominal <= d <= nominal, (n, d)
    assert len({round(d, 6) for n, d in delays if n == 11}) > 10, "retries at the cap are spread out too"


async def test_retries_wait_out_the_schedule(tmp_path):
    waited: list[float] = []

    async def sleep(seconds: float) -> None:   # the engine's clock: records the wait, takes none
        waited.append(seconds)

    class Half(random.Random):
        def random(self) -> float:
            return 0.5
    eng = Engine(Store(tmp_path / "state.db"), lab(tmp_path), backoff=Backoff(base=1.0, cap=3.0, jitter=0.2),
                 sleep=sleep, rng=Half())
    await eng.start()
    try:
        tid = await eng.submit("test.flaky", {"failures": 3})
        info = await eng.wait(tid, timeout=30)
    finally:
        await eng.stop()
        eng.store.close()
    assert info.state == TaskState.SUCCEEDED and info.result == {"attempts": 4}
    assert waited == pytest.approx([0.9, 1.8, 2.7])   # 1, 2, 4 capped at 3; each 10% shorter (u = 0.5)


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
        await running(eng, on_lab1[0], on_lab1[1], on_lab2[0])
        states = {t.id: t.state for t in await eng.list()}
        assert [states[i] for i in on_lab1] == [TaskState.RUNNING, TaskState.RUNNING, TaskState.QUEUED]
        assert [states[i] for i in on_lab2] == [TaskState.RUNNING, TaskState.QUEUED]  # global limit 3
        await eng.cancel(on_lab1[0])
        await running(eng, on_lab1[2])    # its host had room again, and it came first
        await eng.wait(on_lab1[0], timeout=30)
        states = {t.id: t.state for t in await eng.list()}
        assert states[on_lab2[1]] == TaskState.QUEUED
    finally:
        await eng.stop()
        eng.store.close()


async def test_control_from_another_process_goes_through_the_owner(tmp_path):
    """A second engine (as the CLI would be) pauses/cancels a task the first one runs."""
    async with engines(tmp_path) as (owner, other):
        tid = await owner.submit("test.hold", {})
        await running(owner, tid)
        await other.pause(tid)
        info = await other.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=30)
        assert info.owner == owner.owner
        await other.resume(tid)
        await other.wait(tid, until=frozenset({TaskState.RUNNING}), timeout=30)
        await other.cancel(tid)
        assert (await other.wait(tid, timeout=30)).state == TaskState.CANCELLED
        log = [e["message"] for e in await owner.store.call(owner.store.task_log, tid)]
        me = f"{current_user()} (pid "
        assert any(m.startswith("paused by " + me) for m in log), log
        assert any(m.startswith("resumed by " + me) for m in log), log
        assert any(m.startswith("cancelled by " + me) for m in log), log


async def test_a_job_run_by_another_process_is_named_not_started_again_and_taken_over_if_it_stops(tmp_path):
    params = {"path": str(tmp_path / "job.bin"), "chunks": 80, "chunk_size": 4096, "delay": 0.02}
    async with engines(tmp_path) as (owner, other):
        tid = await owner.submit("test.write", params)
        await running(owner, tid)
        for attempt in (other.submit_or_resume("test.write", params),
                        other.submit_or_resume("test.write", params, restart=True),   # not someone else's run
                        other.submit("test.write", params)):
            with pytest.raises(TaskRunsElsewhere) as e:
                await attempt
            assert e.value.task_id == tid and f"pid {os.getpid()} (" in e.value.message
            assert f"ferry task show {tid}" in e.value.hint
        with pytest.raises(PermanentError, match=f"task {tid} .* already does this job"):
            await owner.submit("test.write", params)
        other.watch(tid)
        await until(lambda: (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) >= 5, what="5 chunks")
        await owner.stop()       # its process goes away: the follower carries the job on
        info = await other.wait(tid, timeout=60)
    assert info.state == TaskState.SUCCEEDED and info.owner == other.owner
    assert info.result["resumed_from"] >= 5 and info.result["sha256"] == expected_sha256(80, 4096)
    s = Store(tmp_path / "state.db")
    try:
        assert [r["id"] for r in s.task_rows()] == [tid], "one job, one task"
    finally:
        s.close()


async def test_an_engine_whose_task_was_taken_over_never_writes_its_state_again(tmp_path, monkeypatch):
    """An engine that looked dead (here: heartbeats older than STALE_AFTER_S, as a frozen process
    leaves them) and comes back finds its task taken over: it leaves it alone."""
    async with engines(tmp_path) as (slow, taker):
        tid = await slow.submit("test.write", {"path": str(tmp_path / "t.bin"), "chunks": 8, "chunk_size": 4096,
                                               "delay": 0.4})
        await until(lambda: (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) >= 1, what="a chunk")
        monkeypatch.setattr(tasks_mod, "STALE_AFTER_S", 0.1)    # between two chunks, `slow` looks dead
        await until(taker.adopt_orphans, what="the takeover")
        # `slow` finds out at its next checkpoint, and must not mark the task failed (nor anything).
        await until(lambda: tid not in slow._running, what="the old engine to let go")
        monkeypatch.setattr(tasks_mod, "STALE_AFTER_S", 30.0)
        info = await taker.wait(tid, timeout=60)
        log = [e["message"] for e in await taker.store.call(taker.store.task_log, tid)]
    assert info.state == TaskState.SUCCEEDED and info.owner == taker.owner
    assert info.result["sha256"] == expected_sha256(8, 4096)
    assert not [m for m in log if m.startswith("failed")], log


async def test_engine_stop_leaves_task_resumable(tmp_path):
    site = lab(tmp_path)
    out = tmp_path / "s.bin"
    first = Engine(Store(tmp_path / "state.db"), site)
    await first.start()
    tid = await first.submit("test.write", {"path": str(out), "chunks": 30, "chunk_size": 4096, "delay": 0.02})
    await until(lambda: (checkpoint_of(tmp_path / "state.db", tid) or {}).get("done", 0) >= 3, what="3 chunks")
    await first.stop()
    first.store.close()
    info = Store(tmp_path / "state.db").task_row(tid)
    assert info["state"] == "interrupted" and info["owner"] is None

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
    sub, watcher = engine.subscribe(), engine.subscribe()
    out = Path(engine.store.path).parent / "c.bin"
    tid = await engine.submit("test.write", {"path": str(out), "chunks": 50, "chunk_size": 1024})
    # `watcher` reads as events come, until the final state event; `sub` is left unread till then.
    deadline = time.monotonic() + 30
    while not any(e.type == "state" and e.task_id == tid and e.data.state == TaskState.SUCCEEDED
                  for e in await watcher.wait(timeout=1)):
        assert time.monotonic() < deadline, "no final state event"
    events = sub.drain()
    progress = [e for e in events if e.type == "progress" and e.task_id == tid]
    assert len(progress) == 1, "a reader that did not keep up sees only the newest progress"
    assert progress[0].data.units_done == 50
    states = [e.data.state for e in events if e.type == "state" and e.task_id == tid]
    assert states[0] == TaskState.RUNNING and states[-1] == TaskState.SUCCEEDED


KiB = 1024


@register
class Recount(TaskKind):
    """Moves `total` bytes in steps of `step`, each at least `step_s` long. Every run first counts
    again, at once, what its checkpoint says is done (as an export that re-reads what it wrote),
    and keeps the same total."""

    name = "test.recount"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        total, step, step_s = ctx.params["total"], ctx.params["step"], ctx.params["step_s"]
        done = (ctx.checkpoint or {}).get("done", 0)
        ctx.progress(bytes_done=0, bytes_total=total, item="checking what is there")
        for seen in range(0, done + 1, step):
            ctx.progress(bytes_done=seen)
        while done < total:
            await asyncio.sleep(step_s)        # the work: one step per step_s at the most
            done += step
            await ctx.save_checkpoint({"done": done})
            ctx.progress(bytes_done=done, item="copying")
        return {"done": done}


@register
class Steps(TaskKind):
    """Works through a few steps that move no bytes (as a VM start does)."""

    name = "test.steps"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        for i in range(ctx.params["steps"]):
            ctx.progress(units_done=i, units_total=ctx.params["steps"], item=f"step {i}")
            await asyncio.sleep(ctx.params["step_s"])
        return {}


class Recorder:
    """Every progress event of one task, read as they come."""

    def __init__(self, eng: Engine, tid: int) -> None:
        self.sub, self.tid, self.seen = eng.subscribe(), tid, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for ev in self.sub:
            if ev.type == "progress" and ev.task_id == self.tid:
                self.seen.append(ev.data)

    def close(self) -> list[Progress]:
        self.task.cancel()
        self.sub.close()
        return self.seen


async def test_a_task_that_moves_no_bytes_shows_no_rate_nor_eta(engine):
    tid = await engine.submit("test.steps", {"steps": 6, "step_s": 0.25})
    rec = Recorder(engine, tid)
    info = await engine.wait(tid, timeout=30)
    seen = rec.close()
    assert info.state == TaskState.SUCCEEDED and seen
    assert all(p.rate is None and p.eta is None for p in seen), [(p.rate, p.eta) for p in seen]
    assert info.progress.rate is None and "/s" not in fmt.progress_line(info.progress)


async def test_resume_never_moves_progress_back_nor_counts_catching_up_as_speed(engine):
    step, step_s, total = 64 * KiB, 0.02, 120 * 64 * KiB
    top = step / step_s * 1.1          # the fastest this kind can go, with a margin for the clock
    tid = await engine.submit("test.recount", {"total": total, "step": step, "step_s": step_s})
    rec = Recorder(engine, tid)
    await until(lambda: any(p.rate for p in rec.seen), what="a measured rate")
    await engine.pause(tid)
    paused = await engine.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=30)
    before = rec.close()
    at_pause = paused.progress
    assert at_pause.rate is None and at_pause.eta is None, "a paused task shows no rate or ETA"
    assert 0 < at_pause.bytes_done < total and at_pause.bytes_total == total
    assert all(p.rate is None or p.rate <= top for p in before)

    rec = Recorder(engine, tid)
    await engine.resume(tid)
    done = await engine.wait(tid, timeout=60)
    after = rec.close()
    assert done.state == TaskState.SUCCEEDED and after
    assert [p.bytes_done for p in after if p.bytes_done < at_pause.bytes_done] == [], "progress went back"
    assert {p.bytes_total for p in after} == {total}, "the total changed"
    assert max((p.rate or 0) for p in after) <= top, "counting again what was done is not speed"
    log = [e["message"] for e in await engine.store.call(engine.store.task_log, tid)]
    assert f"paused by {current_user()}; it keeps its checkpoint" in log and f"resumed by {current_user()}" in log


async def test_a_paused_task_shows_paused_without_rate_or_eta_everywhere(tmp_path):
    from ferry.console.app import FerryApp
    from ferry.engine.client import EngineClient
    from ferry.engine.workspace import Workspace
    from harness.pilot import text_of, until as app_until
    from textual.widgets.data_table import RowDoesNotExist

    client = EngineClient(Workspace(tmp_path), lab(tmp_path), adopt=False)
    await client.start()
    try:
        tid = await client.submit("test.recount", {"total": 400 * 64 * KiB, "step": 64 * KiB, "step_s": 0.02})
        rec = Recorder(client.engine, tid)
        await until(lambda: any(p.rate for p in rec.seen), what="a measured rate")
        rec.close()
        await client.pause(tid)
        await client.engine.wait(tid, until=frozenset({TaskState.PAUSED}), timeout=30)
        row = client.store.task_row(tid)
        assert row["progress"]["rate"] is None and row["progress"]["eta"] is None

        # The CLI runs its own event loop: in a thread beside this test's.
        listing = await asyncio.to_thread(ferry, tmp_path, "tasks")
        line = next(ln for ln in listing.out.splitlines() if ln.startswith(f"{tid} "))
        assert "⏸ paused" in line and "/s" not in line and " - " in line
        shown = (await asyncio.to_thread(ferry, tmp_path, "task", "show", str(tid))).out
        progress = next(ln for ln in shown.splitlines() if ln.strip().startswith("progress"))
        assert "paused" in progress and "/s" not in progress and "ETA" not in progress, progress
        assert f"paused by {current_user()}; it keeps its checkpoint" in shown

        app = FerryApp(client, clock=lambda: 0.0)
        async with app.run_test(size=(120, 32)) as pilot:
            await pilot.press("2")
            table = app.query_one("#task-table")

            def cell(column: str) -> str:
                try:
                    value = table.get_cell(str(tid), column)
                except RowDoesNotExist:
                    return ""
                return getattr(value, "plain", str(value)).strip()
            await app_until(pilot, lambda: "paused" in cell("state"), what="the paused row")
            assert (cell("rate"), cell("eta")) == ("-", "-")
            app.tasks_view.select_task(tid)
            await app_until(pilot, lambda: f"#{tid}" in text_of(app, "#task-detail"), what="the detail")
            detail = text_of(app, "#task-detail")
            assert "paused" in detail and "/s" not in detail and "ETA" not in detail, detail
    finally:
        await client.close()


def test_progress_line_shows_rate_and_eta_only_while_running():
    p = Progress(bytes_done=3 << 30, bytes_total=8 << 30, rate=85 << 20, eta=61, item="disk0")
    assert fmt.progress_line(p, 10) == "████░░░░░░   37.5%  3.0 GiB/8.0 GiB  85.0 MiB/s  ETA 1m01s  disk0"
    # A row written while it ran (by an older Ferry, say) still shows at rest once paused or done.
    assert fmt.progress_line(p, 10, state=TaskState.PAUSED) == "████░░░░░░   37.5%  3.0 GiB/8.0 GiB  paused  disk0"
    assert "/s" not in fmt.progress_line(p, 10, state=TaskState.WAITING)
    assert fmt.progress_line(Progress(units_done=1, units_total=3, item="starting QEMU"), 10) == \
        "███░░░░░░░   33.3%  1/3  starting QEMU"


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


def test_a_subscription_that_falls_behind_drops_log_lines_first_and_says_how_many():
    bus = EventBus()
    sub = bus.subscribe()
    rounds = sub.cap // 2       # state changes alone half the cap; with their log lines, twice it
    states = []
    for i in range(rounds):
        tid = i % 7
        bus.publish(Event("state", tid, ("running", i)))
        states.append((tid, ("running", i)))
        for j in range(3):
            bus.publish(Event("log", tid, ("info", f"line {i}.{j}")))
        bus.publish(Event("progress", tid, Progress(units_done=i)))
        assert sub.pending() <= sub.cap
    got = sub.drain()
    assert [(e.task_id, e.data) for e in got if e.type == "state"] == states      # every one, in order
    lagged, logs = got[0], [e for e in got if e.type == "log"]
    assert lagged.type == "lagged" and [e.type for e in got].count("lagged") == 1
    assert lagged.data["logs"] + len(logs) == 3 * rounds and lagged.data["logs"] > rounds
    assert lagged.data["tasks"] == list(range(7))
    assert logs[-1].data == ("info", f"line {rounds - 1}.2")        # the newest lines are the ones kept
    assert {e.task_id: e.data.units_done for e in got if e.type == "progress"} == \
        {tid: max(i for i in range(rounds) if i % 7 == tid) for tid in range(7)}     # each task's newest
    bus.publish(Event("log", 1, ("info", "after")))
    assert [(e.type, e.data) for e in sub.drain()] == [("log", ("info", "after"))]     # told once


async def test_a_subscription_far_behind_loses_no_state_change_silently_and_its_reader_resyncs():
    """Far more state changes than the cap, read slowly: the reader is told to read the task list
    again, and the task list it reads then plus the events after make its view the engine's."""
    bus = EventBus()
    sub = bus.subscribe()
    engine: dict[int, tuple[str, int]] = {}      # the engine's task list: id -> (state, updated)
    view: dict[int, tuple[str, int]] = {}
    delivered = told_dropped = 0
    engine_said = []

    def read(events: list[Event]) -> None:
        nonlocal view, delivered, told_dropped
        for e in events:
            if e.type == "state":
                delivered += 1
                if e.data[1] >= view.get(e.task_id, ("", -1))[1]:
                    view[e.task_id] = e.data
            elif e.type == "resync":
                told_dropped += e.data["dropped"]
                view = dict(engine)         # what `list_tasks` answers now
            elif e.type == "engine":
                engine_said.append(e.data)

    published = 0
    for n in range(3 * sub.cap):
        tid = n % 40
        engine[tid] = (random.choice(["queued", "running", "paused", "succeeded"]), n)
        bus.publish(Event("state", tid, engine[tid]))
        published += 1
        if n == 100:
            bus.publish(Event("engine", data="draining"))
        assert sub.pending() <= sub.cap
        if n % 10 == 0:                      # a reader at a tenth of the pace
            read([await sub.get()])
    read(sub.drain())
    assert sub.resyncs >= 1 and view == engine and engine_said == ["draining"]
    assert delivered + told_dropped == published       # each state change went out, or was said lost
    assert sub.pending() == 0


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


@register
class Secret(TaskKind):
    """Needs a password to run (as a migration that logs in to a source might)."""

    name = "test.secret"

    def dedup_key(self, params: dict[str, Any]) -> str:
        return params["name"]

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        if ctx.params.get("hold"):
            await asyncio.Event().wait()
        return {"password_sha256": hashlib.sha256(ctx.params["password"].encode()).hexdigest(),
                "key_sha256": hashlib.sha256(ctx.params["nested"]["api_key"].encode()).hexdigest()}


def stored_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


async def test_a_secret_parameter_is_used_by_the_task_but_never_stored(engine, tmp_path):
    params = {"name": "s1", "password": "hunter2-secret", "nested": {"api_key": "k-9f8e7d"}}
    tid = await engine.submit("test.secret", params)
    info = await engine.wait(tid, timeout=30)
    assert info.state == TaskState.SUCCEEDED
    assert info.result == {"password_sha256": hashlib.sha256(b"hunter2-secret").hexdigest(),
                           "key_sha256": hashlib.sha256(b"k-9f8e7d").hexdigest()}
    assert info.params["password"] == "<redacted>" and info.params["nested"]["api_key"] == "<redacted>"
    create = [r for r in engine.store.audit_rows() if r["action"] == "task.create"][0]
    assert create["params"]["password"] == "<redacted>"
    raw = stored_bytes(tmp_path / "state.db")
    assert b"hunter2-secret" not in raw and b"k-9f8e7d" not in raw, "a secret reached state.db"
    assert tid not in engine._secret_params, "the secret is forgotten once the task is done"


async def test_a_task_whose_secret_went_with_its_process_asks_for_it_again(tmp_path):
    site = lab(tmp_path)
    params = {"name": "s2", "password": "hunter2-secret", "nested": {"api_key": "k-9f8e7d"}, "hold": True}
    first = Engine(Store(tmp_path / "state.db"), site)
    await first.start()
    tid = await first.submit("test.secret", params)
    await running(first, tid)
    await first.stop()            # the process that knew the secret is gone; the task waits, unowned
    first.store.close()
    second = Engine(Store(tmp_path / "state.db"), site, adopt=True)
    await second.start()
    try:
        info = await second.wait(tid, timeout=30)
        assert info.state == TaskState.FAILED
        assert info.error == f"task {tid} needs its nested.api_key, password again, which Ferry never stores"
        assert "start the job again with the same command" in info.hint
        # The same command again passes the secrets to this process: the task resumes and runs.
        again, resumed = await second.submit_or_resume("test.secret", {**params, "hold": False})
        assert (again, resumed) == (tid, True)
        info = await second.wait(tid, timeout=30)
        assert info.state == TaskState.SUCCEEDED
        assert info.result["password_sha256"] == hashlib.sha256(b"hunter2-secret").hexdigest()
    finally:
        await second.stop()
        second.store.close()
    assert b"hunter2-secret" not in stored_bytes(tmp_path / "state.db")


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

