"""VMs view (k9s style): every VM and template in one table with its state and what its guest agent
says, the same VM keys as the inventory, `/` to filter and enter to see a VM in the inventory.

The list comes from a VMPoller that polls only while the view is shown. Rows are keyed by VM
record id and diffed (update_cell, add_row, remove_row), never cleared, so the cursor stays put.
Agent facts come from a walk over the running VMs on screen (the cursor's first), one
`vm_agent` call at a time, each VM at most every AGENT_REFRESH_S.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.coordinate import Coordinate
from textual.timer import Timer
from textual.widgets import DataTable, Input, Static
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowDoesNotExist

from ferry.engine import fmt
from ferry.engine.api import VMState, VMView
from ferry.engine.textsafe import line as safe

from ferry.console import vms as vmlook
from ferry.console.messages import AgentSampled, VMsUpdated
from ferry.console.dialogs.modals import esc
from ferry.console.poller import VMList, attempt
from ferry.console.theming import rich_style
from ferry.console.views.base import ViewBase
from ferry.console.vmactions import VM_BINDINGS, VMActions


AGENT_REFRESH_S = 15.0    # a VM's agent is asked again at most this often
COLUMNS = vmlook.TABLE_COLUMNS
CAPS = {"host": 12, "state": 13, "agent": 14, "ip": 16, "cpu": 6, "mem": 11, "vcpu": 5, "disk": 6}
MINS = {"name": 8, "host": 5, "ip": 8}      # what gives way, in this order, when the table is narrow
NAME_W = 17                                 # NAME takes up to this much even when the names are short
SHRINK = ("name", "host", "ip")


class Ordered(Text):
    """The NAME cell; it carries the row's sort order, so the table can sort by it."""

    order: tuple = ()


def fit(text: str, width: int) -> str:
    """One leading space as the gap between columns; cut with … to the width."""
    text = " " + text
    if cell_len(text) <= width:
        return text
    while text and cell_len(text) > width - 1:
        text = text[:-1]
    return text + "…"


def column_widths(rows: list[tuple[vmlook.Cell, ...]], total: int) -> dict[str, int]:
    """Each column as wide as its widest cell (within CAPS; NAME at least NAME_W where there is room);
    NAME, then HOST, then IP give way when everything does not fit in `total` cells."""
    w = {key: cell_len(label) + 1 for key, label in COLUMNS}
    for cells in rows:
        for (key, _), (text, _, _) in zip(COLUMNS, cells):
            w[key] = max(w[key], cell_len(text) + 1)
    for key, cap in CAPS.items():
        w[key] = min(w[key], cap)
    w["name"] = max(w["name"], min(NAME_W, total - sum(w.values()) + w["name"]))
    for key in SHRINK:
        over = sum(w.values()) - total
        if over <= 0:
            break
        w[key] = min(w[key], max(MINS[key], w[key] - over))
    return w


class VMFilter(Input):
    """The `/` line: filters as you type; enter keeps the filter, esc clears it."""

    BINDINGS = [Binding("escape", "clear", "Clear", show=False, id="ferry.vms.filter.clear")]

    def action_clear(self) -> None:
        view = next((a for a in self.ancestors if isinstance(a, VMsView)), None)
        if view is not None:
            view.clear_filter()

    def on_blur(self) -> None:
        self.remove_class("-open")


