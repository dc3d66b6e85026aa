"""A task's whole log, full screen and scrollable; it follows new lines while the cursor is at the end.

`y` copies the log (OSC 52), `e` copies the task's error; esc or q goes back.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import Footer, RichLog, Static

from ferry.engine.textsafe import line as safe

from ferry.console.feed import TaskFeed
from ferry.console.keys import bindings
from ferry.console.widgets.framed import FramedScreen
from ferry.console.dialogs.modals import esc
from ferry.console.severity import state_markup
from ferry.console.views.tasks import error_text
from ferry.console.theming import rich_style

LOG_LIMIT = 10000
POLL_S = 1.0


def entry_text(entry: Any, variables: dict[str, str]) -> Text:
    level = entry.level
    style = rich_style(variables, {"warning": "sev-warn", "error": "sev-crit"}.get(level, "foreground"))
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.ts))
    return Text(f"{stamp} {level[:5]:<5} {safe(entry.message)}", style=style)


class TaskLogScreen(FramedScreen):
    BINDINGS = bindings("log")

    def __init__(self, client: Any, feed: TaskFeed, task_id: int) -> None:
        super().__init__()
        self.client = client
        self.feed = feed
        self.task_id = task_id
        self.entries: list = []
        self._seen: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="log-title")
        yield RichLog(id="task-log", wrap=True, markup=False, auto_scroll=True, max_lines=LOG_LIMIT)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.render_title()
        self.query_one(RichLog).focus()
        self.load()
        self.set_interval(POLL_S, self._poll)

    def render_title(self) -> None:
        info = self.feed.tasks.get(self.task_id)
        head = (f"[b]log of task #{info.id} {esc(info.title)}[/b]  {state_markup(info.state)}"
                if info else f"[b]log of task #{self.task_id}[/b]")
        count = f"  [$text-muted]{len(self.entries)} line{'s' if len(self.entries) != 1 else ''}[/]"
        error = (f"\n[$error]✖ {esc(info.error)}[/]" + (f"  [$text-muted]hint: {esc(info.hint)}[/]" if info.hint else "")
                 if info and info.error else "")
        self.query_one("#log-title", Static).update(Content.from_markup(head + count + error))

    def _poll(self) -> None:
        """New lines come as events (or with a change of state): read the log again only then."""
        info = self.feed.tasks.get(self.task_id)
        seen = (self.feed.log_events.get(self.task_id, 0), info.state if info else None)
        if seen != self._seen:
            self.load()

    def load(self) -> None:
        info = self.feed.tasks.get(self.task_id)
        self._seen = (self.feed.log_events.get(self.task_id, 0), info.state if info else None)
        self.run_worker(partial(self._load), group="task-log-screen", exclusive=True, exit_on_error=False)

    async def _load(self) -> None:
        entries = await self.client.task_log(self.task_id, limit=LOG_LIMIT)
        log = self.query_one(RichLog)
        variables = self.app.theme_variables
        if entries[: len(self.entries)] == self.entries:
            new = entries[len(self.entries):]
        else:
            log.clear()
            new = entries
        for entry in new:
            log.write(entry_text(entry, variables))
        self.entries = entries
        self.render_title()

    def text(self) -> str:
        return "\n".join(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.ts))} {e.level} {e.message}"
                         for e in self.entries)

    def action_close(self) -> None:
        self.dismiss()

    def action_scroll_by(self, lines: int) -> None:
        log = self.query_one(RichLog)
        log.scroll_to(y=log.scroll_y + lines, animate=False)

    def action_top(self) -> None:
        self.query_one(RichLog).scroll_home(animate=False)

    def action_bottom(self) -> None:
        self.query_one(RichLog).scroll_end(animate=False)

    def action_copy_log(self) -> None:
        self.app.copy_to_clipboard(self.text())
        self.notify(f"{len(self.entries)} log lines of task {self.task_id} are on the clipboard "
                    "(OSC 52: the terminal must allow it)", title="Copied", timeout=3)

    def action_copy_error(self) -> None:
        info = self.feed.tasks.get(self.task_id)
        if info is None or not info.error:
            self.notify("this task has no error to copy", title="Copy", severity="warning", timeout=3)
            return
        self.app.copy_to_clipboard(error_text(info))
        self.notify(f"the error of task {info.id} is on the clipboard", title="Copied", timeout=3)
