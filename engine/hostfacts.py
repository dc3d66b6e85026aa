"""Host facts for `ferry hosts` and the inventory: one round trip per host, all hosts in parallel.

Besides the machine (OS, CPUs, memory, load, QEMU, datastores) the facts name the host's networks:
each Linux bridge (MTU, state, VLAN filtering and the VLANs configured where `bridge -j vlan` works,
its member interfaces, the taps of Ferry's VMs on it, by VM name), each network config.toml puts on
the host with its bridge present or not (missing and create = false: a problem, the same one the
prechecks refuse by name), and the host's migration address.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from .config import DatastoreSpec, HostSpec, SiteConfig
from .errors import FerryError
from .ship import Program
from .vm.nics import tap_name, vlan_bridge

# One POSIX sh script, so a host costs one round trip. Sections start with "@@name"; datastores
# come as "name path" argument pairs. Every probe tolerates a missing tool (busybox, no QEMU).
FACTS = Program("ferry-facts", lang="sh", source=r"""
export LC_ALL=C
echo @@os; (. /etc/os-release 2>/dev/null && printf '%s\n' "${PRETTY_NAME:-$NAME}")
echo @@kernel; uname -r
echo @@cpus; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null
echo @@meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo 2>/dev/null
echo @@loadavg; cat /proc/loadavg 2>/dev/null
echo @@qemu; qemu-system-x86_64 --version 2>/dev/null | head -n 1
while [ "$#" -ge 2 ]; do
  printf '@@ds %s\n' "$1"
  if [ -e "$2" ]; then df -P -B1 -- "$2" 2>&1 | tail -n 1; else echo '@@missing'; fi
  shift 2
done
# Bridges from /sys with the shell's own `read` (no process per bridge): name mtu state vlan_filtering
# and the member interfaces; `bridge -j vlan` only when some bridge filters VLANs.
echo @@bridges
vf=
for d in /sys/class/net/*/bridge; do
  [ -d "$d" ] || continue
  b=${d%/bridge}; m=?; s=?; f=?
  read -r m 2>/dev/null <"$b/mtu"; read -r s 2>/dev/null <"$b/operstate"
  read -r f 2>/dev/null <"$d/vlan_filtering"
  [ "$f" = 1 ] && vf=1
  printf 'br %s %s %s %s' "${b##*/}" "$m" "$s" "$f"
  for i in "$b"/brif/*; do [ -e "$i" ] && printf ' %s' "${i##*/}"; done
  echo
