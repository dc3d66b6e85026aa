"""When things run: the site's schedules (config.toml's [schedules.NAME]), run by the engine.

A schedule's `at` is a cron expression (croniter reads it) or an alias: `daily 02:00`, `hourly :30`,
`weekly mon 08:00`, `monthly 1 03:00`. Times are wall-clock times of the site's time zone
(`[site] timezone`, else this machine's), and DST is handled as cron does it:
- a time the clock skips (02:30 on a spring-forward night) runs once, when the clock jumps (03:00),
  unless the schedule's hour is `*`: `hourly :30` runs in the hours that exist (23 that day);
- a time the clock passes twice (02:30 on a fall-back night) runs once, at the first pass, unless the
  schedule's hour is `*`: `hourly :30` runs in both of those hours (25 that day), an hour apart.

Each schedule keeps its anchor in the store: the last slot handled (run, skipped or missed). Slots
after it are due. At the engine's start, slots missed while it was down run once (catch_up = true,
the default) or are recorded as missed. A slot that comes due while the schedule's previous run still
runs is skipped and recorded so: runs never overlap with themselves. Claiming a slot is one store
transaction, so two processes never run the same slot. The clock is injectable (`Clock`): tests drive
a simulated month in no time.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Awaitable, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import FerryError
from ..logs import logger
from .model import ScheduleInfo, ScheduleRun

log = logger("ferry.schedule")

RUNS_KEPT = 200          # the history of runs kept per schedule
_FOLD_WINDOW = timedelta(hours=3)    # wider than any DST shift: candidates this close may be out of order


class ScheduleError(ValueError):
    """An `at` that is no schedule: the message, and a hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


# ------------------------------------------------------------------------------ expressions

_DAYS = {"mon": "mon", "monday": "mon", "tue": "tue", "tuesday": "tue", "wed": "wed", "wednesday": "wed",
         "thu": "thu", "thursday": "thu", "fri": "fri", "friday": "fri", "sat": "sat", "saturday": "sat",
         "sun": "sun", "sunday": "sun"}
_AT_SIGNS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * sun",
             "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
_ALIAS_HINT = "for example: daily 02:00, hourly :30, weekly mon 08:00, monthly 1 03:00, or cron \"30 2 * * *\""
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def _hhmm(text: str, alias: str) -> tuple[int, int]:
    m = _HHMM.match(text)
    if not m:
        raise ScheduleError(f"{alias}: {text!r} is not a time HH:MM (00:00 to 23:59)", _ALIAS_HINT)
    return int(m.group(1)), int(m.group(2))


def parse_at(text: str) -> str:
    """The cron expression an `at` means (aliases expanded, the expression checked); ScheduleError."""
    words = text.split()
    if not words:
        raise ScheduleError("is empty", _ALIAS_HINT)
    head = words[0].lower()
    if head == "hourly":
        m = re.match(r"^:?([0-5]?\d)$", words[1]) if len(words) == 2 else None
        if not m:
            raise ScheduleError(f"{text!r}: hourly takes the minute past each hour, as :MM", "for example: hourly :30")
        cron = f"{int(m.group(1))} * * * *"
    elif head == "daily":
        if len(words) != 2:
            raise ScheduleError(f"{text!r}: daily takes a time, HH:MM", "for example: daily 02:00")
        h, mi = _hhmm(words[1], "daily")
        cron = f"{mi} {h} * * *"
    elif head == "weekly":
        if len(words) != 3 or words[1].lower() not in _DAYS:
            raise ScheduleError(f"{text!r}: weekly takes a day (mon..sun) and a time HH:MM",
                                "for example: weekly mon 08:00")
        h, mi = _hhmm(words[2], "weekly")
        cron = f"{mi} {h} * * {_DAYS[words[1].lower()]}"
    elif head == "monthly":
        if len(words) != 3 or not words[1].isdigit() or not 1 <= int(words[1]) <= 28:
            raise ScheduleError(f"{text!r}: monthly takes a day of the month (1 to 28: every month has it) and "
                                "a time HH:MM", "for example: monthly 1 03:00")
        h, mi = _hhmm(words[2], "monthly")
        cron = f"{mi} {h} {int(words[1])} * *"
    elif head in _AT_SIGNS and len(words) == 1:
        cron = _AT_SIGNS[head]
    elif len(words) == 5:
        cron = " ".join(words)
    else:
        raise ScheduleError(f"{text!r} is neither an alias nor a cron expression of 5 fields "
                            "(minute hour day-of-month month day-of-week)", _ALIAS_HINT)
    from croniter import croniter
    try:
        ok = croniter.is_valid(cron)
    except Exception:      # noqa: BLE001 - croniter's own errors vary by version
        ok = False
    if not ok:
        raise ScheduleError(f"{text!r} is not a valid cron expression",
                            "5 fields: minute hour day-of-month month day-of-week, e.g. \"30 2 * * *\"")
    try:
        next_after(cron, ZoneInfo("UTC"), time.time())
    except Exception:      # noqa: BLE001 - e.g. "0 0 31 2 *": croniter finds no such date
        raise ScheduleError(f"{text!r} never comes due", "check the day and month fields") from None
    return cron


