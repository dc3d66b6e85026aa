"""Inventory view: site -> clusters -> hosts -> VMs and templates (plus the recycle bin), and the
facts of what is selected. Host facts and the VM list come from pollers running in workers; the
tree is diffed node by node against each new VM list, never rebuilt, so the cursor stays put.

`/` filters the tree (names, hosts, states; esc clears): what matches shows with its parents, and
what a matching cluster or host holds. The tree is built again when the filter, or what it lets
through, changes; the cursor goes back to what it was on."""

from __future__ import annotations

import bisect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.widgets import Static, Tree
from textual.timer import Timer
from textual.widgets.tree import TreeNode

from ferry.engine import fmt
from ferry.engine.api import AgentReport, AgentState, VMView

from ferry.console import keys as opkeys, vms as vmlook
from ferry.console.messages import AgentUpdated, HostUpdated, VMsUpdated
from ferry.console.dialogs.modals import esc
from ferry.console.poller import FACTS_TIMEOUT_S, HostPoller, HostStatus, VMList, attempt
from ferry.console.severity import Severity, load_severity, usage_severity
from ferry.console.theming import rich_style
from ferry.console.views.base import ViewBase
from ferry.console.widgets.page import Page
from ferry.console.widgets.table import TableFilter
from ferry.console.vmactions import VMActions

LABEL_W = 11
PROBLEM_LINES = 6          # the site and cluster pages name this many problems, then count the rest
DETAIL_DELAY_S = 0.1
RELABEL_LINES = 64          # more labels changed at once than this: the tree is drawn again whole
AGENT_DEBOUNCE_S = 0.4     # the cursor rests this long on a running VM before its agent is asked
AGENT_REFRESH_S = 10.0     # then asked again this often while it stays selected and shown
BIN = "recycle bin"


@dataclass(frozen=True)
class Shown:
    """What the tree shows under a filter: clusters and hosts by name, VMs and binned VMs by id."""
    clusters: frozenset[str]
    hosts: frozenset[str]
    vms: frozenset[str]
    binned: frozenset[str]


class TreeFiltering:
    """What the `/` line (a TableFilter) drives: the inventory's tree filter."""

    def __init__(self, view: "InventoryView") -> None:
        self.view = view

    @property
    def filter_text(self) -> str:
        return self.view.filter_text

    def set_filter(self, text: str) -> None:
        self.view.set_filter(text)

    def focus(self) -> None:
        self.view.query_one("#tree", Tree).focus()


def _hit(words: list[str], hay: str) -> bool:
    hay = hay.casefold()
    return all(w in hay for w in words)


@dataclass(frozen=True)
class NodeRef:
    kind: str      # "site" | "cluster" | "host" | "vm" | "bin" | "recycled"
    name: str
    id: str = ""   # VMs: the record id (names can repeat in the recycle bin)


def host_severity(st: HostStatus | None) -> Severity:
    if st is None or st.ok is None:
        return Severity.UNKNOWN
    return Severity.OK if st.ok else Severity.CRIT


def _clock(ts: float | None) -> str:
    return fmt.clock(ts)


def _network_lines(f: Any) -> list[str]:
    """The host's networks in its detail: each bridge (the site's networks on it, state, MTU, VLANs, its
    uplinks, how many VM taps and whose), then each network of the site whose bridge is not there:
    a problem when Ferry may not make it (create = false), else made at the first start."""
    bridges = list(getattr(f, "bridges", None) or [])
    nets = list(getattr(f, "networks", None) or [])
    absent = [n for n in nets if n.present is False]
    if not bridges and not absent:
        return ["", "[b]Networks[/b]  [$text-muted]no bridges[/]"]
    lines = ["", "[b]Networks[/b]"]
    width = max((len(x) for x in [*(b.name for b in bridges), *(n.bridge for n in absent)]), default=0) + 2
    pad = " " * (width + 2)
    for b in bridges:
        vlans = ("VLANs " + (_vlan_list(b.vlans) if b.vlans else "none")) if b.vlan_filtering and b.vlans is not None             else "VLAN filtering on" if b.vlan_filtering else "no VLAN filtering"
        head = [esc(", ".join(b.networks)) if b.networks else "[$text-muted]not a network of the site[/]",
                esc(b.state), f"MTU {b.mtu}" if b.mtu else "MTU ?", vlans]
        lines.append(f"  {esc(b.name.ljust(width))}" + " · ".join(head))
        taps = f"{len(b.taps)} VM tap{'' if len(b.taps) == 1 else 's'}"
        if b.vms:
            taps += ": " + esc(_some(b.vms, 5))
        elif b.taps:
            taps += " [$text-muted](of no VM of the site)[/]"
        members = ("ports: " + esc(", ".join(b.members))) if b.members else "no other ports"
        lines.append(f"{pad}[$text-muted]{members} ·[/] {taps}")
    for n in absent:
        label = f"network {n.name}" + (f" (VLAN {n.vlan})" if n.vlan else "")
        if n.problem:
            lines.append(f"  {esc(n.bridge.ljust(width))}{Severity.MAJ.markup('missing')}: {esc(label)}, "
                         "and Ferry may not create it (create = false)")
            if n.hint:
                lines.append(f"{pad}[$text-muted]hint: {esc(n.hint)}[/]")
        else:
            lines.append(f"  {esc(n.bridge.ljust(width))}[$text-muted]not there yet: {esc(label)}; "
                         "Ferry makes it at the first start[/]")
    return lines


