"""`ferry metrics HOST|VM [--metric NAME] [--since DURATION]`, `ferry metrics compare [--vms] [--sort COLUMN]`:
performance history (issue 14, F3). One object: a sparkline per metric (or, with --metric, a table of
its points, min/avg/max per bucket); many hosts (or VMs): a comparison table of their newest samples. Every
command takes --json."""

from __future__ import annotations

import sys

from ferry.engine import api, fmt
from ferry.engine.workspace import Workspace

from ferry.console.cli import EXIT_CONFIG, EXIT_OK, _ask, _table
from ferry.console.cli.ops import duration_arg

BARS = "▁▂▃▄▅▆▇█"
WIDTH = 48          # characters of a sparkline
POINT_COLUMNS = ["TIME", "MIN", "AVG", "MAX", "SAMPLES"]
# `--sort` column: (header, the HostMetrics field, how it shows)
COMPARE = {"host": ("HOST", "host"), "cpu": ("CPU", "cpu_pct"), "mem": ("MEM", "mem_pct"),
           "rx": ("NET-RX", "net_rx_bps"), "tx": ("NET-TX", "net_tx_bps"), "read": ("DISK-R", "disk_read_bps"),
           "write": ("DISK-W", "disk_write_bps"), "load": ("LOAD1", "load1"), "age": ("SAMPLED", "ts")}
# `--vms --sort` column: (header, the VMMetrics field)
COMPARE_VMS = {"vm": ("VM", "vm"), "host": ("HOST", "host"), "cpu": ("CPU", "cpu_pct"), "mem": ("MEM", "mem_pct"),
               "rss": ("RSS", "mem_rss_bytes"), "given": ("GIVEN", "mem_total_bytes"), "age": ("SAMPLED", "ts")}


def value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.1f}%"
    if unit == "B":
        return fmt.size(v)
    if unit == "B/s":
        return fmt.rate(v)
    return f"{v:.2f}"


def sparkline(values: list[float], width: int = WIDTH) -> str:
    """The values (averaged down to `width` characters) as bars from the lowest to the highest."""
    if not values:
        return ""
    if len(values) > width:
        per = len(values) / width
        values = [sum(chunk) / len(chunk) for chunk in
                  (values[int(i * per):max(int(i * per) + 1, int((i + 1) * per))] for i in range(width))]
    lo, hi = min(values), max(values)
    span = hi - lo
    return "".join(BARS[int((v - lo) / span * (len(BARS) - 1) + 0.5)] if span else BARS[0] for v in values)


def _window(seconds: float) -> str:
    for n, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def cmd_metrics(args, ws: Workspace) -> int:
    if args.target == "compare":
        return _compare(args, ws)
    if args.sort or args.vms:
        print(f"ferry: {'--sort' if args.sort else '--vms'} goes with `ferry metrics compare` "
              "(hint: ferry metrics compare --vms --sort cpu)", file=sys.stderr)
        return EXIT_CONFIG

    async def go(client) -> int:
        series = await client.metrics(args.target, args.metric, args.since)
        if args.json:
            print(api.dumps(series))
            return EXIT_OK
        obj = series[0].object if series else args.target
        step = series[0].step if series else 0
        if not any(s.points for s in series):
            print(f"no samples of {obj} in the last {_window(args.since)} (the engine samples while it runs, "
                  "every [metrics] interval; is [metrics] enabled?)")
            return EXIT_OK
        if args.metric:
            s = series[0]
            print(f"{obj} {s.metric} over {_window(args.since)}, a point per {step} s")
            print(_table([[fmt.stamp(p.ts), value(p.min, s.unit), value(p.avg, s.unit), value(p.max, s.unit),
                           str(p.n)] for p in s.points], POINT_COLUMNS))
            return EXIT_OK
        print(f"{obj} over {_window(args.since)} (a point per {step} s; last, min, avg, max)")
        name_w = max(len(s.metric) for s in series)
        for s in series:
            if not s.points:
                print(f"  {s.metric.ljust(name_w)}  (no samples)")
                continue
            avgs = [p.avg for p in s.points]
            lo, hi = min(p.min for p in s.points), max(p.max for p in s.points)
            mean = sum(p.avg * p.n for p in s.points) / sum(p.n for p in s.points)
            print(f"  {s.metric.ljust(name_w)}  {sparkline(avgs).ljust(WIDTH)}  last {value(s.last, s.unit)}  "
                  f"min {value(lo, s.unit)}  avg {value(mean, s.unit)}  max {value(hi, s.unit)}")
        return EXIT_OK
    return _ask(ws, go)


