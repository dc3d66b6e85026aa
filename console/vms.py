"""VMs in the console: how a VM looks (tree label, detail pane, table row).

Pure functions over the engine's typed records (`VMView` from `vm_list()`, `AgentReport` from
`vm_agent()`); the inventory and VMs views draw them. Which actions apply to a VM is the engine's
to say (console/vmactions.py asks it), never these functions'.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import PurePosixPath
from rich.text import Text

from ferry.engine import fmt
from ferry.engine.api import AgentReport, VMState, VMView

from ferry.console.dialogs.modals import esc
from ferry.console.severity import Severity, usage_severity
from ferry.console.theming import rich_style

LABEL_W = 11
MARK = "✓"      # a marked VM (space marks it): the keys that act on marked VMs act on it

# Theme variable of each VM state; the state's symbol and word always come with the colour.
STATE_VARIABLE = {
    VMState.RUNNING: "sev-ok",
    VMState.STOPPED: "sev-unknown",
    VMState.PAUSED: "sev-warn",
    VMState.HIBERNATED: "state-paused",
    VMState.TEMPLATE: "secondary",
    VMState.RECYCLED: "sev-unknown",
    VMState.MISSING: "sev-crit",
    VMState.INCOMPLETE: "state-interrupted",
    VMState.DELETING: "state-interrupted",
}


def sort_key(vm: VMView) -> tuple:
    """VMs first, then templates; by name."""
    return (vm.is_template, vm.name)


def state_markup(vm: VMView) -> str:
    st = vm.state
    return f"[${STATE_VARIABLE[st]}]{st.symbol} {st.value}[/]"


def label(vm: VMView, variables: dict[str, str], *, busy: bool = False, marked: bool = False) -> Text:
    """Tree label: the state's symbol (◇ for a template) in the state's colour, the name, … while a task
    works on it; ✓ first when it is marked."""
    st = vm.state
    text = Text.assemble((st.symbol, rich_style(variables, STATE_VARIABLE[st])), " ", vm.name)
    if marked:
        text = Text.assemble((MARK + " ", rich_style(variables, "accent", bold=True)), text)
    if busy:
        text.append(" …", style=rich_style(variables, "sev-unknown"))
    return text


# ---------------------------------------------------------------------------------- detail pane

def _row(label: str, value: str) -> str:
    return f"[$text-muted]{label.ljust(LABEL_W)}[/]{value}"


def _backing(path: str) -> str:
    p = PurePosixPath(path)
    return f"{p.parent.name}/{p.name}"


def detail_text(vm: VMView, *, cluster: str | None, agent: AgentReport | None, agent_pending: bool,
                busy_task: str | None, keys: list[tuple[str, str, str | None]] | None) -> str:
    """The detail pane of a VM or template. `keys`: (key, what, reason it is refused or None); None
    while the engine has not said yet."""
    st = vm.state
    lines = [f"[b]{esc(vm.name)}[/b]  {state_markup(vm)}" + ("" if vm.is_template else "  [$text-muted]VM[/]")]
    where = f"host {esc(vm.host)}" + (f" · cluster {esc(cluster)}" if cluster else "")
    lines.append(f"[$text-muted]{where}[/]")
    if vm.in_bin:
        lines.append(f"{Severity.WARN.markup('in the recycle bin')} since {fmt.stamp(vm.recycled)}")
        if vm.purge_at:
            lines.append(f"  [$text-muted]purged for good at {fmt.stamp(vm.purge_at)}[/]")
    if st is VMState.MISSING:
        lines.append(f"{Severity.CRIT.markup('recorded as running, but its QEMU process is gone')}")
    if busy_task:
        lines.append(f"{Severity.MIN.markup('busy:')} {esc(busy_task)}")
    lines.append("")
    cpus = f"{vm.cpus}" + (f" (up to {vm.max_cpus} while running)" if vm.max_cpus != vm.cpus else "")
    lines.append(_row("CPUs", cpus))
    lines.append(_row("Memory", f"{vm.memory_mb} MiB"))
    if not vm.disks:
        lines.append(_row("Disks", "none"))
    for i, d in enumerate(vm.disks):
        text = (f"{esc(d.name)} {fmt.size(d.size)} {esc(d.bus)} "
                f"[$text-muted]on[/] {esc(d.datastore)}" + (" (shared)" if d.shared else ""))
        lines.append(_row("Disks" if i == 0 else "", text))
        if d.backing:
            lines.append(_row("", f"[$text-muted]linked to {esc(_backing(d.backing))}[/]"))
    if not vm.nics:
        lines.append(_row("NICs", "none"))
    for i, n in enumerate(vm.nics):
        lines.append(_row("NICs" if i == 0 else "", f"{esc(n.network)}"
                          + (f"  [$text-muted]{esc(n.mac)}[/]" if n.mac else "")))
    lines.append(_row("Boot", esc(", ".join(vm.boot) or "-")))
    if vm.passthrough:
        lines.append(_row("Devices", esc(", ".join(f"{p.kind}:{p.address}" for p in vm.passthrough))))
    lines.append(_row("Origin", esc(vm.origin or "made here")))
    if vm.pid:
        lines.append(_row("PID", str(vm.pid)))
    if not vm.is_template and not vm.in_bin:
        lines.append("")
        lines += _agent_lines(vm, agent, agent_pending)
    if keys is None:
        lines += ["", "[$text-muted]keys: asking the engine what applies…[/]"]
    elif keys:
        lines.append("")
        ok = [f"[$accent]{esc(k)}[/] {esc(w)}" for k, w, why in keys if why is None]
        if ok:
            lines.append("[$text-muted]keys:[/] " + " · ".join(ok))
        refused: dict[str, list[str]] = {}
        for k, _w, why in keys:
            if why is not None:
                refused.setdefault(why, []).append(k)
        for why, ks in refused.items():
            lines.append(f"[$text-muted]{esc(' '.join(ks))}: {esc(why)}[/]")
    return "\n".join(lines)


def _agent_lines(vm: VMView, agent: AgentReport | None, pending: bool) -> list[str]:
    if not vm.running:
        return [_row("Agent", "[$text-muted]- (the VM is not running)[/]")]
    if agent is None:
        return [_row("Agent", "[$text-muted]asking…[/]" if pending else "[$text-muted]not asked yet[/]")]
    if not agent.running:
        out = [_row("Agent", Severity.WARN.markup("not running"))]
        if agent.reason:
            out.append(_row("", f"[$text-muted]{esc(agent.reason)}[/]"))
        return out
    out = [_row("Agent", Severity.OK.markup("running") + (f" [$text-muted]{esc(agent.version)}[/]"
                                                          if agent.version else ""))]
    if agent.os:
        kernel = fmt.guest_kernel(agent.os, agent.kernel)
        out.append(_row("Guest OS", esc(agent.os) + (f" [$text-muted]{esc(kernel)}[/]" if kernel else "")))
    out.append(_row("IPs", esc(", ".join(agent.ips)) if agent.ips else "[$text-muted]none reported[/]"))
    cpu = agent.cpu_percent
    if cpu is not None:
        out.append(_row("CPU use", f"{fmt.bar(cpu / 100, 10)} {cpu:.0f}%"))
    total, used = agent.mem_total, agent.mem_used
    if total:
        frac = used / total if used is not None else None
        out.append(_row("Mem use", f"{fmt.size(used)} of {fmt.size(total)}  "
                        f"{usage_severity(frac).markup(fmt.percent(frac).strip())}"))
    for i, d in enumerate(agent.disks):
        frac = d.used / d.total if d.total and d.used is not None else None
        out.append(_row("Guest disk" if i == 0 else "", f"{esc(d.mount)} {fmt.size(d.used)} of "
                        f"{fmt.size(d.total)} {usage_severity(frac).markup(fmt.percent(frac).strip())}"))
    if agent.checked_at:
        again = " · asking again…" if pending else ""
        out.append(f"[$text-muted]agent asked {fmt.clock(agent.checked_at)}{again}[/]")
    return out


def bin_text(recycled: list[VMView]) -> str:
    lines = ["[b]Recycle bin[/b]  [$text-muted]VMs deleted with the delayed mode[/]", ""]
    if not recycled:
        lines.append("[$text-muted]empty[/]")
        return "\n".join(lines)
    width = max(len(v.name) for v in recycled) + 2
    for v in sorted(recycled, key=lambda v: v.purge_at or 0):
        lines.append(f"  {esc(v.name.ljust(width))}{esc(v.host)}  "
                     f"[$text-muted]purged {fmt.stamp(v.purge_at)}[/]")
    lines += ["", "[$text-muted]select one: u restores it, del purges it for good[/]"]
    return "\n".join(lines)


def counts_text(vms: list[VMView]) -> str:
    """'3 VMs (1 running) · 1 template' for a host, cluster or site."""
    n_vm = sum(1 for v in vms if not v.is_template)
    n_tpl = len(vms) - n_vm
    running = sum(1 for v in vms if v.running)
    missing = sum(1 for v in vms if v.state is VMState.MISSING)
    text = f"{n_vm} VM{'' if n_vm == 1 else 's'}"
    if n_vm:
        # the green tick says something runs: none running is not good news
        text += f" ({Severity.OK.markup(f'{running} running')}" if running else " ([$text-muted]none running[/]"
        text += f", {Severity.CRIT.markup(f'{missing} missing')})" if missing else ")"
    if n_tpl:
        text += f" · {n_tpl} template{'' if n_tpl == 1 else 's'}"
    return text


# ---------------------------------------------------------------------------------- VMs table

AGENT_STALE_S = 30.0     # an agent answer older than this is shown dimmed (the walk did not reach it again)


@dataclass(frozen=True)
class AgentFact:
    """What the VMs view knows of one VM's guest agent: the last answer and the last attempt."""

    info: AgentReport | None = None   # the last answer (the agent running or not), None: none yet
    taken: float | None = None     # monotonic time of that answer
    tried: float = 0.0             # monotonic time of the last attempt, answered or failed
    error: str | None = None       # the last attempt failed: why (the answer before it is kept)

    def stale(self, now: float) -> bool:
        return self.error is not None or self.taken is None or now - self.taken > AGENT_STALE_S


