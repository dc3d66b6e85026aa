"""The records of performance history (F3), as front ends receive them (`ferry metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

# Each metric's unit, as the CLI shows it and Prometheus names it. Rates are per second, over the
# interval between two samples (counters of /proc read each time).
HOST_METRICS = {
    "cpu_pct": "%", "mem_pct": "%", "mem_used_bytes": "B", "mem_total_bytes": "B", "load1": "",
    "net_rx_bps": "B/s", "net_tx_bps": "B/s", "disk_read_bps": "B/s", "disk_write_bps": "B/s",
}
VM_METRICS = {"cpu_pct": "%", "mem_rss_bytes": "B", "mem_total_bytes": "B", "mem_pct": "%"}
COMPARE_COLUMNS = ("cpu_pct", "mem_pct", "net_rx_bps", "net_tx_bps", "disk_read_bps", "disk_write_bps", "load1")


@dataclass(frozen=True)
class MetricPoint:
    """One bucket of a series: the samples that fell in [ts, ts + step), their min, mean and max."""
    ts: float
    min: float
    avg: float
    max: float
    n: int


@dataclass(frozen=True)
class MetricSeries:
    """One metric of one object (host:NAME, vm:NAME) over a window, at the resolution `step` (s)
    that the window allows (10 s within the last hour, 1 min within a day, 10 min within 30 days)."""
    object: str
    metric: str
    unit: str
    step: int
    since: float
    points: list[MetricPoint]

    @property
    def last(self) -> float | None:
        return self.points[-1].avg if self.points else None


@dataclass(frozen=True)
class HostMetrics:
    """A host's newest sample (`ferry metrics compare`); None where it has none (yet)."""
    host: str
    ts: float | None = None            # when it was sampled
    cpu_pct: float | None = None
    mem_pct: float | None = None
    net_rx_bps: float | None = None
    net_tx_bps: float | None = None
    disk_read_bps: float | None = None
    disk_write_bps: float | None = None
    load1: float | None = None


@dataclass(frozen=True)
class VMMetrics:
    """A VM's newest sample (the console's Performance view, VMs); None where it has none (it does not
    run, or has not run this last hour)."""
    vm: str
    host: str                          # where its record says it is
    ts: float | None = None
    cpu_pct: float | None = None
    mem_pct: float | None = None
    mem_rss_bytes: float | None = None
    mem_total_bytes: float | None = None
