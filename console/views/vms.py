"""VMs view (k9s style): every VM and template in one table with its state and what its guest agent
says, the same VM keys as the inventory, `/` to filter (states too), `o`/`O` or a header click to
sort by any column, space to mark VMs for the keys that act on all of them, and enter to see a VM in
the inventory.

The list comes from a VMPoller that polls only while the view is shown. The rows live in a
KeyedTable (console/widgets/table.py): keyed by VM record id and diffed, the cursor and the detail
following their VM by key. Agent facts come from a walk over the running VMs on screen (the
cursor's first), one `vm_agent` call at a time, each VM at most every AGENT_REFRESH_S.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.timer import Timer
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.api import VMState, VMView
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys, vms as vmlook
from ferry.console.messages import AgentSampled, VMsUpdated
from ferry.console.dialogs.modals import esc
from ferry.console.poller import VMList, attempt
from ferry.console.theming import rich_style
from ferry.console.views.base import ViewBase
from ferry.console.vmactions import VMActions
from ferry.console.widgets.table import Cell, Column, KeyedTable, Row, TableFilter


AGENT_REFRESH_S = 15.0    # a VM's agent is asked again at most this often
COLUMNS = (
    Column("name", "NAME", flex=True, least=8),
    Column("host", "HOST", cap=12),
    Column("state", "STATE", cap=13),
    Column("agent", "AGENT", cap=14),
    Column("ip", "IP", cap=16, optional=True),
    Column("cpu", "CPU%", cap=7),
    Column("mem", "MEM", cap=11),
    Column("vcpu", "vCPU", cap=7),
    Column("disk", "DISK", cap=7),
)


class StyledCell(Cell):
    """A cell that differs from another in its style alone (an agent answer going stale is dimmed):
    Rich's Text compares text and spans only, so the table would not redraw it."""

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Text) and super().__eq__(other) and self.style == other.style
                and self.sort_value == getattr(other, "sort_value", None))

    __hash__ = None     # type: ignore[assignment]


def styled_cell(text: str, *, sort: Any, style: Style) -> StyledCell:
    out = StyledCell(" " + text, style=style, no_wrap=True, overflow="ellipsis", end="")
    out.sort_value = sort
    return out


