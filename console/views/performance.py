"""Performance view (issue 14, F3): every host's newest sample side by side (CPU, memory, load, network
and disk rates, the sample's age; sorted by the table's own keys `o`/`O`, the busiest on top when a
number column is chosen), and below it the selected host's history: a line per metric with its
sparkline over the window and its last, min, mean and max. `v` shows the VMs instead (as k9s switches
resources): a row per VM with its host, CPU, memory and the sample's age, the selected VM's history
below. `w` cycles the window: 1 h (a point per 10 s), 1 d (1 min), 30 d (10 min), as the engine keeps
them (engine/ops/metricsdb.py).

Polled as the other views are (console/views/polled.py): `metrics_compare` (hosts) or
`metrics_compare_vms` (VMs) for the table shown, then `metrics(host:NAME or vm:NAME, None, window)`
for the selected row; the cursor, `v` or `w` asks again at once. Each table keeps its own sort, filter
and cursor. The sparklines are the CLI's (`ferry metrics HOST|VM`); their numbers stand in columns,
and in a narrow terminal min, then avg, give the sparkline their room.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine.api import HostMetrics, MetricSeries, VMMetrics
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.cli.metrics import WIDTH, sparkline, value
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.views.polled import TIMEOUT, PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, KeyedTable, Row, TableFilter, cell

POLL_S = 10.0           # the engine samples every [metrics] interval (10 s by default)
WINDOWS = ((3600.0, "1h"), (86400.0, "1d"), (30 * 86400.0, "30d"))
NONE_YET = "no samples yet: the engine samples its hosts every [metrics] interval while it runs"
NO_VM_SAMPLES = "no VM samples yet: the engine samples the VMs that run, every [metrics] interval"
NO_VMS = "no VMs (ferry vm create makes one)"
COLUMNS = (
    Column("host", "HOST", cap=20),
    Column("cpu", "CPU", cap=7),
    Column("mem", "MEM", cap=7),
    Column("load", "LOAD1", cap=7),
    Column("rx", "NET-RX", cap=11),
    Column("tx", "NET-TX", cap=11),
    Column("read", "DISK-R", cap=11),
    Column("write", "DISK-W", cap=11),
    Column("age", "SAMPLED", flex=True, least=8),
)
VM_COLUMNS = (
    Column("vm", "VM", cap=24),
    Column("host", "HOST", cap=20),
    Column("cpu", "CPU", cap=7),
    Column("mem", "MEM", cap=7),
    Column("rss", "RSS", cap=11),
    Column("given", "GIVEN", cap=11),
    Column("age", "SAMPLED", flex=True, least=8),
)
# column: (the record's field, its unit)
FIELDS = (("cpu_pct", "%"), ("mem_pct", "%"), ("load1", ""), ("net_rx_bps", "B/s"), ("net_tx_bps", "B/s"),
          ("disk_read_bps", "B/s"), ("disk_write_bps", "B/s"))
VM_FIELDS = (("cpu_pct", "%"), ("mem_pct", "%"), ("mem_rss_bytes", "B"), ("mem_total_bytes", "B"))
# The two tables `v` switches between: mode -> (its columns, the column sorted by at first, the object prefix)
MODES = {"hosts": (COLUMNS, "host", "host:"), "vms": (VM_COLUMNS, "vm", "vm:")}
STATS = ("last", "min", "avg", "max")
SPARK_LEAST = 24        # a narrower sparkline says too little: min, then avg, give it their room
WIDE = 160              # the pane's width before it is laid out


def age_text(ts: float | None, now: float) -> str:
    """How old a sample is: 12s, 3m05s; '-' without one."""
    if ts is None:
        return "-"
    s = max(0, int(now - ts))
    return f"{s}s ago" if s < 60 else f"{s // 60}m{s % 60:02d}s ago" if s < 3600 else f"{s // 3600}h ago"


def numbers(s: MetricSeries) -> tuple[float, float, float] | None:
    """A series' min, exact mean (weighted by the samples of each bucket) and max."""
    if not s.points:
        return None
    n = sum(p.n for p in s.points)
    return (min(p.min for p in s.points), sum(p.avg * p.n for p in s.points) / n, max(p.max for p in s.points))


def stats_of(s: MetricSeries) -> dict[str, str] | None:
    """last, min, avg, max of a series as shown; None without samples."""
    got = numbers(s)
    if got is None:
        return None
    lo, mean, hi = got
    return {"last": value(s.last, s.unit), "min": value(lo, s.unit), "avg": value(mean, s.unit),
            "max": value(hi, s.unit)}


