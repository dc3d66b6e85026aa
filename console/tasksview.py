"""Tasks view: a table keyed by task id and diffed cell by cell, plus the selected task's details."""

from __future__ import annotations

from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Static
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowDoesNotExist

from ferry.engine import fmt
from ferry.engine.taskmodel import FINAL_STATES, TaskInfo, TaskState
from ferry.engine.textsafe import line as safe

from .feed import TaskFeed
from .messages import TasksChanged
from .modals import esc
from .severity import state_markup, state_text
from .theming import rich_style
from .viewbase import ViewBase

BAR_W = 8
# (key, label, width or None for the flexible ones); each cell carries one leading space as its gap.
FIXED = {"id": 5, "state": 12, "progress": 1 + BAR_W + 1 + 6, "rate": 12, "eta": 7}
COLUMNS = (("id", " ID"), ("title", " TITLE"), ("state", " STATE"), ("progress", " PROGRESS"),
           ("rate", " RATE"), ("eta", " ETA"), ("item", " ITEM"))
LOG_TAIL = 3
ALLOWED = {   # the task states each key applies to
    "pause": frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING}),
    "resume": frozenset({TaskState.PAUSED, TaskState.FAILED, TaskState.INTERRUPTED}),
    "cancel": frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING, TaskState.PAUSED,
                         TaskState.INTERRUPTED, TaskState.FAILED}),
}


