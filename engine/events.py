"""The engine's event stream: task created / state / progress / log, for the console and the CLI.

Each reader has a Subscription, a bounded queue that never slows the publisher, and that never
loses an event silently when its reader falls behind:

- progress carries only the newest value, so one pending progress event per task is kept (a
  fast task can never flood a slow reader);
- past `backlog()` pending events, the oldest log lines go first, and the reader is told: a
  "lagged" event at the head of the queue counts them and names their tasks (their logs are in
  the store: `task_log` reads them);
- a queue full of what cannot be dropped (task created / state events, and their progress) is
  emptied and its reader told to resynchronise: one "resync" event, which means "read the task
  list again" (a state event carries the whole task, so the list read then is at least as new as
  every state event dropped). Events published after it follow it as usual.

So memory stays bounded whatever the reader does, and a reader's view of the tasks is right once
it has applied what it got, refetching when told.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

MAX_PENDING = 5000


def backlog() -> int:
    """The most events a subscription holds for its reader (FERRY_EVENT_BACKLOG: the test suite's)."""
    try:
        return max(8, int(os.environ.get("FERRY_EVENT_BACKLOG") or MAX_PENDING))
    except ValueError:
        return MAX_PENDING


@dataclass(frozen=True)
class Event:
    # "created" | "state" | "progress" | "log" | "engine", and from a subscription that fell behind:
    # "lagged" (data: {"logs": N, "tasks": [ids]}, log lines dropped) or "resync" (data:
    # {"dropped": N}: events dropped; read the task list again)
    type: str
    task_id: int | None = None
    data: Any = None           # TaskInfo for created/state, Progress for progress, (level, text) for log
    ts: float = field(default_factory=time.time)


_LAGGED = ("lagged",)
_RESYNC = ("resync",)


class Subscription:
    """A bounded, coalescing queue of events for one reader (see the module's docstring)."""

    def __init__(self, bus: "EventBus", cap: int | None = None) -> None:
        self._bus = bus
        self.cap = cap or backlog()
        self._items: OrderedDict[tuple, Event] = OrderedDict()
        self._logs: deque[tuple] = deque()       # the keys of the pending log lines, oldest first
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self._lost_logs: dict[int | None, int] = {}    # log lines dropped since the last "lagged" went out
        self._lost = 0                                   # events dropped since the last "resync" went out
        self.dropped = 0        # (all time) log lines and events dropped
        self.resyncs = 0        # (all time) times the reader was told to resynchronise

    def _put(self, ev: Event) -> None:
        if ev.type == "progress":
            key: tuple = ("progress", ev.task_id)
            self._items.pop(key, None)  # replace, and move to the end to keep order with state events
        else:
            key = ("event", next(self._seq))
            if ev.type == "log":
                self._logs.append(key)
        self._items[key] = ev
        if len(self._items) > self.cap:
            if self._logs:
                self._drop_log()
            else:
                self._overflow()
        self._ready.set()

    def _drop_log(self) -> None:
        """The oldest pending log line goes; the "lagged" event at the head counts it."""
        old = self._items.pop(self._logs.popleft())
        self.dropped += 1
        self._lost_logs[old.task_id] = self._lost_logs.get(old.task_id, 0) + 1
        if _LAGGED not in self._items:
            self._items[_LAGGED] = Event("lagged")       # its counts are filled in as it goes out
            self._items.move_to_end(_LAGGED, last=False)

    def _overflow(self) -> None:
        """Only events that cannot be dropped one by one are pending: all go, and the reader reads
        the task list again. The newest engine event stays (it is the engine's state)."""
        engine = next((e for e in reversed(self._items.values()) if e.type == "engine"), None)
        n = sum(1 for k in self._items if k not in (_LAGGED, _RESYNC)) - (engine is not None)
        self._lost += n
        self.dropped += n
        self.resyncs += 1
        self._items.clear()
        self._logs.clear()
        self._lost_logs.clear()
        self._items[_RESYNC] = Event("resync")           # its count is filled in as it goes out
        if engine is not None:
            self._items[("event", next(self._seq))] = engine

    def _out(self, key: tuple, ev: Event) -> Event:
        """An event leaving the queue (a lagged or resync event with its counts)."""
        if key == _LAGGED:
            ev = Event("lagged", data={"logs": sum(self._lost_logs.values()),
                                       "tasks": sorted(t for t in self._lost_logs if t is not None)}, ts=ev.ts)
            self._lost_logs.clear()
        elif key == _RESYNC:
            ev = Event("resync", data={"dropped": self._lost}, ts=ev.ts)
            self._lost = 0
        elif self._logs and self._logs[0] == key:
            self._logs.popleft()
        return ev

    def pending(self) -> int:
        return len(self._items)

    def drain(self) -> list[Event]:
        """All pending events, oldest first, without waiting."""
        out = [self._out(k, ev) for k, ev in self._items.items()]
        self._items.clear()
        self._logs.clear()
        self._ready.clear()
        return out

    async def get(self) -> Event:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        key, ev = self._items.popitem(last=False)
        if not self._items:
            self._ready.clear()
        return self._out(key, ev)

    async def wait(self, timeout: float | None = None) -> list[Event]:
        """Wait until something is pending (or timeout), then drain."""
        if not self._items:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        return self.drain()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Event:
        return await self.get()


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, ev: Event) -> None:
        for sub in list(self._subs):
            sub._put(ev)
