"""Waiting in tests on a condition, never on time: poll it until it holds, with a generous deadline."""

from __future__ import annotations

import asyncio
import subprocess
import threading
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


def until_sync(cond: Callable[[], Any], *, timeout: float = 30.0, what: str = "", every: float = 0.02) -> Any:
    """`until` for a test without an event loop: poll `cond()` until it is true and return its value.
    A condition may assert as well (that the child process it watches still runs: see `running`),
    to fail at once rather than at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(every)
    return value


def running(job: subprocess.Popen | threading.Thread, outcome: Any = None) -> bool:
    """For a condition: true while `job` (a child process, or a thread whose `outcome` it fills)
    runs; once it has ended, an AssertionError showing its output or outcome."""
    if isinstance(job, threading.Thread):
        assert job.is_alive(), f"{job.name} ended: {outcome}"
    else:
        assert job.poll() is None, job.communicate()
    return True