class VMsView(ViewBase, VMActions, Vertical):
    BINDINGS = [
        *VM_BINDINGS,
        Binding("slash", "filter", "Filter", id="ferry.vms.filter",
                tooltip="Filter the rows: a part of a name or a host (esc clears it)"),
        Binding("f", "refresh_now", "Now", show=False, id="ferry.vms.refresh",
                tooltip="Ask for the list and the agent of the VM under the cursor now"),
    ]
    VIEW = "vms"
    TITLE = "VMs"

    def __init__(self, client: Any, *, clock: Callable[[], float] = time.time, poll: dict | None = None) -> None:
        super().__init__(client, clock=clock, id="vms")
        self.interval = (poll or {}).get("vm_interval")
        self.vm_list = VMList()
        self.vms: dict[str, VMView] = {}
        self.recycled: dict[str, VMView] = {}
        self.agents: dict[str, vmlook.AgentFact] = {}   # VM id -> its agent's last answer and attempt
        self.filter_text = ""
        self.selected_id: str | None = None
        self._rendered: dict[str, tuple] = {}            # VM id -> (the cells shown, its sort order)
        self._widths: dict[str, int] = {}
        self._dirty = False
        self._started = False
        self._seen_selected: VMView | None = None
        self._agent_inflight: str | None = None
        self._agent_timer: Timer | None = None

    # ------------------------------------------------------------------ layout and lifecycle

    def compose(self) -> ComposeResult:
        yield DataTable(id="vm-table", cursor_type="row", cell_padding=0, zebra_stripes=False)
        yield VMFilter(placeholder="filter: part of a name or host · enter keeps it · esc clears", id="vm-filter")
        yield Static(id="vms-status")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        self._widths = column_widths([], self._room())
        for key, label in COLUMNS:
            table.add_column(f" {label}", key=key, width=self._widths[key])
        self.watch(table, "scroll_y", self._scrolled, init=False)
        self.make_vm_poller(self.interval)
        self.render_status()

    def _room(self) -> int:
        """Cells a row may take: the view's width less the scrollbar."""
        return max(40, (self.size.width or self.app.size.width) - 1)

    def activate(self) -> None:
        """Called when the view is shown: poll from now on (the first time), draw, walk the agents."""
        if not self._started and self.vm_poller is not None:
            self._started = True
            self.run_worker(partial(self.vm_poller.run), name="VM list (VMs view)", group="vms-view",
                            exclusive=True, exit_on_error=False)
        self.catch_up()
        self.post_crumbs()
        self.query_one(DataTable).focus()

    def catch_up(self) -> None:
        """Draw what changed while hidden or covered by a modal; ask again; walk the agents again."""
        if self._dirty:
            self._dirty = False
            self.sync()
        self.refresh_vms()
        self.kick_agents()
        self.ask_vm_checks()

    def crumbs(self) -> tuple[str, ...]:
        vm = self.cursor_vm()
        return (("vms",) + ((f"/{self.filter_text}",) if self.filter_text else ())
                + ((vm.name,) if vm else ()))

    # ------------------------------------------------------------------ the list

    def on_vms_updated(self, message: VMsUpdated) -> None:
        message.stop()
        self.vm_list = message.vms
        self.vms = {v.id: v for v in message.vms.vms}
        self.recycled = {v.id: v for v in message.vms.recycled}
        for vid in [v for v in self.agents if v not in self.vms]:
            del self.agents[vid]
        if not self.shown:
            self._dirty = True
            return
        self.sync()
        self.kick_agents()
        self.vms_listed(message.vms)

    def on_resize(self) -> None:
        if self._widths and column_widths([cells for cells, _ in self._rendered.values()], self._room()) != self._widths:
            self.sync()
        self.kick_agents()      # more (or other) rows on screen

    def _scrolled(self) -> None:
        self.kick_agents()

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self.sync(rerender=True)

    def sync(self, *, rerender: bool = False) -> None:
        """Bring the table in line with the list, the filter and the agent facts: update the cells that
        changed, add and remove rows, sort when something came or moved; the cursor stays on its VM."""
        table = self.query_one(DataTable)
        now = time.monotonic()
        everything = {**self.vms, **self.recycled}
        wanted = {vid: vm for vid, vm in everything.items() if vmlook.matches(vm, self.filter_text)}
        rows = {vid: vmlook.table_cells(vm, self.agents.get(vid), now, busy=bool(self.busy_task(vm)))
                for vid, vm in wanted.items()}
        widths = column_widths(list(rows.values()), self._room())
        if widths != self._widths:
            self._widths = widths
            for key, _ in COLUMNS:
                table.columns[ColumnKey(key)].width = widths[key]
            table._require_update_dimensions = True   # no public API to resize a column yet
            rerender = True
        reorder = False
        with self.app.batch_update():
            for vid in [v for v in self._rendered if v not in wanted]:
                try:
                    table.remove_row(vid)
                except RowDoesNotExist:
                    pass
                del self._rendered[vid]
            for vid in sorted(wanted, key=lambda v: vmlook.row_order(wanted[v])):
                cells, order = rows[vid], vmlook.row_order(wanted[vid])
                old = self._rendered.get(vid)
                if old is None:
                    table.add_row(*(self._cell(k, c, order) for (k, _), c in zip(COLUMNS, cells)), key=vid)
                    reorder = True
                else:
                    old_cells, old_order = old
                    reorder |= old_order != order
                    for (key, _), new, was in zip(COLUMNS, cells, old_cells):
                        if rerender or new != was or (key == "name" and old_order != order):
                            try:
                                table.update_cell(vid, key, self._cell(key, new, order))
                            except CellDoesNotExist:
                                pass
                self._rendered[vid] = (cells, order)
            if reorder:
                table.sort("name", key=lambda cell: getattr(cell, "order", ()))
                self._keep_cursor(table)
        self._follow_cursor(table)
        self.render_status()

    def _cell(self, key: str, cell: vmlook.Cell, order: tuple) -> Text:
        text, variable, dim = cell
        style = rich_style(self.app.theme_variables, variable, dim=dim) if variable else Style(dim=dim)
        out = Ordered(fit(safe(text), self._widths[key]), style=style, no_wrap=True, overflow="ellipsis")
        out.order = order
        return out

    def _keep_cursor(self, table: DataTable) -> None:
        if self.selected_id is not None:
            try:
                table.move_cursor(row=table.get_row_index(self.selected_id), animate=False, scroll=False)
            except RowDoesNotExist:
                pass

    def _follow_cursor(self, table: DataTable) -> None:
        """After a sync: what is under the cursor now (its row may be gone, or its VM changed)."""
        vid = self.cursor_id()
        vm = {**self.vms, **self.recycled}.get(vid) if vid else None
        if vid != self.selected_id or vm != self._seen_selected:
            moved = vid != self.selected_id
            self.selected_id, self._seen_selected = vid, vm
            self.refresh_bindings()
            self.ask_vm_checks()
            if moved:
                self.post_crumbs()

    def cursor_id(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        except CellDoesNotExist:
            return None

    def cursor_vm(self) -> VMView | None:
        vid = self.cursor_id()
        return (self.vms.get(vid) or self.recycled.get(vid)) if vid else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._follow_cursor(self.query_one(DataTable))
        self.kick_agents()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """enter: the VM in the inventory, where the detail pane shows it."""
        event.stop()
        vid = event.row_key.value
        if vid is None:
            return
        app: Any = self.app
        app.switch_view("inventory")
        if not app.inventory.show_vm(vid, self.vm_list):
            vm = self.vms.get(vid) or self.recycled.get(vid)
            name = vm.name if vm else vid
            app.notify(f"{esc(name)} is not in the inventory (any more)", title="VMs", severity="warning")

    def render_status(self) -> None:
        """One line under the table: counts and the filter, or why the list is stale."""
        vl = self.vm_list
        if vl.ok is False:
            text = (f"[b $error]✖ VM list stale since {fmt.clock(vl.stale_since)}[/] [$error]{esc(vl.error or '')}[/]"
                    + (f" [$text-muted]hint: {esc(vl.hint)}[/]" if vl.hint else ""))
        elif vl.ok is None:
            text = "[$text-muted]asking for the VMs…[/]"
        elif not self.vms and not self.recycled:
            text = "[$text-muted]no VMs yet: n creates one, i imports one[/]"
        else:
            text = vmlook.counts_text(list(self.vms.values()))
            if self.recycled:
                text += f" · ♻ {len(self.recycled)} in the bin"
            if self.filter_text:
                text += (f" · [$accent]/{esc(self.filter_text)}[/] {len(self._rendered)} of "
                         f"{len(self.vms) + len(self.recycled)} [$text-muted](esc clears)[/]")
        self.query_one("#vms-status", Static).update(Content.from_markup(text))

    # ------------------------------------------------------------------ the filter

    def action_filter(self) -> None:
        line = self.query_one(VMFilter)
        line.value = self.filter_text
        line.add_class("-open")
        line.focus()

    @on(Input.Changed, "#vm-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        if event.value != self.filter_text:
            self.filter_text = event.value
            self.sync()
            self.post_crumbs()
            self.kick_agents()

    @on(Input.Submitted, "#vm-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one(VMFilter).remove_class("-open")
        self.query_one(DataTable).focus()

    def clear_filter(self) -> bool:
        """esc: clear the filter (True), or nothing to clear (False)."""
        line = self.query_one(VMFilter)
        if not self.filter_text and not line.has_class("-open"):
            return False
        line.remove_class("-open")
        line.value = ""
        self.filter_text = ""
        self.query_one(DataTable).focus()
        self.sync()
        self.post_crumbs()
        return True

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action.startswith("vm_"):
            return self.vm_check(action)
        return True

    def action_refusal(self, action: str) -> str | None:
        """Why the key of `action` does nothing here (None: it works)."""
        return self.vm_refusal(action) if action.startswith("vm_") else None

    def action_refresh_now(self) -> None:
        self.refresh_vms()
        vid = self.cursor_id()
        fact = self.agents.get(vid) if vid else None
        if fact is not None:       # due now: the walk asks it next
            self.agents[vid] = vmlook.AgentFact(fact.info, fact.taken, 0.0, fact.error)
        self.kick_agents()

    # ------------------------------------------------------------------ the agent walk

    def agent_targets(self) -> list[str]:
        """Running VMs on screen, the cursor's first, then the rows shown from top to bottom."""
        table = self.query_one(DataTable)
        top = int(table.scroll_y)
        height = max(1, (table.size.height or self.app.size.height) - (1 if table.show_header else 0))
        ids = [self.cursor_id()] + [row.key.value for row in table.ordered_rows[top:top + height]]
        out: list[str] = []
        for vid in ids:
            vm = self.vms.get(vid) if vid else None
            if vm is not None and vid not in out and vm.state is VMState.RUNNING and not vm.is_template:
                out.append(vid)
        return out

    def kick_agents(self) -> None:
        """Ask the next agent that is due, unless one is being asked or the view is not seen; else
        come back when the next one is due."""
        if self._agent_timer is not None:
            self._agent_timer.stop()
            self._agent_timer = None
        if self._agent_inflight is not None or not self.shown:
            return
        now = time.monotonic()
        wait: float | None = None
        for vid in self.agent_targets():
            fact = self.agents.get(vid)
            due = fact.tried + AGENT_REFRESH_S if fact is not None else now
            if due <= now:
                self._agent_inflight = vid
                name = self.vms[vid].name
                self.run_worker(partial(self._ask_agent, vid, name), name=f"agent {name}", group="vms-agent",
                                exit_on_error=False)
                return
            wait = due - now if wait is None else min(wait, due - now)
        if wait is not None:
            self._agent_timer = self.set_timer(wait, self.kick_agents)

    async def _ask_agent(self, vid: str, name: str) -> None:
        info, error, _hint = await attempt(self.client.vm_agent(name), f"agent of {name}")
        self.post_message(AgentSampled(vid, info, error))   # a failure is shown; the walk goes on

    def on_agent_sampled(self, message: AgentSampled) -> None:
        message.stop()
        self._agent_inflight = None
        vid, now = message.vm_id, time.monotonic()
        if vid in self.vms:
            old = self.agents.get(vid) or vmlook.AgentFact()
            self.agents[vid] = (vmlook.AgentFact(old.info, old.taken, now, message.error) if message.error
                                else vmlook.AgentFact(message.info, now, now))
            if self.shown:
                self.sync()
            else:
                self._dirty = True
        self.kick_agents()