def first_ipv4(ips: list[str] | tuple[str, ...] | None) -> str | None:
    """The first IPv4 address that is not loopback, without its prefix ("10.0.2.15/24" -> "10.0.2.15")."""
    for a in ips or ():
        try:
            ip = ipaddress.ip_interface(a).ip
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback:
            return str(ip)
    return None


def short_size(n: float | None) -> str:
    """Sizes for narrow columns: 512K, 42M, 1.9G (binary units)."""
    if n is None:
        return "?"
    n = float(n)
    for unit in "BKMGTP":
        if n < 1000 or unit == "P":
            text = f"{n:.1f}" if n < 9.95 and unit != "B" else f"{n:.0f}"
            return text.removesuffix(".0") + ("" if unit == "B" else unit)
        n /= 1024
    return "?"


def row_order(vm: VMView) -> tuple:
    """VMs by name, then templates, then what is in the recycle bin."""
    return (2 if vm.in_bin else 1 if vm.is_template else 0, vm.name, vm.id)


# A cell: (text, theme variable or None, dimmed: a stale value, or a placeholder). The columns of the VMs view, in order.
Cell = tuple[str, str | None, bool]
TABLE_COLUMNS = (("name", "NAME"), ("host", "HOST"), ("state", "STATE"), ("agent", "AGENT"), ("ip", "IP"),
                 ("cpu", "CPU%"), ("mem", "MEM"), ("vcpu", "vCPU"), ("disk", "DISK"))