def chart(series: list[MetricSeries], width: int) -> list[str]:
    """The series as markup lines `width` wide: a line naming the columns, then per metric its name, its
    sparkline and its numbers in columns (min, then avg, left out where the sparkline would be too narrow)."""
    name_w = max(len(s.metric) for s in series)
    stats = [stats_of(s) for s in series]
    col_w = {k: max([len(k)] + [len(st[k]) for st in stats if st]) for k in STATS}
    keep = list(STATS)

    def room() -> int:
        return min(WIDTH, width - 4 - name_w - sum(col_w[k] + 2 for k in keep))
    for k in ("min", "avg"):
        if room() >= SPARK_LEAST:
            break
        keep.remove(k)
    spark_w = max(1, room())
    lines = [f"[$text-muted]{' ' * (4 + name_w + spark_w)}{''.join(f'  {k:>{col_w[k]}}' for k in keep)}[/]"]
    for s, st in zip(series, stats):
        name = esc(s.metric.ljust(name_w))
        if st is None:
            lines.append(f"  {name}  [$text-muted](no samples)[/]")
        else:
            spark = sparkline([p.avg for p in s.points], spark_w).ljust(spark_w)
            lines.append(f"  {name}  [$accent]{spark}[/]" + "".join(f"  {st[k]:>{col_w[k]}}" for k in keep))
    return lines