def _vlan_list(ids: list[int]) -> str:
    """'1, 10-12, 20': runs of VLAN ids as ranges."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _some(names: list[str], most: int = 3) -> str:
    """'lab1, lab2' or 'lab1, lab2, lab3 and 4 more'."""
    head = ", ".join(names[:most])
    return head + (f" and {len(names) - most} more" if len(names) > most else "")


class InventoryTree(Tree[NodeRef]):
    """The tree: space on a VM marks it (as in the VMs view) instead of toggling a node that has none;
    nodes added or removed inside `adding()` lay the tree out once, not once each (10,000 VMs)."""

    _holding = False
    _held = False

    @contextmanager
    def adding(self) -> Iterator[None]:
        self._holding, self._held = True, False
        try:
            yield
        finally:
            self._holding = False
            if self._held:
                super()._invalidate()

    def _invalidate(self) -> None:
        if self._holding:
            self._held = True
            return
        super()._invalidate()

    def watch_cursor_line(self, previous_line: int, line: int) -> None:
        """The view hears of the new node at once, not when the NodeHighlighted message reaches it:
        the tree's cursor and the page it selects are drawn in one frame (two frames are at least
        1/60 s apart, the first one ready early only to wait for the second)."""
        super().watch_cursor_line(previous_line, line)
        node = self._cursor_node
        view = self._view()
        if node is not None and view is not None and previous_line != line:
            view.highlighted(node)

    def _view(self) -> "InventoryView | None":
        return next((a for a in self.ancestors if isinstance(a, InventoryView)), None)

    def action_toggle_node(self) -> None:
        node = self.cursor_node
        view = self._view()
        if view is not None and node is not None and isinstance(node.data, NodeRef) \
                and node.data.kind in ("vm", "recycled"):
            view.action_vm_mark()
            return
        super().action_toggle_node()


class InventoryView(ViewBase, VMActions, Horizontal):
    """Tree on the left, details on the right. Facts come from a HostPoller, VMs from a VMPoller."""

    BINDINGS = opkeys.bindings("inventory", "vm")
    VIEW = "inventory"
    TITLE = "Inventory"

    def __init__(self, client: Any, *, clock: Callable[[], float] = time.time, poll: dict | None = None) -> None:
        super().__init__(client, clock=clock, id="inventory")
        self.poll = dict(poll or {})     # HostPoller knobs: interval, backoff_base, backoff_max, concurrency
        self.status: dict[str, HostStatus] = {h: HostStatus(h) for h in self.site.hosts}
        self.selected = NodeRef("site", self.site.name)
        self.poller: HostPoller | None = None
        self._host_nodes: dict[str, TreeNode] = {}
        self._cluster_nodes: dict[str, TreeNode] = {}
        self._dirty = False
        self._detail_pending = False
        # VMs: what the last poll said, and the tree nodes showing it (keyed by record id)
        self.vm_list = VMList()
        self.vms: dict[str, VMView] = {}
        self.recycled: dict[str, VMView] = {}
        self._vm_nodes: dict[str, TreeNode] = {}
        self._bin_node: TreeNode | None = None
        self._bin_vm_nodes: dict[str, TreeNode] = {}
        self._labels: dict[str, tuple] = {}          # node key -> what its label shows
        self.agent: dict[str, AgentReport] = {}       # VM name -> what its guest agent said last
        self._agent_timer: Timer | None = None
        self._agent_inflight: str | None = None
        self._agent_again = False
        self.filter_text = ""
        self._shown: Shown | None = None              # None: no filter, everything shown
        self._by_host: dict[str, list[VMView]] | None = None   # self.vms by host, made when first asked
        self._busy: list[str] = []                    # ids of the VMs a task works on
        self._labels_pending = False
        self._relabelled: set[TreeNode] = set()       # nodes whose labels changed since the tree was drawn

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        tree = InventoryTree(self.site.name, data=NodeRef("site", self.site.name), id="tree")
        self._tree_w = tree       # kept: a query per use cost a millisecond, several times a key
        tree.show_root = True
        tree.guide_depth = 2
        tree.root.expand()
        for cname in sorted(self.site.clusters):
            cnode = tree.root.add(cname, data=NodeRef("cluster", cname), expand=True)
            self._cluster_nodes[cname] = cnode
            for h in sorted(self.site.hosts_in(cname), key=lambda h: h.name):
                self._host_nodes[h.name] = cnode.add_leaf(h.name, data=NodeRef("host", h.name))
        yield tree
        yield Page(id="detail-body")
        line = TableFilter(TreeFiltering(self), id="inventory-filter")   # type: ignore[arg-type]
        line.placeholder = "filter: a part of a name, a host or a state · enter keeps it · esc clears"
        line.styles.dock = "bottom"
        yield line
        status = Static(id="inventory-status", classes="view-status")
        status.styles.dock = "bottom"
        status.display = False
        yield status

    def on_mount(self) -> None:
        host_knobs = {k: v for k, v in self.poll.items() if k != "vm_interval"}
        self.poller = HostPoller(sorted(self.site.hosts), self._fetch,
                                 lambda st: self.post_message(HostUpdated(st)), clock=self.clock, **host_knobs)
        self.run_worker(partial(self.poller.run), name="host facts", group="facts", exclusive=True, exit_on_error=False)
        vm_poller = self.make_vm_poller(self.poll.get("vm_interval"))
        self.run_worker(partial(vm_poller.run), name="VM list", group="vms", exclusive=True, exit_on_error=False)
        self.relabel()
        self.render_detail()

    async def _fetch(self, host: str) -> Any:
        return await self.client.host_facts(host, timeout=FACTS_TIMEOUT_S)

    def activate(self) -> None:
        """Called when the view is shown."""
        self.catch_up()
        self.post_crumbs()
        self._tree_w.focus()

    def catch_up(self) -> None:
        """Draw what changed while the view was hidden or covered by a modal; ask for the VMs again."""
        if self._dirty:
            self._dirty = False
            self.relabel()
            self.render_detail()
        self.refresh_vms()
        self.schedule_agent()
        self.ask_vm_checks()

    def crumbs(self) -> tuple[str, ...]:
        ref = self.selected
        if self.filter_text:
            return ("inventory", f"/{self.filter_text}") + self._crumbs(ref)[1:]
        return self._crumbs(ref)

    def _crumbs(self, ref: NodeRef) -> tuple[str, ...]:
        if ref.kind == "site":
            return ("inventory",)
        if ref.kind == "cluster":
            return ("inventory", ref.name)
        if ref.kind == "host":
            return ("inventory", self.site.hosts[ref.name].cluster, ref.name)
        if ref.kind == "vm":
            vm = self.vms.get(ref.id)
            host = vm.host if vm else "?"
            spec = self.site.hosts.get(host)
            return ("inventory",) + ((spec.cluster,) if spec else ()) + (host, ref.name)
        if ref.kind == "bin":
            return ("inventory", BIN)
        return ("inventory", BIN, ref.name)

    # ------------------------------------------------------------------ events

    def on_host_updated(self, message: HostUpdated) -> None:
        message.stop()
        st = message.status
        old = self.status.get(st.host)
        self.status[st.host] = st
        if not self.shown:
            self._dirty = True
            return
        if old is None or host_severity(old) != host_severity(st):
            self.relabel_host(st.host)
            if self.filter_text and self._shown_now(self.vm_list) != self._shown:
                self.rebuild_tree()     # "/down": a host that stops answering shows up
        if self._affects_selection(st.host):
            self.schedule_detail()

    def schedule_detail(self) -> None:
        """Redraw the detail pane soon, once for a burst of updates (a site of many hosts)."""
        if not self._detail_pending:
            self._detail_pending = True
            self.set_timer(DETAIL_DELAY_S, self._flush_detail)

    def _flush_detail(self) -> None:
        self._detail_pending = False
        self.render_detail()

    def _affects_selection(self, host: str) -> bool:
        ref = self.selected
        if ref.kind == "site":
            return True
        if ref.kind == "cluster":
            return self.site.hosts[host].cluster == ref.name
        return ref.kind == "host" and ref.name == host

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        event.stop()
        self.highlighted(event.node)     # heard already from the tree itself, most of the time

    def highlighted(self, node: TreeNode) -> None:
        ref = node.data
        if isinstance(ref, NodeRef) and ref != self.selected:
            self.selected = ref
            self.render_detail()
            self.post_crumbs()
            self.refresh_bindings()
            if ref.kind == "host" and self.status[ref.name].ok is None and self.poller:
                self.poller.poke(ref.name)
            self.schedule_agent()
            self.ask_vm_checks()

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        event.stop()

    def selected_hosts(self) -> list[str]:
        ref = self.selected
        if ref.kind == "host":
            return [ref.name]
        if ref.kind == "cluster":
            return sorted(h.name for h in self.site.hosts_in(ref.name))
        if ref.kind == "vm":
            vm = self.vms.get(ref.id)
            return [vm.host] if vm and vm.host in self.site.hosts else []
        return sorted(self.site.hosts)

    # ------------------------------------------------------------------ actions

    def cursor_ref(self) -> NodeRef:
        """What the tree cursor is on now (keys can arrive before the highlight message)."""
        node = self._tree_w.cursor_node
        return node.data if node is not None and isinstance(node.data, NodeRef) else self.selected

    def cursor_vm(self) -> VMView | None:
        ref = self.cursor_ref()
        if ref.kind == "vm":
            return self.vms.get(ref.id)
        if ref.kind == "recycled":
            return self.recycled.get(ref.id)
        return None

    def cursor_host(self) -> str:
        """The selected host, the first of the selected cluster, else the selected VM's."""
        ref = self.cursor_ref()
        if ref.kind == "host":
            return ref.name
        if ref.kind == "cluster":
            hosts = sorted(h.name for h in self.site.hosts_in(ref.name))
            if hosts:
                return hosts[0]
        return super().cursor_host()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "probe" and self.cursor_ref().kind != "host":
            return None     # shown dimmed: select a host first
        if action.startswith("vm_"):
            return self.vm_check(action)
        return True

    def action_refusal(self, action: str) -> str | None:
        """Why the key of `action` does nothing here (None: it works)."""
        if action == "probe":
            return None if self.cursor_ref().kind == "host" else "select a host in the tree first, then press p"
        if action.startswith("vm_"):
            return self.vm_refusal(action)
        return None

    def action_probe(self) -> None:
        ref = self.cursor_ref()
        if ref.kind != "host":
            self.app.notify("select a host in the tree first, then press p", title="Probe", severity="warning")
            return
        self.app.start_probe(ref.name)   # type: ignore[attr-defined]

    def action_refresh_facts(self) -> None:
        if self.poller:
            for h in self.selected_hosts():
                self.poller.poke(h)
        self.refresh_vms()
        self.schedule_agent(0.0)

    def refresh_all(self) -> None:
        if self.poller:
            for h in self.site.hosts:
                self.poller.poke(h)
        self.refresh_vms()

    # ------------------------------------------------------------------ VMs in the tree

    def on_vms_updated(self, message: VMsUpdated) -> None:
        message.stop()
        vl, old = message.vms, self.vm_list
        if vl.ok and old.ok and vl.vms == old.vms and vl.recycled == old.recycled:
            # the same list again (most polls of a big site): the tree stands; only a busy mark may have
            # gone with its task, which the feed says before the list does
            self.vm_list = vl
            variables = self.app.theme_variables
            for vid in self._busy:
                if vid in self._vm_nodes and vid in self.vms:
                    self._label_vm(self._vm_nodes[vid], f"vm:{vid}", self.vms[vid], variables)
        else:
            self.apply_vms(vl)
        self.vms_listed(vl)

    def apply_vms(self, vl: VMList) -> None:
        """Diff the tree against a new VM list: add, move, remove and relabel nodes; keep the cursor."""
        tree: Tree[NodeRef] = self._tree_w
        before = self.selected
        old_sel_vm = (self.vms if before.kind == "vm" else self.recycled).get(before.id)
        stale_before = self.vm_list.ok
        self.vm_list = vl
        every_live = {v.id: v for v in vl.vms}
        every_binned = {v.id: v for v in vl.recycled}
        shown = self._shown_now(vl)
        if shown != self._shown and vl.ok:
            if shown is None or self._shown is None or (shown.clusters, shown.hosts) != (
                    self._shown.clusters, self._shown.hosts):
                self._shown = shown
                self.rebuild_tree()    # other hosts or clusters pass the filter: built again, then here again
                return
            self._shown = shown
        live = every_live if shown is None else {i: v for i, v in every_live.items() if i in shown.vms}
        binned = every_binned if shown is None else {i: v for i, v in every_binned.items() if i in shown.binned}
        cursor = tree.cursor_node
        fallback: TreeNode | None = None
        structural = changed = False
        variables = self.app.theme_variables

        with tree.adding():     # one layout of the tree for all the nodes added or removed
            # live VMs under their hosts; one that moved (another host, or became a template) is re-added
            follow: str | None = None
            for vid in [i for i, node in self._vm_nodes.items()
                        if i not in live or node.parent is not self._host_nodes.get(live[i].host)
                        or vmlook.sort_key(live[i]) != vmlook.sort_key(self.vms.get(i, live[i]))]:
                node = self._vm_nodes.pop(vid)
                self._labels.pop(f"vm:{vid}", None)
                if node is cursor:
                    if vid in live:
                        follow = vid          # the cursor goes with it
                    else:
                        fallback = node.parent
                parent = node.parent
                node.remove()
                if parent is not None and not parent.children:
                    parent.allow_expand = False
                structural = True
            for vid, vm in sorted(live.items(), key=lambda kv: vmlook.sort_key(kv[1])):
                node = self._vm_nodes.get(vid)
                if node is None:
                    host_node = self._host_nodes.get(vm.host)
                    if host_node is None:
                        continue      # its host is no longer in the configuration
                    node = self._add_sorted(host_node, vm, live, NodeRef("vm", vm.name, vid),
                                            self._new_label(f"vm:{vid}", vm, variables))
                    self._vm_nodes[vid] = node
                    if not host_node.allow_expand:
                        host_node.allow_expand = True
                        host_node.expand()
                    structural = True
                changed |= self._label_vm(node, f"vm:{vid}", vm, variables)

            # the recycle bin, under the site, shown while it holds something
            for vid in [i for i in self._bin_vm_nodes if i not in binned]:
                node = self._bin_vm_nodes.pop(vid)
                self._labels.pop(f"bin:{vid}", None)
                if node is cursor:
                    fallback = node.parent
                node.remove()
                structural = True
            if binned and self._bin_node is None:
                self._bin_node = tree.root.add(BIN, data=NodeRef("bin", BIN), expand=False)
                structural = True
            if self._bin_node is not None:
                for vid, vm in sorted(binned.items(), key=lambda kv: (kv[1].name, kv[0])):
                    node = self._bin_vm_nodes.get(vid)
                    if node is None:
                        node = self._add_sorted(self._bin_node, vm, binned, NodeRef("recycled", vm.name, vid),
                                                self._new_label(f"bin:{vid}", vm, variables))
                        self._bin_vm_nodes[vid] = node
                        structural = True
                    changed |= self._label_vm(node, f"bin:{vid}", vm, variables)
                if not binned:
                    if cursor is self._bin_node or fallback is self._bin_node:
                        fallback = tree.root
                    self._bin_node.remove()
                    self._bin_node = None
                    self._labels.pop("bin", None)
                    structural = True
                else:
                    self._label_bin(variables)

        if len(every_live) + len(every_binned) != len(self.vms) + len(self.recycled) or structural:
            self.app.heap_grew(len(every_live) + len(every_binned))
        self.vms, self.recycled = every_live, every_binned
        self._by_host = None
        self._busy = [i for i, v in every_live.items() if v.busy]
        if follow is not None and follow in self._vm_nodes:
            fallback = self._vm_nodes[follow]
        elif follow is not None:
            fallback = tree.root
        if structural and cursor is not None:
            target = fallback or cursor
            tree.last_line          # lay the tree out again, so every node knows its line
            if tree.cursor_node is not target or tree.cursor_line != target.line:
                tree.move_cursor(target)
        # what the detail pane shows may have changed
        ref = self.selected
        now_vm = (self.vms if ref.kind == "vm" else self.recycled).get(ref.id)
        if not (structural or changed or now_vm != old_sel_vm or vl.ok != stale_before or vl.ok is False):
            return
        if not self.shown:
            self._dirty = True
            return
        self.schedule_detail()
        if ref.kind == "vm" and (now_vm and now_vm.state) != (old_sel_vm and old_sel_vm.state):
            self.schedule_agent()
        self.refresh_bindings()

    # ------------------------------------------------------------------ the `/` filter

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()

    def clear_filter(self) -> bool:
        """esc: clear the filter (True), or nothing to clear (False)."""
        return self.query_one(TableFilter).clear()

    def set_filter(self, text: str) -> None:
        if text == self.filter_text:
            return
        self.filter_text = text
        self._shown = self._shown_now(self.vm_list)
        self.rebuild_tree()
        self.render_status()
        self.post_crumbs()

    def _shown_now(self, vl: VMList) -> Shown | None:
        """What passes the filter: a cluster, host or VM whose name, host or state matches every word,
        what a matching cluster or host holds, and the parents of all of it."""
        words = self.filter_text.casefold().split()
        if not words:
            return None
        clusters = {c for c in self.site.clusters if _hit(words, c)}
        hosts = {h.name for h in self.site.hosts.values() if h.cluster in clusters
                 or _hit(words, f"{h.name} {self._host_word(h.name)}")}
        vms = {v.id for v in vl.vms if v.host in hosts or _hit(words, self._vm_hay(v))}
        binned = {v.id for v in vl.recycled if _hit(words, f"{BIN} {self._vm_hay(v)}")}
        hosts |= {v.host for v in vl.vms if v.id in vms and v.host in self.site.hosts}
        clusters |= {self.site.hosts[h].cluster for h in hosts}
        return Shown(frozenset(clusters), frozenset(hosts), frozenset(vms), frozenset(binned))

    def _host_word(self, name: str) -> str:
        sev = host_severity(self.status.get(name))
        return {Severity.OK: "reachable ok", Severity.CRIT: "down not answering"}.get(sev, "unknown")

    @staticmethod
    def _vm_hay(vm: VMView) -> str:
        return f"{vm.name} {vm.host} {vm.state.value} {vm.kind}"

    def rebuild_tree(self) -> None:
        """The tree again, with what passes the filter; the cursor back on what it was on (or the site)."""
        tree: Tree[NodeRef] = self._tree_w
        keep, shown = self.selected, self._shown
        with self.app.batch_update():
            tree.clear()
            self._cluster_nodes.clear()
            self._host_nodes.clear()
            self._vm_nodes.clear()
            self._bin_vm_nodes.clear()
            self._bin_node = None
            self._labels.clear()
            for cname in sorted(self.site.clusters):
                if shown is not None and cname not in shown.clusters:
                    continue
                cnode = tree.root.add(cname, data=NodeRef("cluster", cname), expand=True)
                self._cluster_nodes[cname] = cnode
                for h in sorted(self.site.hosts_in(cname), key=lambda h: h.name):
                    if shown is None or h.name in shown.hosts:
                        self._host_nodes[h.name] = cnode.add_leaf(h.name, data=NodeRef("host", h.name))
            self.vms, self.recycled, self._by_host = {}, {}, None
            self.apply_vms(self.vm_list)
            self.relabel()
            node = self._node_of(keep)
            if node is not None:
                parent = node.parent
                while parent is not None:
                    parent.expand()
                    parent = parent.parent
            tree.last_line          # lay the tree out again, so every node knows its line
            tree.move_cursor(node or tree.root)

    def _node_of(self, ref: NodeRef) -> TreeNode | None:
        if ref.kind == "cluster":
            return self._cluster_nodes.get(ref.name)
        if ref.kind == "host":
            return self._host_nodes.get(ref.name)
        if ref.kind == "vm":
            return self._vm_nodes.get(ref.id)
        if ref.kind == "recycled":
            return self._bin_vm_nodes.get(ref.id)
        if ref.kind == "bin":
            return self._bin_node
        return None

    def marks_changed(self) -> None:
        """Marks were set or cleared: the labels of the VMs show them, the status line counts them."""
        variables = self.app.theme_variables
        for vid, node in self._vm_nodes.items():
            if vid in self.vms:
                self._label_vm(node, f"vm:{vid}", self.vms[vid], variables)
        for vid, node in self._bin_vm_nodes.items():
            if vid in self.recycled:
                self._label_vm(node, f"bin:{vid}", self.recycled[vid], variables)
        self.render_status()

    def render_status(self) -> None:
        """A line under the tree and the detail while a filter is set or VMs are marked."""
        parts = []
        if self.filter_text:
            n = len(self._shown.vms) if self._shown is not None else 0
            parts.append(f"[$accent]/{esc(self.filter_text)}[/] {n} of {len(self.vms)} VMs "
                         "[$text-muted](esc clears)[/]")
        if self.marked:
            parts.append(f"[b $accent]{vmlook.MARK} {len(self.marked)} marked[/] [$text-muted](M clears)[/]")
        status = self.query_one("#inventory-status", Static)
        status.display = bool(parts)
        status.update(Content.from_markup(" · ".join(parts)))

    def show_vm(self, vid: str, vl: VMList | None = None) -> bool:
        """Put the tree cursor on the VM or template with record id `vid`, opening its host (or the
        recycle bin), so the detail pane shows it. `vl`: a list that may be newer than this view's."""
        if vl is not None and vl.ok and vid not in self._vm_nodes and vid not in self._bin_vm_nodes:
            self.apply_vms(vl)
        if self.filter_text and vid not in self._vm_nodes and vid not in self._bin_vm_nodes:
            self.query_one(TableFilter).clear()      # filtered out here: shown all the same
        node = self._vm_nodes.get(vid) or self._bin_vm_nodes.get(vid)
        if node is None:
            return False
        parent = node.parent
        while parent is not None:
            parent.expand()
            parent = parent.parent
        tree: Tree[NodeRef] = self._tree_w
        tree.last_line          # lay the tree out again, so the node knows its line
        tree.move_cursor(node)
        if isinstance(node.data, NodeRef) and node.data != self.selected:
            self.selected = node.data
            self.render_detail()
            self.post_crumbs()
            self.refresh_bindings()
            self.schedule_agent()
            self.ask_vm_checks()
        return True

    def _add_sorted(self, parent: TreeNode, vm: VMView, known: dict[str, VMView], ref: NodeRef,
                    label: Text) -> TreeNode:
        key = vmlook.sort_key(vm) + (ref.id,)

        def key_of(child: TreeNode) -> tuple:
            other = known.get(child.data.id) if isinstance(child.data, NodeRef) else None
            return vmlook.sort_key(other) + (child.data.id,) if other is not None else ()
        children = parent.children
        # new VMs come in sorted order, so most go at the end (the first load of a big host)
        if not children or key_of(children[-1]) < key:
            return parent.add_leaf(label, data=ref)
        return parent.add_leaf(label, data=ref, before=bisect.bisect_left(children, key, key=key_of))

    def _new_label(self, key: str, vm: VMView, variables: dict[str, str]) -> Text:
        """The label of a node about to be added (so it is not set a second time)."""
        busy = bool(self.busy_task(vm))
        marked = vm.id in self.marked
        self._labels[key] = (vm.name, vm.state, vm.kind, busy, marked)
        return vmlook.label(vm, variables, busy=busy, marked=marked)

    def _label_vm(self, node: TreeNode, key: str, vm: VMView, variables: dict[str, str], *, force: bool = False) -> bool:
        """Set the label when what it shows changed; True if it did."""
        busy = bool(self.busy_task(vm))
        marked = vm.id in self.marked
        shown = (vm.name, vm.state, vm.kind, busy, marked)
        if force or self._labels.get(key) != shown:
            self._labels[key] = shown
            self._set_label(node, vmlook.label(vm, variables, busy=busy, marked=marked))
            return True
        return False

    def _set_label(self, node: TreeNode, label: Text) -> None:
        """TreeNode.set_label without its refresh per node: a new VM list relabels thousands of nodes,
        and each set_label queued a callback that walked the visible lines. One refresh of the tree
        after the batch draws them all (a line is drawn again when its nodes' update counts change)."""
        text = node.tree.process_label(label)
        if text == node._label:
            return          # the same label (a host polled again and still down): nothing to draw
        node._label = text
        node._updates += 1
        if len(self._relabelled) <= RELABEL_LINES:
            self._relabelled.add(node)
        if not self._labels_pending:
            self._labels_pending = True
            self.call_later(self._labels_drawn)

    def _labels_drawn(self) -> None:
        """Draw the lines whose labels changed, or the whole tree after many."""
        self._labels_pending = False
        nodes, self._relabelled = self._relabelled, set()
        tree = self._tree_w
        if len(nodes) > RELABEL_LINES:
            tree.refresh()
            return
        top = tree.scroll_offset.y
        for line_no, line in enumerate(tree._tree_lines[top:top + tree.size.height], top):
            if line.node in nodes:
                tree._refresh_line(line_no)

    def _label_bin(self, variables: dict[str, str]) -> None:
        if self._bin_node is None:
            return
        n = len(self.recycled) if self.recycled else len(self._bin_vm_nodes)
        if self._labels.get("bin") != n:
            self._labels["bin"] = n
            self._set_label(self._bin_node, Text.assemble(("♻", rich_style(variables, "sev-unknown")), f" {BIN} ",
                                                   (f"({n})", rich_style(variables, "sev-unknown"))))

    # ------------------------------------------------------------------ the guest agent of the selected VM

    def schedule_agent(self, delay: float = AGENT_DEBOUNCE_S) -> None:
        """Ask the selected VM's agent after `delay` (a cursor moving over many VMs asks none of them)."""
        if self._agent_timer is not None:
            self._agent_timer.stop()
            self._agent_timer = None
        vm = self.vms.get(self.selected.id) if self.selected.kind == "vm" else None
        if vm is None or vm.is_template or not vm.running:
            return
        self._agent_timer = self.set_timer(delay, self._agent_due)

    def _agent_due(self) -> None:
        self._agent_timer = None
        vm = self.vms.get(self.selected.id) if self.selected.kind == "vm" else None
        if vm is None or not vm.running or not self.shown:
            return
        if self._agent_inflight is not None:
            self._agent_again = True       # never two at once: ask again when this one is back
            return
        self._agent_inflight = vm.name
        self.run_worker(partial(self._fetch_agent, vm.name), name=f"agent {vm.name}", group="vm-agent",
                        exit_on_error=False)
        self.render_detail()

    async def _fetch_agent(self, name: str) -> None:
        info, error, _hint = await attempt(self.client.vm_agent(name), f"agent of {name}")
        if error is not None:   # shown, not raised: the next refresh tries again
            info = AgentReport(name, AgentState.NOT_RUNNING, time.time(), reason=error)
        self.post_message(AgentUpdated(name, info))

    def on_agent_updated(self, message: AgentUpdated) -> None:
        message.stop()
        self._agent_inflight = None
        self.agent[message.name] = message.info
        for name in [n for n in self.agent if n not in {v.name for v in self.vms.values()}]:
            del self.agent[name]
        again, self._agent_again = self._agent_again, False
        if self.selected.kind == "vm" and self.selected.name == message.name and self.shown:
            self.render_detail()
        self.schedule_agent(AGENT_DEBOUNCE_S if again else AGENT_REFRESH_S)

    # ------------------------------------------------------------------ rendering

    def relabel(self) -> None:
        """All tree labels (after a theme change, or when the view comes back)."""
        for name in self._host_nodes:
            self._label_host(name)
        for cname in self._cluster_nodes:
            self._label_cluster(cname)
        variables = self.app.theme_variables
        for vid, node in self._vm_nodes.items():
            if vid in self.vms:
                self._label_vm(node, f"vm:{vid}", self.vms[vid], variables, force=True)
        for vid, node in self._bin_vm_nodes.items():
            if vid in self.recycled:
                self._label_vm(node, f"bin:{vid}", self.recycled[vid], variables, force=True)
        self._labels.pop("bin", None)
        self._label_bin(variables)

    def relabel_host(self, name: str) -> None:
        """One host's label and its cluster's."""
        self._label_host(name)
        self._label_cluster(self.site.hosts[name].cluster)

    def _label_host(self, name: str) -> None:
        node = self._host_nodes.get(name)
        if node is None:
            return      # filtered out
        sev = host_severity(self.status.get(name))
        style = rich_style(self.app.theme_variables, sev.variable)
        self._set_label(node, Text.assemble((sev.symbol, style), " ", name))

    def _label_cluster(self, cname: str) -> None:
        """A cluster shows how many hosts it has and how many do not answer."""
        node = self._cluster_nodes.get(cname)
        if node is None:
            return
        variables = self.app.theme_variables
        hosts = self.site.hosts_in(cname)
        bad = sum(1 for h in hosts if host_severity(self.status.get(h.name)) == Severity.CRIT)
        label = Text(cname)
        label.append(f" ({len(hosts)})", style=rich_style(variables, "sev-unknown"))
        if bad:
            label.append(f" ✖{bad}", style=rich_style(variables, "sev-crit"))
        self._set_label(node, label)

    def render_detail(self) -> None:
        ref = self.selected
        if ref.kind == "site":
            text = self._site_text()
        elif ref.kind == "cluster":
            text = self._cluster_text(ref.name)
        elif ref.kind == "host":
            text = self._host_text(ref.name)
        elif ref.kind == "bin":
            text = vmlook.bin_text(list(self.recycled.values()))
        else:
            text = self._vm_text(ref)
        self.query_one("#detail-body", Page).update(Content.from_markup(text))

    def vm_checks_changed(self, vm_id: str) -> None:
        """The engine said anew which actions apply to a VM: its detail pane lists the keys."""
        if self.selected.kind in ("vm", "recycled") and self.selected.id == vm_id and self.shown:
            self.render_detail()        # with the footer's keys, in one frame

    def _vm_text(self, ref: NodeRef) -> str:
        vm = (self.vms if ref.kind == "vm" else self.recycled).get(ref.id)
        if vm is None:
            return f"[b]{esc(ref.name)}[/b]  [$text-muted]gone[/]"
        spec = self.site.hosts.get(vm.host)
        text = vmlook.detail_text(vm, cluster=spec.cluster if spec else None, agent=self.agent.get(vm.name),
                                  agent_pending=self._agent_inflight == vm.name, busy_task=self.busy_task(vm),
                                  keys=self.vm_keys(vm))
        return self._vm_stale_line() + text

    def _vm_stale_line(self) -> str:
        vl = self.vm_list
        if vl.ok is False:
            return (f"[b $error]✖ VM list stale since {_clock(vl.stale_since)}[/]  [$error]{esc(vl.error or '')}[/]\n"
                    + (f"  [$text-muted]hint: {esc(vl.hint)}[/]\n" if vl.hint else ""))
        return ""

    def vms_on(self, hosts: list[str]) -> list[VMView]:
        if self._by_host is None:       # once per VM list, not once per key (10,000 VMs)
            self._by_host = {}
            for v in self.vms.values():
                self._by_host.setdefault(v.host, []).append(v)
        return [v for h in hosts for v in self._by_host.get(h, ())]

    def _counts(self, hosts: list[str]) -> str:
        sevs = [host_severity(self.status.get(h)) for h in hosts]
        ok, bad, unk = (sevs.count(Severity.OK), sevs.count(Severity.CRIT), sevs.count(Severity.UNKNOWN))
        return (f"{Severity.OK.markup(f'{ok} reachable')}  {Severity.CRIT.markup(f'{bad} down')}  "
                f"{Severity.UNKNOWN.markup(f'{unk} unknown')}")

    def _problems(self, hosts: list[str]) -> list[str]:
        """Rows for the site or a cluster page: what is wrong, counted (hosts that do not answer,
        datastores missing or failing on a host, networks whose bridge is missing where Ferry may not
        make it, facts only partly read), or ✔ none once every host answered with nothing wrong."""
        down = [h for h in hosts if host_severity(self.status.get(h)) == Severity.CRIT]
        unknown = [h for h in hosts if host_severity(self.status.get(h)) == Severity.UNKNOWN]
        missing: dict[str, list[str]] = {}     # datastore -> hosts where it is missing
        failing: dict[str, list[str]] = {}     # datastore -> hosts where it could not be read
        nets: dict[str, list[str]] = {}        # "network (bridge)" -> hosts where the bridge is missing
        partial = []
        for h in hosts:
            f = self.status[h].facts if h in self.status else None
            if f is None or not f.reachable:
                continue
            if f.error:
                partial.append(h)
            for d in f.datastores:
                if d.error:
                    (missing if "does not exist" in d.error else failing).setdefault(d.name, []).append(h)
            for n in getattr(f, "networks", None) or []:
                if n.problem:
                    nets.setdefault(f"{n.name} (bridge {n.bridge})", []).append(h)
        counts = []
        if down:
            counts.append(Severity.CRIT.markup(f"{len(down)} host{'' if len(down) == 1 else 's'} not answering"))
        if missing:
            counts.append(Severity.MAJ.markup(f"{len(missing)} datastore{'' if len(missing) == 1 else 's'} missing"))
        if failing:
            counts.append(Severity.WARN.markup(f"{len(failing)} datastore{'' if len(failing) == 1 else 's'} "
                                               "not readable"))
        if nets:
            counts.append(Severity.MAJ.markup(f"{len(nets)} network{'' if len(nets) == 1 else 's'} missing"))
        if partial:
            counts.append(Severity.WARN.markup(f"{len(partial)} host{'' if len(partial) == 1 else 's'} "
                                               "with incomplete facts"))
        if not counts:
            text = Severity.OK.markup("none") if not unknown else \
                Severity.UNKNOWN.markup(f"none yet ({len(unknown)} not answered yet)")
            return [self._row("Problems", text)]
        rows = [self._row("Problems", " · ".join(counts))]
        shown = 0
        for what, found, sev in (("not answering", {h: [] for h in down}, Severity.CRIT),
                                 ("missing on", missing, Severity.MAJ), ("missing on", nets, Severity.MAJ),
                                 ("not readable on", failing, Severity.WARN)):
            for name, on in sorted(found.items()):
                if shown == PROBLEM_LINES:
                    break
                shown += 1
                where = f" {what} {esc(_some(on))}" if on else f" {what}"
                rows.append(self._row("", f"{sev.symbol} {esc(name)}{where}"))
        total = len(down) + len(missing) + len(nets) + len(failing)
        if total > shown:
            rows.append(self._row("", f"[$text-muted]… {total - shown} more (select a host for its page)[/]"))
        return rows

    @staticmethod
    def _row(label: str, value: str) -> str:
        return f"[$text-muted]{label.ljust(LABEL_W)}[/]{value}"

    def _site_text(self) -> str:
        site = self.site
        where = "built-in lab on this machine" if site.is_lab else f"config {site.source}"
        lines = [f"[b]Site {esc(site.name)}[/b]  [$text-muted]{esc(where)}[/]"]
        if site.production:
            lines.append("[b $error]⚠ PRODUCTION: actions here touch production[/]")
        lines += [
            "",
            self._row("Clusters", str(len(site.clusters))),
            self._row("Hosts", str(len(site.hosts))),
            self._row("", self._counts(sorted(site.hosts))),
            self._row("Datastores", f"{len(site.datastores)} ({sum(1 for d in site.datastores.values() if d.shared)} shared)"),
            *self._problems(sorted(site.hosts)),
        ]
        if self.vms:
            lines.append(self._row("VMs", vmlook.counts_text(list(self.vms.values()))))
        if self.recycled:
            lines.append(self._row("Recycled", f"{len(self.recycled)} in the recycle bin"))
        if self.vm_list.ok is False:
            lines.append(self._vm_stale_line().rstrip("\n"))
        lines += [
            "",
            "[b]Clusters[/b]",
        ]
        width = max((len(c) for c in site.clusters), default=0) + 2
        for cname in sorted(site.clusters):
            hosts = sorted(h.name for h in site.hosts_in(cname))
            n = f"{len(hosts)} host" + ("" if len(hosts) == 1 else "s")
            sevs = [host_severity(self.status.get(h)) for h in hosts]
            counts = "  ".join(s.markup(str(sevs.count(s))) for s in (Severity.OK, Severity.CRIT, Severity.UNKNOWN))
            lines.append(f"  {esc(cname.ljust(width))}{n.ljust(9)} {counts}")
        lines += ["", "[$text-muted]↑↓ move · p probe a host · f facts now · ? keys[/]"]
        return "\n".join(lines)

    def _cluster_text(self, cname: str) -> str:
        spec = self.site.clusters[cname]
        hosts = sorted(self.site.hosts_in(cname), key=lambda h: h.name)
        lines = [f"[b]Cluster {esc(cname)}[/b]" + (f"  [$text-muted]{esc(spec.description)}[/]" if spec.description else ""),
                 "",
                 self._row("Hosts", str(len(hosts))),
                 self._row("", self._counts([h.name for h in hosts])),
                 *self._problems([h.name for h in hosts])]
        cvms = self.vms_on([h.name for h in hosts])
        if cvms:
            lines.append(self._row("VMs", vmlook.counts_text(cvms)))
        lines += ["", "[b]Hosts[/b]"]
        width = max((len(h.name) for h in hosts), default=0) + 2
        for h in hosts:
            sev = host_severity(self.status.get(h.name))
            ds = ", ".join(d.name for d in self.site.datastores_of(h.name)) or "no datastore"
            lines.append(f"  {sev.markup(esc(h.name.ljust(width)))}{esc(h.transport):<6} {esc(ds)}")
        return "\n".join(lines)

    def _host_text(self, name: str) -> str:
        spec = self.site.hosts[name]
        st = self.status.get(name) or HostStatus(name)
        f = st.facts
        sev = host_severity(st)
        state = {Severity.OK: "reachable", Severity.CRIT: "not answering", Severity.UNKNOWN: "not asked yet"}[sev]
        if st.polling and st.ok is None:
            state = "asking…"
        lines = [f"[b]{esc(name)}[/b]  {sev.markup(state)}",
                 f"[$text-muted]cluster {esc(spec.cluster)} · {esc(spec.transport)} transport"
                 + (f" · {esc(spec.target)}" if spec.transport != "local" else "") + "[/]"]
        hvms = self.vms_on([name])
        if hvms:
            lines.append(self._row("VMs", vmlook.counts_text(hvms)))
        if st.ok is False:
            since = f"stale since {_clock(st.stale_since)}" if f is not None and getattr(f, "reachable", False) \
                else f"failing since {_clock(st.stale_since)}"
            lines.append(f"[b $error]✖ {since}[/]  [$error]{esc(st.error or '')}[/]")
            if st.hint:
                lines.append(f"  [$text-muted]hint: {esc(st.hint)}[/]")
            lines.append(f"  [$text-muted]next try {_clock(st.next_due)} ({st.failures} failed)[/]")
        lines.append("")
        if f is None or not getattr(f, "reachable", False):
            if st.ok is None:
                lines.append("[$text-muted]facts not collected yet[/]")
            return "\n".join(lines)
        g = lambda attr: getattr(f, attr, None)  # noqa: E731
        if g("error"):    # it answered, but not everything could be read
            lines.append(f"{Severity.WARN.markup('facts incomplete:')} {esc(g('error'))}")
            if g("hint"):
                lines.append(f"  [$text-muted]hint: {esc(g('hint'))}[/]")
        lines.append(self._row("OS", esc(g("os_name") or "?")))
        lines.append(self._row("Kernel", esc(g("kernel") or "?")))
        lines.append(self._row("CPUs", str(g("cpus") or "?")))
        total, avail = g("mem_total"), g("mem_available")
        if total:
            used = (total - (avail or 0)) / total if avail is not None else None
            msev = usage_severity(used)
            lines.append(self._row("Memory", f"{fmt.size(avail)} free of {fmt.size(total)}  "
                                             f"{msev.markup(f'{(used or 0) * 100:.0f}% used')}"))
        else:
            lines.append(self._row("Memory", "?"))
        l1, l5, l15 = g("load1"), g("load5"), g("load15")
        if l1 is not None:
            lsev = load_severity(l1, g("cpus"))
            lines.append(self._row("Load", f"{l1:.2f} {l5 or 0:.2f} {l15 or 0:.2f}  {lsev.markup()}"))
        else:
            lines.append(self._row("Load", "?"))
        qemu = g("qemu_version")
        lines.append(self._row("QEMU", esc(qemu) if qemu else Severity.WARN.markup("not installed")))
        lines.append(self._row("Target", esc(spec.target)))
        if g("migration_address"):
            lines.append(self._row("Migration", esc(g("migration_address"))
                                   + ("  [$text-muted](the management address)[/]" if g("migration_default") else "")))
        stores = list(g("datastores") or [])
        lines.append("")
        lines.append("[b]Datastores[/b]" if stores else "[b]Datastores[/b]  [$text-muted]none[/]")
        width = max((len(getattr(d, "name", "")) for d in stores), default=0) + 2
        for d in stores:
            if getattr(d, "error", None):
                missing = "does not exist" in d.error
                lines.append(f"  {esc(getattr(d, 'name', '?').ljust(width))}"
                             f"{Severity.WARN.markup('missing' if missing else 'WARN')}")
                lines.append(f"  {' ' * width}[$text-muted]{esc(getattr(d, 'path', '') if missing else d.error)}[/]")
                continue
            dtotal, dused = getattr(d, "total", None), getattr(d, "used", None)
            frac = (dused / dtotal) if dtotal and dused is not None else None
            dsev = usage_severity(frac)
            lines.append(f"  {esc(getattr(d, 'name', '?').ljust(width))}{fmt.bar(frac, 10)} "
                         f"{fmt.percent(frac)} {dsev.markup()}")
            lines.append(f"  {' ' * width}[$text-muted]{fmt.size(dused)} of {fmt.size(dtotal)} used[/]")
        lines += _network_lines(f)
        lines.append("")
        elapsed = g("elapsed_s")
        took = f" in {elapsed:.2f} s" if isinstance(elapsed, (int, float)) else ""
        collected = g("collected_at") or st.last_ok
        lines.append(f"[$text-muted]collected {_clock(collected)}{took}"
                     + (f" · next {_clock(st.next_due)}" if st.ok else "") + "[/]")
        return "\n".join(lines)
