"""The engine's event stream: task created / state / progress / log, for the console and the CLI.

Progress events carry only the newest value, so a subscriber keeps at most one pending
progress event per task: a fast task can never flood a slow reader.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_PENDING = 5000


@dataclass(frozen=True)
class Event:
    type: str                  # "created" | "state" | "progress" | "log" | "engine"
    task_id: int | None = None
    data: Any = None           # TaskInfo for created/state, Progress for progress, (level, text) for log
    ts: float = field(default_factory=time.time)


class Subscription:
    """A coalescing queue of events for one reader."""

    def __init__(self, bus: "EventBus") -> None:
        self._bus = bus
        self._items: OrderedDict[tuple, Event] = OrderedDict()
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self.dropped = 0

    def _put(self, ev: Event) -> None:
        if ev.type == "progress":
            key: tuple = ("progress", ev.task_id)
            self._items.pop(key, None)  # replace, and move to the end to keep order with state events
        else:
            key = ("event", next(self._seq))
        self._items[key] = ev
        if len(self._items) > MAX_PENDING:
            # Drop the oldest log line first; state changes matter more than chatter.
            for k, old in self._items.items():
                if old.type == "log":
                    del self._items[k]
                    break
            else:
                self._items.popitem(last=False)
            self.dropped += 1
        self._ready.set()

    def pending(self) -> int:
        return len(self._items)

    def drain(self) -> list[Event]:
        """All pending events, oldest first, without waiting."""
        out = list(self._items.values())
        self._items.clear()
        self._ready.clear()
        return out

    async def get(self) -> Event:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        _, ev = self._items.popitem(last=False)
        if not self._items:
            self._ready.clear()
        return ev

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