done
if [ -n "$vf" ]; then echo @@vlans; bridge -j vlan show 2>/dev/null; echo; fi
echo @@end
""")

# A tap of a Ferry VM's NIC (engine/vm/nics.py tap_name): 'ft' + 9 hex + the NIC's place.
_TAP_RE = re.compile(r"^ft[0-9a-f]{9}\d+$")

_DF_RE = re.compile(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s+\S.*$")
_QEMU_RE = re.compile(r"version\s+(\S+)")


@dataclass(frozen=True)
class DatastoreUsage:
    name: str
    path: str
    total: int | None = None     # bytes
    used: int | None = None
    free: int | None = None
    error: str | None = None     # e.g. the path does not exist on the host


@dataclass(frozen=True)
class BridgeFacts:
    """A Linux bridge on a host, as the host reports it."""
    name: str
    mtu: int | None = None
    state: str = "?"                     # operstate: up, down, unknown
    vlan_filtering: bool | None = None   # None: not known
    vlans: list[int] | None = None       # the VLAN ids on the bridge and its ports; None: not known
    members: list[str] = field(default_factory=list)   # interfaces on it other than VM taps (uplinks)
    taps: list[str] = field(default_factory=list)      # Ferry's VM taps on it
    vms: list[str] = field(default_factory=list)       # the VMs those taps belong to (by name)
    networks: list[str] = field(default_factory=list)  # the site's networks on this bridge (or a VLAN of it)


@dataclass(frozen=True)
class NetworkFacts:
    """A bridge-mode network config.toml puts on a host, and whether its bridge is there."""
    name: str
    bridge: str
    vlan: int | None = None
    create: bool = True
    present: bool | None = None          # None: the host's bridges could not be read
    vlan_bridge: str | None = None       # the VLAN's own bridge, where the bridge does not filter VLANs
    problem: str | None = None           # one line: the bridge is missing and may not be created
    hint: str = ""


@dataclass(frozen=True)
class HostFacts:
    host: str
    reachable: bool
    error: str | None = None
    hint: str = ""
    os_name: str | None = None
    kernel: str | None = None
    cpus: int | None = None
    mem_total: int | None = None       # bytes
    mem_available: int | None = None   # bytes
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    qemu_version: str | None = None    # None: QEMU is not installed
    datastores: list[DatastoreUsage] = field(default_factory=list)
    bridges: list[BridgeFacts] = field(default_factory=list)
    networks: list[NetworkFacts] = field(default_factory=list)
    migration_address: str | None = None   # live migration and replication data go here
    migration_default: bool = True         # it is the management address (no migration_address in config)
    collected_at: float = 0.0          # time.time()
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_facts(host: str, text: str, datastores: list[DatastoreSpec], owners: dict[str, str] | None = None) -> dict:
    """The fields of HostFacts found in the script's output; whatever is garbled stays None.
    `owners`: tap name -> VM name (tap_owners), so a bridge's taps are named by their VMs."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    current = None
    for line in text.splitlines():
        if line.startswith("@@") and line != "@@missing":
            current = line[2:].strip()
            sections[current] = []
            order.append(current)
        elif current is not None and line.strip():
            sections[current].append(line.strip())

    def first(name: str) -> str | None:
        lines = sections.get(name) or []
        return lines[0] if lines else None

    facts: dict = {"os_name": first("os"), "kernel": first("kernel")}
    cpus = first("cpus")
    facts["cpus"] = int(cpus) if cpus and cpus.isdigit() else None
    for line in sections.get("meminfo", []):
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib = int(parts[0]) * 1024
            if key == "MemTotal":
                facts["mem_total"] = kib
            elif key == "MemAvailable":
                facts["mem_available"] = kib
    load = (first("loadavg") or "").split()
    try:
        facts["load1"], facts["load5"], facts["load15"] = (float(x) for x in load[:3])
    except ValueError:
        pass
    qemu = first("qemu")
    if qemu:
        m = _QEMU_RE.search(qemu)
        facts["qemu_version"] = m.group(1) if m else qemu
    usages = []
    for ds in datastores:
        lines = sections.get(f"ds {ds.name}")
        if lines is None:
            usages.append(DatastoreUsage(ds.name, ds.path, error="no answer for this datastore"))
        elif lines == ["@@missing"]:
            usages.append(DatastoreUsage(ds.name, ds.path, error=f"{ds.path} does not exist on {host}"))
        else:
            m = _DF_RE.search(lines[-1]) if lines else None
            if m:
                usages.append(DatastoreUsage(ds.name, ds.path, int(m.group(1)), int(m.group(2)), int(m.group(3))))
            else:
                usages.append(DatastoreUsage(ds.name, ds.path, error=(lines[-1] if lines else "df gave no output")))
    facts["datastores"] = usages
    if "bridges" in sections:
        facts["bridges"] = _bridges(sections["bridges"], sections.get("vlans"), owners or {})
    return facts


def _bridges(lines: list[str], vlan_lines: list[str] | None, owners: dict[str, str]) -> list[BridgeFacts]:
    """The @@bridges lines ('br NAME MTU STATE VLAN_FILTERING MEMBER...'), with the VLANs of
    `bridge -j vlan show` (either JSON shape iproute2 has had) for the bridges that filter VLANs."""
    per_if: dict[str, set[int]] = {}
    if vlan_lines:
        try:
            doc: Any = json.loads("".join(vlan_lines))
        except ValueError:
            doc = None
        # iproute2 >= 5: [{"ifname": "br0", "vlans": [...]}]; older: {"br0": [...]}
        items = ([(d.get("ifname"), d.get("vlans") or []) for d in doc if isinstance(d, dict)] if isinstance(doc, list)
                 else list(doc.items()) if isinstance(doc, dict) else [])
        for ifname, vlans in items:
            ids = per_if.setdefault(str(ifname), set())
            for v in vlans if isinstance(vlans, list) else []:
                if isinstance(v, dict) and isinstance(v.get("vlan"), int):
                    ids.update(range(v["vlan"], int(v.get("vlanEnd", v["vlan"])) + 1))
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 5 or parts[0] != "br":
            continue
        name, mtu, state, vf, ifaces = parts[1], parts[2], parts[3], parts[4], parts[5:]
        taps = [i for i in ifaces if i in owners or _TAP_RE.match(i)]
        filtering = {"1": True, "0": False}.get(vf)
        vlans = None
        if filtering and vlan_lines is not None:
            vlans = sorted(set().union(*(per_if.get(i, set()) for i in (name, *ifaces))))
        out.append(BridgeFacts(name, int(mtu) if mtu.isdigit() else None, state, filtering, vlans,
                               [i for i in ifaces if i not in taps], taps,
                               sorted({owners[t] for t in taps if t in owners})))
    return out


def tap_owners(vms: Iterable[Any]) -> dict[str, str]:
    """Tap name -> VM name for the VMs' NICs (VMSpec records): the taps a host's bridges may carry."""
    return {tap_name(vm.id, i): vm.name for vm in vms for i in range(len(vm.nics))}


