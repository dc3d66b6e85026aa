"""The scheduler (engine/ops/schedule.py): aliases and cron expressions in the site's time zone, a
simulated month across a DST change (which runs happened), catch-up after a downtime, no overlap,
config.toml's one-line errors, and the engine service running it (`ferry schedules`)."""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from ferry.engine.config import ScheduleSpec, dump_config, lab_document
from ferry.engine.ops import schedule as sched
from ferry.engine.store import Store
from harness.cli import ferry
from harness.waiting import until_sync

BERLIN = ZoneInfo("Europe/Berlin")


def at(*when: int) -> float:
    return datetime(*when, tzinfo=BERLIN).timestamp()


def local(ts: float) -> str:
    return datetime.fromtimestamp(ts, BERLIN).strftime("%m-%d %H:%M%z")


def spec(name: str, at_: str, *, run: str = "work", catch_up: bool = True) -> ScheduleSpec:
    return ScheduleSpec(name, at_, sched.parse_at(at_), run, catch_up)


class MonthOver(Exception):
    pass


class SimClock(sched.Clock):
    """Simulated time: a sleep lets the runs started at this instant finish, then moves time on at once."""

    def __init__(self, start: float, end: float) -> None:
        self.t, self.end = start, end
        self.scheduler: sched.Scheduler | None = None

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if self.scheduler is not None:
            await self.scheduler.settle()
        if self.t + seconds > self.end:
            raise MonthOver
        self.t += seconds


def simulate(store: Store, specs: list[ScheduleSpec], start: float, end: float, ran: list) -> sched.Scheduler:
    """Run the scheduler from `start` to `end` of simulated time; `ran` gets (name, slot, caught_up)."""
    site = SimpleNamespace(timezone="Europe/Berlin", schedules={s.name: s for s in specs})

    async def dispatch(s, slot: float, caught_up: bool) -> str:
        ran.append((s.name, slot, caught_up))
        return f"ran {s.name}"

    clock = SimClock(start, end)
    scheduler = sched.Scheduler(store, lambda: site, dispatch, clock=clock, max_sleep=86400)
    clock.scheduler = scheduler

    async def go() -> None:
        await scheduler.start()
        with pytest.raises(MonthOver):
            await scheduler.run()
        await scheduler.stop()
    asyncio.run(go())
    return scheduler


@pytest.mark.parametrize("text, cron", [
    ("daily 02:00", "0 2 * * *"), ("daily 2:30", "30 2 * * *"), ("hourly :30", "30 * * * *"),
    ("hourly :05", "5 * * * *"), ("weekly mon 08:00", "0 8 * * mon"), ("weekly Sunday 23:59", "59 23 * * sun"),
    ("monthly 1 03:00", "0 3 1 * *"), ("monthly 28 00:15", "15 0 28 * *"), ("*/15 * * * *", "*/15 * * * *"),
    ("@daily", "0 0 * * *"), ("30 2 * * 1-5", "30 2 * * 1-5"),
])
def test_aliases_and_cron_expressions_are_read(text, cron):
    assert sched.parse_at(text) == cron


@pytest.mark.parametrize("text, says", [
    ("daily 25:00", "is not a time HH:MM"), ("hourly 30 past", "hourly takes the minute"),
    ("weekly someday 08:00", "weekly takes a day"), ("monthly 31 03:00", "1 to 28"),
    ("61 * * * *", "not a valid cron expression"), ("every day", "neither an alias nor a cron expression"),
    ("0 0 31 2 *", "never comes due"),
])
def test_bad_expressions_are_refused_saying_why(text, says):
    with pytest.raises(sched.ScheduleError) as e:
        sched.parse_at(text)
    assert says in e.value.message and e.value.hint


