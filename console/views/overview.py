"""Overview (issue 14): the first screen of the console, the daily round at a glance.

Six tiles: hosts up and down (what the Inventory's host polls found), VMs by state, open alarms by
severity (silenced and suppressed ones counted apart, as are acknowledged ones), tasks running, waiting
and failed (the task feed), the last health run and how many checks have a problem, and the last
management-data backup (a tile shown only when the engine client has a backup_list call). Enter on a tile,
or a click, opens that view filtered to what needs a look (the hosts that are down, the failed tasks,
the checks with a problem); its view's number opens it as it is.

Alarms, checks, VMs (and backups) are asked for through the engine client only: one poll at a time,
the next one POLL_S after the last ended (longer when the VM list takes long to come: a big site),
only while the view is on screen, backing off after a failure and saying "stale since"; the backups
every BACKUP_POLL_S only, unless the Backups view has a newer list (after `b` there). Hosts and tasks
are what the console already knows: drawn again once a second while shown, a tile only when its text
changed.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from textual import events
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.api import AlarmInfo, AlarmState, CheckState, HealthCheck, Severity, TaskState, VMView

from ferry.console import keys as opkeys
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.severity import state_markup, state_variable
from ferry.console.views.audit import stamp
from ferry.console.views.backups import BackupsView
from ferry.console.views.polled import TIMEOUT, Polled
from ferry.console.widgets.paint import update_static

POLL_S = 5.0
VM_LOAD = 0.05          # at most this share of the console's time goes to asking for the VM list
TICK_S = 1.0            # hosts and tasks drawn again (what changed) while shown
BACKUP_POLL_S = 300.0   # the backups are asked for less often: the engine checks every archive's checksum
HEALTH_KIND = "health.run"

# Alarm severities as a table shows them: symbol, word, theme variable (colour never stands alone).
SEVERITY_LOOK = {Severity.CRITICAL: ("✖", "sev-crit"), Severity.MAJOR: ("▲", "sev-maj"),
                 Severity.MINOR: ("●", "sev-min"), Severity.WARNING: ("◆", "sev-warn")}
CHECK_LOOK = {CheckState.OK: "sev-ok", CheckState.WARNING: "sev-warn", CheckState.CRITICAL: "sev-crit",
              CheckState.UNKNOWN: "sev-unknown"}
# tile -> (its title, the view it opens)
TILES = {
    "hosts": ("Hosts", "inventory"),
    "vms": ("VMs", "vms"),
    "alarms": ("Alarms", "alarms"),
    "tasks": ("Tasks", "tasks"),
    "health": ("Health", "health"),
    "backups": ("Backups", "backups"),
}
VIEW_KEYS = {"inventory": "1", "tasks": "2", "vms": "3", "alarms": "7", "health": "8", "backups": "9"}


def alarm_bucket(a: AlarmInfo) -> str:
    """Where an open alarm is counted: suppressed, silenced, acknowledged, or its severity (active)."""
    if a.suppressed_by:
        return "suppressed"
    if a.silenced_by is not None:
        return "silenced"
    if a.state == AlarmState.ACKNOWLEDGED:
        return "acknowledged"
    return str(a.severity)


def backup_call(client: Any) -> Any:
    """The client's call listing backups (None: a client without one)."""
    call = getattr(client, "backup_list", None)
    return call if callable(call) else None


class Tile(Static, can_focus=True):
    """One tile: a title in its border, a few lines; Enter opens its view."""

    def __init__(self, tile: str, title: str) -> None:
        super().__init__(id=f"tile-{tile}", classes="tile")
        self.tile = tile
        self.border_title = title
        self.shown_text = ""