def _fit(text: str, width: int) -> str:
    text = " " + text
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def flexible_widths(total: int) -> tuple[int, int]:
    """TITLE and ITEM share what the fixed columns leave (the table keeps 1 column for its scrollbar)."""
    rest = max(20, total - sum(FIXED.values()) - 1)
    title = max(12, min(40, (rest * 2) // 3))
    return title, max(8, rest - title)


class TasksView(ViewBase, Vertical):
    BINDINGS = [
        Binding("p", "pause", "Pause", id="ferry.tasks.pause", tooltip="Pause the selected task; it keeps its checkpoint"),
        Binding("r", "resume", "Resume", id="ferry.tasks.resume", tooltip="Resume the selected paused, interrupted or failed task"),
        Binding("c", "cancel_task", "Cancel", id="ferry.tasks.cancel", tooltip="Cancel the selected task; what it made is rolled back"),
    ]
    VIEW = "tasks"
    TITLE = "Tasks"

    def __init__(self, client: Any, feed: TaskFeed) -> None:
        super().__init__(id="tasks")
        self.client = client
        self.feed = feed
        self._rendered: dict[int, tuple] = {}    # task id -> the cell values shown
        self._pending: set[int] = set()
        self._pending_removed: set[int] = set()
        self._widths: dict[str, int] = {}
        self._log: tuple[int, list[dict]] | None = None
        self._log_seen: dict[int, tuple] = {}
        self.selected_id: int | None = None
        self._want: int | None = None             # a task to put the cursor on once its row exists
        self._shown_error: str | None = None

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="task-table", cursor_type="row", cell_padding=0, zebra_stripes=False)
        yield table
        yield Static(id="task-detail")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        title_w, item_w = flexible_widths(self.size.width or self.app.size.width)
        self._widths = {**FIXED, "title": title_w, "item": item_w}
        for key, label in COLUMNS:
            table.add_column(label, key=key, width=self._widths[key])
        self.render_detail()

    def activate(self) -> None:
        """Called when the view is shown."""
        self.sync(full=True)
        self.post_crumbs()
        self.query_one(DataTable).focus()

    def catch_up(self) -> None:
        """Draw what changed while a modal covered the view."""
        if self._pending or self._pending_removed:
            self.sync()

    def crumbs(self) -> tuple[str, ...]:
        info = self.feed.tasks.get(self.selected_id) if self.selected_id is not None else None
        return ("tasks", f"#{info.id} {info.title}") if info else ("tasks",)

    # ------------------------------------------------------------------ the feed

    def on_tasks_changed(self, message: TasksChanged) -> None:
        message.stop()
        dirty, removed = self.feed.take_changes()
        self._pending |= dirty
        self._pending_removed |= removed
        if self.shown:
            self.sync()

    def on_resize(self) -> None:
        if not self._widths:
            return
        title_w, item_w = flexible_widths(self.size.width or self.app.size.width)
        if (title_w, item_w) != (self._widths.get("title"), self._widths.get("item")):
            self._widths.update(title=title_w, item=item_w)
            table = self.query_one(DataTable)
            for key in ("title", "item"):
                table.columns[ColumnKey(key)].width = self._widths[key]
            table._require_update_dimensions = True   # no public API to resize a column yet
            self.sync(full=True, rerender=True)

    def row_cells(self, info: TaskInfo) -> tuple:
        p = info.progress
        moving = info.state == TaskState.RUNNING   # paused, waiting or done: no rate, no ETA
        title = info.title or info.kind
        return (
            str(info.id), title, info.state, f"{fmt.bar(p.fraction, BAR_W)} {fmt.percent(p.fraction)}",
            fmt.rate(p.rate) if moving else "-",
            fmt.duration(p.eta) if moving else "-",
            p.item or "",
        )

    def _cell(self, key: str, value: Any) -> Text:
        width = self._widths[key]
        variables = self.app.theme_variables
        if key == "state":
            t = state_text(value, variables)
            return Text(" ") + t
        if key == "id":
            return Text(_fit(value.rjust(width - 2), width))
        style = rich_style(variables, "sev-unknown") if key in ("rate", "eta") else ""
        # TITLE names paths and ITEM the file being copied: a guest's names, shown escaped.
        return Text(_fit(safe(value), width), style=style, no_wrap=True)

    def sync(self, *, full: bool = False, rerender: bool = False) -> None:
        """Bring the table in line with the feed: update changed cells, add and remove rows."""
        table = self.query_one(DataTable)
        tasks = self.feed.tasks
        before = self.selected_id
        if full:
            ids = set(tasks) | set(self._rendered)
            removed = {tid for tid in self._rendered if tid not in tasks}
        else:
            ids, removed = self._pending, self._pending_removed
        self._pending, self._pending_removed = set(), set()
        if rerender:
            self._rendered = {tid: () for tid in self._rendered}
        added = False
        with self.app.batch_update():
            for tid in removed:
                if tid in self._rendered:
                    try:
                        table.remove_row(str(tid))
                    except RowDoesNotExist:
                        pass
                    del self._rendered[tid]
            for tid in sorted(ids - removed):
                info = tasks.get(tid)
                if info is None:
                    continue
                cells = self.row_cells(info)
                old = self._rendered.get(tid)
                if old is None:
                    table.add_row(*(self._cell(k, v) for (k, _), v in zip(COLUMNS, cells)), key=str(tid))
                    added = True
                elif old != cells:
                    for (key, _), new, was in zip(COLUMNS, cells, old or (None,) * len(cells)):
                        if new != was:
                            try:
                                table.update_cell(str(tid), key, self._cell(key, new))
                            except CellDoesNotExist:
                                pass
                self._rendered[tid] = cells
            if added:
                self._sort_keep_cursor(table)
        if self._want is not None and self._want in self._rendered:
            self._move_to(table, self._want)
        if self.selected_id is None and table.row_count:
            self._select_row(table, table.cursor_row)
        if self.selected_id in ids or self.selected_id in removed or full or self.feed.error != self._shown_error:
            self.refresh_bindings()
            if self.selected_id is not None and self.selected_id not in tasks and table.row_count:
                self._select_row(table, min(table.cursor_row, table.row_count - 1))
            self.render_detail()
            self._maybe_reload_log()
        if self.selected_id != before:
            self.post_crumbs()

    def _sort_keep_cursor(self, table: DataTable) -> None:
        keep = self.selected_id
        table.sort("id", key=lambda cell: -int(cell.plain))   # newest first
        if keep is not None:
            try:
                table.move_cursor(row=table.get_row_index(str(keep)), animate=False, scroll=False)
            except RowDoesNotExist:
                pass

    def select_task(self, tid: int) -> None:
        """Put the cursor on task `tid` (now, or as soon as it shows up)."""
        self._want = tid
        if tid in self._rendered:
            self._move_to(self.query_one(DataTable), tid)

    def _move_to(self, table: DataTable, tid: int) -> None:
        self._want = None
        try:
            table.move_cursor(row=table.get_row_index(str(tid)), animate=False)
        except RowDoesNotExist:
            return

    def _select_row(self, table: DataTable, row: int) -> None:
        try:
            key = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        except CellDoesNotExist:
            self.selected_id = None
            return
        self.selected_id = int(key) if key is not None else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        previous = self.selected_id
        self._select_row(self.query_one(DataTable), self.query_one(DataTable).cursor_row)  # what the cursor shows now
        tid = self.selected_id
        if tid != previous:
            self.refresh_bindings()
            self._log = None
            self.render_detail()
            self._maybe_reload_log(force=True)
            self.post_crumbs()

    # ------------------------------------------------------------------ the detail pane

    def _maybe_reload_log(self, force: bool = False) -> None:
        tid = self.selected_id
        if tid is None:
            return
        info = self.feed.tasks.get(tid)
        # New log lines show up as events (tasks run here) or with a change of state (tasks run elsewhere).
        seen = (self.feed.log_events.get(tid, 0), info.state if info else None, info.attempts if info else 0)
        if force or self._log is None or self._log[0] != tid or self._log_seen.get(tid) != seen:
            self._log_seen[tid] = seen
            self.run_worker(partial(self._load_log, tid), group="task-log", exclusive=True, exit_on_error=False)

    async def _load_log(self, tid: int) -> None:
        entries = await self.client.task_log(tid, limit=LOG_TAIL)
        if tid == self.selected_id:
            self._log = (tid, entries)
            self.render_detail()

    def render_detail(self) -> None:
        detail = self.query_one("#task-detail", Static)
        info = self.feed.tasks.get(self.selected_id) if self.selected_id is not None else None
        self._shown_error = self.feed.error
        stale = []
        if self.feed.error:
            stale = [f"[b $error]✖ task list stale since {fmt.clock(self.feed.stale_since)}:[/] "
                     f"[$error]{esc(self.feed.error)}[/]"]
        if info is None:
            text = ("[$text-muted]no tasks yet: start one from the inventory (p probes a host) "
                    "or with `ferry probe HOST`[/]" if not self.feed.tasks else "[$text-muted]no task selected[/]")
            detail.update(Content.from_markup("\n".join(stale + [text])))
            return
        hosts = ", ".join(info.hosts) or "-"
        lines = stale + [f"[b]#{info.id} {esc(info.title)}[/b]  {state_markup(info.state)}  "
                 f"[$text-muted]{esc(info.kind)} · hosts {esc(hosts)} · attempt {info.attempts}[/]",
                 esc(fmt.progress_line(info.progress, width=16, state=info.state))]
        if info.state == TaskState.WAITING and info.waiting:
            lines.append(f"[b $warning]? waiting for you:[/] {esc(str(info.waiting.get('prompt', '')))}")
        extra = info.progress.detail if isinstance(info.progress.detail, dict) else {}
        streams = extra.get("streams")
        if isinstance(streams, dict) and streams and info.state not in FINAL_STATES:
            phase = f"{esc(str(extra.get('phase')))} · " if extra.get("phase") else ""
            lines.append(f"[$text-muted]{phase}" + " · ".join(
                f"{esc(str(name))} {fmt.size(n)}" for name, n in sorted(streams.items())) + "[/]")
        retry = extra.get("retry")
        if retry and info.state not in FINAL_STATES:
            lines.append(f"[$warning]◆ {esc(str(retry))}[/]")
        if info.error:
            lines.append(f"[$error]✖ {esc(info.error)}[/]" + (f"  [$text-muted]hint: {esc(info.hint)}[/]" if info.hint else ""))
        if self._log and self._log[0] == info.id:
            for entry in self._log[1][-LOG_TAIL:]:
                level = entry.get("level", "info")
                var = {"warning": "$warning", "error": "$error"}.get(level, "$text-muted")
                lines.append(f"[{var}]│ {esc(str(entry.get('message', '')))}[/]")
        detail.update(Content.from_markup("\n".join(lines)))

    # ------------------------------------------------------------------ operator actions

    def selected_task(self) -> TaskInfo | None:
        return self.feed.tasks.get(self.selected_id) if self.selected_id is not None else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys that cannot apply to the selected task are shown dimmed."""
        action = {"cancel_task": "cancel"}.get(action, action)
        if action in ALLOWED:
            info = self.selected_task()
            return True if info is not None and info.state in ALLOWED[action] else None
        return True

    def action_pause(self) -> None:
        self.app.control_task("pause", self.selected_id)   # type: ignore[attr-defined]

    def action_resume(self) -> None:
        self.app.control_task("resume", self.selected_id)   # type: ignore[attr-defined]

    def action_cancel_task(self) -> None:
        self.app.control_task("cancel", self.selected_id)   # type: ignore[attr-defined]

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self.sync(full=True, rerender=True)

