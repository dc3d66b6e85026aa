"""Performance sampling (F3): while the engine runs, every [metrics] interval, one small sh script per
host reads /proc (CPU, memory, network, disks, load) and its QEMU processes' /proc/PID/stat, over the
host's transport (the same way as the health checks, engine/ops/checks.py). CPU, network and disk
are counters: their rates are the differences between two samples over the host's own uptime, so the
first sample of a host (or of a restarted QEMU) gives no rate. A VM's CPU is its QEMU's user + system
time over its vCPUs (100 % = every vCPU busy); its memory the QEMU's resident set against the memory
it was given. The guest agent is not asked: it costs a round trip per VM, and a process's RSS is free.

Samples go to metrics.db (engine/ops/metricsdb.py: tiers with min/avg/max per bucket); the newest
values stay in memory for Prometheus' /metrics (engine/ops/exposition.py) and `ferry metrics compare`.
The clock is injectable (now, sleep): tests sample without sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..errors import FerryError, PermanentError
from ..logs import logger
from ..ship import Program
from .checks import split_sections
from .metricsconfig import settings
from .metricsdb import MetricsDB
from .metricsmodel import COMPARE_COLUMNS, HOST_METRICS, VM_METRICS, HostMetrics, MetricSeries, VMMetrics
from .schedule import Clock

log = logger("ferry.metrics")

PARALLEL = 16               # hosts sampled at once

SAMPLE_SCRIPT = Program("ferry-metrics", lang="sh", source=r"""
export LC_ALL=C
T=$1 R=$2
s() { printf '\n%s %s\n' "$T" "$1"; }
s uptime; cat /proc/uptime
s stat; grep '^cpu' /proc/stat
s meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo
s loadavg; cat /proc/loadavg
s net; cat /proc/net/dev
s nics; for n in /sys/class/net/*; do [ -e "$n/device" ] && echo "${n##*/}"; done
s disks; for d in /sys/block/*; do [ -e "$d/device" ] && echo "${d##*/}"; done
s diskstats; cat /proc/diskstats
s vms; echo "$(getconf CLK_TCK 2>/dev/null || echo 100) $(getconf PAGESIZE 2>/dev/null || echo 4096)"
for f in "$R"/vm-*.pid; do
  [ -e "$f" ] || continue
  p=; read -r p <"$f" 2>/dev/null
  [ -n "$p" ] && [ -r "/proc/$p/stat" ] && tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$f" &&
    printf '%s %s\n' "${f##*/}" "$(cat "/proc/$p/stat" 2>/dev/null)"