def zone(name: str | None) -> tzinfo:
    """The site's time zone: `name` (IANA, e.g. Europe/Berlin), else this machine's (TZ, /etc/localtime)."""
    if name:
        return ZoneInfo(name)
    return local_zone()


def zone_name(name: str | None) -> str:
    return name or str(getattr(local_zone(), "key", None) or "local")


def local_zone() -> tzinfo:
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz:
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in target:
            return ZoneInfo(target.split("/zoneinfo/", 1)[1])
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return ZoneInfo("UTC")


def zone_problem(name: str) -> str | None:
    """Why `name` is no time zone (for config.toml), or None."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"{name!r} is not a time zone this machine knows"
    return None


def _hour_is_wildcard(cron: str) -> bool:
    return cron.split()[1].startswith("*")


def _instants(naive: datetime, tz: tzinfo, both_folds: bool) -> list[float]:
    """The instants a wall-clock time of `tz` names. In a DST gap: the moment the clock jumps (none for
    a job whose hour is `*`: its runs go on in the hours that exist). In a fold: the first, or both
    when `both_folds` (the hour is `*`)."""
    e0 = naive.replace(tzinfo=tz, fold=0).timestamp()
    e1 = naive.replace(tzinfo=tz, fold=1).timestamp()
    if e0 == e1:
        return [e0]
    if datetime.fromtimestamp(e0, tz).replace(tzinfo=None) != naive:     # the clock skips this time
        if both_folds:      # an hourly job: that hour does not exist, and its run neither
            return []
        lo, hi = min(e0, e1), max(e0, e1)
        off = datetime.fromtimestamp(lo, tz).utcoffset()
        while hi - lo > 1:      # the moment the offset changes
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, tz).utcoffset() == off:
                lo = mid
            else:
                hi = mid
        return [float(hi)]
    return sorted((e0, e1)) if both_folds else [min(e0, e1)]


def next_after(cron: str, tz: tzinfo, t: float) -> float:
    """The first instant after `t` at which the cron expression (wall-clock times of `tz`) comes due."""
    from croniter import croniter
    wild = _hour_is_wildcard(cron)
    start = datetime.fromtimestamp(t, tz).replace(tzinfo=None, fold=0)
    it = croniter(cron, start - _FOLD_WINDOW)
    best: float | None = None
    best_naive = start
    while True:
        n = it.get_next(datetime)
        if best is not None and n > best_naive + _FOLD_WINDOW:
            return best
        for e in _instants(n, tz, wild):
            if e > t and (best is None or e < best):
                best, best_naive = e, n


def last_at_or_before(cron: str, tz: tzinfo, t: float) -> float | None:
    """The last instant at or before `t` at which the expression came due (None: not within a year...)."""
    from croniter import croniter
    wild = _hour_is_wildcard(cron)
    start = datetime.fromtimestamp(t, tz).replace(tzinfo=None, fold=0)
    it = croniter(cron, start + _FOLD_WINDOW)
    best: float | None = None
    best_naive = start
    for _ in range(100000):
        n = it.get_prev(datetime)
        if best is not None and n < best_naive - _FOLD_WINDOW:
            return best
        for e in _instants(n, tz, wild):
            if e <= t and (best is None or e > best):
                best, best_naive = e, n
    return best


# ------------------------------------------------------------------------------ the clock

class Clock:
    """Time as the scheduler sees it: `now()` (epoch seconds) and `sleep(seconds)`. Tests give their own."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# ------------------------------------------------------------------------------ the store's side