class PerformanceView(PolledTable, Vertical):
    BINDINGS = opkeys.bindings("performance")
    VIEW = "performance"
    TITLE = "Performance"
    WHAT = "samples"

    COLUMNS = COLUMNS
    SORT = "host"
    PANE = "performance"
    DEFAULT_CSS = detail_css("PerformanceView", "performance-detail", 12)

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="performance")
        self.client = client
        self.init_poll(float((poll or {}).get("performance_interval") or POLL_S))
        self.mode = "hosts"                 # the table shown: "hosts" or "vms" (`v`)
        self.hosts: dict[str, tuple[HostMetrics, str]] = {}     # host -> (its newest sample, its age as shown)
        self.vms: dict[str, tuple[VMMetrics, str]] | None = None    # the same of each VM; None: not asked yet
        self.window = 0                     # index in WINDOWS
        self.series: list[MetricSeries] = []
        self.asked: tuple[str, float] | None = None     # (object, window) of the series shown
        self.series_error: str | None = None
        self.selected: str | None = None    # the object of the selected row: host:NAME, vm:NAME
        self.tables: dict[str, KeyedTable] = {}
        self._rows_of: dict[str, dict[str, tuple[Any, Row]]] = {mode: {} for mode in MODES}
        self._rows = self._rows_of[self.mode]
        self._width = 0                     # the detail pane's width the chart was laid out for

    def compose(self) -> ComposeResult:
        for mode, (columns, sort, _) in MODES.items():
            table = KeyedTable(columns, sort=sort, id=f"performance-{mode}")
            table.on_cursor = self.cursor_moved
            table.display = mode == self.mode
            self.tables[mode] = table
            yield table
            yield TableFilter(table, id=f"performance-{mode}-filter")
        self.table = self.tables[self.mode]
        yield Static(id="performance-status", classes="view-status")
        yield Page(id="performance-detail")

    @property
    def window_s(self) -> float:
        return WINDOWS[self.window][0]

    @property
    def window_name(self) -> str:
        return WINDOWS[self.window][1]

    def crumbs(self) -> tuple[str, ...]:
        name = self.selected.partition(":")[2] if self.selected else None
        return ("performance", self.mode) + self.filter_crumbs() + ((name, self.window_name) if name
                                                                    else (self.window_name,))

    # ------------------------------------------------------------------ the poll

    async def poll_once(self) -> tuple[str | None, str | None]:
        mode = self.mode
        ask = self.client.metrics_compare() if mode == "hosts" else self.client.metrics_compare_vms()
        got, error, hint = await attempt(ask, "metrics", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        self.ok = True
        if mode != self.mode:
            return None, None           # `v` meanwhile: the poke it made asks for the other table
        now = self.app.clock()
        new: dict[str, Any] = ({h.host: (h, age_text(h.ts, now)) for h in got} if mode == "hosts" else
                               {v.vm: (v, age_text(v.ts, now)) for v in got})
        if new != self.records:
            if mode == "hosts":
                self.hosts = new
            else:
                self.vms = new
            self.changed()
        else:
            self.render_status()
        await self.ask_series()
        return None, None

    async def ask_series(self) -> None:
        """The selected host's or VM's series over the window (drawn below the table)."""
        obj, since = self.selected, self.window_s
        if obj is None:
            self.series, self.asked, self.series_error = [], None, None
        else:
            got, error, hint = await attempt(self.client.metrics(obj, None, since), f"metrics of {obj}",
                                             timeout=TIMEOUT)
            if (obj, since) != (self.selected, self.window_s):
                return              # the cursor, the table or the window moved meanwhile: the next poll asks
            self.asked = (obj, since)
            self.series_error = None if error is None else error + (f" (hint: {hint})" if hint else "")
            self.series = got if error is None else []
        if self.shown:
            self.render_detail()

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, Any]:
        return self.hosts if self.mode == "hosts" else self.vms or {}

    def make_row(self, record: tuple[HostMetrics | VMMetrics, str]) -> Row:
        m, age = record
        if isinstance(m, HostMetrics):
            cells, fields = [cell(safe(m.host))], FIELDS
        else:
            cells, fields = [cell(safe(m.vm)), cell(safe(m.host))], VM_FIELDS
        for field, unit in fields:
            v = getattr(m, field)
            # no sample sorts below every number, whichever way round
            cells.append(cell(value(v, unit), sort=v if v is not None else float("-inf")))
        cells.append(cell(age, sort=-(m.ts or 0)))
        return Row(cells=tuple(cells), search="nosample" if m.ts is None else "")

    # ------------------------------------------------------------------ cursor and detail

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        obj = None if key is None else MODES[self.mode][2] + key
        if obj != self.selected:
            self.selected = obj
            self.render_detail()
            self.post_crumbs()
            self.poke()

    def on_resize(self) -> None:
        self.render_detail()

    def render_detail(self, *, again: bool = False) -> None:
        if not self.is_mounted:
            return
        page = self.query_one("#performance-detail", Page)
        self._width = page.scrollable_content_region.width
        obj, window = self.selected, self.window_name
        if obj is None:
            if self.mode == "hosts":
                lines = [f"[$text-muted]{NONE_YET if not self.hosts else 'no host selected'}[/]"]
            else:
                said = "asking for the VMs…" if self.vms is None else "no VM selected" if self.vms else NO_VMS
                lines = [f"[$text-muted]{said}[/]"]
        else:
            name = obj.partition(":")[2]
            vm = (self.vms or {}).get(name) if self.mode == "vms" else None
            head = f"[b]{esc(name)}[/b]" + (f" on {esc(vm[0].host)}" if vm else "") + f" over {window}"
            if self.series_error:
                lines = [head, f"[$error]{esc(self.series_error)}[/]"]
            elif self.asked != (obj, self.window_s):
                lines = [head, "[$text-muted]asking…[/]"]
            elif not any(s.points for s in self.series):
                lines = [head, f"[$text-muted]no samples of {esc(name)} in the last {window}[/]"]
            else:
                lines = [f"{head} · a point per {self.series[0].step} s  [$text-muted](w: 1h / 1d / 30d)[/]"]
                lines += chart(self.series, self._width or WIDE)
        page.update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        if not self.is_mounted:
            return
        text = self.poll_status()
        if text is None and self.mode == "vms" and self.vms is None:
            text = "[$text-muted]asking for the VMs…[/]"
        if text is None:
            got = [m for m, _ in self.records.values()]
            sampled = sum(m.ts is not None for m in got)
            if self.mode == "hosts" and not sampled:
                text = f"[$text-muted]{NONE_YET}[/]"
            elif self.mode == "vms" and not got:
                text = f"[$text-muted]{NO_VMS} · v: the hosts[/]"
            else:
                noun = ("host" if self.mode == "hosts" else "VM") + ("s" if len(got) != 1 else "")
                text = f"{len(got)} {noun}, {sampled} sampled · window {self.window_name}"
                if self.mode == "vms" and not sampled:
                    text = f"{text} · [$text-muted]{NO_VM_SAMPLES}[/]"
                text += self.table_status()
        update_static(self.query_one("#performance-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ keys

    def action_toggle_objects(self) -> None:
        """v: the VMs instead of the hosts, or the hosts again; each table as it was left."""
        old = self.table
        self.mode = "vms" if self.mode == "hosts" else "hosts"
        self.table, self._rows = self.tables[self.mode], self._rows_of[self.mode]
        for f in self.query(TableFilter):
            f.remove_class("-open")
        old.display, self.table.display = False, True
        self.sync()                 # what this table had (the poke below asks for the newest)
        self.table.focus()
        self.render_detail()
        self.post_crumbs()
        self.poke()

    def action_filter(self) -> None:
        self.query_one(f"#performance-{self.mode}-filter", TableFilter).open_line()

    def clear_filter(self) -> bool:
        return self.query_one(f"#performance-{self.mode}-filter", TableFilter).clear()

    def action_cycle_window(self) -> None:
        """w: 1h -> 1d -> 30d -> 1h; the series asked for again at once."""
        self.window = (self.window + 1) % len(WINDOWS)
        self.render_detail()
        self.render_status()
        self.post_crumbs()
        self.poke()
