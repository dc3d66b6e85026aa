"""Health view (issue 14, F2): every check's current state in one table, keyed by host and check and
diffed (problems first: CRITICAL, UNKNOWN, WARNING, then OK), the selected one's details below; `/`
filters (a host, a check, a state, "problem", SOFT or HARD), `r` runs checks now (a checklist or every
check of one host: the task health.run, followed in the Tasks view; when it ends the view asks again
and says what it found), Enter shows the selected check full screen: its long output, performance data
and history.

States are Nagios': a symbol and a word, coloured by the theme's severity variables. Polled as the
Migrations view is: one poll at a time, only while shown, backing off after a failure and saying
"stale since".
"""

from __future__ import annotations

from functools import partial
from typing import Any

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import DataTable, Static

from ferry.engine import fmt
from ferry.engine.api import CheckState, HealthCheck, HealthResult
from ferry.engine.errors import FerryError
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.theming import rich_style
from ferry.console.views.audit import stamp
from ferry.console.views.overview import CHECK_LOOK
from ferry.console.views.polled import TIMEOUT, PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, Row, cell

POLL_S = 5.0
HISTORY = 50            # results shown in a check's details
KIND = "health.run"
CHECKLISTS = ("daily", "weekly", "monthly")     # the built-in ones, when the site's settings do not say
NONE_YET = "no check results yet: r runs a checklist (daily: alarms, platform, devices)"
# At 80 columns the attempt and the time (the detail pane says both) give their room to the summary.
COLUMNS = (
    Column("host", "HOST", cap=16),
    Column("check", "CHECK", cap=24),
    Column("state", "STATE", cap=11),
    Column("type", "TYPE", cap=6),
    Column("attempt", "ATTEMPT", cap=8, optional=True),
    Column("checked", "LAST CHECKED", cap=17, optional=True),
    Column("summary", "SUMMARY", flex=True, least=12),
)


def key_of(c: HealthCheck | HealthResult) -> str:
    return f"{c.host}\t{c.check}"


def worst_first(state: CheckState) -> int:
    """CRITICAL, UNKNOWN, WARNING, OK: the state column's sort value."""
    return 3 - state.rank


def state_markup(state: CheckState) -> str:
    return f"[${CHECK_LOOK[state]}]{esc(state.symbol)}[/]"


def checklist_names(site: Any) -> list[str]:
    """The checklists `r` offers: the site's settings say (the built-in ones and [checklists.NAME])."""
    health = getattr(site, "health", None)
    if hasattr(health, "checklist_names"):
        return list(health.checklist_names())
    own = (health or {}).get("checklists") if isinstance(health, dict) else None     # a site from the wire
    return sorted({*CHECKLISTS, *(own or {})})


def _md(text: str) -> str:
    """Text inside a Markdown table cell."""
    return safe(text).replace("|", "\\|")


def details_markdown(c: HealthCheck, history: list[HealthResult]) -> str:
    """A check's details as Markdown: state, summary, alarm, long output, performance data, history."""
    fence = "~~~~~~~~"
    out = [f"# {c.check} on {c.where}", "",
           f"**{c.state.symbol}** {c.state_type}, attempt {c.attempt}/{c.max_attempts} · last checked "
           f"{fmt.stamp(c.last_checked)} · state since {fmt.stamp(c.last_change)} · hard since "
           f"{fmt.stamp(c.last_hard_change)}", "", _md(c.summary), ""]
    if c.alarm:
        out += [f"Alarm raised: **{_md(c.alarm)}**", ""]
    out += ["## Long output", ""]
    out += [fence, c.details.replace(fence, "~~~"), fence, ""] if c.details.strip() else ["(none)", ""]
    out += ["## Performance data", ""]
    if c.perfdata.strip():
        out += [fence, "\n".join(c.perfdata.split()), fence, ""]
    else:
        out += ["(none)", ""]
    out += [f"## History (the newest {len(history)})", ""]
    if history:
        out += ["| time | state | type | attempt | summary |", "|---|---|---|---|---|"]
        out += [f"| {fmt.stamp(r.ts)} | {r.state.symbol} | {r.state_type} | {r.attempt} | {_md(r.summary)} |"
                for r in history]
    else:
        out.append("(none)")
    return "\n".join(out) + "\n"


