"""`:audit` and `:events`: who did what (the engine's audit log) and what this console heard from the
engine in this session (tasks created, their states, their log lines, the engine's own state)."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine.textsafe import line as safe

from ferry.console.feed import TaskFeed
from ferry.console.keys import bindings
from ferry.console.dialogs.modals import esc
from ferry.console.widgets.table import Column, KeyedTable, Row, TableFilter, cell
from ferry.console.theming import rich_style
from ferry.console.views.base import ViewBase

AUDIT_LIMIT = 500
AUDIT_POLL_S = 5.0


def stamp(ts: float) -> str:
    """Today's events by time; older ones with their date."""
    day = time.strftime("%Y-%m-%d", time.localtime(ts))
    today = time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if day == today else "%Y-%m-%d %H:%M", time.localtime(ts))


class TableView(ViewBase, Vertical):
    """A view that is one KeyedTable, its `/` line and a status line; `y` copies the row."""

    BINDINGS = bindings("records")
    COLUMNS: tuple[Column, ...] = ()
    SORT = ("time", True)

    def compose(self) -> ComposeResult:
        table = KeyedTable(self.COLUMNS, sort=self.SORT[0], reverse=self.SORT[1], id=f"{self.VIEW}-table")
        yield table
        yield TableFilter(table, id=f"{self.VIEW}-filter")
        yield Static(id=f"{self.VIEW}-status", classes="view-status")

    @property
    def table(self) -> KeyedTable:
        return self.query_one(KeyedTable)

    def crumbs(self) -> tuple[str, ...]:
        filt = (f"/{self.table.filter_text}",) if self.table.filter_text else ()
        return (self.VIEW,) + filt

    def catch_up(self) -> None:
        self.sync()

    def sync(self) -> None:
        raise NotImplementedError

    def on_keyed_table_sorted(self, message: KeyedTable.Sorted) -> None:
        message.stop()
        self.render_status()
        self.post_crumbs()

    def on_keyed_table_cursor_moved(self, message: KeyedTable.CursorMoved) -> None:
        message.stop()

    def render_status(self) -> None:
        table = self.table
        text = f"{len(table.model)} {self.noun}"
        if table.filter_text:
            text += f" · [$accent]/{esc(table.filter_text)}[/] {len(table.shown_keys)} shown [$text-muted](esc clears)[/]"
        text += f" · sorted by {esc(table.sort_text())} [$text-muted](o, O)[/]"
        self.query_one(f"#{self.VIEW}-status", Static).update(Content.from_markup(text + self.status_extra()))

    noun = "rows"

    def status_extra(self) -> str:
        return ""

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()

    def clear_filter(self) -> bool:
        return self.query_one(TableFilter).clear()

    def action_copy_row(self) -> None:
        key = self.table.selected_key
        row = self.table.model.get(key) if key is not None else None
        if row is None:
            self.app.notify("no row selected", title="Copy", severity="warning", timeout=3)
            return
        self.app.copy_to_clipboard("  ".join(c.plain.strip() for c in row.cells))
        self.app.notify("the row is on the clipboard (OSC 52: the terminal must allow it)", title="Copied", timeout=3)

    def restyle(self) -> None:
        self.table.redraw()
        self.sync()


class AuditView(TableView):
    """The engine's audit log, newest first; read again every few seconds while shown."""

    VIEW = "audit"
    TITLE = "Audit"
    COLUMNS = (
        Column("time", "TIME", cap=17),
        Column("actor", "ACTOR", cap=16),
        Column("action", "ACTION", cap=22),
        Column("target", "TARGET", flex=True, least=12),
        Column("result", "RESULT", cap=24),
        Column("params", "PARAMS", cap=60, optional=True),
    )
    noun = "audit entries"

    def __init__(self, client: Any) -> None:
        super().__init__(id="audit")
        self.client = client
        self.entries: list = []
        self.error: str | None = None

    def on_mount(self) -> None:
        self.set_interval(AUDIT_POLL_S, self._poll)

    def activate(self) -> None:
        self.load()
        self.post_crumbs()
        self.table.focus()

    def _poll(self) -> None:
        if self.shown:
            self.load()

    def load(self) -> None:
        self.run_worker(partial(self._load), group="audit", exclusive=True, exit_on_error=False)

    async def _load(self) -> None:
        try:
            self.entries = await self.client.audit_log(limit=AUDIT_LIMIT)
            self.error = None
        except Exception as e:   # shown in the status line; the next poll tries again
            self.error = str(e)
        self.sync()

    def sync(self) -> None:
        table = self.table
        variables = self.app.theme_variables
        keys = set()
        for e in self.entries:
            key = str(e.id)
            keys.add(key)
            failed = e.result not in ("ok", "")
            params = json.dumps(e.params, sort_keys=True, default=str) if e.params else ""
            table.put(key, Row(cells=(
                cell(stamp(e.ts), sort=e.ts),
                cell(safe(e.actor)),
                cell(safe(e.action)),
                cell(safe(e.target)),
                cell(safe(e.result), style=rich_style(variables, "sev-crit" if failed else "sev-ok")),
                cell(safe(params)),
            )))
        for key in [k for k in table.keys() if k not in keys]:
            table.drop(key)
        table.commit()
        self.render_status()

    def status_extra(self) -> str:
        return f" · [$error]✖ {esc(self.error)}[/]" if self.error else ""


class EventsView(TableView):
    """The events this console received from the engine in this session, newest first."""

    VIEW = "events"
    TITLE = "Events"
    COLUMNS = (
        Column("time", "TIME", cap=17),
        Column("task", "TASK", cap=8),
        Column("event", "EVENT", cap=9),
        Column("what", "WHAT", flex=True, least=16),
    )
    noun = "events this session"

    def __init__(self, feed: TaskFeed) -> None:
        super().__init__(id="events")
        self.feed = feed
        self._seen = 0

    def activate(self) -> None:
        self.sync()
        self.post_crumbs()
        self.table.focus()

    def restyle(self) -> None:
        self._seen = 0          # build every row again, in the new colours
        super().restyle()

    def feed_changed(self) -> None:
        if self.shown:
            self.sync()

    def sync(self) -> None:
        table = self.table
        variables = self.app.theme_variables
        events = list(self.feed.session_events)
        for ev in events:
            if ev.seq <= self._seen:
                continue
            var = {"warning": "sev-warn", "error": "sev-crit"}.get(ev.level)
            style = rich_style(variables, var) if var else ""
            table.put(str(ev.seq), Row(cells=(
                cell(stamp(ev.ts), sort=ev.seq),
                cell(f"#{ev.task_id}" if ev.task_id is not None else "-", sort=ev.task_id),
                cell(ev.type),
                cell(safe(ev.text), style=style),
            ), search=ev.level))
        if events:
            self._seen = events[-1].seq
            oldest = events[0].seq
            for key in [k for k in table.keys() if int(k) < oldest]:
                table.drop(key)
        table.commit()
        self.render_status()