@pytest.mark.parametrize("start, end, change, daily_then, hourly_then", [
    # Spring forward (last Sunday of March 2026): 02:00 -> 03:00. 02:30 does not exist that night.
    ((2026, 3, 15), (2026, 4, 14, 23, 59), "03-29", ["03-29 03:00+0200"], 23),
    # Fall back (last Sunday of October 2026): 03:00 -> 02:00. 02:30 happens twice that night.
    ((2026, 10, 10), (2026, 11, 9, 23, 59), "10-25", ["10-25 02:30+0200"], 25),
], ids=["spring-forward", "fall-back"])
def test_a_simulated_month_across_a_dst_change_runs_each_slot_once(tmp_path, start, end, change, daily_then,
                                                                   hourly_then):
    store = Store(tmp_path / "state.db")
    specs = [spec("nightly", "daily 02:30"), spec("halfpast", "hourly :30"), spec("sunday", "weekly sun 02:30"),
             spec("first", "monthly 1 03:00")]
    ran: list = []
    t0 = time.monotonic()
    simulate(store, specs, at(*start), at(*end), ran)
    assert time.monotonic() - t0 < 60           # a month, simulated: no real waiting
    by = collections.defaultdict(list)
    for name, slot, caught_up in ran:
        assert not caught_up
        by[name].append(local(slot))
    days = (datetime(*end) - datetime(*start)).days + 1

    # Daily at 02:30: once a day, every day; on the night of the change once, as cron does it.
    assert len(by["nightly"]) == days
    assert len({s[:5] for s in by["nightly"]}) == days
    assert [s for s in by["nightly"] if s.startswith(change)] == daily_then
    assert all(s[6:11] == "02:30" for s in by["nightly"] if not s.startswith(change))
    # Hourly at :30: every hour that exists (23 or 25 on the day of the change), never twice in one.
    hours = collections.Counter(s[:5] for s in by["halfpast"])
    assert hours[change] == hourly_then
    assert all(n == 24 for d, n in hours.items() if d != change)
    assert len(by["halfpast"]) == len(set(by["halfpast"])) == 24 * days - 24 + hourly_then
    # Weekly on Sundays at 02:30, the day of the change among them; monthly on the 1st at 03:00.
    assert [s for s in by["sunday"] if s.startswith(change)] == daily_then
    assert len(by["sunday"]) == sum(1 for d in range(days) if datetime.fromtimestamp(at(*start) + d * 86400 + 7200,
                                                                                      BERLIN).weekday() == 6)
    assert by["first"] == (["04-01 03:00+0200"] if change == "03-29" else ["11-01 03:00+0100"])
    # Every run is in the store's history, finished and ok.
    runs = sched.runs(store, "nightly", limit=100)
    assert len(runs) == days and all(r.result == "ok: ran nightly" and r.ended for r in runs)
    store.close()


def test_a_slot_missed_while_the_engine_was_down_runs_once_at_start_or_is_recorded_missed(tmp_path):
    path = tmp_path / "state.db"
    specs = [spec("nightly", "daily 02:30"), spec("optional", "daily 02:30", catch_up=False),
             spec("hourly", "hourly :00")]
    ran: list = []
    store = Store(path)
    simulate(store, specs, at(2026, 3, 26), at(2026, 3, 27, 12), ran)
    store.close()
    before = len(ran)
    # The engine is down from the 27th at noon to the 30th at 10:20, over the spring-forward night.
    store = Store(path)             # another process's connection: the anchors come from the store
    simulate(store, specs, at(2026, 3, 30, 10, 20), at(2026, 3, 31, 12), ran)
    after = [(n, local(s), c) for n, s, c in ran[before:]]
    assert after[:2] == [("nightly", "03-30 02:30+0200", True), ("hourly", "03-30 10:00+0200", True)]
    assert [x for x in after[2:] if x[2]] == []          # caught up once each, then live again
    assert ("optional", "03-30 02:30+0200", True) not in after
    assert [x for x in after if x[0] == "optional"] == [("optional", "03-31 02:30+0200", False)]
    nightly = [local(s) for n, s, _ in ran if n == "nightly"]
    assert nightly == ["03-26 02:30+0100", "03-27 02:30+0100", "03-30 02:30+0200", "03-31 02:30+0200"]
    optional = sched.runs(store, "optional")
    assert [(local(r.slot), (r.result or "").split(":")[0]) for r in reversed(optional)] == [
        ("03-26 02:30+0100", "ok"), ("03-27 02:30+0100", "ok"), ("03-30 02:30+0200", "missed"),
        ("03-31 02:30+0200", "ok")]
    caught = sched.runs(store, "nightly")[1]
    assert caught.caught_up and caught.started == at(2026, 3, 30, 10, 20)
    # The hours between were not run one by one: one catch-up for the whole downtime.
    assert [local(s) for n, s, _ in ran if n == "hourly" and "03-28" <= local(s)[:5] <= "03-29"] == []
    store.close()


