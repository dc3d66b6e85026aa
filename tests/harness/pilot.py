"""Helpers for Textual Pilot tests."""

from __future__ import annotations

from typing import Any, Callable

from textual.widgets import Static

from .waiting import until as wait_until


async def until(pilot, cond: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Let the app run until `cond()` is true (async conditions allowed)."""
    return await wait_until(cond, timeout=timeout, what=what, pause=pilot.pause, every=0.05)


def text_of(app, selector: str) -> str:
    widget = app.query_one(selector)
    if not isinstance(widget, Static):
        return widget.text          # a Page (console/widgets/page.py): its text as shown
    visual = widget.render()
    return getattr(visual, "plain", str(visual))
