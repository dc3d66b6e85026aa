"""The console's picture of the tasks: engine events plus a slow poll of state.db.

It also keeps the events of this session (task created, state changes, log lines, the engine's
state) for the `:events` view.

Events give live progress of the tasks this process runs (already coalesced per task by the
engine); the poll picks up tasks changed by other Ferry processes. Changes are collected
as a set of dirty task ids and announced at most `max_hz` times a second, and at most
`progress_hz` times when only progress moved (a hundred tasks' bars redrawn ten times a second
would take the console's time from the operator's keys). No textual here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from ferry.engine.events import Event
from ferry.engine.taskmodel import TaskInfo, TaskState

MAX_HZ = 10.0
PROGRESS_HZ = 4.0
POLL_S = 2.0
LIMIT = 500
EVENT_PROGRESS_WINS_S = 5.0   # progress from events beats the (throttled) progress stored in state.db
EVENTS_KEPT = 2000


@dataclass(frozen=True)
class SessionEvent:
    """One event this console received, as the `:events` view lists it."""
    seq: int
    ts: float
    task_id: int | None
    type: str            # created | state | log | engine | lagged | resync
    text: str
    level: str = "info"  # info | warning | error


class TaskFeed:
    def __init__(self, client: Any, on_change: Callable[[], None], *, max_hz: float = MAX_HZ,
                 progress_hz: float = PROGRESS_HZ, poll_s: float = POLL_S, limit: int = LIMIT) -> None:
        self.client = client
        self.on_change = on_change
        self.min_gap = 1.0 / max_hz
        self.progress_gap = 1.0 / min(max_hz, progress_hz)
        self.poll_s = poll_s
        self.limit = limit
        self.tasks: dict[int, TaskInfo] = {}
        self.engine_state: str = client.engine_state
        self.log_events: dict[int, int] = {}         # task id -> log events seen (to know when to re-read the log)
        self.recent_logs: deque[tuple[int, str, str]] = deque(maxlen=50)
        self.session_events: deque[SessionEvent] = deque(maxlen=EVENTS_KEPT)
        self._seq = itertools.count(1)
        self._dirty: set[int] = set()
        self._removed: set[int] = set()
        self._progress_ts: dict[int, float] = {}
        self._last_flush = 0.0
        self._announced = False
        self.loaded = asyncio.Event()
        self.error: str | None = None           # the last failed poll of state.db
        self.stale_since: float | None = None
        self.resync_due = False                 # the engine dropped events for us: read the task list again

    # ------------------------------------------------------------------ what the view takes

    def take_changes(self) -> tuple[set[int], set[int]]:
        """Task ids changed and removed since the last call."""
        dirty, removed = self._dirty, self._removed
        self._dirty, self._removed = set(), set()
        self._announced = False
        return dirty - removed - {0}, removed

    # ------------------------------------------------------------------ loops (run in workers)

    async def run_events(self) -> None:
        sub = self.client.subscribe()
        try:
            while True:
                events = await sub.wait(timeout=1.0)
                if not events:
                    continue
                urgent = self.apply_events(events)
                if self.resync_due:
                    self.resync_due = False
                    try:
                        await self.refresh()
                    except asyncio.CancelledError:
                        raise
                    except Exception:       # the poll reads it again and says why
                        pass
                since = time.monotonic() - self._last_flush
                gap = (self.min_gap if urgent else self.progress_gap) - since
                if gap > 0:
                    # Batch: whatever arrives in the rest of this frame goes out with it (the
                    # subscription keeps only the newest progress of each task meanwhile).
                    await asyncio.sleep(gap)
                    self.apply_events(sub.drain())
                self._flush()
        finally:
            sub.close()

    async def run_poll(self) -> None:
        delay = self.poll_s
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:   # keep polling: show the task list as stale instead of stopping
                self.error = str(e)
                self.stale_since = self.stale_since or time.time()
                delay = min(30.0, delay * 2)
                self._dirty.add(0)
                self._flush()
            else:
                if self.error:
                    self._dirty.add(0)
                self.error, self.stale_since, delay = None, None, self.poll_s
            await asyncio.sleep(delay)

    async def refresh(self) -> None:
        """Read the task list from state.db and merge it (non-overlapping: the poll loop awaits it)."""
        infos = await self.client.list_tasks(limit=self.limit)
        self.merge(infos)
        self.loaded.set()
        self._flush()

    # ------------------------------------------------------------------ merging

    def _note(self, ev: Event, text: str, level: str = "info") -> None:
        self.session_events.append(SessionEvent(next(self._seq), ev.ts, ev.task_id, ev.type, text, level))

    def apply_events(self, events: list[Event]) -> bool:
        """Merge events; True when one was more than progress (a task came, changed state or logged)."""
        urgent = False
        for ev in events:
            urgent |= ev.type != "progress"
            if ev.type in ("created", "state") and isinstance(ev.data, TaskInfo):
                info = ev.data
                if ev.type == "created":
                    self._note(ev, f"{info.title or info.kind} ({info.kind}): {info.state.symbol} {info.state}")
                else:
                    self._note(ev, f"{info.state.symbol} {info.state}" + (f": {info.error}" if info.error else ""),
                               "error" if info.state in (TaskState.FAILED, TaskState.INTERRUPTED) else "info")
                self._put(ev.data)
            elif ev.type == "progress" and ev.task_id in self.tasks:
                self.tasks[ev.task_id] = replace(self.tasks[ev.task_id], progress=ev.data)
                self._progress_ts[ev.task_id] = time.monotonic()
                self._dirty.add(ev.task_id)
            elif ev.type == "log" and ev.task_id is not None:
                level, text = ev.data
                self._note(ev, str(text), str(level))
                self.log_events[ev.task_id] = self.log_events.get(ev.task_id, 0) + 1
                self.recent_logs.append((ev.task_id, level, text))
                self._dirty.add(ev.task_id)
            elif ev.type == "engine":
                self.engine_state = str(ev.data)
                self._note(ev, f"engine {ev.data}", "info" if ev.data == "running" else "warning")
                self._dirty.add(0)
            elif ev.type == "lagged" and isinstance(ev.data, dict):
                # this console fell behind: log lines the engine dropped for it (each task's log has them)
                tasks = [t for t in ev.data.get("tasks") or [] if isinstance(t, int)]
                self._note(ev, f"{ev.data.get('logs', 0)} log line(s) not shown here (this console fell behind); "
                               f"the task logs have them: tasks {', '.join(map(str, tasks)) or '-'}", "warning")
                for t in tasks:             # their logs are read again
                    self.log_events[t] = self.log_events.get(t, 0) + 1
                    self._dirty.add(t)
            elif ev.type == "resync":
                # fell so far behind that state changes were dropped: the task list is read again
                self._note(ev, "this console fell behind the engine: the task list is read again", "warning")
                self.resync_due = True
        return urgent

    def _put(self, info: TaskInfo) -> None:
        old = self.tasks.get(info.id)
        if old is not None and info.updated < old.updated:
            return       # an older picture of the task than the one we have
        if (old is not None and info.state == TaskState.RUNNING and old.state == TaskState.RUNNING
                and time.monotonic() - self._progress_ts.get(info.id, -1e9) < EVENT_PROGRESS_WINS_S):
            info = replace(info, progress=old.progress)
        if info != old:
            self.tasks[info.id] = info
            self._dirty.add(info.id)
        self._removed.discard(info.id)

    def merge(self, infos: list[TaskInfo]) -> None:
        seen = set()
        for info in infos:
            seen.add(info.id)
            self._put(info)
        for tid in list(self.tasks):
            if tid not in seen:
                del self.tasks[tid]
                self._progress_ts.pop(tid, None)
                self._removed.add(tid)
        self.engine_state = self.client.engine_state

    def _flush(self) -> None:
        if (self._dirty or self._removed) and not self._announced:
            self._announced = True
            self._last_flush = time.monotonic()
            self.on_change()
