"""Migrations view (issue 13): every server migration of the workspace in one table, keyed by name
and diffed (console/widgets/table.py), with the selected one's details below; `/` filters (a wave,
a state, a host), `a` assesses (a task, followed in the Tasks view), `R` shows the assessment
report full screen, `n` overrides a failed network check with a reason (audited).

The list is asked for through the engine client only: one poll at a time, the next one POLL_S after
the last ended, only while the view is on screen (a modal over it waits), backing off after a
failure and saying "stale since". An assessment task that ends asks again at once. A list equal to
the last one changes nothing on screen; a row is made again only when its migration changed.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.api import Migration, MigrationState
from ferry.engine.errors import FerryError, Refused
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.theming import rich_style
from ferry.console.views.audit import stamp
from ferry.console.views.base import ViewBase
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, KeyedTable, Row, TableFilter, cell

POLL_S = 5.0             # between two polls of the list while the view is shown
BACKOFF_MAX_S = 60.0
ASSESS = "migration.assess"
COLUMNS = (
    Column("name", "NAME", flex=True, least=8),
    Column("wave", "WAVE", cap=14),
    Column("state", "STATE", cap=19),
    Column("round", "ROUND", cap=8),
    Column("sync", "LAST SYNC", cap=17),
    Column("network", "NETWORK", cap=24),
    Column("blockers", "BLOCKERS", cap=11),
    # Filled by the sync rounds and the cutover estimate (later steps of issue 13): "-" until then.
    Column("changed", "DATA CHANGED", cap=15, optional=True),
    Column("downtime", "PREDICTED DOWNTIME", cap=21, optional=True),
)
STATE_VARIABLE = {
    MigrationState.CUTTING_OVER: "state-running", MigrationState.READY: "sev-ok",
    MigrationState.CUT_OVER: "sev-ok", MigrationState.FINALIZED: "sev-ok", MigrationState.ROLLED_BACK: "sev-warn",
}


def netcheck_of(m: Migration) -> dict | None:
    nc = (m.assessment or {}).get("netcheck")
    return nc if isinstance(nc, dict) else None


def network_cell(m: Migration) -> str:
    """The last network check in a few characters: "0.3 ms, 11474 Mbit/s" ("-": none yet)."""
    nc = netcheck_of(m)
    if nc is None:
        return "-"
    lat, bw = nc.get("latency_ms"), nc.get("bandwidth_mbit")
    return ", ".join([f"{lat:.1f} ms" if lat is not None else "no answer"]
                     + ([f"{bw:.0f} Mbit/s"] if bw is not None else []))


def network_line(m: Migration) -> str:
    """The last network check in one line, as `ferry migration netcheck NAME` says it."""
    nc = netcheck_of(m)
    if nc is None:
        return f"no network check yet (a assesses {m.name})"
    probes, lost = nc.get("probes") or 0, nc.get("lost") or 0
    loss = 100.0 * lost / probes if probes else 100.0
    lat, jit, bw = nc.get("latency_ms"), nc.get("jitter_ms"), nc.get("bandwidth_mbit")
    figs = (f"latency {lat:.2f} ms" if lat is not None else "latency -") + \
        (f", jitter {jit:.2f} ms" if jit is not None else "") + f", loss {loss:.0f}%" + \
        (f", {bw:.0f} Mbit/s" if bw is not None else "")
    problems = nc.get("problems") or []
    return f"{nc.get('source')} -> {nc.get('target')}: {figs}: " + ("passed" if not problems else "; ".join(problems))


def network_failed(m: Migration) -> bool:
    nc = netcheck_of(m)
    return bool(nc and nc.get("problems"))


class MigrationsView(ViewBase, Vertical):
    BINDINGS = opkeys.bindings("migrations")
    VIEW = "migrations"
    TITLE = "Migrations"

    DEFAULT_CSS = """
    MigrationsView { height: 1fr; }
    #migration-detail {
        height: 10;         /* fixed: a detail that grows as the cursor moves would lay the screen out again */
        padding: 0 1;
        border-top: hkey $panel;
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="migrations")
        self.client = client
        self.interval = float((poll or {}).get("migration_interval") or POLL_S)
        self.migrations: dict[str, Migration] = {}
        self.ok: bool | None = None          # None: not asked yet
        self.error: str | None = None
        self.hint: str | None = None
        self.stale_since: float | None = None
        self.polls = 0
        self.selected: str | None = None
        self._shown_record: Migration | None = None
        self._rows: dict[str, tuple[Migration, Row]] = {}
        self._wake = asyncio.Event()
        self._started = False
        self._dirty = False
        self._task_states: dict[int, str] = {}
        self.mine: dict[int, str] = {}       # assessment tasks submitted here -> migration

    # ------------------------------------------------------------------ layout and lifecycle

    def compose(self) -> ComposeResult:
        table = KeyedTable(COLUMNS, sort="name", id="migration-table")
        table.on_cursor = self._cursor_moved
        self._table = table
        yield table
        yield TableFilter(table, id="migration-filter")
        yield Static(id="migrations-status", classes="view-status")
        yield Page(id="migration-detail")

    @property
    def table(self) -> KeyedTable:
        return self._table

    def on_mount(self) -> None:
        self.render_status()
        self.render_detail()

    def activate(self) -> None:
        """Shown: poll from now on (the first time), draw what changed while hidden, ask again."""
        if not self._started:
            self._started = True
            self.run_worker(partial(self._run), name="migration list", group="migrations-poll", exclusive=True,
                            exit_on_error=False)
        self.catch_up()
        self.post_crumbs()
        self.table.focus()

    def catch_up(self) -> None:
        if self._dirty:
            self._dirty = False
            self.sync()
        self.poke()

    def crumbs(self) -> tuple[str, ...]:
        filt = (f"/{self.table.filter_text}",) if self.table.filter_text else ()
        return ("migrations",) + filt + ((self.selected,) if self.selected else ())

    # ------------------------------------------------------------------ the list

    def poke(self) -> None:
        """Ask for the list again now (after the running poll: never two at once)."""
        self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()          # a poke from now on means "again after this one"
            delay = self.interval
            if self.shown:
                got, error, hint = await attempt(self.client.migration_list(), "migration list", timeout=(
                    "the migration list did not come in time", "check the engine: ferry engine status"))
                self.polls += 1
                if error is None:
                    failures = 0
                    self.listed(got)
                else:
                    failures += 1
                    self.failed(error, hint)
                    delay = min(BACKOFF_MAX_S, self.interval * 2 ** failures)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    def listed(self, items: list[Migration]) -> None:
        self.ok, self.error, self.hint, self.stale_since = True, None, None, None
        new = {m.name: m for m in items}
        if new == self.migrations:
            self.render_status()
            return
        self.migrations = new
        self._changed()

    def failed(self, error: str, hint: str | None) -> None:
        self.ok, self.error, self.hint = False, error, hint
        self.stale_since = self.stale_since or self.app.clock()
        self.render_status()

    def put(self, m: Migration) -> None:
        """One migration as the engine just returned it (an override): shown at once."""
        self.migrations[m.name] = m
        self._changed()

    def _changed(self) -> None:
        if self.shown:
            self.sync()
        else:
            self._dirty = True

    def row(self, m: Migration) -> Row:
        kept = self._rows.get(m.name)
        if kept is not None and kept[0] == m:
            return kept[1]
        variables = self.app.theme_variables
        var = STATE_VARIABLE.get(m.state)
        n = len(m.blockers)
        net = network_cell(m)
        net_var = ("sev-warn" if m.override else "sev-crit") if network_failed(m) else None
        row = Row(cells=(
            cell(safe(m.name)),
            cell(safe(m.wave)),
            cell(f"{m.state.symbol} {m.state}", sort=list(MigrationState).index(m.state),
                 style=rich_style(variables, var) if var else ""),
            cell(str(m.round), sort=m.round),
            cell(stamp(m.last_sync) if m.last_sync else "-", sort=m.last_sync),
            cell(("◆ " if m.override else "✖ ") + net if net_var else net,
                 style=rich_style(variables, net_var) if net_var else ""),
            cell(f"✖ {n}" if n else "0", sort=n, style=rich_style(variables, "sev-crit") if n else ""),
            cell("-", sort=None),
            cell("-", sort=None),
        ), search=safe(f"{m.state} {m.spec.source.target} {m.spec.target.host} {m.spec.target.datastore} "
                       f"{m.spec.method}" + (" blocked" if n else "") + (" override" if m.override else "")))
        self._rows[m.name] = (m, row)
        return row

    def sync(self, *, rerender: bool = False) -> None:
        table = self.table
        if rerender:
            table.redraw()
            self._rows.clear()
        for key in [k for k in table.keys() if k not in self.migrations]:
            table.drop(key)
            self._rows.pop(key, None)
        for name, m in self.migrations.items():
            table.put(name, self.row(m))
        table.commit()
        self._follow_cursor()
        self.render_status()

    def restyle(self) -> None:
        """The theme changed: cells carry resolved colours, so draw them again."""
        self.sync(rerender=True)
        self._shown_record = None
        self.render_detail()

    # ------------------------------------------------------------------ cursor and detail

    def selected_migration(self) -> Migration | None:
        return self.migrations.get(self.selected) if self.selected else None

    def _cursor_moved(self, key: str | None) -> None:
        self._follow_cursor()

    def on_keyed_table_cursor_moved(self, message: KeyedTable.CursorMoved) -> None:
        message.stop()
        self._follow_cursor()

    def on_keyed_table_sorted(self, message: KeyedTable.Sorted) -> None:
        message.stop()
        self.render_status()
        self.post_crumbs()

    def _follow_cursor(self) -> None:
        key = self.table.selected_key
        m = self.migrations.get(key) if key else None
        if key != self.selected or m != self._shown_record:
            moved = key != self.selected
            self.selected = key
            self.render_detail()
            self.refresh_bindings()
            if moved:
                self.post_crumbs()

    def render_detail(self) -> None:
        m = self.selected_migration()
        self._shown_record = m
        page = self.query_one("#migration-detail", Page)
        if m is None:
            text = ("[$text-muted]no migrations yet: `ferry plan apply FILE` records a wave's plan[/]"
                    if not self.migrations else "[$text-muted]no migration selected[/]")
            page.update(Content.from_markup(text))
            return
        s, t = m.spec.source, m.spec.target
        var = STATE_VARIABLE.get(m.state)
        state = f"[${var}]{m.state.symbol} {m.state}[/]" if var else f"{m.state.symbol} {m.state}"
        hw = ", ".join(x for x in (f"{t.cpus} CPUs" if t.cpus else "", f"{t.memory_mib}M" if t.memory_mib else "",
                                   " + ".join(fmt.size(d) for d in t.disks)) if x)
        lines = [
            f"[b]{esc(m.name)}[/b]  {state}  [$text-muted]wave {esc(m.wave)} · round {m.round} · "
            f"last sync {fmt.stamp(m.last_sync)}[/]",
            f"source  {esc(s.target)}" + (f"  [$text-muted]key {esc(s.identity)}[/]" if s.identity else ""),
            f"target  host {esc(t.host)}, datastore {esc(t.datastore)}, network {esc(t.network)}"
            + (f"  [$text-muted]{esc(hw)}[/]" if hw else ""),
            f"method  {esc(str(m.spec.method))}" + (", relayed by Ferry" if m.spec.relay else ""),
        ]
        net = esc(network_line(m))
        if network_failed(m):
            lines.append((f"[$warning]◆ network  {net}[/]" if m.override else f"[$error]✖ network  {net}[/]"))
        else:
            lines.append(f"network {net}")
        if m.override:
            lines.append(f"[$warning]override[/] {esc(m.override)}")
        for b in m.blockers:
            lines.append(f"[$error]✖ {esc(b.name)}: {esc(b.message)}[/]"
                         + (f"  [$text-muted]hint: {esc(b.hint)}[/]" if b.hint else ""))
        for w in m.warnings:
            lines.append(f"[$warning]◆ {esc(w.name)}: {esc(w.message)}[/]"
                         + (f"  [$text-muted]hint: {esc(w.hint)}[/]" if w.hint else ""))
        page.update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        table = self.table
        if self.ok is False:
            text = (f"[b $error]✖ migration list stale since {fmt.clock(self.stale_since)}[/] "
                    f"[$error]{esc(self.error or '')}[/]"
                    + (f" [$text-muted]hint: {esc(self.hint)}[/]" if self.hint else ""))
        elif self.ok is None:
            text = "[$text-muted]asking for the migrations…[/]"
        elif not self.migrations:
            text = "[$text-muted]no migrations yet: `ferry plan apply FILE` records a wave's plan[/]"
        else:
            waves = len({m.wave for m in self.migrations.values()})
            blocked = sum(1 for m in self.migrations.values() if m.blockers)
            text = f"{len(self.migrations)} migrations in {waves} wave{'s' if waves != 1 else ''}"
            if blocked:
                text += f" · [$error]✖ {blocked} blocked[/]"
            if table.filter_text:
                text += (f" · [$accent]/{esc(table.filter_text)}[/] {len(table.shown_keys)} shown "
                         "[$text-muted](esc clears)[/]")
            if (table.sort_column, table.sort_reverse) != table.default_sort:
                text += f" · sorted by {esc(table.sort_text())} [$text-muted](o, O)[/]"
        update_static(self.query_one("#migrations-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ the task feed

    def tasks_changed(self, tasks: dict) -> None:
        """An assessment that changed state changes its migration: ask for the list again."""
        poke = False
        for tid, info in tasks.items():
            if not info.kind.startswith("migration."):
                continue
            state = str(info.state)
            if self._task_states.get(tid) != state:
                self._task_states[tid] = state
                poke = poke or info.state.final
                if info.state.final and tid in self.mine:
                    self._task_ended(info)
        if len(self._task_states) > 2 * len(tasks) + 100:
            self._task_states = {t: st for t, st in self._task_states.items() if t in tasks}
        if poke:
            self.poke()

    def _task_ended(self, info: Any) -> None:
        name = self.mine.pop(info.id)
        if info.state.value == "succeeded":
            self.app.notify(f"task {info.id}: {esc(name)} assessed", title="Assess", timeout=4)
        elif info.state.value == "failed":
            self.app.notify(f"task {info.id} failed: {esc(info.error or 'no reason given')}"
                            + (f"\nhint: {esc(info.hint)}" if info.hint else ""), title="Assess", severity="error",
                            timeout=10)

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("assess", "report", "override"):
            return True if self.selected_migration() is not None else None
        return True

    def _refused(self, title: str, e: FerryError) -> None:
        """The engine's refusal, in one line with its hint."""
        self.app.notify(esc(e.message) + (f" (hint: {esc(e.hint)})" if e.hint else ""), title=title,
                        severity="warning" if isinstance(e, Refused) else "error", timeout=8)

    def action_filter(self) -> None:
        self.query_one(TableFilter).open_line()

    def clear_filter(self) -> bool:
        return self.query_one(TableFilter).clear()

    def action_refresh_now(self) -> None:
        self.poke()

    def action_assess(self) -> None:
        m = self.selected_migration()
        if m is not None:
            self.app.run_worker(partial(self._assess, m.name), name=f"assess {m.name}", group="migration-actions",
                                exit_on_error=False)

    async def _assess(self, name: str) -> None:
        params = {"migration": name}
        try:
            await self.client.precheck(ASSESS, params)
            tid, attached = await self.client.vm_task_or_attach(ASSESS, params)
        except FerryError as e:         # Refused: no task was made
            self._refused("Assess", e)
            return
        self.mine[tid] = name
        self.app.notify(f"task {tid}: assess {esc(name)}" + (" (already under way)" if attached else "")
                        + " · follow it in Tasks (2)", title="Assess", timeout=4)
        feed = getattr(self.app, "feed", None)
        if feed is not None:
            await feed.refresh()
            info = feed.tasks.get(tid)
            if info is not None and info.state.final and tid in self.mine:    # it ended before it was mine
                self._task_ended(info)

    def action_report(self) -> None:
        m = self.selected_migration()
        if m is not None:
            self.app.run_worker(partial(self._report, m.name), name=f"report {m.name}", group="migration-actions",
                                exclusive=True, exit_on_error=False)

    async def _report(self, name: str) -> None:
        try:
            text = await self.client.migration_report(name)
        except FerryError as e:
            self._refused("Report", e)
            return
        from ferry.console.dialogs.report import ReportScreen
        self.app.push_screen(ReportScreen(f"assessment report of {name}", text))

    def action_override(self) -> None:
        m = self.selected_migration()
        if m is None:
            return
        from ferry.console.dialogs.vmforms import Field, FormScreen
        if network_failed(m):
            intro = f"The network check of {m.name} failed:\n{network_line(m)}\n"
        else:
            intro = f"{m.name} has no failed network check now; the reason holds for its next assessment.\n"
        intro += "Going on below the thresholds is recorded, with your reason, in the audit log."

        async def record(values: dict) -> str | None:
            try:
                done = await self.client.migration_override(m.name, values.get("reason", ""))
            except FerryError as e:
                return e.message + (f"\nhint: {e.hint}" if e.hint else "")
            self.put(done)
            self.app.notify(f"{esc(m.name)}: the network check is overridden ({esc(done.override or '')}); "
                            "recorded in the audit log", title="Override", timeout=5)
            return None
        self.app.push_screen(FormScreen(f"Override the network check of {m.name}?",
                                        [Field("reason", "Reason", m.override or "",
                                               placeholder="why it may go on (audited)")],
                                        confirm="Override", intro=intro, check=record))