def table_cells(vm: VMView, fact: AgentFact | None, now: float, *, busy: bool = False) -> tuple[Cell, ...]:
    """One row of the VMs view. Agent columns: blank for templates and the recycle bin, - when not
    running, ? before the first answer or after a failure with none before; a stale answer is dimmed."""
    st = vm.state
    name = vm.name + (" …" if busy else "")
    common: tuple[Cell, ...] = ((name, None, False), (vm.host, None, False),
                                (f"{st.symbol} {st.value}", STATE_VARIABLE[st], False))
    tail: tuple[Cell, ...] = ((str(vm.cpus), None, False), (short_size(vm.disk_bytes), None, False))
    if vm.is_template or vm.in_bin:
        return common + (("", None, False),) * 4 + tail
    info = fact.info if fact is not None else None
    if not vm.running or (info is None and st is not VMState.RUNNING):
        return common + (("-", None, True),) * 4 + tail
    if info is None:
        return common + (("?", None, True),) * 4 + tail
    dim = fact is not None and fact.stale(now)
    if not info.running:
        agent: tuple[Cell, ...] = ((f"{Severity.CRIT.symbol} not running", Severity.CRIT.variable, dim),) + \
            (("-", None, True),) * 3
        return common + agent + tail
    cpu = info.cpu_percent
    total, used = info.mem_total, info.mem_used
    return common + (
        (f"{Severity.OK.symbol} running", Severity.OK.variable, dim),
        (first_ipv4(info.ips) or "-", None, dim),
        (f"{cpu:.0f}%" if cpu is not None else "-", None, dim),
        (f"{short_size(used)}/{short_size(total)}" if total else "-", None, dim),
    ) + tail


def matches(vm: VMView, text: str) -> bool:
    """The `/` filter: a substring of the name or the host, any case."""
    t = text.strip().lower()
    return not t or t in vm.name.lower() or t in vm.host.lower()