done
s end
""")


@dataclass
class HostReading:
    """The counters and levels of one run of the script on a host."""
    uptime: float
    cpu_busy: int
    cpu_total: int
    mem_total: int
    mem_available: int
    load1: float | None
    net_rx: int
    net_tx: int
    disk_read: int          # bytes (sectors of 512)
    disk_write: int
    vms: dict[str, tuple[int, float, int]] = field(default_factory=dict)   # process name: (pid, cpu s, rss B)


def parse_reading(text: str, token: str) -> HostReading:
    """What the script printed; ValueError when it is not what /proc gives."""
    sec = split_sections(text, token)
    if "end" not in sec:
        raise ValueError("the sampling script did not finish")
    uptime = float(sec["uptime"][0].split()[0])
    cpu = next(ln.split() for ln in sec["stat"] if ln.startswith("cpu "))
    ticks = [int(x) for x in cpu[1:9]]        # user nice system idle iowait irq softirq steal (guest is in user)
    idle = ticks[3] + ticks[4]
    mem = {}
    for ln in sec.get("meminfo", []):
        key, _, rest = ln.partition(":")
        mem[key] = int(rest.split()[0]) * 1024
    load = sec.get("loadavg", [""])[0].split()
    nics = set(sec.get("nics", []))
    rx = tx = 0
    counted: dict[str, tuple[int, int]] = {}
    for ln in sec.get("net", []):
        name, sep, rest = ln.partition(":")
        f = rest.split()
        if not sep or len(f) < 9 or not f[0].isdigit():
            continue
        counted[name.strip()] = (int(f[0]), int(f[8]))
    # Physical interfaces where there are any (bridges, taps and VLANs would count their traffic
    # again); in a container or namespace, whatever is there but loopback.
    names = [n for n in counted if n in nics] or [n for n in counted if n != "lo"]
    for n in names:
        rx, tx = rx + counted[n][0], tx + counted[n][1]
    disks = set(sec.get("disks", []))
    rd = wr = 0
    for ln in sec.get("diskstats", []):
        f = ln.split()
        if len(f) >= 10 and f[2] in disks:
            rd, wr = rd + int(f[5]) * 512, wr + int(f[9]) * 512
    vms: dict[str, tuple[int, float, int]] = {}
    vm_lines = sec.get("vms", [])
    if vm_lines:
        hz, page = (int(x) for x in vm_lines[0].split()[:2])
        for ln in vm_lines[1:]:
            name, _, stat = ln.partition(" ")
            pid, _, rest = stat.partition(" ")
            f = rest.rpartition(")")[2].split()      # after "(comm)": state is field 3
            if len(f) > 21 and pid.isdigit():
                vms[name.removesuffix(".pid")] = (int(pid), (int(f[11]) + int(f[12])) / hz, int(f[21]) * page)
    return HostReading(uptime, sum(ticks) - idle, sum(ticks), mem.get("MemTotal", 0), mem.get("MemAvailable", 0),
                       float(load[0]) if load else None, rx, tx, rd, wr, vms)


def host_values(prev: HostReading | None, cur: HostReading) -> dict[str, float]:
    """The host's metrics from this reading, with rates where the previous one allows them."""
    out: dict[str, float] = {}
    if cur.mem_total:
        used = cur.mem_total - cur.mem_available
        out.update(mem_total_bytes=float(cur.mem_total), mem_used_bytes=float(used),
                   mem_pct=100.0 * used / cur.mem_total)
    if cur.load1 is not None:
        out["load1"] = cur.load1
    dt = cur.uptime - prev.uptime if prev else 0.0
    if prev is None or dt <= 0:          # the first reading, or a reboot in between
        return out
    dtot = cur.cpu_total - prev.cpu_total
    if dtot > 0 and cur.cpu_busy >= prev.cpu_busy:
        out["cpu_pct"] = max(0.0, min(100.0, 100.0 * (cur.cpu_busy - prev.cpu_busy) / dtot))
    for key, a, b in (("net_rx_bps", prev.net_rx, cur.net_rx), ("net_tx_bps", prev.net_tx, cur.net_tx),
                      ("disk_read_bps", prev.disk_read, cur.disk_read),
                      ("disk_write_bps", prev.disk_write, cur.disk_write)):
        if b >= a:                        # an interface or disk that went away makes no negative rate
            out[key] = (b - a) / dt
    return out


def vm_values(prev: HostReading | None, cur: HostReading, pname: str, cpus: int, memory_mb: int) -> dict[str, float]:
    pid, cpu_s, rss = cur.vms[pname]
    total = memory_mb * 1024 * 1024
    out = {"mem_rss_bytes": float(rss), "mem_total_bytes": float(total), "mem_pct": 100.0 * rss / total}
    before = prev.vms.get(pname) if prev else None
    dt = cur.uptime - prev.uptime if prev else 0.0
    if before and before[0] == pid and dt > 0 and cpu_s >= before[1]:
        out["cpu_pct"] = max(0.0, min(100.0, 100.0 * (cpu_s - before[1]) / dt / max(1, cpus)))
    return out


