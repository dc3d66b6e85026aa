"""Tasks view: a table keyed by task id and diffed cell by cell (console/widgets/table.py), plus the selected
task's details. The cursor and the detail stay on their task whatever comes, goes or moves; `/`
filters (states too), `o`/`O` or a header click sort, `f` hides what ended well, `l` opens the
task's whole log, `y` copies its error."""

from __future__ import annotations

from functools import partial
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.taskmodel import FINAL_STATES, TASK_ACTIONS, TaskInfo, TaskState
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.feed import TaskFeed
from ferry.console.messages import TasksChanged
from ferry.console.dialogs.modals import esc
from ferry.console.severity import state_markup, state_variable
from ferry.console.widgets.table import Column, KeyedTable, Row, TableFilter, cell
from ferry.console.theming import rich_style
from ferry.console.views.base import ViewBase
from ferry.console.widgets.paint import update_static

BAR_W = 8
COLUMNS = (
    Column("id", "ID", cap=8),
    Column("title", "TITLE", flex=True, least=12),
    Column("state", "STATE", cap=14),
    Column("progress", "PROGRESS", cap=1 + BAR_W + 1 + 6),
    Column("rate", "RATE", cap=12),
    Column("eta", "ETA", cap=9),
    Column("item", "ITEM", cap=40, optional=True),
)
LOG_TAIL = 3
HIDDEN_WHEN_DONE = frozenset({TaskState.SUCCEEDED, TaskState.CANCELLED})   # what `f` hides; failures stay
ALLOWED = TASK_ACTIONS   # the task states each key applies to: the engine's one rule


def error_text(info: TaskInfo) -> str:
    """What `y` copies: the task's error and its hint."""
    return (info.error or "") + (f"\nhint: {info.hint}" if info.hint else "")


