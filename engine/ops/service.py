"""The engine's side of operations: one Ops per EngineClient (alarms, silences, events, schedules), and
the scheduler loop the engine service runs (`launch` / `stop`).

What a schedule runs is an open string (`run = "daily"`, `run = "backup"`): the first word names a
runner registered here (`register_runner`), or a resolver registered by a later part of the ops layer
(health checklists, backups) recognises it (`register_resolver`). A run that fails, or names nothing
that runs, raises the alarm schedule.failed on schedule:NAME (major); its next good run clears it.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..errors import PermanentError
from ..logs import logger
from ..store import Store, current_user
from . import alarms as _alarms
from . import schedule as _schedule
from .model import AlarmInfo, EventInfo, ScheduleInfo, ScheduleRun, SilenceInfo
from .notify import Notifier

log = logger("ferry.ops")

Runner = Callable[["Ops", str, Any], Awaitable[str | None]]
_RUNNERS: dict[str, Runner] = {}
_RESOLVERS: list[Callable[["Ops", str], Runner | None]] = []


def register_runner(word: str, fn: Runner) -> None:
    """`fn(ops, run, spec)` runs schedules whose `run` starts with `word` ("backup", "backup remote1")."""
    _RUNNERS[word] = fn


def register_resolver(fn: Callable[["Ops", str], Runner | None]) -> None:
    """`fn(ops, run)` gives the runner of a `run` no word names (a health checklist of config.toml), or None."""
    _RESOLVERS.append(fn)


def runner_for(ops: "Ops", run: str) -> Runner | None:
    words = run.split()
    if words and words[0] in _RUNNERS:
        return _RUNNERS[words[0]]
    for resolve in _RESOLVERS:
        found = resolve(ops, run)
        if found is not None:
            return found
    return None


class Ops:
    def __init__(self, store: Store, site: Callable[[], Any], *, clock: _schedule.Clock | None = None,
                 notify_sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.store, self._site = store, site
        self.clock = clock or _schedule.Clock()
        kw = {"sleep": notify_sleep} if notify_sleep else {}
        self.notifier = Notifier(lambda: (self._site().notify, self._site().name), self._notified, **kw)
        self.scheduler: _schedule.Scheduler | None = None
        self.engine: Any = None     # the task engine (EngineClient sets it): runners submit tasks to it

    @property
    def site(self) -> Any:
        return self._site()

    def now(self) -> float:
        return self.clock.now()

    async def _notified(self, alarm: AlarmInfo, kind: str, text: str) -> None:
        await self.store.call(_alarms.event, self.store, kind, text, now=self.now(), alarm=alarm)

    # ------------------------------------------------------------------ alarms (sources call these)

    async def raise_alarm(self, type: str, object: str, severity: str, summary: str, *, details: dict | None = None,
                          source: str = "") -> AlarmInfo:
        """Raise (type, object); a new critical or major alarm (neither silenced nor suppressed) is
        notified in the background."""
        info, notify = await self.store.call(_alarms.raise_alarm, self.store, type, object, severity, summary,
                                             now=self.now(), details=details, source=source)
        if notify:
            self.notifier.send(info)
        return info

    async def resolve(self, type: str, object: str, text: str = "") -> AlarmInfo | None:
        """The condition of (type, object) went away: its open alarm is cleared."""
        return await self.store.call(_alarms.resolve, self.store, type, object, now=self.now(), text=text)

    # ------------------------------------------------------------------ what operators do

    async def alarms(self, all: bool = False) -> list[AlarmInfo]:
        return await self.store.call(_alarms.alarms, self.store, now=self.now(), all=all)

    async def alarm(self, alarm_id: int) -> AlarmInfo:
        return await self.store.call(_alarms.alarm, self.store, alarm_id, now=self.now())

    async def ack(self, alarm_id: int, comment: str = "") -> AlarmInfo:
        return await self.store.call(_alarms.ack, self.store, alarm_id, who=current_user(), comment=comment.strip(),
                                     now=self.now())

    async def clear(self, alarm_id: int, reason: str) -> AlarmInfo:
        return await self.store.call(_alarms.clear, self.store, alarm_id, who=current_user(), reason=reason,
                                     now=self.now())

    async def silence_add(self, matchers: dict[str, str], duration_s: float, reason: str) -> SilenceInfo:
        now = self.now()
        return await self.store.call(_alarms.silence_add, self.store, matchers, expires=now + duration_s,
                                     who=current_user(), reason=reason, now=now)

    async def silence_list(self, all: bool = False) -> list[SilenceInfo]:
        return await self.store.call(_alarms.silences, self.store, now=self.now(), all=all)

    async def silence_remove(self, silence_id: int) -> SilenceInfo:
        return await self.store.call(_alarms.silence_remove, self.store, silence_id, who=current_user(),
                                     now=self.now())

    async def events(self, limit: int = 100, alarm_id: int | None = None) -> list[EventInfo]:
        return await self.store.call(_alarms.events, self.store, limit=limit, alarm_id=alarm_id)

    # ------------------------------------------------------------------ schedules

    async def schedules(self) -> list[ScheduleInfo]:
        running = self.scheduler.running if self.scheduler else (lambda name: False)
        return await self.store.call(_schedule.status, self.store, self.site, self.now(), running)

    async def schedule_runs(self, name: str | None = None, limit: int = 100) -> list[ScheduleRun]:
        return await self.store.call(_schedule.runs, self.store, name, limit)

    async def dispatch(self, spec: Any, slot: float, caught_up: bool) -> str | None:
        """Run one slot of a schedule: its runner's text; a failure (or nothing to run it) raises the
        alarm schedule.failed on schedule:NAME, a success clears it."""
        obj = f"schedule:{spec.name}"
        try:
            runner = runner_for(self, spec.run)
            if runner is None:
                raise PermanentError(f"nothing runs {spec.run!r}",
                                     f"schedules.{spec.name}.run names a health checklist or backup")
            out = await runner(self, spec.run, spec)
        except Exception as e:
            await self.raise_alarm("schedule.failed", obj, "major", f"schedule {spec.name} ({spec.run}) failed: {e}",
                                   details={"run": spec.run, "slot": slot, "caught_up": caught_up}, source="scheduler")
            raise
        await self.resolve("schedule.failed", obj, f"schedule {spec.name} ran")
        return out

    async def _tick(self) -> None:
        await self.store.call(_alarms.sweep, self.store, now=self.now())

    def launch(self, *, reload: Callable[[], Awaitable[Any]] | None = None, max_sleep: float = 60.0) -> None:
        """The scheduler loop, as a task of the running event loop: missed slots caught up, then each
        slot as it comes due (the engine service: started with it, stopped with it)."""
        self.scheduler = _schedule.Scheduler(self.store, lambda: self.site, self.dispatch, clock=self.clock,
                                             max_sleep=max_sleep, reload=reload, on_tick=self._tick)
        self.scheduler.launch()

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.notifier.close()
