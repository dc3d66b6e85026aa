"""Host facts for `ferry hosts` and the inventory: one round trip per host, all hosts in parallel."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict, dataclass, field

from .config import DatastoreSpec, HostSpec, SiteConfig
from .errors import FerryError
from .ship import Program

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
echo @@end
""")

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
    collected_at: float = 0.0          # time.time()
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_facts(host: str, text: str, datastores: list[DatastoreSpec]) -> dict:
    """The fields of HostFacts found in the script's output; whatever is garbled stays None."""
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
    return facts


async def gather_facts(transport, host: HostSpec, datastores: list[DatastoreSpec],
                       timeout: float = 10) -> HostFacts:
    """Facts of one host in one round trip; never raises: an unreachable host says why."""
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
    return HostFacts(host.name, True, **parse_facts(host.name, text, datastores),
                     collected_at=collected, elapsed_s=time.monotonic() - t0)


async def gather_all(pool, site: SiteConfig, timeout: float = 10) -> dict[str, HostFacts]:
    """Facts of every host of the site, in parallel: a dead host never delays the others."""
    names = list(site.hosts)

    async def one(name: str) -> HostFacts:
        spec = site.hosts[name]
        try:
            transport = pool.get(name)
        except FerryError as e:
            return HostFacts(name, False, e.message, e.hint, collected_at=time.time())
        return await gather_facts(transport, spec, site.datastores_of(name), timeout)

    results = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, results))
