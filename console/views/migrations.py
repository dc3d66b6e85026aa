"""Migrations view (issue 13): every server migration of the workspace in one table, keyed by name
and diffed (console/widgets/table.py), with the selected one's details below; `/` filters (a wave,
a state, a host), `a` assesses (a task, followed in the Tasks view), `R` shows the assessment
report full screen, `n` overrides a failed network check with a reason (audited), `s` runs a sync
round, `t` a test launch, `c` opens the cutover screen (console/dialogs/cutover.py: the summary and
the name typed, then the steps live), `b` rolls back (the name typed), `F` finalizes after go-live,
`N` opens the wizard (console/dialogs/wizard.py: a migration saved into its wave's plan file, checked,
then applied if asked; the new migration gets the cursor).
Each asks the engine's precheck first: a refusal is one line with its hint, and nothing starts.

The list is asked for through the engine client only, polled as the other table views are
(console/views/polled.py, PolledTable): one poll at a time, the next one POLL_S after the last ended,
only while the view is on screen (a modal over it waits), backing off after a failure and saying
"stale since". A migration task that ends asks again at once. A list equal to the last one changes
nothing on screen; a row is made again only when its migration changed.
The predicted downtime of a migration syncing or ready comes with the list (the engine predicts it
as it reads the migration: Migration.predicted_downtime_s).
"""

from __future__ import annotations

from functools import partial
from typing import Any

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
from ferry.console.views.polled import PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, Row, cell

POLL_S = 5.0             # between two polls of the list while the view is shown
ASSESS = "migration.assess"
SYNC = "migration.sync"
TEST = "migration.test"
CUTOVER = "migration.cutover"
ROLLBACK = "migration.rollback"
FINALIZE = "migration.finalize"
# kind -> (the notice's title, what the migration became when its task succeeded)
SAID = {ASSESS: ("Assess", "assessed"), SYNC: ("Sync", "synced"), TEST: ("Test launch", "test-launched"),
        CUTOVER: ("Cutover", "cut over"), ROLLBACK: ("Rollback", "rolled back"), FINALIZE: ("Finalize", "finalized")}