class TasksView(ViewBase, Vertical):
    BINDINGS = opkeys.bindings("tasks")
    VIEW = "tasks"
    TITLE = "Tasks"

    def __init__(self, client: Any, feed: TaskFeed) -> None:
        super().__init__(id="tasks")
        self.client = client
        self.feed = feed
        self._pending: set[int] = set()
        self._pending_removed: set[int] = set()
        self._log: tuple[int, list] | None = None
        self._log_seen: dict[int, tuple] = {}
        self.selected_id: int | None = None
        self._want: int | None = None             # a task to put the cursor on once its row exists
        self._shown_error: str | None = None
        self.hide_finished = False

    def compose(self) -> ComposeResult:
        table = KeyedTable(COLUMNS, sort="id", reverse=True, id="task-table")   # newest first
        table.on_cursor = self._selected
        self._table = table
        yield table
        yield TableFilter(table, id="task-filter")
        yield Static(id="tasks-status")
        yield Static(id="task-detail")

    @property
    def table(self) -> KeyedTable:
        return self._table      # kept from compose: a query per call cost a millisecond, on every footer key check

    def on_mount(self) -> None:
        self.render_detail()
        self.render_status()

    def activate(self) -> None:
        """Called when the view is shown."""
        self.sync(full=True)
        self.post_crumbs()
        self.table.focus()

    def catch_up(self) -> None:
        """Draw what changed while a modal covered the view."""
        if self._pending or self._pending_removed:
            self.sync()

    def crumbs(self) -> tuple[str, ...]:
        info = self.selected_task()
        filt = (f"/{self.table.filter_text}",) if self.table.filter_text else ()
        return ("tasks",) + filt + ((f"#{info.id} {info.title}",) if info else ())

    # ------------------------------------------------------------------ the feed

    def on_tasks_changed(self, message: TasksChanged) -> None:
        message.stop()
        dirty, removed = self.feed.take_changes()
        self._pending |= dirty
        self._pending_removed |= removed
        if self.shown:
            self.sync()

    def row(self, info: TaskInfo) -> Row:
        p = info.progress
        moving = info.state == TaskState.RUNNING   # paused, waiting or done: no rate, no ETA
        variables = self.app.theme_variables
        muted = rich_style(variables, "sev-unknown")
        state = cell(f"{info.state.symbol} {info.state.value}", sort=info.state.value,
                     style=rich_style(variables, state_variable(info.state), bold=info.state == TaskState.WAITING))
        return Row(cells=(
            cell(str(info.id), sort=info.id),
            # TITLE names paths and ITEM the file being copied: a guest's names, shown escaped.
            cell(safe(info.title or info.kind)),
            state,
            cell(f"{fmt.bar(p.fraction, BAR_W)} {fmt.percent(p.fraction)}", sort=p.fraction or 0.0),
            cell(fmt.rate(p.rate) if moving else "-", sort=p.rate if moving else None, style=muted),
            cell(fmt.duration(p.eta) if moving else "-", sort=p.eta if moving else None, style=muted),
            cell(safe(p.item or "")),
        ), search=f"{info.kind} {' '.join(info.hosts)} #{info.id}")

    def _listed(self, info: TaskInfo | None) -> bool:
        return info is not None and not (self.hide_finished and info.state in HIDDEN_WHEN_DONE)

    def sync(self, *, full: bool = False, rerender: bool = False) -> None:
        """Bring the table in line with the feed: rows that changed, came or went."""
        table = self.table
        tasks = self.feed.tasks
        if full:
            ids = set(tasks)
            removed = {int(k) for k in table.keys() if int(k) not in tasks}
        else:
            ids, removed = self._pending, self._pending_removed
        self._pending, self._pending_removed = set(), set()
        if rerender:
            table.redraw()
        for tid in removed:
            table.drop(str(tid))
        for tid in ids - removed:
            info = tasks.get(tid)
            if self._listed(info):
                table.put(str(tid), self.row(info))
            else:
                table.drop(str(tid))
        table.commit()
        if self._want is not None and table.select(str(self._want)):
            self._want = None
        self._selected(table.selected_key)
        if self.selected_id in ids or full or self.feed.error != self._shown_error:
            self.refresh_bindings()
            self.render_detail()
            self._maybe_reload_log()
        self.render_status()

    def select_task(self, tid: int) -> None:
        """Put the cursor on task `tid` (now, or as soon as it shows up)."""
        self._want = tid
        if self.table.select(str(tid)):
            self._want = None
            self._selected(str(tid))

    def _selected(self, key: str | None) -> None:
        tid = int(key) if key is not None else None
        if tid != self.selected_id:
            self.selected_id = tid
            self.refresh_bindings()
            self._log = None
            self.render_detail()
            self._maybe_reload_log(force=True)
            self.post_crumbs()

    def on_keyed_table_cursor_moved(self, message: KeyedTable.CursorMoved) -> None:
        message.stop()
        self._selected(message.key)

    def on_keyed_table_sorted(self, message: KeyedTable.Sorted) -> None:
        message.stop()
        self.render_status()
        self.post_crumbs()

    def render_status(self) -> None:
        """One line under the table when it shows less than everything, or in another order."""
        table = self.table
        parts = []
        if table.filter_text:
            parts.append(f"[$accent]/{esc(table.filter_text)}[/] {len(table.shown_keys)} of {len(self.feed.tasks)}"
                         " [$text-muted](esc clears)[/]")
        if self.hide_finished:
            hidden = sum(1 for t in self.feed.tasks.values() if t.state in HIDDEN_WHEN_DONE)
            parts.append(f"{hidden} done hidden [$text-muted](f shows them)[/]")
        if (table.sort_column, table.sort_reverse) != table.default_sort:
            parts.append(f"sorted by {esc(table.sort_text())} [$text-muted](o, O)[/]")
        status = self.query_one("#tasks-status", Static)
        status.display = bool(parts)
        update_static(status, Content.from_markup(" · ".join(parts)))

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
        info = self.selected_task()
        self._shown_error = self.feed.error
        stale = []
        if self.feed.error:
            stale = [f"[b $error]✖ task list stale since {fmt.clock(self.feed.stale_since)}:[/] "
                     f"[$error]{esc(self.feed.error)}[/]"]
        if info is None:
            text = ("[$text-muted]no tasks yet: start one from the inventory (p probes a host) "
                    "or with `ferry probe HOST`[/]" if not self.feed.tasks else "[$text-muted]no task selected[/]")
            update_static(detail, Content.from_markup("\n".join(stale + [text])))
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
            lines.append(f"[$error]✖ {esc(info.error)}[/]" + (f"  [$text-muted]hint: {esc(info.hint)}[/]" if info.hint else "")
                         + "  [$text-muted](y copies it)[/]")
        if self._log and self._log[0] == info.id:
            for entry in self._log[1][-LOG_TAIL:]:
                var = {"warning": "$warning", "error": "$error"}.get(entry.level, "$text-muted")
                lines.append(f"[{var}]│ {esc(entry.message)}[/]")
        update_static(detail, Content.from_markup("\n".join(lines)))

    # ------------------------------------------------------------------ operator actions

    def selected_task(self) -> TaskInfo | None:
        return self.feed.tasks.get(self.selected_id) if self.selected_id is not None else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys that cannot apply to the selected task are shown dimmed."""
        action = {"cancel_task": "cancel"}.get(action, action)
        if action in ALLOWED:
            info = self.selected_task()
            return True if info is not None and info.state in ALLOWED[action] else None
        if action in ("log", "copy_error"):
            info = self.selected_task()
            return True if info is not None and (action == "log" or info.error) else None
        return True

    def action_pause(self) -> None:
        self.app.control_task("pause", self.selected_id)   # type: ignore[attr-defined]

    def action_resume(self) -> None:
        self.app.control_task("resume", self.selected_id)   # type: ignore[attr-defined]

    def action_cancel_task(self) -> None:
        self.app.control_task("cancel", self.selected_id)   # type: ignore[attr-defined]

    def action_log(self) -> None:
        info = self.selected_task()
        if info is not None:
            from ferry.console.dialogs.log import TaskLogScreen
            self.app.push_screen(TaskLogScreen(self.client, self.feed, info.id))

    def action_copy_error(self) -> None:
        info = self.selected_task()
        if info is None or not info.error:
            self.app.notify("the selected task has no error to copy", title="Copy", severity="warning", timeout=3)
            return
        self.app.copy_to_clipboard(error_text(info))
        self.app.notify(f"the error of task {info.id} is on the clipboard (OSC 52: the terminal must allow it)",
                        title="Copied", timeout=3)

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()

    def clear_filter(self) -> bool:
        return self.query_one(TableFilter).clear()

    def action_hide_finished(self) -> None:
        self.hide_finished = not self.hide_finished
        self.sync(full=True)
        self.app.notify("tasks that succeeded or were cancelled are " + ("hidden" if self.hide_finished else "shown"),
                        title="Tasks", timeout=2)

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self.sync(full=True, rerender=True)