class VMsView(ViewBase, VMActions, Vertical):
    BINDINGS = opkeys.bindings("vm", "vms")
    VIEW = "vms"
    TITLE = "VMs"

    def __init__(self, client: Any, *, clock: Callable[[], float] = time.time, poll: dict | None = None) -> None:
        super().__init__(client, clock=clock, id="vms")
        self.interval = (poll or {}).get("vm_interval")
        self.vm_list = VMList()
        self.vms: dict[str, VMView] = {}
        self.recycled: dict[str, VMView] = {}
        self.agents: dict[str, vmlook.AgentFact] = {}   # VM id -> its agent's last answer and attempt
        self.selected_id: str | None = None
        self._dirty = False
        self._started = False
        self._seen_selected: VMView | None = None
        self._agent_inflight: str | None = None
        self._agent_timer: Timer | None = None
        self._rows: dict[str, tuple[tuple, Row]] = {}   # VM id -> what its row was made of, and the row

    # ------------------------------------------------------------------ layout and lifecycle

    def compose(self) -> ComposeResult:
        table = KeyedTable(COLUMNS, sort="name", id="vm-table")
        table.on_cursor = self._cursor_moved
        self._table = table
        yield table
        yield TableFilter(table, id="vm-filter")
        yield Static(id="vms-status")

    @property
    def table(self) -> KeyedTable:
        return self._table      # kept from compose: a query per call cost a millisecond, on every footer key check

    @property
    def filter_text(self) -> str:
        return self.table.filter_text

    def on_mount(self) -> None:
        self.watch(self.table, "scroll_y", self._scrolled, init=False)
        self.make_vm_poller(self.interval)
        self.render_status()

    def activate(self) -> None:
        """Called when the view is shown: poll from now on (the first time), draw, walk the agents."""
        if not self._started and self.vm_poller is not None:
            self._started = True
            self.run_worker(partial(self.vm_poller.run), name="VM list (VMs view)", group="vms-view",
                            exclusive=True, exit_on_error=False)
        self.catch_up()
        self.post_crumbs()
        self.table.focus()

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
        vl, old = message.vms, self.vm_list
        self.vm_list = vl
        if not (vl.ok and old.ok and vl.vms == old.vms and vl.recycled == old.recycled):
            # a list equal to the last keeps the records it has: their rows are made again only when
            # something else they show changed (10,000 VMs polled again unchanged)
            self.vms = {v.id: v for v in vl.vms}
            self.recycled = {v.id: v for v in vl.recycled}
            self.app.heap_grew(len(self.vms) + len(self.recycled))
        for vid in [v for v in self.agents if v not in self.vms]:
            del self.agents[vid]
        self.vms_listed(message.vms)      # marks of VMs gone drop here
        if not self.shown:
            self._dirty = True
            return
        self.sync()
        self.kick_agents()

    def on_resize(self) -> None:
        self.kick_agents()      # more (or other) rows on screen

    def _scrolled(self) -> None:
        self.kick_agents()

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self._rows.clear()
        self.sync(rerender=True)

    def row(self, vm: VMView, now: float) -> Row:
        """One VM's row: the cells of vmlook.table_cells, sorting by value (names naturally, VMs before
        templates before the recycle bin), and what `/` matches besides (kind, the bin, a mark). A row
        without agent facts (they age with the clock) is made once for what it shows."""
        fact = self.agents.get(vm.id)
        busy = bool(self.busy_task(vm))
        marked = vm.id in self.marked
        made = (vm, busy, marked)
        if fact is None:
            kept = self._rows.get(vm.id)
            if kept is not None and kept[0] == made:
                return kept[1]
        row = self._make_row(vm, fact, now, busy, marked)
        if fact is None:
            self._rows[vm.id] = (made, row)
        else:
            self._rows.pop(vm.id, None)
        return row

    def _make_row(self, vm: VMView, fact: vmlook.AgentFact | None, now: float, busy: bool, marked: bool) -> Row:
        cells = vmlook.table_cells(vm, fact, now, busy=busy)
        group = vmlook.row_order(vm)[0]
        out = []
        for (key, _), (text, variable, dim) in zip(vmlook.TABLE_COLUMNS, cells):
            style = rich_style(self.app.theme_variables, variable, dim=dim) if variable else Style(dim=dim)
            sort: Any = text
            if key == "name":
                sort = f"{group} {vm.name}"           # digit runs sort as numbers, the group first
                text = (vmlook.MARK + " " if marked else "") + text
                if marked:
                    style = style + Style(bold=True)
            elif key == "vcpu":
                sort = vm.cpus
            elif key == "disk":
                sort = vm.disk_bytes
            elif key in ("cpu", "mem"):
                sort = _number(text)
            out.append(styled_cell(safe(text), sort=sort, style=style))
        search = f"{vm.kind} {'recycle bin recycled' if vm.in_bin else ''} {'marked' if marked else ''}"
        return Row(tuple(out), search=search)

    def sync(self, *, rerender: bool = False) -> None:
        """Bring the table in line with the list and the agent facts: the KeyedTable diffs, filters,
        sorts and keeps the cursor on its VM."""
        table = self.table
        now = time.monotonic()
        everything = {**self.vms, **self.recycled}
        if rerender:
            table.redraw()
        for vid in [k for k in table.keys() if k not in everything]:
            table.drop(vid)
        for vid in [k for k in self._rows if k not in everything]:
            del self._rows[vid]
        for vid, vm in everything.items():
            table.put(vid, self.row(vm, now))
        table.commit()
        self._follow_cursor()
        self.render_status()

    def marks_changed(self) -> None:
        """Marks were set or cleared: the rows show them, the status line counts them."""
        if self.shown:
            self.sync()
        else:
            self._dirty = True

    def _follow_cursor(self) -> None:
        """After a sync or a move: what is under the cursor now (its row may be gone, or its VM changed)."""
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
        return self.table.selected_key

    def cursor_vm(self) -> VMView | None:
        vid = self.cursor_id()
        return (self.vms.get(vid) or self.recycled.get(vid)) if vid else None

    def on_keyed_table_cursor_moved(self, message: KeyedTable.CursorMoved) -> None:
        message.stop()
        self._cursor_moved(message.key)

    def _cursor_moved(self, key: str | None) -> None:
        self._follow_cursor()
        self.kick_agents()

    def on_keyed_table_sorted(self, message: KeyedTable.Sorted) -> None:
        message.stop()
        self.render_status()
        self.post_crumbs()
        self.kick_agents()

    def on_data_table_row_selected(self, event: KeyedTable.RowSelected) -> None:
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
        """One line under the table: counts, marks, the filter and the sort, or why the list is stale."""
        vl = self.vm_list
        table = self.table
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
                text += (f" · [$accent]/{esc(self.filter_text)}[/] {len(table.shown_keys)} of "
                         f"{len(self.vms) + len(self.recycled)} [$text-muted](esc clears)[/]")
            if (table.sort_column, table.sort_reverse) != table.default_sort:
                text += f" · sorted by {esc(table.sort_text())}"
        if self.marked:
            text += f" · [b $accent]{vmlook.MARK} {len(self.marked)} marked[/] [$text-muted](M clears)[/]"
        self.query_one("#vms-status", Static).update(Content.from_markup(text))

    # ------------------------------------------------------------------ the filter

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()

    def clear_filter(self) -> bool:
        """esc: clear the filter (True), or nothing to clear (False)."""
        return self.query_one(TableFilter).clear()

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
        table = self.table
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


def _number(text: str) -> float | None:
    """The number a CPU% or MEM cell starts with (12%, 42M/1.9G), in bytes for sizes; None for - or ?."""
    head = text.split("/")[0].rstrip("%")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(head[-1:], 1)
    try:
        return float(head.rstrip("KMGT")) * mult
    except ValueError:
        return None
