"""Waiting in tests on a condition, never on time: poll it until it holds, with a generous deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable


async def until(cond: Callable[[], Any], *, timeout: float = 30.0, what: str = "",
                pause: Callable[[float], Awaitable[Any]] = asyncio.sleep, every: float = 0.02) -> Any:
    """Poll `cond()` (async conditions allowed) until it is true and return its value; `pause`
    lets something else run in between (a Textual pilot's pause, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pause(every)
