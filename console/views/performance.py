"""Performance view (issue 14, F3): every host's newest sample side by side (CPU, memory, load, network
and disk rates, the sample's age; sorted by the table's own keys `o`/`O`, the busiest on top when a
number column is chosen), and below it the selected host's history: a line per metric with its
sparkline over the window and its last, min, mean and max. `w` cycles the window: 1 h (a point per
10 s), 1 d (1 min), 30 d (10 min), as the engine keeps them (engine/ops/metricsdb.py).

Polled as the other views are (console/views/polled.py): `metrics_compare` for the table, then
`metrics(host, None, window)` for the selected host; the cursor or `w` asks again at once.
The sparklines are the CLI's (`ferry metrics HOST`): the same text on screen and in a shell.
"""

from __future__ import annotations

from typing import Any

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine.api import HostMetrics, MetricSeries
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.cli.metrics import WIDTH, sparkline, value
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.views.polled import TIMEOUT, PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, Row, cell

POLL_S = 10.0           # the engine samples every [metrics] interval (10 s by default)
WINDOWS = ((3600.0, "1h"), (86400.0, "1d"), (30 * 86400.0, "30d"))
NONE_YET = "no samples yet: the engine samples its hosts every [metrics] interval while it runs"
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
# column: (the HostMetrics field, its unit)
FIELDS = (("cpu_pct", "%"), ("mem_pct", "%"), ("load1", ""), ("net_rx_bps", "B/s"), ("net_tx_bps", "B/s"),
          ("disk_read_bps", "B/s"), ("disk_write_bps", "B/s"))


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


def series_line(s: MetricSeries, name_w: int) -> str:
    """One metric as markup: name, sparkline, last/min/avg/max (the CLI's line)."""
    got = numbers(s)
    if got is None:
        return f"  {esc(s.metric.ljust(name_w))}  [$text-muted](no samples)[/]"
    lo, mean, hi = got
    return (f"  {esc(s.metric.ljust(name_w))}  [$accent]{sparkline([p.avg for p in s.points]).ljust(WIDTH)}[/]  "
            f"last {value(s.last, s.unit)}  min {value(lo, s.unit)}  avg {value(mean, s.unit)}  "
            f"max {value(hi, s.unit)}")


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
        self.hosts: dict[str, tuple[HostMetrics, str]] = {}     # host -> (its newest sample, its age as shown)
        self.window = 0                     # index in WINDOWS
        self.series: list[MetricSeries] = []
        self.asked: tuple[str, float] | None = None     # (host, window) of the series shown
        self.series_error: str | None = None
        self.selected: str | None = None
        self._rows: dict[str, tuple[Any, Row]] = {}

    @property
    def window_s(self) -> float:
        return WINDOWS[self.window][0]

    @property
    def window_name(self) -> str:
        return WINDOWS[self.window][1]

    def crumbs(self) -> tuple[str, ...]:
        return ("performance",) + self.filter_crumbs() + ((self.selected, self.window_name) if self.selected
                                                          else (self.window_name,))

    # ------------------------------------------------------------------ the poll

    async def poll_once(self) -> tuple[str | None, str | None]:
        got, error, hint = await attempt(self.client.metrics_compare(), "metrics", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        self.ok = True
        now = self.app.clock()
        new = {h.host: (h, age_text(h.ts, now)) for h in got}
        if new != self.hosts:
            self.hosts = new
            self.changed()
        else:
            self.render_status()
        await self.ask_series()
        return None, None

    async def ask_series(self) -> None:
        """The selected host's series over the window (drawn below the table)."""
        host, since = self.selected, self.window_s
        if host is None:
            self.series, self.asked, self.series_error = [], None, None
        else:
            got, error, hint = await attempt(self.client.metrics(host, None, since), f"metrics of {host}",
                                             timeout=TIMEOUT)
            if (host, since) != (self.selected, self.window_s):
                return              # the cursor or the window moved meanwhile: the next poll asks
            self.asked = (host, since)
            self.series_error = None if error is None else error + (f" (hint: {hint})" if hint else "")
            self.series = got if error is None else []
        if self.shown:
            self.render_detail()

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, tuple[HostMetrics, str]]:
        return self.hosts

    def make_row(self, record: tuple[HostMetrics, str]) -> Row:
        h, age = record
        cells = [cell(safe(h.host))]
        for field, unit in FIELDS:
            v = getattr(h, field)
            # no sample sorts below every number, whichever way round
            cells.append(cell(value(v, unit), sort=v if v is not None else float("-inf")))
        cells.append(cell(age, sort=-(h.ts or 0)))
        return Row(cells=tuple(cells), search="nosample" if h.ts is None else "")

    # ------------------------------------------------------------------ cursor and detail

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        if key != self.selected:
            self.selected = key
            self.render_detail()
            self.post_crumbs()
            self.poke()

    def render_detail(self, *, again: bool = False) -> None:
        if not self.is_mounted:
            return
        host, window = self.selected, self.window_name
        if host is None:
            lines = [f"[$text-muted]{NONE_YET if not self.hosts else 'no host selected'}[/]"]
        else:
            head = f"[b]{esc(host)}[/b] over {window}"
            if self.series_error:
                lines = [head, f"[$error]{esc(self.series_error)}[/]"]
            elif self.asked != (host, self.window_s):
                lines = [head, "[$text-muted]asking…[/]"]
            elif not any(s.points for s in self.series):
                lines = [head, f"[$text-muted]no samples of {esc(host)} in the last {window}[/]"]
            else:
                step = self.series[0].step
                lines = [f"{head} · a point per {step} s · last, min, avg, max  [$text-muted](w: the window "
                         "1h / 1d / 30d)[/]"]
                name_w = max(len(s.metric) for s in self.series)
                lines += [series_line(s, name_w) for s in self.series]
        self.query_one("#performance-detail", Page).update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        if not self.is_mounted:
            return
        sampled = [h for h, _ in self.hosts.values() if h.ts is not None]
        text = self.poll_status() or (f"[$text-muted]{NONE_YET}[/]" if not sampled else None)
        if text is None:
            n = len(self.hosts)
            text = f"{n} host{'s' if n != 1 else ''}, {len(sampled)} sampled · window {self.window_name}"
            text += self.table_status()
        update_static(self.query_one("#performance-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ keys

    def action_cycle_window(self) -> None:
        """w: 1h -> 1d -> 30d -> 1h; the series asked for again at once."""
        self.window = (self.window + 1) % len(WINDOWS)
        self.render_detail()
        self.render_status()
        self.post_crumbs()
        self.poke()