PREDICTED = (MigrationState.SYNCING, MigrationState.READY)
NONE_YET = "no migrations yet: N opens the wizard; `ferry plan apply FILE` records a wave's plan"
# What the issue asks of every row comes first and stays in an 80-column terminal (name, state, round,
# last sync, data changed, predicted downtime: at worst, with "◑ target_prepared", a date and a measured
# downtime, the 79 cells a row has there); the optional ones after them give their room away first:
# network, then wave (a filter all the same: /wave1), then blockers (the status line counts the blocked).
COLUMNS = (
    Column("name", "NAME", flex=True, least=8),
    Column("state", "STATE", cap=19),
    Column("round", "ROUND", cap=8),
    Column("sync", "LAST SYNC", cap=17),
    # What the last measure found changed since the last sync round; the cutover's downtime, "~" predicted
    # (measured beside the prediction once cut over): "-" until known.
    Column("changed", "CHANGED", cap=15),
    Column("downtime", "DOWNTIME", cap=21),
    Column("blockers", "BLOCKERS", cap=11, optional=True),
    Column("wave", "WAVE", cap=14, optional=True),
    Column("network", "NETWORK", cap=24, optional=True),
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


def downtime_cell(m: Migration, predicted: float | None) -> Any:
    """The predicted downtime, "~1m25s"; once cut over the measured one with it: "1m23s (~1m25s)"."""
    measured = (m.cutover or {}).get("measured_downtime_s")
    if measured is not None:
        return cell(f"{fmt.duration(measured)} (~{fmt.duration(predicted)})", sort=measured)
    return cell(f"~{fmt.duration(predicted)}" if predicted is not None else "-", sort=predicted)


class MigrationsView(PolledTable, Vertical):
    BINDINGS = opkeys.bindings("migrations")
    VIEW = "migrations"
    TITLE = "Migrations"
    WHAT = "migration list"

    COLUMNS = COLUMNS
    SORT = "name"
    PANE = "migration"
    DEFAULT_CSS = detail_css("MigrationsView", "migration-detail", 10)

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="migrations")
        self.client = client
        self.init_poll(float((poll or {}).get("migration_interval") or POLL_S))
        self.migrations: dict[str, Migration] = {}
        self.selected: str | None = None
        self._shown_record: Migration | None = None
        self._rows: dict[str, tuple[Migration, Row]] = {}
        self._task_states: dict[int, str] = {}
        self.mine: dict[int, str] = {}       # tasks submitted here -> migration
        self.select_next: str | None = None  # the migration the wizard just applied: the cursor goes to it

    def crumbs(self) -> tuple[str, ...]:
        return ("migrations",) + self.filter_crumbs() + ((self.selected,) if self.selected else ())

    # ------------------------------------------------------------------ the list

    async def poll_once(self) -> tuple[str | None, str | None]:
        got, error, hint = await attempt(self.client.migration_list(), "migration list", timeout=(
            "the migration list did not come in time", "check the engine: ferry engine status"))
        if error is None:
            self.ok = True
            self.listed(got)
        return error, hint

    def predicted_s(self, m: Migration) -> float | None:
        """The predicted downtime: the cutover's (recorded when it began), else the engine's, read with the
        list (a syncing or ready migration's)."""
        p = ((m.cutover or {}).get("predicted_downtime") or {}).get("total_s")
        return p if p is not None else m.predicted_downtime_s

    def listed(self, items: list[Migration]) -> None:
        new = {m.name: m for m in items}
        if new == self.migrations:
            self.render_status()
            return
        self.migrations = new
        self.changed()

    def put(self, m: Migration) -> None:
        """One migration as the engine just returned it (an override): shown at once."""
        self.migrations[m.name] = m
        self.changed()

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, Migration]:
        return self.migrations

    def make_row(self, m: Migration) -> Row:
        variables = self.app.theme_variables
        var = STATE_VARIABLE.get(m.state)
        n = len(m.blockers)
        net = network_cell(m)
        net_var = ("sev-warn" if m.override else "sev-crit") if network_failed(m) else None
        return Row(cells=(
            cell(safe(m.name)),
            cell(f"{m.state.symbol} {m.state}", sort=list(MigrationState).index(m.state),
                 style=rich_style(variables, var) if var else ""),
            cell(str(m.round), sort=m.round),
            cell(stamp(m.last_sync) if m.last_sync else "-", sort=m.last_sync),
            cell(fmt.size(m.bytes_changed_since) if m.bytes_changed_since is not None else "-",
                 sort=m.bytes_changed_since),
            downtime_cell(m, self.predicted_s(m)),
            cell(f"✖ {n}" if n else "0", sort=n, style=rich_style(variables, "sev-crit") if n else ""),
            cell(safe(m.wave)),
            cell(("◆ " if m.override else "✖ ") + net if net_var else net,
                 style=rich_style(variables, net_var) if net_var else ""),
        ), search=safe(f"{m.state} {m.spec.source.target} {m.spec.target.host} {m.spec.target.datastore} "
                       f"{m.spec.method}" + (" blocked" if n else "") + (" override" if m.override else "")))

    def sync(self, *, rerender: bool = False) -> None:
        """As PolledTable's, then the cursor on the migration the wizard just applied, once it is listed."""
        super().sync(rerender=rerender)
        if self.select_next is not None and self.table.select(self.select_next):
            self.select_next = None
            self.follow_cursor()

    # ------------------------------------------------------------------ cursor and detail

    def selected_migration(self) -> Migration | None:
        return self.migrations.get(self.selected) if self.selected else None

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        m = self.migrations.get(key) if key else None
        if key != self.selected or m != self._shown_record:
            moved = key != self.selected
            self.selected = key
            self.render_detail()
            self.refresh_bindings()
            if moved:
                self.post_crumbs()

    def render_detail(self, *, again: bool = False) -> None:
        m = self.selected_migration()
        self._shown_record = m
        page = self.query_one("#migration-detail", Page)
        if m is None:
            text = f"[$text-muted]{NONE_YET}[/]" if not self.migrations else "[$text-muted]no migration selected[/]"
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
        from ferry.console.dialogs.cutover import downtime_line, seconds, step_lines, test_line
        if m.rounds or m.round:
            last = m.rounds[-1] if m.rounds else None
            said = [f"round {m.round}"]
            if last is not None:
                said.append(f"last {esc(last.label)}: {last.moved} in {seconds(last.duration_s)}")
            if m.bytes_changed_since is not None:
                said.append(f"{fmt.size(m.bytes_changed_since)} changed since")
            if m.predicted_final_sync_s is not None:
                said.append(f"final sync about {seconds(m.predicted_final_sync_s)}")
            lines.append("sync    " + " · ".join(said))
        if m.test or m.state in PREDICTED:
            lines.append("test    " + test_line(m.test))
        predicted = self.predicted_s(m)
        if predicted is not None and not m.cutover:
            lines.append(f"cutover downtime about {seconds(predicted)} predicted [$text-muted](c: the summary)[/]")
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
        if (m.cutover or {}).get("steps"):
            feed = getattr(self.app, "feed", None)
            from ferry.console.dialogs.cutover import cutover_task
            down = downtime_line(m)
            lines.append("[b]cutover[/b]" + (f"  {down}" if down else "") + "  [$text-muted](c: follow it)[/]")
            lines += ["  " + x for x in step_lines(m, cutover_task(feed.tasks, m.name) if feed else None)]
        page.update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        text = self.poll_status() or (f"[$text-muted]{NONE_YET}[/]" if not self.migrations else None)
        if text is None:
            waves = len({m.wave for m in self.migrations.values()})
            blocked = sum(1 for m in self.migrations.values() if m.blockers)
            text = f"{len(self.migrations)} migrations in {waves} wave{'s' if waves != 1 else ''}"
            if blocked:
                text += f" · [$error]✖ {blocked} blocked[/]"
            text += self.table_status()
        update_static(self.query_one("#migrations-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ the task feed

    def tasks_changed(self, tasks: dict) -> None:
        """A migration task that ended changed its migration: ask for the list again."""
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
        title, became = SAID.get(info.kind, (info.kind, "done"))
        if info.state.value == "succeeded":
            if info.kind == TEST and not (info.result or {}).get("passed", True):
                self.app.notify(f"task {info.id}: the test launch of {esc(name)} FAILED its checks (R, the detail "
                                "pane: what failed)", title=title, severity="warning", timeout=10)
            else:
                self.app.notify(f"task {info.id}: {esc(name)} {became}", title=title, timeout=4)
        elif info.state.value == "failed":
            self.app.notify(f"task {info.id} failed: {esc(info.error or 'no reason given')}"
                            + (f"\nhint: {esc(info.hint)}" if info.hint else ""), title=title, severity="error",
                            timeout=10)

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("assess", "report", "override", "sync_round", "test_launch", "cutover", "rollback", "finalize"):
            return True if self.selected_migration() is not None else None
        return True

    def _refused(self, title: str, e: FerryError) -> None:
        """The engine's refusal, in one line with its hint."""
        self.app.notify(esc(e.message) + (f" (hint: {esc(e.hint)})" if e.hint else ""), title=title,
                        severity="warning" if isinstance(e, Refused) else "error", timeout=8)

    def action_assess(self) -> None:
        self._task_action(ASSESS, "assess")

    def action_sync_round(self) -> None:
        self._task_action(SYNC, "sync")

    def action_test_launch(self) -> None:
        self._task_action(TEST, "test-launch")

    def _task_action(self, kind: str, verb: str) -> None:
        self._on_selected(verb, partial(self._submit, kind, verb), exclusive=False)

    def _on_selected(self, verb: str, work: Any, *, exclusive: bool = True) -> None:
        """`work(name)` of the migration under the cursor, in a worker (the engine is asked there)."""
        m = self.selected_migration()
        if m is not None:
            self.app.run_worker(partial(work, m.name), name=f"{verb} {m.name}", group="migration-actions",
                                exclusive=exclusive, exit_on_error=False)

    async def _submit(self, kind: str, verb: str, name: str, *, checked: bool = False) -> None:
        """The engine's precheck (unless done), then the task (or the same one under way)."""
        params = {"migration": name}
        title = SAID[kind][0]
        try:
            if not checked:
                await self.client.precheck(kind, params)
            tid, attached = await self.client.vm_task_or_attach(kind, params)
        except FerryError as e:         # Refused: no task was made
            self._refused(title, e)
            return
        self.mine[tid] = name
        self.app.notify(f"task {tid}: {verb} {esc(name)}" + (" (already under way)" if attached else "")
                        + " · follow it in Tasks (2)", title=title, timeout=4)
        feed = getattr(self.app, "feed", None)
        if feed is not None:
            await feed.refresh()
            info = feed.tasks.get(tid)
            if info is not None and info.state.final and tid in self.mine:    # it ended before it was mine
                self._task_ended(info)

    def action_report(self) -> None:
        self._on_selected("report", self._report)

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

    def action_cutover(self) -> None:
        self._on_selected("cutover", self._cutover)

    async def _cutover(self, name: str) -> None:
        """A migration cutting over (or past it) opens its screen following the steps; another one the
        confirmation screen, once the engine's precheck allows a cutover."""
        from ferry.console.dialogs.cutover import FOLLOWED, CutoverScreen
        m = self.migrations.get(name)
        if m is None or m.state not in FOLLOWED or not m.cutover:
            try:
                await self.client.precheck(CUTOVER, {"migration": name, "confirm": name})
            except FerryError as e:
                self._refused("Cutover", e)
                return
        self.app.push_screen(CutoverScreen(self.client, name, feed=getattr(self.app, "feed", None)),
                             lambda _: self.poke())

    def action_rollback(self) -> None:
        self._on_selected("rollback", self._rollback)

    async def _rollback(self, name: str) -> None:
        """The engine's precheck of a rollback (unless a cutover runs: it is cancelled instead), then the
        name typed, then the rollback."""
        from ferry.console.dialogs.cutover import ask_rollback, running_cutover
        feed = getattr(self.app, "feed", None)
        if running_cutover(feed.tasks if feed else {}, name) is None:
            try:
                await self.client.precheck(ROLLBACK, {"migration": name})
            except FerryError as e:
                self._refused("Rollback", e)
                return

        def done(tid: int | None, error: str | None) -> None:
            if tid is not None:
                self.mine[tid] = name
            self.poke()
        ask_rollback(self.app, self.client, name, done)

    def action_new_migration(self) -> None:
        from ferry.console.dialogs.wizard import WizardScreen
        m = self.selected_migration()

        def closed(name: str | None) -> None:
            self.select_next = name or self.select_next
            self.poke()
        self.app.push_screen(WizardScreen(self.client, wave=m.wave if m else None), closed)

    def action_finalize(self) -> None:
        self._on_selected("finalize", self._finalize)

    async def _finalize(self, name: str) -> None:
        try:
            await self.client.precheck(FINALIZE, {"migration": name})
        except FerryError as e:
            self._refused("Finalize", e)
            return
        from ferry.console.dialogs.modals import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.run_worker(partial(self._submit, FINALIZE, "finalize", name, checked=True),
                                    name=f"finalize {name}", group="migration-actions", exit_on_error=False)
        self.app.push_screen(ConfirmScreen(
            f"Finalize {name}?",
            "Ferry's pull key and folder (snapshots, restore script, go-live timer) leave the source, which then "
            "shuts down, parked with its services stopped: it stays intact as the fallback of last resort. "
            "There is no rollback after this.", confirm="Finalize"), answered)
