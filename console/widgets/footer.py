"""The footer: the keys that apply here, drawn as one line.

Textual's Footer is a row of a dozen widgets, composed anew whenever any widget calls
refresh_bindings (the views do on every cursor move): mounted, styled and laid out, then the whole
screen repainted, tens of milliseconds at the size of a big site. This footer is one widget of one
line: when the keys or their states change it draws its line again, and nothing else on the screen
moves. A key is dimmed where its action does not apply; a click on a key presses it.
"""

from __future__ import annotations

from typing import NamedTuple

from textual import events
from textual.content import Content, Span
from textual.screen import Screen
from textual.style import Style
from textual.widget import Widget

DIM = Style(dim=True)


class FooterItem(NamedTuple):
    key: str            # the key as Textual names it (what a click presses)
    display: str        # the key as shown
    description: str
    action: str
    enabled: bool


class FerryFooter(Widget, can_focus=False):
    """One line of keys; see the module's docstring."""

    ALLOW_SELECT = False
    COMPONENT_CLASSES = {"footer--key", "footer--description", "footer--palette"}
    DEFAULT_CSS = """
    FerryFooter {
        dock: bottom;
        height: 1;
        color: $footer-foreground;
        background: $footer-background;
        .footer--key {
            color: $footer-key-foreground;
            background: $footer-key-background;
            text-style: bold;
        }
        .footer--description {
            color: $footer-description-foreground;
            background: $footer-description-background;
        }
        .footer--palette {
            color: $foreground 20%;
        }
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.items: tuple[FooterItem, ...] = ()
        self.palette: FooterItem | None = None
        self._spots: list[tuple[int, int, FooterItem]] = []     # cells of each key on the line

    def on_mount(self) -> None:
        # immediate: the keys are drawn in the same frame as the cursor move that changed them
        self.screen.bindings_updated_signal.subscribe(self, self.bindings_changed, immediate=True)
        self.call_after_refresh(self._update_keys)

    def bindings_changed(self, screen: Screen) -> None:
        if not self.is_attached or screen is not self.screen:
            return
        self._update_keys()

    def _update_keys(self) -> None:
        if not self.is_attached:
            return
        app = self.app
        first: dict[str, FooterItem] = {}
        active = self.screen.active_bindings
        for _node, binding, enabled, _tip in active.values():
            if binding.show and binding.action not in first:
                first[binding.action] = FooterItem(binding.key, app.get_key_display(binding), binding.description,
                                                   binding.action, bool(enabled))
        palette = None
        if app.ENABLE_COMMAND_PALETTE and app.COMMAND_PALETTE_BINDING in active:
            _node, binding, enabled, _tip = active[app.COMMAND_PALETTE_BINDING]
            palette = FooterItem(binding.key, app.get_key_display(binding), binding.description, binding.action,
                                 bool(enabled))
            first.pop(binding.action, None)
        items = tuple(first.values())
        if (items, palette) != (self.items, self.palette):
            self.items, self.palette = items, palette
            self.refresh()          # one line, the same size: drawn again, nothing laid out

    def render(self) -> Content:
        key_style = self.get_visual_style("footer--key")
        text_style = self.get_visual_style("footer--description")
        palette_style = self.get_visual_style("footer--palette")
        width = self.size.width
        tail = None
        if self.palette is not None:
            tail = f"▏{self.palette.display} {self.palette.description} "
        room = width - (len(tail) + 1 if tail else 0)
        parts: list[str] = []
        spans: list[Span] = []
        spots: list[tuple[int, int, FooterItem]] = []
        at = 0
        for item in self.items:
            piece = f"{item.display} {item.description}" if item.description else item.display
            if at + len(piece) > room:
                break
            keys, words = (key_style, text_style) if item.enabled else (key_style + DIM, text_style + DIM)
            spans.append(Span(at, at + len(item.display), keys))
            spans.append(Span(at + len(item.display), at + len(piece), words))
            spots.append((at, at + len(piece), item))
            parts.append(piece + " ")
            at += len(piece) + 1
        line = "".join(parts)
        if tail is not None and self.palette is not None:
            gap = max(1, width - len(line) - len(tail))
            start = len(line) + gap
            spans.append(Span(start, start + 1, palette_style))
            spans.append(Span(start + 1, start + 1 + len(self.palette.display), key_style))
            spans.append(Span(start + 1 + len(self.palette.display), start + len(tail) - 1, text_style))
            spots.append((start + 1, start + len(tail) - 1, self.palette))
            line = line + " " * gap + tail
        self._spots = spots
        return Content(line, spans)

    def item_at(self, x: int) -> FooterItem | None:
        return next((item for start, end, item in self._spots if start <= x < end), None)

    def on_mouse_down(self, event: events.MouseDown) -> None:
        item = self.item_at(event.x)
        if item is None:
            return
        if item.enabled:
            self.app.simulate_key(item.key)
        else:
            self.app.bell()