def _compare(args, ws: Workspace) -> int:
    columns = COMPARE_VMS if args.vms else COMPARE
    names = ("vm", "host") if args.vms else ("host",)
    key = args.sort or names[0]
    if key not in columns:
        print(f"ferry: --sort {key}: not a column of the {'VMs' if args.vms else 'hosts'}' comparison "
              f"(hint: one of {', '.join(columns)})", file=sys.stderr)
        return EXIT_CONFIG
    field = columns[key][1]

    def order(r) -> tuple:
        # Highest first for numbers (the busiest on top), by name for names; no sample: last.
        name = tuple(getattr(r, n) for n in names)
        if key in names:
            return (getattr(r, field), *name)
        return (getattr(r, field) is None, -(getattr(r, field) or 0), *name)

    def when(r) -> str:
        return fmt.clock(r.ts) if r.ts else "-"

    async def go(client) -> int:
        rows = sorted(await (client.metrics_compare_vms() if args.vms else client.metrics_compare()), key=order)
        if args.json:
            print(api.dumps(rows))
            return EXIT_OK
        if not any(r.ts for r in rows):
            print("no samples yet (the engine samples its hosts and running VMs every [metrics] interval while "
                  "it runs)")
        if args.vms:
            cells = [[r.vm, r.host, value(r.cpu_pct, "%"), value(r.mem_pct, "%"), value(r.mem_rss_bytes, "B"),
                      value(r.mem_total_bytes, "B"), when(r)] for r in rows]
        else:
            cells = [[r.host, value(r.cpu_pct, "%"), value(r.mem_pct, "%"), value(r.net_rx_bps, "B/s"),
                      value(r.net_tx_bps, "B/s"), value(r.disk_read_bps, "B/s"), value(r.disk_write_bps, "B/s"),
                      value(r.load1, ""), when(r)] for r in rows]
        print(_table(cells, [h for h, _ in columns.values()]))
        return EXIT_OK
    return _ask(ws, go)


def add_parsers(sub) -> None:
    s = sub.add_parser("metrics", help="performance history of a host or VM; `metrics compare`: all hosts side by side",
                       description="ferry metrics HOST|VM [--metric NAME] [--since DURATION] | "
                       "ferry metrics compare [--vms] [--sort COLUMN]")
    s.add_argument("target", metavar="HOST|VM|compare",
                   help="a host or VM (host:NAME, vm:NAME when both have the name), or `compare`")
    s.add_argument("--metric", metavar="NAME", help="one metric, as a table of its points (e.g. cpu_pct, mem_pct, "
                   "net_rx_bps, disk_write_bps)")
    s.add_argument("--since", type=duration_arg, default=3600.0, metavar="DURATION",
                   help="the window: 1h (default; 10 s points), up to 1d (1 min points), up to 30d (10 min points)")
    s.add_argument("--sort", type=str.lower, metavar="COLUMN",
                   help=f"compare: the column to sort by, numbers highest first ({', '.join(COMPARE)}; with --vms: "
                   f"{', '.join(COMPARE_VMS)})")
    s.add_argument("--vms", action="store_true", help="compare: the VMs (CPU, memory; where each runs) instead of the hosts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_metrics)