class OverviewView(Polled, Vertical):
    BINDINGS = opkeys.bindings("overview")
    VIEW = "overview"
    TITLE = "Overview"
    WHAT = "overview"

    DEFAULT_CSS = """
    OverviewView { height: 1fr; }
    #overview-grid { grid-size: 2; grid-gutter: 0 1; height: 1fr; padding: 0 1; }
    OverviewView .tile { height: 1fr; border: round $panel; padding: 0 1; border-title-color: $text; }
    OverviewView .tile:focus { border: round $accent; border-title-style: bold; }
    """

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="overview")
        self.client = client
        self.init_poll(float((poll or {}).get("overview_interval") or POLL_S))
        self.alarms: list[AlarmInfo] = []
        self.checks: list[HealthCheck] = []
        self.vms: list[VMView] | None = None
        self.backups: Any = None             # the last api.BackupList (None: not asked yet)
        self._backups_asked = 0.0            # monotonic
        self._backups_again = False          # r: asked again, whatever list there is
        self.focused_tile = "hosts"
        self._ended_seen: int | None = None      # the last health run whose end asked again

    # ------------------------------------------------------------------ layout and lifecycle

    def compose(self) -> ComposeResult:
        with Grid(id="overview-grid"):
            for name, (title, view) in TILES.items():
                key = VIEW_KEYS.get(view or "")
                yield Tile(name, f"{title} ({key})" if key else title)
        yield Static(id="overview-status", classes="view-status")

    def on_mount(self) -> None:
        self.query_one("#tile-backups", Tile).display = backup_call(self.client) is not None
        self.set_interval(TICK_S, self._tick)
        self.render_all()

    def activate(self) -> None:
        """Shown: poll from now on (the first time), draw what changed, ask again."""
        self.start_polling()
        self.catch_up()
        self.post_crumbs()
        self.tile_widget(self.focused_tile).focus()

    def catch_up(self) -> None:
        self.render_all()
        self.poke()

    def crumbs(self) -> tuple[str, ...]:
        return ("overview",)

    def tile_widget(self, name: str) -> Tile:
        return self.query_one(f"#tile-{name}", Tile)

    def tiles(self) -> list[Tile]:
        return [t for t in self.query(Tile) if t.display]

    def _tick(self) -> None:
        if self.shown:
            self.render_all()

    # ------------------------------------------------------------------ the poll

    def next_delay(self, took: float) -> float:
        """A big site's VM list takes long to come: asked less often."""
        return max(self.interval, took / VM_LOAD)

    async def poll_once(self) -> tuple[str | None, str | None]:
        """Alarms, checks, VMs (and backups); (error, hint) of the first that failed (what came is kept)."""
        error, hint = await self._ask()
        if error is None:
            self.ok = True
            self.render_all()
        return error, hint

    async def _ask(self) -> tuple[str | None, str | None]:
        alarms, error, hint = await attempt(self.client.alarms(), "alarms", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        checks, error, hint = await attempt(self.client.health_list(), "health checks", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        vms, error, hint = await attempt(self.client.vm_list(), "VM list", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        self.alarms, self.checks, self.vms = list(alarms), list(checks), list(vms)
        call = backup_call(self.client)
        seen = self.backups_view_list()
        if seen is not None and seen[0] > self._backups_asked and not self._backups_again:
            self._backups_asked, self.backups = seen        # `b` there a moment ago: no need to wait
        elif call is not None and (self.backups is None or self._backups_again
                                   or time.monotonic() - self._backups_asked >= BACKUP_POLL_S):
            self._backups_again = False
            got, error, hint = await attempt(call(), "backups", timeout=TIMEOUT)
            if error is not None:
                return error, hint
            self.backups, self._backups_asked = got, time.monotonic()
        return None, None

    def backups_view_list(self) -> tuple[float, Any] | None:
        """(when, list) of the Backups view's last list (None: it has none): newer than the Overview's
        own after a backup, prune or restore there."""
        view = next(iter(self.app.query(BackupsView)), None)
        return view.listed if view is not None else None

    # ------------------------------------------------------------------ what the tiles say

    def host_counts(self) -> Counter:
        """up, down, unknown: what the Inventory's host polls found."""
        status = getattr(self.app, "inventory", None)
        status = getattr(status, "status", {}) or {}
        return Counter("unknown" if st.ok is None else "up" if st.ok else "down" for st in status.values())

    def tasks(self) -> dict:
        feed = getattr(self.app, "feed", None)
        return feed.tasks if feed is not None else {}

    def hosts_text(self) -> str:
        n = self.host_counts()
        total = sum(n.values())
        line = f"[$sev-ok]✔ {n['up']} up[/]  " + (f"[b $sev-crit]✖ {n['down']} down[/]" if n["down"]
                                                    else "[$text-muted]✖ 0 down[/]")
        if n["unknown"]:
            line += f"  [$text-muted]? {n['unknown']} not asked yet[/]"
        return f"{line}\n[$text-muted]{total} host{'s' if total != 1 else ''} in the site[/]"

    def vms_text(self) -> str:
        if self.vms is None:
            return "[$text-muted]asking…[/]"
        templates = sum(1 for v in self.vms if v.is_template)
        states = Counter(v.state for v in self.vms if not v.is_template)
        if not states and not templates:
            return "[$text-muted]no VMs yet[/]"
        parts = [f"{s.symbol} {n} {s.value}" for s, n in sorted(states.items(), key=lambda kv: -kv[1])]
        total = sum(states.values())
        return (f"{total} VM{'s' if total != 1 else ''}: " + "  ".join(parts)
                + f"\n[$text-muted]{templates} template{'s' if templates != 1 else ''}[/]")

    def alarms_text(self) -> str:
        if self.ok is None:
            return "[$text-muted]asking…[/]"
        n = Counter(alarm_bucket(a) for a in self.alarms)
        sevs = []
        for sev in Severity:
            symbol, var = SEVERITY_LOOK[sev]
            count = n[str(sev)]
            sevs.append(f"[b ${var}]{symbol} {count} {sev}[/]" if count else f"[$text-muted]{symbol} 0 {sev}[/]")
        apart = " · ".join(f"{n[k]} {k}" for k in ("acknowledged", "silenced", "suppressed"))
        return f"{sevs[0]}  {sevs[1]}\n{sevs[2]}  {sevs[3]}\n[$text-muted]{apart}[/]"

    def tasks_text(self) -> str:
        n = Counter(t.state for t in self.tasks().values())
        always = (TaskState.RUNNING, TaskState.FAILED)
        shown = [s for s in (TaskState.RUNNING, TaskState.QUEUED, TaskState.WAITING, TaskState.PAUSED,
                             TaskState.INTERRUPTED, TaskState.FAILED) if n[s] or s in always]
        line = "  ".join(f"[${state_variable(s)}]{s.symbol} {n[s]} {s.value}[/]" if n[s]
                         else f"[$text-muted]{s.symbol} 0 {s.value}[/]" for s in shown)
        total = sum(n.values())
        return line + f"\n[$text-muted]{total} task{'s' if total != 1 else ''} in the engine's list[/]"

    def last_health_task(self) -> Any:
        runs = [t for t in self.tasks().values() if t.kind == HEALTH_KIND]
        return max(runs, key=lambda t: t.id) if runs else None

    def health_text(self) -> str:
        run = self.last_health_task()
        if run is not None and not run.state.final:
            head = f"{state_markup(run.state)} task {run.id}: {esc(run.title)}"
        elif run is not None:
            r = run.result or {}
            problems = len(r.get("problems") or [])
            when = fmt.stamp(run.finished or run.updated)
            if run.state == TaskState.SUCCEEDED:
                said = (f"[b $sev-crit]{problems} problem{'s' if problems != 1 else ''}[/]" if problems
                        else "[$sev-ok]no problems[/]")
                head = f"last run {when} ({esc(run.title)}, task {run.id}): {said}"
            else:
                head = f"last run {when} ({esc(run.title)}, task {run.id}): {state_markup(run.state)}"
        elif self.checks:
            head = f"last checked {fmt.stamp(max(c.last_checked for c in self.checks))}"
        elif self.ok is None:
            return "[$text-muted]asking…[/]"
        else:
            return "[$text-muted]no health run yet: r in the Health view (8) runs one[/]"
        n = Counter(c.state for c in self.checks)
        states = [f"[b ${CHECK_LOOK[s]}]{s.symbol.split()[0]} {n[s]} {s.value}[/]" if n[s] and s.problem
                  else f"[${CHECK_LOOK[s]}]{s.symbol.split()[0]} {n[s]} {s.value}[/]" if n[s]
                  else f"[$text-muted]{s.symbol.split()[0]} 0 {s.value}[/]" for s in CheckState]
        return f"{head}\n{states[0]}  {states[1]}\n{states[2]}  {states[3]}"

    def backups_text(self) -> str:
        if self.backups is None:
            return "[$text-muted]asking…[/]"
        items = self.backups.backups
        if not items:
            line = "[$text-muted]no backups yet: `ferry backup now` makes one[/]"
        else:
            b = max(items, key=lambda b: b.created)
            check = {True: "[$sev-ok]✔ verified[/]", False: "[b $sev-crit]✖ checksum[/]"}.get(b.verified,
                                                                                            "? unchecked")
            # two lines that fit a tile at 80 columns, where its problems still have room below
            line = (f"last backup {stamp(b.created)} {check}\n"
                    f"[$text-muted]{esc(b.kind)} · {esc(b.where)} · {fmt.size(b.size)} · {len(items)} kept[/]")
        for p in self.backups.problems[:2]:
            line += f"\n[$sev-warn]◆ {esc(p)}[/]"
        return line

    def render_all(self) -> None:
        if not self.is_mounted:
            return
        for name in TILES:
            tile = self.tile_widget(name)
            if not tile.display:
                continue
            text = getattr(self, f"{name}_text")()
            if text != tile.shown_text:
                tile.shown_text = text
                update_static(tile, Content.from_markup(text))
        self.render_status()

    def restyle(self) -> None:
        """The theme changed: draw every tile again."""
        for tile in self.query(Tile):
            tile.shown_text = ""
        self.render_all()

    def render_status(self) -> None:
        text = self.poll_status() or "[$text-muted]enter: the tile's view · j/k: the next tile · 0 comes back here[/]"
        update_static(self.query_one("#overview-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ the task feed

    def tasks_changed(self, tasks: dict) -> None:
        """A health run that ended changed the checks and perhaps the alarms: ask again."""
        last = max((t.id for t in tasks.values() if t.kind == HEALTH_KIND and t.state.final), default=None)
        if last is not None and self._ended_seen != last:
            self._ended_seen = last
            self.poke()

    # ------------------------------------------------------------------ keys

    def on_descendant_focus(self, event: Any) -> None:
        if isinstance(event.widget, Tile):
            self.focused_tile = event.widget.tile

    def on_click(self, event: events.Click) -> None:
        """A click on a tile opens its view, as Enter does."""
        if isinstance(event.widget, Tile):
            event.stop()
            self.focused_tile = event.widget.tile
            event.widget.focus()
            self.action_open_tile()

    def action_tile(self, step: int) -> None:
        tiles = self.tiles()
        names = [t.tile for t in tiles]
        at = names.index(self.focused_tile) if self.focused_tile in names else 0
        tiles[(at + step) % len(tiles)].focus()

    def action_refresh_now(self) -> None:
        self._backups_again = True
        self.poke()

    def action_open_tile(self) -> None:
        """The focused tile's view, filtered to what needs a look."""
        name = self.focused_tile
        view = TILES[name][1]
        filt = ""
        if name == "hosts" and self.host_counts()["down"]:
            filt = "down"
        elif name == "tasks" and any(t.state == TaskState.FAILED for t in self.tasks().values()):
            filt = "failed"
        elif name == "health" and any(c.state.problem for c in self.checks):
            filt = "problem"
        elif name == "backups" and self.backups is not None and any(b.verified is False for b in
                                                                    self.backups.backups):
            filt = "problem"
        self.app.show_view(view, filt)