def _sync(db: sqlite3.Connection, name: str, key: str, now: float) -> sqlite3.Row:
    """The schedule's row; a new schedule, or one whose expression or zone changed, counts from now."""
    row = db.execute("SELECT * FROM schedules WHERE name=?", (name,)).fetchone()
    if row is None or row["cron"] != key:
        db.execute("INSERT INTO schedules(name, cron, anchor) VALUES(?,?,?) ON CONFLICT(name) DO UPDATE SET "
                   "cron=excluded.cron, anchor=excluded.anchor", (name, key, now))
        row = db.execute("SELECT * FROM schedules WHERE name=?", (name,)).fetchone()
    return row


def _add_run(db: sqlite3.Connection, name: str, slot: float, started: float | None, ended: float | None,
             result: str | None, caught_up: bool) -> int:
    cur = db.execute("INSERT INTO schedule_runs(schedule, slot, started, ended, result, caught_up) VALUES(?,?,?,?,?,?)",
                     (name, slot, started, ended, result, int(caught_up)))
    db.execute("DELETE FROM schedule_runs WHERE schedule=? AND id < (SELECT id FROM schedule_runs WHERE schedule=? "
               "ORDER BY id DESC LIMIT 1 OFFSET ?)", (name, name, RUNS_KEPT - 1))
    return int(cur.lastrowid)


def _run(r: sqlite3.Row | None) -> ScheduleRun | None:
    if r is None:
        return None
    return ScheduleRun(id=r["id"], schedule=r["schedule"], slot=r["slot"], started=r["started"], ended=r["ended"],
                       result=r["result"], caught_up=bool(r["caught_up"]))


def runs(store, name: str | None = None, limit: int = 100) -> list[ScheduleRun]:
    """The newest runs (of one schedule), newest first."""
    def read(db: sqlite3.Connection) -> list[ScheduleRun]:
        sql = "SELECT * FROM schedule_runs" + (" WHERE schedule=?" if name else "") + " ORDER BY id DESC LIMIT ?"
        return [_run(r) for r in db.execute(sql, ((name,) if name else ()) + (limit,))]
    return store.read(read)


@dataclass(frozen=True)
class Claim:
    run_id: int | None          # a run to start; None: nothing to run (claimed elsewhere, or skipped)
    skipped: str | None = None


def claim(store, name: str, key: str, slot: float, now: float, *, caught_up: bool = False,
          missed: bool = False, tz: tzinfo | None = None) -> Claim:
    """Take the slot `slot` of the schedule, in one transaction: a run starts (its id), or the slot is
    recorded as skipped (the previous run still runs) or missed (missed=True). Nothing when the slot
    was handled already (by another process)."""
    def tx(db: sqlite3.Connection) -> Claim:
        row = _sync(db, name, key, now)
        if row["anchor"] >= slot:
            return Claim(None)
        db.execute("UPDATE schedules SET anchor=? WHERE name=?", (slot, name))
        if missed:
            _add_run(db, name, slot, None, None, "missed: the engine was down (catch_up = false)", False)
            return Claim(None, "missed")
        if row["running"] is not None:
            prev = db.execute("SELECT slot FROM schedule_runs WHERE id=?", (row["running"],)).fetchone()
            why = "skipped: the run due " + (_stamp(prev["slot"], tz) if prev else "before") + " still runs"
            _add_run(db, name, slot, None, None, why, caught_up)
            return Claim(None, why)
        run_id = _add_run(db, name, slot, now, None, None, caught_up)
        db.execute("UPDATE schedules SET running=? WHERE name=?", (run_id, name))
        return Claim(run_id)
    return store.transaction(tx)