def migration_address(spec: HostSpec) -> tuple[str, bool]:
    """Where the host takes live migrations and replication data, and whether that is its management
    address (config has no migration_address for it): a local host's is this machine's loopback."""
    if spec.migration_address:
        return spec.migration_address, False
    return (spec.address or spec.name) if spec.transport != "local" else "127.0.0.1", True


def network_facts(site: SiteConfig, host: str, bridges: list[BridgeFacts] | None) -> list[NetworkFacts]:
    """Each bridge-mode network the site puts on `host`, with its bridge there or not. A bridge that is
    missing where the network may not create it (create = false) is a problem; one Ferry creates is not.
    `bridges` None: the host's bridges are not known."""
    have = {b.name: b for b in bridges or []}
    out = []
    for n in site.networks_of(host) if host in site.hosts else []:
        try:
            spec = site.network(n)
        except FerryError:
            continue
        if spec.mode != "bridge":
            continue
        present = None if bridges is None else spec.bridge in have
        own = None
        if spec.vlan and present and not have[spec.bridge].vlan_filtering:
            own = vlan_bridge(spec.bridge, spec.vlan)
        problem, hint = None, ""
        if present is False and not spec.create:
            problem = f"network {n}: bridge {spec.bridge} is missing on host {host} (create = false)"
            hint = (f"create {spec.bridge} on {host}, or let Ferry make it: create = true in [networks.{n}] "
                    "of config.toml")
        out.append(NetworkFacts(n, spec.bridge, spec.vlan, spec.create, present, own, problem, hint))
    return out


def _with_networks(bridges: list[BridgeFacts], nets: list[NetworkFacts]) -> list[BridgeFacts]:
    """Each bridge names the site's networks it carries (a VLAN's own bridge too)."""
    on: dict[str, list[str]] = {}
    for n in nets:
        label = n.name if not n.vlan else f"{n.name} (VLAN {n.vlan})"
        on.setdefault(n.bridge, []).append(label)
        if n.vlan:
            on.setdefault(vlan_bridge(n.bridge, n.vlan), []).append(label)
    return [replace(b, networks=on.get(b.name, [])) for b in bridges]


async def gather_facts(transport, host: HostSpec, datastores: list[DatastoreSpec],
                       timeout: float = 10, *, site: SiteConfig | None = None,
                       owners: dict[str, str] | None = None) -> HostFacts:
    """Facts of one host in one round trip; never raises: an unreachable host says why. With `site`,
    the networks it puts on the host; `owners` (tap_owners) names the VMs whose taps are on a bridge."""
    t0 = time.monotonic()
    collected = time.time()
    args: list[str] = []
    for ds in datastores:
        args += [ds.name, ds.path]
    try:
        # The timeout covers connecting as well as running, so a dead host costs at most `timeout`.
        async with asyncio.timeout(timeout):
            r = await FACTS.run(transport, *args, timeout=None)
    except (TimeoutError, asyncio.TimeoutError):
        return HostFacts(host.name, False, f"no answer from {host.name} ({host.target}) within {timeout:g} s",
                         "is the host up and reachable? check address/port in config.toml",
                         collected_at=collected, elapsed_s=time.monotonic() - t0)
    except FerryError as e:
        return HostFacts(host.name, False, e.message, e.hint, collected_at=collected,
                         elapsed_s=time.monotonic() - t0)
    text = r.stdout.decode("utf-8", "replace")
    if "@@end" not in text:
        last = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        return HostFacts(host.name, True, f"the facts script on {host.name} failed: {last}",
                         "the host needs a POSIX sh with uname, df and /proc", collected_at=collected,
                         elapsed_s=time.monotonic() - t0)
    facts = parse_facts(host.name, text, datastores, owners)
    if site is not None:
        nets = network_facts(site, host.name, facts.get("bridges"))
        facts["networks"] = nets
        facts["bridges"] = _with_networks(facts.get("bridges") or [], nets)
    facts["migration_address"], facts["migration_default"] = migration_address(host)
    return HostFacts(host.name, True, **facts, collected_at=collected, elapsed_s=time.monotonic() - t0)


async def gather_all(pool, site: SiteConfig, timeout: float = 10,
                     owners: dict[str, str] | None = None) -> dict[str, HostFacts]:
    """Facts of every host of the site, in parallel: a dead host never delays the others."""
    names = list(site.hosts)

    async def one(name: str) -> HostFacts:
        spec = site.hosts[name]
        try:
            transport = pool.get(name)
        except FerryError as e:
            return HostFacts(name, False, e.message, e.hint, collected_at=time.time())
        return await gather_facts(transport, spec, site.datastores_of(name), timeout, site=site, owners=owners)

    results = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, results))
