"""What the views polled through the engine client share (Overview, Alarms, Health): one poll at a time,
the next one `interval` after the last ended, only while the view is on screen (a modal over it waits),
backing off after a failure and saying "stale since"; a poke asks again at once (after a running poll).

A table view on top (PolledTable) has one KeyedTable with its `/` line: a list equal to the last one
changes nothing on screen, and what came in while the view was hidden is drawn when it is shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from textual.app import ComposeResult
from textual.widgets import Static

from ferry.engine import fmt

from ferry.console.dialogs.modals import esc
from ferry.console.views.base import ViewBase
from ferry.console.widgets.page import Page
from ferry.console.widgets.table import Column, KeyedTable, Row, TableFilter

log = logging.getLogger("ferry.console")
BACKOFF_MAX_S = 60.0


def detail_css(view: str, pane: str, height: int) -> str:
    """The CSS of a view of a table over a detail pane (a Page, id `pane`) of a fixed height: a pane that
    grew as the cursor moved would lay the screen out again."""
    return f"""
    {view} {{ height: 1fr; }}
    #{pane} {{
        height: {height};
        padding: 0 1;
        border-top: hkey $panel;
        background: $surface;
        scrollbar-size-vertical: 1;
    }}
    """
TIMEOUT = ("the engine did not answer in time", "check the engine: ferry engine status")


class Polled(ViewBase):
    """Mixed into a view before its Textual widget class; the view defines `poll_once` and `render_status`."""

    WHAT = "list"           # what the status line says is stale: "alarms stale since 09:30:00"
    interval: float

    def init_poll(self, interval: float) -> None:
        self.interval = interval
        self.ok: bool | None = None          # None: not asked yet
        self.error: str | None = None
        self.hint: str | None = None
        self.stale_since: float | None = None
        self.polls = 0
        self._wake = asyncio.Event()
        self._polling = False

    def start_polling(self) -> None:
        """The first time the view is shown: its poll loop starts."""
        if not self._polling:
            self._polling = True
            self.run_worker(partial(self._run), name=f"{self.VIEW} poll", group=f"{self.VIEW}-poll",   # type: ignore
                            exclusive=True, exit_on_error=False)

    def poke(self) -> None:
        """Ask again now (after the running poll: never two at once)."""
        self._wake.set()

    async def poll_once(self) -> tuple[str | None, str | None]:
        """One poll: (None, None), or the (error, hint) of what failed."""
        raise NotImplementedError

    def next_delay(self, took: float) -> float:
        return self.interval

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()          # a poke from now on means "again after this one"
            delay = self.interval
            if self.shown:
                started = time.monotonic()
                try:
                    error, hint = await self.poll_once()
                except Exception as e:      # a bug here must not end the polling unseen: said as stale
                    log.exception("%s poll", self.VIEW)
                    error, hint = f"internal error: {type(e).__name__}: {e}", "see logs/ferry.log in the workspace"
                self.polls += 1
                if error is None:
                    failures = 0
                    self.ok, self.error, self.hint, self.stale_since = True, None, None, None
                    delay = self.next_delay(time.monotonic() - started)
                else:
                    failures += 1
                    self.failed(error, hint)
                    delay = min(BACKOFF_MAX_S, self.interval * 2 ** failures)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    def failed(self, error: str, hint: str | None) -> None:
        self.ok, self.error, self.hint = False, error, hint
        self.stale_since = self.stale_since or self.app.clock()
        self.render_status()

    def render_status(self) -> None:
        raise NotImplementedError

    def poll_status(self) -> str | None:
        """The status line while the view has nothing good to say: stale since (and why), or asking."""
        if self.ok is False:
            return (f"[b $error]✖ {self.WHAT} stale since {fmt.clock(self.stale_since)}[/] "
                    f"[$error]{esc(self.error or '')}[/]" + (f" [$text-muted]hint: {esc(self.hint)}[/]" if self.hint
                                                             else ""))
        if self.ok is None:
            return f"[$text-muted]asking for the {self.WHAT}…[/]"
        return None


class PolledTable(Polled):
    """A polled view of one KeyedTable (`self.table`), its `/` line and a detail pane it redraws as the
    cursor moves (`follow_cursor`)."""

    COLUMNS: tuple[Column, ...] = ()
    SORT = ""               # the column sorted by at first
    SORT_REVERSE = False    # ... the other way round (the newest first)
    PANE = ""               # the ids: PANE-table, PANE-filter, PANE-detail (and VIEW-status)
    table: KeyedTable
    _dirty = False
    _rows: dict[str, tuple[Any, Row]]       # key -> (the record, its row as last made)

    def compose(self) -> ComposeResult:
        table = KeyedTable(self.COLUMNS, sort=self.SORT, reverse=self.SORT_REVERSE, id=f"{self.PANE}-table")
        table.on_cursor = self.cursor_moved
        self.table = table
        yield table
        yield TableFilter(table, id=f"{self.PANE}-filter")
        yield Static(id=f"{self.VIEW}-status", classes="view-status")
        yield Page(id=f"{self.PANE}-detail")

    def on_mount(self) -> None:
        self.render_status()
        self.render_detail()

    def activate(self) -> None:
        """Shown: poll from now on (the first time), draw what changed while hidden, ask again."""
        self.start_polling()
        self.catch_up()
        self.post_crumbs()
        self.table.focus()

    def catch_up(self) -> None:
        if self._dirty:
            self._dirty = False
            self.sync()
        self.poke()

    def changed(self) -> None:
        """The records changed: drawn now, or when the view is shown again."""
        if self.shown:
            self.sync()
        else:
            self._dirty = True

    @property
    def records(self) -> dict[str, Any]:
        """What the table shows: key -> record."""
        raise NotImplementedError

    def make_row(self, record: Any) -> Row:
        raise NotImplementedError

    def row(self, key: str, record: Any) -> Row:
        """The row of a record: made again only when the record changed."""
        kept = self._rows.get(key)
        if kept is not None and kept[0] == record:
            return kept[1]
        row = self.make_row(record)
        self._rows[key] = (record, row)
        return row

    def sync(self, *, rerender: bool = False) -> None:
        """The table in line with the records: rows of keys gone dropped, the others put, then committed."""
        table, records = self.table, self.records
        if rerender:
            table.redraw()
            self._rows.clear()
        for key in [k for k in table.keys() if k not in records]:
            table.drop(key)
            self._rows.pop(key, None)
        for key, record in records.items():
            table.put(key, self.row(key, record))
        table.commit()
        self.follow_cursor()
        self.render_status()

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self.sync(rerender=True)
        self.render_detail(again=True)

    def follow_cursor(self) -> None:
        raise NotImplementedError

    def render_detail(self, *, again: bool = False) -> None:
        raise NotImplementedError

    def filter_crumbs(self) -> tuple[str, ...]:
        return (f"/{self.table.filter_text}",) if self.table.filter_text else ()

    def table_status(self) -> str:
        """The filter and the sort order, when not the default, for the end of the status line."""
        table, text = self.table, ""
        if table.filter_text:
            text += (f" · [$accent]/{esc(table.filter_text)}[/] {len(table.shown_keys)} shown "
                     "[$text-muted](esc clears)[/]")
        if (table.sort_column, table.sort_reverse) != table.default_sort:
            text += f" · sorted by {esc(table.sort_text())} [$text-muted](o, O)[/]"
        return text

    def cursor_moved(self, key: str | None) -> None:
        self.follow_cursor()

    def on_keyed_table_cursor_moved(self, message: KeyedTable.CursorMoved) -> None:
        message.stop()
        self.follow_cursor()

    def on_keyed_table_sorted(self, message: KeyedTable.Sorted) -> None:
        message.stop()
        self.render_status()
        self.post_crumbs()

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()     # type: ignore[attr-defined]

    def clear_filter(self) -> bool:
        return self.query_one(TableFilter).clear()  # type: ignore[attr-defined]

    def action_refresh_now(self) -> None:
        self.poke()

