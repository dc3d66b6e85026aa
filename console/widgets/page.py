"""A page of text that scrolls and is drawn again only where it changed.

The detail panes change with every cursor move. As a Static in a scrolling container, a page
taller or shorter than the last one lays the whole screen out again (and repaints every widget on
it), and even a page of the same size is drawn again from its first line to its last. A Page keeps
its lines: a new page is compared line by line with the one shown, and only the lines that differ
are drawn; its height is its own business (a scrollbar is always there, so one appearing never
changes the width of the text either).
"""

from __future__ import annotations

from textual.content import Content
from textual.geometry import Region, Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.visual import Visual
from textual.widget import Widget


class Page(ScrollView, can_focus=False):
    """Text (Content) shown from its first line, wrapped to the width, scrolled with the mouse wheel."""

    DEFAULT_CSS = """
    Page {
        overflow-y: scroll;
        overflow-x: hidden;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.content = Content("")
        self._lines: list[Strip] = []

    @property
    def text(self) -> str:
        """The page as plain text (what the operator reads)."""
        return self.content.plain

    def update(self, content: Content | str) -> None:
        """Show `content` from its first line; draw only the lines that differ from those shown."""
        if isinstance(content, str):
            content = Content(content)
        same_page = content.plain.split("\n", 1)[0] == self.content.plain.split("\n", 1)[0]
        self.content = content
        self._wrap(keep_scroll=same_page)

    def _wrap(self, *, keep_scroll: bool = True, whole: bool = False) -> None:
        """Lay the text out in lines at the width shown; draw those that changed (whole: every line)."""
        width = self.scrollable_content_region.width
        if width <= 0:
            return
        lines = Visual.to_strips(self, self.content, width, None, self.visual_style, pad=True)
        old, self._lines = self._lines, lines
        size = Size(width, len(lines))
        if size != self.virtual_size:
            # set without the layout a reactive virtual_size asks for: the page's own size changes,
            # its place on the screen does not
            self.set_reactive(Widget.virtual_size, size)
            self._scroll_update(size)
        if not keep_scroll and self.scroll_y:
            self.scroll_to(y=0, animate=False, immediate=True)
            whole = True
        if whole:
            self.refresh()
            return
        top = int(self.scroll_y)
        for y in range(top, min(top + self.size.height, max(len(old), len(lines)))):
            if y >= len(old) or y >= len(lines) or old[y] != lines[y]:
                self.refresh(Region(0, y - top, self.size.width, 1))

    def on_resize(self) -> None:
        self._wrap(whole=True)      # another width: every line again

    def notify_style_update(self) -> None:
        super().notify_style_update()
        if self.is_mounted:
            self._wrap(whole=True)  # a theme changed the colours: every line again

    def render_line(self, y: int) -> Strip:
        index = int(self.scroll_y) + y
        width = self.size.width
        style = self.rich_style
        if 0 <= index < len(self._lines):
            return self._lines[index].crop_extend(0, width, style)
        return Strip.blank(width, style)