def finish(store, name: str, run_id: int, result: str, now: float) -> None:
    def tx(db: sqlite3.Connection) -> None:
        db.execute("UPDATE schedule_runs SET ended=?, result=? WHERE id=?", (now, result, run_id))
        db.execute("UPDATE schedules SET running=NULL WHERE name=? AND running=?", (name, run_id))
    store.transaction(tx)


def interrupted(store, now: float) -> int:
    """Runs a stopped or dead engine left unfinished, ended as interrupted (at the engine's start)."""
    def tx(db: sqlite3.Connection) -> int:
        n = db.execute("UPDATE schedule_runs SET ended=?, result='interrupted: the engine stopped during the run' "
                       "WHERE ended IS NULL AND started IS NOT NULL", (now,)).rowcount
        db.execute("UPDATE schedules SET running=NULL")
        return n
    return store.transaction(tx)


def _stamp(ts: float, tz: tzinfo | None = None) -> str:
    """A slot as the site's clock shows it."""
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------------ the scheduler

Dispatch = Callable[[object, float, bool], Awaitable[str | None]]


class Scheduler:
    """Runs the site's schedules: `await start()` once (catch-up), then `await run()` until cancelled.
    `dispatch(spec, slot, caught_up)` does a run's work: its text is the run's result (raising
    FerryError fails the run)."""

    def __init__(self, store, site: Callable[[], object], dispatch: Dispatch, *, clock: Clock | None = None,
                 max_sleep: float = 60.0, reload: Callable[[], Awaitable[object]] | None = None,
                 on_tick: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store, self._site, self.dispatch = store, site, dispatch
        self._on_tick = on_tick
        self.clock = clock or Clock()
        self.max_sleep = max_sleep
        self._reload = reload
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop: asyncio.Task | None = None

    # what the site says, now
    def _specs(self) -> tuple[tzinfo, str, dict]:
        site = self._site()
        tzname = getattr(site, "timezone", None)
        tz = zone(tzname)
        return tz, zone_name(tzname), dict(getattr(site, "schedules", {}) or {})

    @staticmethod
    def _key(spec, tzname: str) -> str:
        return f"{spec.cron} {tzname}"

    async def start(self) -> None:
        """At the engine's start: runs a dead engine left are ended as interrupted, and each schedule's
        slots missed while it was down run once now (catch_up) or are recorded as missed."""
        now = self.clock.now()
        n = await self.store.call(interrupted, self.store, now)
        if n:
            log.warning("%d scheduled run(s) were under way when the engine stopped: recorded as interrupted", n)
        await self._due(now, startup=True)

    async def tick(self) -> float:
        """Start what is due now; the time of the next slot of any schedule."""
        now = self.clock.now()
        return await self._due(now, startup=False)

    async def _due(self, now: float, *, startup: bool) -> float:
        tz, tzname, specs = self._specs()
        wake = now + self.max_sleep
        for name, spec in specs.items():
            key = self._key(spec, tzname)
            row = await self.store.call(self.store.transaction, lambda db, n=name, k=key: dict(_sync(db, n, k, now)))
            nxt = next_after(spec.cron, tz, row["anchor"])
            if nxt <= now:
                slot = last_at_or_before(spec.cron, tz, now) or nxt
                if startup and not spec.catch_up:
                    await self.store.call(claim, self.store, name, key, slot, now, missed=True, tz=tz)
                    log.info("schedule %s: missed %s while the engine was down (catch_up = false)", name,
                             _stamp(slot, tz))
                else:
                    if startup:
                        log.info("schedule %s: catching up the run due %s, missed while the engine was down",
                                 name, _stamp(slot, tz))
                    await self._fire(spec, key, slot, now, caught_up=startup, tz=tz)
                nxt = next_after(spec.cron, tz, max(slot, now))
            wake = min(wake, nxt)
        return wake

    async def _fire(self, spec, key: str, slot: float, now: float, *, caught_up: bool, tz: tzinfo) -> None:
        got = await self.store.call(claim, self.store, spec.name, key, slot, now, caught_up=caught_up, tz=tz)
        if got.skipped:
            log.warning("schedule %s: %s", spec.name, got.skipped)
        if got.run_id is None:
            return
        task = asyncio.create_task(self._run(spec, got.run_id, slot, caught_up), name=f"schedule {spec.name}")
        self._tasks[spec.name] = task
        task.add_done_callback(lambda t, n=spec.name: self._tasks.pop(n, None) if self._tasks.get(n) is t else None)

    async def _run(self, spec, run_id: int, slot: float, caught_up: bool) -> None:
        try:
            out = await self.dispatch(spec, slot, caught_up)
            result = "ok" + (f": {out}" if out else "")
        except asyncio.CancelledError:
            await self.store.call(finish, self.store, spec.name, run_id,
                                  "interrupted: the engine stopped during the run", self.clock.now())
            raise
        except FerryError as e:
            result = f"failed: {e}"
        except Exception as e:      # noqa: BLE001 - a run's bug fails that run, not the scheduler
            log.exception("schedule %s: run %d", spec.name, run_id)
            result = f"failed: {e}"
        if result.startswith("failed"):
            log.warning("schedule %s: %s", spec.name, result)
        await self.store.call(finish, self.store, spec.name, run_id, result, self.clock.now())

    async def run(self) -> None:
        """Fire schedules as they come due, until cancelled (config.toml re-read between slots)."""
        while True:
            if self._reload is not None:
                try:
                    await self._reload()
                except FerryError as e:
                    log.warning("config.toml: %s; the schedules stay as they were", e)
            try:
                wake = await self.tick()
                if self._on_tick is not None:
                    await self._on_tick()
            except FerryError as e:         # a locked store, say: tried again a moment later
                log.warning("scheduler: %s", e)
                wake = self.clock.now() + min(self.max_sleep, 5.0)
            await self.clock.sleep(max(0.0, min(wake - self.clock.now(), self.max_sleep)))

    async def settle(self) -> None:
        """Wait until no run is under way (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    def running(self, name: str) -> bool:
        return name in self._tasks

    def launch(self) -> None:
        """start() then run(), as a task of the event loop (the engine service)."""
        async def go() -> None:
            await self.start()
            await self.run()
        self._loop = asyncio.create_task(go(), name="scheduler")

    async def stop(self) -> None:
        """Stop the loop; runs under way stop and are recorded as interrupted."""
        tasks = ([self._loop] if self._loop else []) + list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None


def status(store, site, now: float, running: Callable[[str], bool] = lambda name: False) -> list[ScheduleInfo]:
    """Each schedule of the site with its next run and its last run."""
    tzname = getattr(site, "timezone", None)
    tz, shown = zone(tzname), zone_name(tzname)

    def read(db: sqlite3.Connection) -> dict:
        rows = {r["name"]: dict(r) for r in db.execute("SELECT * FROM schedules")}
        last = {}
        for name in rows:
            r = db.execute("SELECT * FROM schedule_runs WHERE schedule=? ORDER BY id DESC LIMIT 1", (name,)).fetchone()
            last[name] = _run(r)
        return {"rows": rows, "last": last}
    got = store.read(read)
    out = []
    for name, spec in (getattr(site, "schedules", {}) or {}).items():
        row = got["rows"].get(name)
        counts_from = row["anchor"] if row and row["cron"] == f"{spec.cron} {shown}" else now
        out.append(ScheduleInfo(name=name, at=spec.at, cron=spec.cron, run=spec.run, catch_up=spec.catch_up,
                                timezone=shown, next_run=next_after(spec.cron, tz, max(counts_from, now)),
                                running=running(name) or bool(row and row["running"]),
                                last=got["last"].get(name) if row else None))
    return out


__all__ = ["Clock", "Scheduler", "ScheduleError", "parse_at", "next_after", "last_at_or_before", "zone", "status",
           "runs", "claim", "finish"]
