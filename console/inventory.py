"""Inventory view: site -> clusters -> hosts, and the facts of what is selected."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from engine import fmt

from .messages import CrumbsChanged, HostUpdated
from .modals import esc
from .poller import FACTS_TIMEOUT_S, HostPoller, HostStatus
from .severity import Severity, load_severity, usage_severity
from .theming import rich_style

LABEL_W = 11
DETAIL_DELAY_S = 0.1


@dataclass(frozen=True)
class NodeRef:
    kind: str      # "site" | "cluster" | "host"
    name: str


def host_severity(st: HostStatus | None) -> Severity:
    if st is None or st.ok is None:
        return Severity.UNKNOWN
    return Severity.OK if st.ok else Severity.CRIT


def _clock(ts: float | None) -> str:
    return fmt.clock(ts)


class InventoryView(Horizontal):
    """Tree on the left, details on the right. Facts come from a HostPoller running in a worker."""

    BINDINGS = [
        Binding("p", "probe", "Probe", id="ferry.inventory.probe",
                tooltip="Probe the selected host: latency and throughput (a task)"),
        Binding("f", "refresh_facts", "Facts now", id="ferry.inventory.facts",
                tooltip="Facts now: ask the selected host(s) again without waiting"),
    ]
    VIEW = "inventory"
    TITLE = "Inventory"

    def __init__(self, client: Any, *, clock: Callable[[], float] = time.time, poll: dict | None = None) -> None:
        super().__init__(id="inventory")
        self.client = client
        self.site = client.site
        self.clock = clock
        self.poll = dict(poll or {})     # HostPoller knobs: interval, backoff_base, backoff_max, concurrency
        self.status: dict[str, HostStatus] = {h: HostStatus(h) for h in self.site.hosts}
        self.selected = NodeRef("site", self.site.name)
        self.poller: HostPoller | None = None
        self._host_nodes: dict[str, TreeNode] = {}
        self._cluster_nodes: dict[str, TreeNode] = {}
        self._dirty = False
        self._detail_pending = False

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        tree: Tree[NodeRef] = Tree(self.site.name, data=NodeRef("site", self.site.name), id="tree")
        tree.show_root = True
        tree.guide_depth = 2
        tree.root.expand()
        for cname in sorted(self.site.clusters):
            cnode = tree.root.add(cname, data=NodeRef("cluster", cname), expand=True)
            self._cluster_nodes[cname] = cnode
            for h in sorted(self.site.hosts_in(cname), key=lambda h: h.name):
                self._host_nodes[h.name] = cnode.add_leaf(h.name, data=NodeRef("host", h.name))
        yield tree
        with VerticalScroll(id="detail"):
            yield Static(id="detail-body")

    def on_mount(self) -> None:
        self.poller = HostPoller(sorted(self.site.hosts), self._fetch,
                                 lambda st: self.post_message(HostUpdated(st)), clock=self.clock, **self.poll)
        self.run_worker(partial(self.poller.run), name="host facts", group="facts", exclusive=True, exit_on_error=False)
        self.relabel()
        self.render_detail()

    async def _fetch(self, host: str) -> Any:
        return await self.client.host_facts(host, timeout=FACTS_TIMEOUT_S)

    @property
    def shown(self) -> bool:
        return self.display and self.app.screen is self.screen

    def activate(self) -> None:
        """Called when the view is shown."""
        self.catch_up()
        self.post_crumbs()
        self.query_one("#tree", Tree).focus()

    def catch_up(self) -> None:
        """Draw what changed while the view was hidden or covered by a modal."""
        if self._dirty:
            self._dirty = False
            self.relabel()
            self.render_detail()

    def crumbs(self) -> tuple[str, ...]:
        ref = self.selected
        if ref.kind == "site":
            return ("inventory",)
        if ref.kind == "cluster":
            return ("inventory", ref.name)
        return ("inventory", self.site.hosts[ref.name].cluster, ref.name)

    def post_crumbs(self) -> None:
        self.post_message(CrumbsChanged(self.VIEW, self.crumbs()))

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
        return ref.name == host

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        event.stop()
        ref = event.node.data
        if isinstance(ref, NodeRef) and ref != self.selected:
            self.selected = ref
            self.render_detail()
            self.post_crumbs()
            self.refresh_bindings()
            if ref.kind == "host" and self.status[ref.name].ok is None and self.poller:
                self.poller.poke(ref.name)

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        event.stop()

    def selected_hosts(self) -> list[str]:
        ref = self.selected
        if ref.kind == "host":
            return [ref.name]
        if ref.kind == "cluster":
            return sorted(h.name for h in self.site.hosts_in(ref.name))
        return sorted(self.site.hosts)

    # ------------------------------------------------------------------ actions

    def cursor_ref(self) -> NodeRef:
        """What the tree cursor is on now (keys can arrive before the highlight message)."""
        node = self.query_one("#tree", Tree).cursor_node
        return node.data if node is not None and isinstance(node.data, NodeRef) else self.selected

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "probe" and self.cursor_ref().kind != "host":
            return None     # shown dimmed: select a host first
        return True

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

    def refresh_all(self) -> None:
        if self.poller:
            for h in self.site.hosts:
                self.poller.poke(h)

    # ------------------------------------------------------------------ rendering

    def relabel(self) -> None:
        """All tree labels (after a theme change, or when the view comes back)."""
        for name in self._host_nodes:
            self._label_host(name)
        for cname in self._cluster_nodes:
            self._label_cluster(cname)

    def relabel_host(self, name: str) -> None:
        """One host's label and its cluster's."""
        self._label_host(name)
        self._label_cluster(self.site.hosts[name].cluster)

    def _label_host(self, name: str) -> None:
        sev = host_severity(self.status.get(name))
        style = rich_style(self.app.theme_variables, sev.variable)
        self._host_nodes[name].set_label(Text.assemble((sev.symbol, style), " ", name))

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
        node.set_label(label)

    def render_detail(self) -> None:
        ref = self.selected
        if ref.kind == "site":
            text = self._site_text()
        elif ref.kind == "cluster":
            text = self._cluster_text(ref.name)
        else:
            text = self._host_text(ref.name)
        self.query_one("#detail-body", Static).update(Content.from_markup(text))

    def _counts(self, hosts: list[str]) -> str:
        sevs = [host_severity(self.status.get(h)) for h in hosts]
        ok, bad, unk = (sevs.count(Severity.OK), sevs.count(Severity.CRIT), sevs.count(Severity.UNKNOWN))
        return (f"{Severity.OK.markup(f'{ok} reachable')}  {Severity.CRIT.markup(f'{bad} down')}  "
                f"{Severity.UNKNOWN.markup(f'{unk} unknown')}")

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
                 "", "[b]Hosts[/b]"]
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
        lines.append("")
        elapsed = g("elapsed_s")
        took = f" in {elapsed:.2f} s" if isinstance(elapsed, (int, float)) else ""
        collected = g("collected_at") or st.last_ok
        lines.append(f"[$text-muted]collected {_clock(collected)}{took}"
                     + (f" · next {_clock(st.next_due)}" if st.ok else "") + "[/]")
        return "\n".join(lines)