def run_summary(info: Any) -> str:
    """What a finished health run found, in a line or two (as `ferry health run` says it)."""
    r = info.result or {}
    what = r.get("checklist") or f"host {r.get('host')}"
    states = ", ".join(f"{n} {s}" for s, n in (r.get("states") or {}).items() if n) or "no checks"
    line = f"health {what}: {r.get('checks', 0)} checks: {states}"
    if r.get("raised"):
        line += f"; alarms raised: {', '.join(r['raised'])}"
    return line


class HealthView(PolledTable, Vertical):
    BINDINGS = opkeys.bindings("health")
    VIEW = "health"
    TITLE = "Health"
    WHAT = "checks"

    COLUMNS = COLUMNS
    SORT = "state"
    PANE = "health"
    DEFAULT_CSS = detail_css("HealthView", "health-detail", 8)

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="health")
        self.client = client
        self.init_poll(float((poll or {}).get("health_interval") or POLL_S))
        self.checks: dict[str, HealthCheck] = {}
        self.selected: str | None = None
        self._shown_record: HealthCheck | None = None
        self._rows: dict[str, tuple[HealthCheck, Row]] = {}
        self._task_states: dict[int, str] = {}
        self.mine: set[int] = set()          # health runs started here: said when they end

    def crumbs(self) -> tuple[str, ...]:
        c = self.selected_check()
        return ("health",) + self.filter_crumbs() + ((f"{c.where} {c.check}",) if c else ())

    # ------------------------------------------------------------------ the poll

    async def poll_once(self) -> tuple[str | None, str | None]:
        got, error, hint = await attempt(self.client.health_list(), "health checks", timeout=TIMEOUT)
        if error is None:
            self.ok = True
            self.listed(got)
        return error, hint

    def listed(self, items: list[HealthCheck]) -> None:
        new = {key_of(c): c for c in items}
        if new == self.checks:
            self.render_status()
            return
        self.checks = new
        self.changed()

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, HealthCheck]:
        return self.checks

    def make_row(self, c: HealthCheck) -> Row:
        variables = self.app.theme_variables
        var = CHECK_LOOK[c.state]
        return Row(cells=(
            cell(safe(c.where)),
            cell(safe(c.check)),
            cell(c.state.symbol, sort=worst_first(c.state), style=rich_style(variables, var, bold=c.hard and
                                                                              c.state.problem)),
            cell(c.state_type),
            cell(f"{c.attempt}/{c.max_attempts}", sort=c.attempt),
            cell(stamp(c.last_checked), sort=c.last_checked),
            cell(safe(c.summary)),
        ), search=f"{c.state.value} " + ("problem" if c.state.problem else "") + (f" alarm {c.alarm}" if c.alarm
                                                                                     else ""))

    # ------------------------------------------------------------------ cursor and detail

    def selected_check(self) -> HealthCheck | None:
        return self.checks.get(self.selected) if self.selected else None

    def on_data_table_row_selected(self, message: DataTable.RowSelected) -> None:
        """Enter on a row: its details (the table's own enter selects the row)."""
        message.stop()
        self.action_details()

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        c = self.checks.get(key) if key else None
        if key != self.selected or c != self._shown_record:
            moved = key != self.selected
            self.selected = key
            self.render_detail()
            if moved:
                self.refresh_bindings()
                self.post_crumbs()

    def render_detail(self, *, again: bool = False) -> None:
        c = self.selected_check()
        self._shown_record = c
        page = self.query_one("#health-detail", Page)
        if c is None:
            text = f"[$text-muted]{NONE_YET}[/]" if not self.checks else "[$text-muted]no check selected[/]"
            page.update(Content.from_markup(text))
            return
        lines = [f"[b]{esc(c.check)} on {esc(c.where)}[/b]  {state_markup(c.state)} {c.state_type} · attempt "
                 f"{c.attempt}/{c.max_attempts} · checked {stamp(c.last_checked)} · since {fmt.stamp(c.last_change)}"
                 "  [$text-muted](enter: details and history)[/]",
                 esc(c.summary)]
        if c.alarm:
            lines.append(f"[$warning]alarm {esc(c.alarm)}[/]")
        if c.perfdata:
            lines.append(f"[$text-muted]perfdata[/] {esc(c.perfdata)}")
        lines += [esc(x) for x in c.details.splitlines()[:4]]
        page.update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        text = self.poll_status() or (f"[$text-muted]{NONE_YET}[/]" if not self.checks else None)
        if text is None:
            counts = {s: sum(1 for c in self.checks.values() if c.state == s) for s in CheckState}
            hosts = len({c.host for c in self.checks.values()})
            text = f"{len(self.checks)} checks on {hosts} host{'s' if hosts != 1 else ''}: " + "  ".join(
                f"[${CHECK_LOOK[s]}]{esc(s.symbol.split()[0])} {n} {s.value}[/]" for s, n in counts.items() if n)
            soft = sum(1 for c in self.checks.values() if c.state.problem and not c.hard)
            if soft:
                text += f" · {soft} soft (re-checked before an alarm)"
            text += self.table_status()
        update_static(self.query_one("#health-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ the task feed

    def tasks_changed(self, tasks: dict) -> None:
        """A health run that ended changed the checks: ask again (and say what it found, if run here)."""
        poke = False
        for tid, info in tasks.items():
            if info.kind != KIND:
                continue
            state = str(info.state)
            if self._task_states.get(tid) != state:
                self._task_states[tid] = state
                if info.state.final:
                    poke = True
                    if tid in self.mine:
                        self.mine.discard(tid)
                        self._said(info)
        if poke:
            self.poke()

    def _said(self, info: Any) -> None:
        if info.state.value == "succeeded":
            self.app.notify(f"task {info.id}: {esc(run_summary(info))}", title="Health", timeout=8)
        else:
            self.app.notify(f"task {info.id} {info.state.value}: {esc(info.error or 'no reason given')}"
                            + (f"\nhint: {esc(info.hint)}" if info.hint else ""), title="Health",
                            severity="error", timeout=10)

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "details":
            return True if self.selected_check() is not None else None
        return True

    def action_details(self) -> None:
        c = self.selected_check()
        if c is not None:
            self.app.run_worker(partial(self._details, c), name=f"details {c.check}", group="health-details",
                                exclusive=True, exit_on_error=False)

    async def _details(self, c: HealthCheck) -> None:
        try:
            history = await self.client.health_history(c.check, c.host, HISTORY)
        except FerryError as e:
            self.app.notify(esc(e.message) + (f" (hint: {esc(e.hint)})" if e.hint else ""), title="Details",
                            severity="error", timeout=8)
            return
        from ferry.console.dialogs.report import ReportScreen
        self.app.push_screen(ReportScreen(f"{c.check} on {c.where}", details_markdown(c, history)))

    def action_run_health(self) -> None:
        from ferry.console.dialogs.vmforms import Field, FormScreen
        site = getattr(self.client, "site", None) or getattr(self.app, "site", None)
        options = [(f"checklist {n}", n) for n in checklist_names(site)]
        c = self.selected_check()
        hosts = sorted(getattr(site, "hosts", {}) or {})
        if c is not None and c.host in hosts:           # the selected check's host first among the hosts
            hosts.remove(c.host)
            hosts.insert(0, c.host)
        options += [(f"every check of host {h}", "host:" + h) for h in hosts]

        async def run(values: dict) -> str | None:
            what = str(values.get("what") or "daily")
            host = what.removeprefix("host:") if what.startswith("host:") else None
            checklist = None if host else what
            try:
                tid = await self.client.health_run(checklist, host)
            except FerryError as e:
                return e.message + (f"\nhint: {e.hint}" if e.hint else "")
            self.mine.add(tid)
            self.app.notify(f"task {tid}: health {esc(checklist or 'of host ' + str(host))} · follow it in Tasks (2)",
                            title="Health", timeout=4)
            feed = getattr(self.app, "feed", None)
            if feed is not None:
                await feed.refresh()
            return None
        self.app.push_screen(FormScreen("Run health checks now?", [
            Field("what", "Run", "daily", kind="select", options=tuple(options))],
            confirm="Run", intro="A health run is a task: the Tasks view (2) follows it, and this view shows its "
            "results when it ends. A problem is re-checked before it is hard and raises an alarm.", check=run))

