"""Repainting without laying the screen out again.

Static.update lays the whole screen out again by default, and a layout repaints every widget on
it: tens of milliseconds at the size of a big site, on every key that moves a cursor. A detail
pane, a status line or the header keeps its size most of the time; `update_static` asks for a
layout only when the size may change.
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static


def update_static(static: Static, content: Any) -> None:
    """Static.update with a layout only when the widget's size may change: its width comes from its
    content, or its height does and the new content is taller or shorter than the last."""
    static.update(content, layout=False)
    if not static.display:
        return                      # hidden: showing it again lays it out
    styles = static.styles
    width = static.size.width
    if styles.width is not None and styles.width.is_auto or not width:
        static.refresh(layout=True)
        return
    if styles.height is not None and not styles.height.is_auto:
        return                      # fixed (or fractional) height: the content does not size it
    height = static._render().get_height(styles, width)
    if getattr(static, "_ferry_height", None) != (width, height):
        static._ferry_height = (width, height)      # type: ignore[attr-defined]
        static.refresh(layout=True)