async def test_a_run_never_overlaps_itself_and_a_stop_records_it_interrupted(tmp_path):
    store = Store(tmp_path / "state.db")
    site = SimpleNamespace(timezone="Europe/Berlin", schedules={"slow": spec("slow", "hourly :00")})
    release = asyncio.Event()
    under_way = []
    most = 0

    async def dispatch(s, slot, caught_up):
        nonlocal most
        under_way.append(slot)
        most = max(most, len(under_way))
        try:
            await release.wait()
        finally:
            under_way.remove(slot)
        return None

    clock = SimClock(at(2026, 5, 4, 9, 30), at(2026, 6, 1))
    scheduler = sched.Scheduler(store, lambda: site, dispatch, clock=clock)
    await scheduler.start()
    for hour in (10, 11, 12):
        clock.t = at(2026, 5, 4, hour, 0, 5)
        await scheduler.tick()
        await asyncio.sleep(0)
    assert scheduler.running("slow") and len(under_way) == 1
    release.set()
    await scheduler.settle()
    release.clear()
    clock.t = at(2026, 5, 4, 13, 0, 5)
    await scheduler.tick()
    await asyncio.sleep(0)
    assert scheduler.running("slow")
    await scheduler.stop()                       # the engine stops during the 13:00 run
    got = [(local(r.slot)[6:11], r.result) for r in reversed(sched.runs(store, "slow"))]
    assert got == [("10:00", "ok"), ("11:00", "skipped: the run due 2026-05-04 10:00 still runs"),
                   ("12:00", "skipped: the run due 2026-05-04 10:00 still runs"),
                   ("13:00", "interrupted: the engine stopped during the run")]
    assert most == 1
    store.close()


def _workspace(tmp_path, extra: str) -> tuple:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "config.toml").write_text(dump_config(lab_document(ws)).replace('name = "lab"\n', 'name = "lab"\n' + extra, 1))
    return ws, ws / "config.toml"


def test_a_bad_schedule_in_config_toml_is_one_line_with_its_file_and_line(tmp_path):
    ws, path = _workspace(tmp_path, 'timezone = "Mars/Olympus"\n')
    text = path.read_text() + '\n[schedules.nightly]\nat = "daily 2:61"\nrun = "backup"\n'
    path.write_text(text)
    line = text.splitlines().index('at = "daily 2:61"') + 1
    tz_line = text.splitlines().index('timezone = "Mars/Olympus"') + 1
    r = ferry(ws, "config", "check")
    assert r.code == 2
    assert r.err.splitlines() == [
        f"{path}:{tz_line}: site.timezone: 'Mars/Olympus' is not a time zone this machine knows "
        '(hint: for example: timezone = "Europe/Berlin")',
        f"{path}:{line}: schedules.nightly.at: daily: '2:61' is not a time HH:MM (00:00 to 23:59) (hint: for example: "
        'daily 02:00, hourly :30, weekly mon 08:00, monthly 1 03:00, or cron "30 2 * * *")']


def test_the_engine_catches_up_a_missed_slot_and_ferry_schedules_shows_it(tmp_path):
    """The engine service runs the schedules: a slot missed while no engine ran is caught up as it
    starts; a run that names nothing that runs fails and raises schedule.failed."""
    ws, path = _workspace(tmp_path, 'timezone = "UTC"\n')
    path.write_text(path.read_text() + '\n[schedules.hourly]\nat = "hourly :00"\nrun = "nothing-here"\n'
                    '\n[schedules.later]\nat = "monthly 1 03:00"\nrun = "backup"\ncatch_up = false\n')
    store = Store(ws / "state.db")         # the last slot it handled: three hours ago
    store.transaction(lambda db: db.execute("INSERT INTO schedules(name, cron, anchor) VALUES(?,?,?)",
                                            ("hourly", "0 * * * * UTC", time.time() - 3 * 3600)))
    store.close()

    def caught_up():
        r = ferry(ws, "schedules", "--json")
        assert r.code == 0, r.err
        got = {s["name"]: s for s in r.json}
        last = got["hourly"]["last"]
        return got if last and last["result"] and last["result"] != "running" else None
    got = until_sync(caught_up, timeout=60, what="the missed slot to be caught up")
    last = got["hourly"]["last"]
    assert last["caught_up"] is True and last["result"].startswith("failed: nothing runs 'nothing-here'")
    assert got["hourly"]["next_run"] > time.time() and got["hourly"]["timezone"] == "UTC"
    assert got["later"]["last"] is None and got["later"]["cron"] == "0 3 1 * *"
    table = ferry(ws, "schedules")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split() == ["NAME", "AT", "RUN", "NEXT", "LAST", "RESULT"]
    assert any(ln.startswith("hourly") and "hourly :00" in ln and "(caught up)" in ln for ln in lines)
    alarms = ferry(ws, "alarms", "--json").json
    assert [(a["type"], a["object"], a["severity"]) for a in alarms] == [("schedule.failed", "schedule:hourly", "major")]