class Metrics:
    """The engine's sampler: `sample()` once, or `launch()` its loop (the engine service does)."""

    def __init__(self, engine: Any, site: Callable[[], Any], path: Path, *, clock: Clock | None = None) -> None:
        self.engine, self._site = engine, site
        self.db = MetricsDB(path)
        self.clock = clock or Clock()
        self._prev: dict[str, HostReading] = {}
        self.latest: dict[str, dict[str, float]] = {}       # object: metric: value (the newest sample)
        self.vm_hosts: dict[str, str] = {}                  # vm:NAME: its host (labels)
        self.up: dict[str, bool] = {}                       # host: its last sample succeeded
        self.sampled_at: float | None = None
        self._loop: asyncio.Task | None = None
        self._exposition: Any = None
        self._refused: str | None = None                   # a listen address that could not be had
        self._pool: Any = None

    @property
    def site(self) -> Any:
        return self._site()

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-metrics")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    # -------------------------------------------------------------- sampling

    async def _read(self, host: str, timeout: float) -> HostReading:
        token = secrets.token_hex(8)
        spec = self.site.hosts[host]
        async with asyncio.timeout(timeout):
            r = await SAMPLE_SCRIPT.run(self.engine.transport(host), token, spec.runtime, timeout=None)
        return parse_reading(r.stdout.decode("utf-8", "replace"), token)

    async def sample(self) -> dict[str, dict[str, float]]:
        """One sample of every host and its running VMs, stored; the values by object. A host that
        does not answer is left out of this sample (and is down in /metrics)."""
        site = self.site
        cfg = settings(site)
        now = self.clock.now()
        rows = await self.engine.store.call(self.engine.store.vm_rows)
        by_host: dict[str, list[dict]] = {}
        for row in rows:
            if row["kind"] == "vm":
                by_host.setdefault(row["host"], []).append(row)
        sem = asyncio.Semaphore(PARALLEL)
        values: dict[str, dict[str, float]] = {}
        vm_hosts: dict[str, str] = {}

        async def one(h: str) -> None:
            async with sem:
                try:
                    cur = await self._read(h, max(2.0, min(cfg.interval, 15.0)))
                except (FerryError, OSError, TimeoutError, ValueError, IndexError, KeyError) as e:
                    log.debug("metrics: %s gave no sample: %s", h, getattr(e, "message", None) or e or "timed out")
                    self.up[h] = False
                    self._prev.pop(h, None)
                    return
            self.up[h] = True
            prev = self._prev.get(h)
            self._prev[h] = cur
            values[f"host:{h}"] = host_values(prev, cur)
            from ..vm.model import VMSpec
            for row in by_host.get(h, []):
                spec = VMSpec.from_dict(row["spec"])
                if spec.process_name in cur.vms:
                    values[f"vm:{spec.name}"] = vm_values(prev, cur, spec.process_name, spec.cpus, spec.memory_mb)
                    vm_hosts[f"vm:{spec.name}"] = h
        await asyncio.gather(*(one(h) for h in site.hosts))
        for gone in set(self.up) - set(site.hosts):
            self.up.pop(gone, None)
            self._prev.pop(gone, None)
        self.latest, self.vm_hosts, self.sampled_at = values, vm_hosts, now
        await self._db(self.db.add, values, now)
        return values

    def launch(self, *, reload: Callable[[], Awaitable[Any]] | None = None) -> None:
        """The sampling loop (and /metrics where [metrics] listen says), as a task of the running loop;
        `reload` (the engine's reload_site) before each sample: an edit of [metrics] takes effect at once."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(reload), name="ferry-metrics")

    async def _run(self, reload: Callable[[], Awaitable[Any]] | None) -> None:
        while True:
            if reload is not None:
                try:
                    await reload()
                except FerryError:
                    pass        # config.toml is being edited (invalid): the site read before goes on
            cfg = settings(self.site)
            t0 = self.clock.now()
            try:
                await self._serve(cfg.listen)
                if cfg.enabled and self.site.hosts:
                    await self.sample()
            except Exception:       # noqa: BLE001 - the loop goes on; the next sample tries again
                log.exception("metrics: a sample failed")
            await self.clock.sleep(max(0.2, t0 + cfg.interval - self.clock.now()))

    async def _serve(self, listen: str | None) -> None:
        """Serve /metrics on `listen` (None: stop serving): started, moved or stopped as config.toml says.
        An address that cannot be had is said once, and tried again when config.toml names another."""
        current = self._exposition.listen if self._exposition else self._refused
        if listen == current:
            return
        self._refused = None
        if self._exposition is not None:
            await self._exposition.close()
            self._exposition = None
        if listen:
            from .exposition import Exposition
            try:
                self._exposition = await Exposition.start(self, listen)
                log.info("serving Prometheus metrics on http://%s/metrics", listen)
            except OSError as e:
                self._refused = listen
                log.error("cannot serve /metrics on %s: %s (hint: another port in [metrics] listen)", listen, e)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        if self._exposition is not None:
            await self._exposition.close()
            self._exposition = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.db.close()

    # -------------------------------------------------------------- what front ends ask

    async def _object(self, name: str) -> tuple[str, dict[str, str]]:
        if name.startswith(("host:", "vm:")):
            kind, _, rest = name.partition(":")
            name = rest
        else:
            kind = ""
        if kind in ("", "host") and name in self.site.hosts:
            return f"host:{name}", HOST_METRICS
        if kind in ("", "vm"):
            rows = await self.engine.store.call(self.engine.store.vm_named, name)
            if rows:
                return f"vm:{rows[0]['name']}", VM_METRICS
        raise PermanentError(f"no host or VM named {name!r}", "ferry hosts lists the hosts, ferry vm list the VMs")

    async def series(self, name: str, metric: str | None = None, since: float = 3600.0) -> list[MetricSeries]:
        """Each metric of a host or VM (or the one named) over the last `since` seconds."""
        obj, known = await self._object(name)
        if metric is not None and metric not in known:
            raise PermanentError(f"no metric {metric!r} of {obj}", "metrics: " + ", ".join(known))
        if since <= 0:
            raise PermanentError(f"a window of {since:g} s is nothing", "--since 1h, 30m, 1d, 30d")
        now = self.clock.now()
        step, points = await self._db(self.db.series, obj, metric, since, now)
        return [MetricSeries(obj, m, known[m], step, now - since, points.get(m, []))
                for m in ([metric] if metric else known)]

    async def compare(self) -> list[HostMetrics]:
        """Every host's newest sample (within the last hour), in the site's order."""
        latest = await self._db(self.db.latest, "host:")
        out = []
        for h in self.site.hosts:
            ts, vals = latest.get(f"host:{h}", (None, {}))
            out.append(HostMetrics(h, ts, **{c: vals.get(c) for c in COMPARE_COLUMNS}))
        return out

    async def compare_vms(self) -> list[VMMetrics]:
        """Every VM's newest sample (within the last hour; none for a VM that does not run), by name."""
        rows = await self.engine.store.call(self.engine.store.vm_rows)
        latest = await self._db(self.db.latest, "vm:")
        out = []
        for row in rows:
            if row["kind"] == "vm":
                ts, vals = latest.get(f"vm:{row['name']}", (None, {}))
                out.append(VMMetrics(row["name"], row["host"], ts, **{m: vals.get(m) for m in VM_METRICS}))
        return out


def metrics_of(engine: Any, site: Callable[[], Any], workspace: Any) -> Metrics:
    """The engine's sampler (one per engine): its history in the workspace's metrics.db."""
    m = engine.services.get(Metrics)
    if m is None:
        m = engine.services[Metrics] = Metrics(engine, site, Path(workspace.root) / "metrics.db")
    return m


__all__ = ["Metrics", "SAMPLE_SCRIPT", "host_values", "metrics_of", "parse_reading"]
