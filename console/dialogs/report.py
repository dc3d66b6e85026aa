"""A Markdown report full screen (a migration's assessment report): scrolls with the arrows and the
page keys; esc or q goes back. Links in it are not opened (the report quotes what a source said)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Footer, Markdown, Static

from ferry.engine.textsafe import lines

from ferry.console.dialogs.modals import esc
from ferry.console.keys import bindings
from ferry.console.widgets.framed import FramedScreen


class ReportScreen(FramedScreen):
    BINDINGS = bindings("report")

    DEFAULT_CSS = """
    #report-title { height: 1; padding: 0 1; background: $panel; }
    #report-body { height: 1fr; padding: 0 1; background: $background; scrollbar-size-vertical: 1; }
    """

    def __init__(self, title: str, markdown: str) -> None:
        super().__init__()
        self.title_text = title
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        yield Static(Content.from_markup(f"[b]{esc(self.title_text)}[/b]  [$text-muted]esc: back[/]"),
                     id="report-title")
        with VerticalScroll(id="report-body"):
            yield Markdown(lines(self.markdown), open_links=False, id="report")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#report-body").focus()

    def action_close(self) -> None:
        self.dismiss()
