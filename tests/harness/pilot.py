"""Helpers for Textual Pilot tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from textual.widgets import Static


async def until(pilot, cond: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Let the app run until `cond()` is true (async conditions allowed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pilot.pause(0.05)


def text_of(app, selector: str) -> str:
    visual = app.query_one(selector, Static).render()
    return getattr(visual, "plain", str(visual))
