"""Alarms view (issue 14, F1): the open alarms in one table, keyed by id and diffed (worst first: severity,
then the newest), the selected one's details below; `/` filters (a severity, a state, a type, an object,
"silenced", "suppressed"), `a` acknowledges with a comment, `C` clears with a reason, `S` silences alarms
like the selected one (its type, object and severity prefilled, a duration, a reason), `H` shows the
history (cleared alarms) too, `e` turns the lower pane into the events of alarms and silences (what
`ferry events` lists) and back. Each change goes through the engine client (audited there) and is shown
at once.

Polled as the Migrations view is: one poll at a time, only while shown, backing off after a failure
and saying "stale since"; a row is made again only when its alarm changed.
"""

from __future__ import annotations

from typing import Any

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.api import AlarmInfo, AlarmState, EventInfo, SilenceInfo
from ferry.engine.errors import FerryError
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.theming import rich_style
from ferry.console.views.audit import stamp
from ferry.console.views.overview import SEVERITY_LOOK
from ferry.console.views.polled import TIMEOUT, PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, Row, cell

POLL_S = 5.0
EVENTS = 200            # events asked for each poll (the pane and the selected alarm's own)
SILENCE_FOR = "2h"      # the silence dialog's default duration
# What says what is wrong comes first; at 80 columns the optional ones give their room to the summary
# (in this order: the first of them is the first given back on a wider screen), and the state says
# silenced or suppressed in place of the note.
COLUMNS = (
    Column("severity", "SEV", cap=8),
    Column("state", "STATE", cap=14),
    Column("type", "TYPE", cap=22),
    Column("object", "OBJECT", cap=26),
    Column("count", "COUNT", cap=7, optional=True),
    Column("last", "LAST SEEN", cap=17, optional=True),
    Column("first", "FIRST SEEN", cap=17, optional=True),
    Column("note", "NOTE", cap=30, optional=True),
    Column("summary", "SUMMARY", flex=True, least=12),
)
STATE_VARIABLE = {AlarmState.ACTIVE: None, AlarmState.ACKNOWLEDGED: "state-paused", AlarmState.CLEARED: "sev-ok"}


def state_word(a: AlarmInfo) -> str:
    """The STATE cell: an open alarm that is suppressed or silenced says so (as Alertmanager's state
    does), since that is what tells the operator it needs no action; otherwise its state."""
    if a.state != AlarmState.CLEARED:
        if a.suppressed_by:
            return "suppressed"
        if a.silenced_by is not None:
            return "silenced"
    return str(a.state)


def worst_first(a: AlarmInfo) -> float:
    """The severity column's sort value: by severity, then the newest first (last seen) within one."""
    return a.severity.rank + 1.0 - a.last_seen / 1e10     # (last_seen < 1e10 until the year 2286)


def note(a: AlarmInfo, acked: bool = True) -> str:
    """Silenced or suppressed (and why), or who acknowledged it."""
    if a.note:
        return a.note
    if a.state == AlarmState.CLEARED:
        return f"cleared by {a.cleared_by}" if a.cleared_by else "cleared"
    if acked and a.state == AlarmState.ACKNOWLEDGED and a.acked_by:
        return f"acked by {a.acked_by}"
    return ""


def matchers_text(s: SilenceInfo) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(s.matchers.items()))


def event_line(e: EventInfo) -> str:
    """One event as `ferry events` says it (markup)."""
    what = f"#{e.alarm_id} " if e.alarm_id is not None else ""
    return (f"[$text-muted]{fmt.stamp(e.ts)}[/] [b]{esc(e.kind)}[/] {what}{esc(e.object or '')} "
            f"[$text-muted]by {esc(e.actor)}[/] {esc(e.text)}")


class AlarmsView(PolledTable, Vertical):
    BINDINGS = opkeys.bindings("alarms")
    VIEW = "alarms"
    TITLE = "Alarms"
    WHAT = "alarms"

    COLUMNS = COLUMNS
    SORT = "severity"
    PANE = "alarm"
    DEFAULT_CSS = detail_css("AlarmsView", "alarm-detail", 10)

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="alarms")
        self.client = client
        self.init_poll(float((poll or {}).get("alarm_interval") or POLL_S))
        self.alarms: dict[str, AlarmInfo] = {}
        self.silences: dict[int, SilenceInfo] = {}
        self.events: list[EventInfo] = []
        self.show_history = False
        self.pane = "alarm"                  # the lower pane: "alarm" (the selected one) or "events"
        self.selected: str | None = None
        self._shown_detail: tuple | None = None
        self._rows: dict[str, tuple[AlarmInfo, Row]] = {}

    def crumbs(self) -> tuple[str, ...]:
        a = self.selected_alarm()
        return ("alarms",) + (("history",) if self.show_history else ()) + self.filter_crumbs() + \
            ((f"#{a.id} {a.type} on {a.object}",) if a else ())

    # ------------------------------------------------------------------ the poll

    async def poll_once(self) -> tuple[str | None, str | None]:
        history = self.show_history
        alarms, error, hint = await attempt(self.client.alarms(all=history), "alarms", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        silences, error, hint = await attempt(self.client.silence_list(all=True), "silences", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        events, error, hint = await attempt(self.client.events(limit=EVENTS), "events", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        if history == self.show_history:            # not toggled while asked
            self.ok = True
            self.listed(alarms, silences, events)
        return None, None

    def listed(self, alarms: list[AlarmInfo], silences: list[SilenceInfo], events: list[EventInfo]) -> None:
        self.silences = {s.id: s for s in silences}
        new_events = list(events)
        events_changed = new_events != self.events
        self.events = new_events
        new = {str(a.id): a for a in alarms}
        if new == self.alarms:
            self.render_status()
            if events_changed:
                self.render_detail(again=True)
            return
        self.alarms = new
        self.changed()

    def put(self, a: AlarmInfo) -> None:
        """One alarm as the engine just returned it (acknowledged, cleared): shown at once."""
        if a.state == AlarmState.CLEARED and not self.show_history:
            self.alarms.pop(str(a.id), None)
        else:
            self.alarms[str(a.id)] = a
        self.changed()

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, AlarmInfo]:
        return self.alarms

    def make_row(self, a: AlarmInfo) -> Row:
        variables = self.app.theme_variables
        symbol, var = SEVERITY_LOOK[a.severity]
        sev_word = a.severity.symbol.split()[1]
        muted = a.state == AlarmState.CLEARED or bool(a.note)     # silenced, suppressed, history: not the worry
        state, state_var = state_word(a), STATE_VARIABLE.get(a.state)
        quiet = ("silenced " if a.silenced_by is not None else "") + ("suppressed " if a.suppressed_by else "")
        return Row(cells=(
            cell(f"{symbol} {sev_word}", sort=worst_first(a), style=rich_style(variables, var, dim=muted)),
            cell(state, style=rich_style(variables, state_var) if state_var and state == a.state else ""),
            cell(safe(a.type)),
            cell(safe(a.object)),
            cell(str(a.count), sort=a.count),
            cell(stamp(a.last_seen), sort=a.last_seen),
            cell(stamp(a.first_seen), sort=a.first_seen),
            cell(safe(note(a))),
            cell(safe(a.summary)),
        ), search=safe(f"{a.severity} {a.state} {a.source} #{a.id} {quiet}"
                       + ("open" if a.state != AlarmState.CLEARED else "history")))

    # ------------------------------------------------------------------ cursor and detail

    def selected_alarm(self) -> AlarmInfo | None:
        return self.alarms.get(self.selected) if self.selected else None

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        moved = key != self.selected
        self.selected = key
        self.render_detail()
        if moved:
            self.refresh_bindings()
            self.post_crumbs()

    def render_detail(self, *, again: bool = False) -> None:
        a = self.selected_alarm()
        what = (self.pane, a, self.silences.get(a.silenced_by) if a and a.silenced_by is not None else None,
                len(self.events), self.events[0].id if self.events else None)
        if what == self._shown_detail and not again:
            return
        self._shown_detail = what
        page = self.query_one("#alarm-detail", Page)
        if self.pane == "events":
            lines = ["[b]events of alarms and silences[/b], newest first  [$text-muted](e: the selected alarm)[/]"]
            lines += [event_line(e) for e in self.events] or ["[$text-muted]no events yet[/]"]
            page.update(Content.from_markup("\n".join(lines)))
            return
        if a is None:
            text = "no alarm selected" if self.alarms else \
                ("no alarms, open or cleared" if self.show_history else "no open alarms")
            page.update(Content.from_markup(f"[$text-muted]{text}  (e: the events)[/]"))
            return
        symbol, var = SEVERITY_LOOK[a.severity]
        lines = [f"[b]#{a.id} {esc(a.type)} on {esc(a.object)}[/b]  [${var}]{symbol} {a.severity}[/]  {a.state} · "
                 f"count {a.count} · first {fmt.stamp(a.first_seen)} · last {fmt.stamp(a.last_seen)}"
                 + (f"  [$text-muted]source {esc(a.source)}[/]" if a.source else ""),
                 esc(a.summary)]
        if a.suppressed_by:
            lines.append(f"[$warning]suppressed by {esc(a.suppressed_by)}[/] [$text-muted](its host is down: "
                         "the host's alarm is the one to act on)[/]")
        if a.silenced_by is not None:
            s = self.silences.get(a.silenced_by)
            lines.append(f"[$warning]silenced by #{a.silenced_by}[/]" + (
                f" ({esc(matchers_text(s))}) until {fmt.stamp(s.expires)} by {esc(s.created_by)}: {esc(s.reason)}"
                if s else ""))
        if a.acked_by:
            lines.append(f"acknowledged by {esc(a.acked_by)} {fmt.stamp(a.acked_at)}"
                         + (f": {esc(a.ack_comment)}" if a.ack_comment else ""))
        if a.state == AlarmState.CLEARED:
            lines.append(f"cleared {fmt.stamp(a.cleared_at)}" + (f" by {esc(a.cleared_by)}" if a.cleared_by else "")
                         + (f": {esc(a.clear_reason)}" if a.clear_reason else ""))
        for k, v in sorted(a.details.items()):
            if v not in (None, "", [], {}):
                lines.append(f"[$text-muted]{esc(str(k))}[/]  {esc(str(v))}")
        own = [e for e in self.events if e.alarm_id == a.id]
        if own:
            lines.append("[b]events[/b]")
            lines += ["  " + event_line(e) for e in own[:10]]
        page.update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        text = self.poll_status()
        if text is None:
            open_ = [a for a in self.alarms.values() if a.state != AlarmState.CLEARED]
            text = f"{len(open_)} open alarm{'s' if len(open_) != 1 else ''}"
            quiet = sum(1 for a in open_ if a.note)
            if quiet:
                text += f" ({quiet} silenced or suppressed)"
            if self.show_history:
                text += f" · [$accent]history[/] {len(self.alarms) - len(open_)} cleared [$text-muted](H hides)[/]"
            text += self.table_status()
        update_static(self.query_one("#alarms-status", Static), Content.from_markup(text))

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("ack", "clear_alarm"):
            a = self.selected_alarm()
            return True if a is not None and a.state != AlarmState.CLEARED else None
        if action == "silence":
            return True if self.selected_alarm() is not None else None
        return True

    def action_history(self) -> None:
        self.show_history = not self.show_history
        self.app.notify("cleared alarms (the history) are " + ("shown" if self.show_history else "hidden"),
                        title="Alarms", timeout=2)
        if not self.show_history:
            self.alarms = {k: a for k, a in self.alarms.items() if a.state != AlarmState.CLEARED}
            self.changed()
        self.post_crumbs()
        self.poke()

    def action_events(self) -> None:
        self.pane = "alarm" if self.pane == "events" else "events"
        self.render_detail()

    def _problem(self, e: FerryError) -> str:
        return e.message + (f"\nhint: {e.hint}" if e.hint else "")

    def action_ack(self) -> None:
        a = self.selected_alarm()
        if a is None or a.state == AlarmState.CLEARED:
            return
        from ferry.console.dialogs.vmforms import Field, FormScreen

        async def ack(values: dict) -> str | None:
            try:
                done = await self.client.alarm_ack(a.id, values.get("comment", ""))
            except FerryError as e:
                return self._problem(e)
            self.put(done)
            self.app.notify(f"alarm {done.id} ({esc(done.type)} on {esc(done.object)}) acknowledged by "
                            f"{esc(done.acked_by or '')}", title="Acknowledge", timeout=4)
            return None
        self.app.push_screen(FormScreen(f"Acknowledge alarm {a.id}?", [
            Field("comment", "Comment", a.ack_comment or "", placeholder="what is being done about it (audited)")],
            confirm="Acknowledge", intro=f"{a.severity.symbol} {a.type} on {a.object}: {a.summary}", check=ack))

    def action_clear_alarm(self) -> None:
        a = self.selected_alarm()
        if a is None or a.state == AlarmState.CLEARED:
            return
        from ferry.console.dialogs.vmforms import Field, FormScreen

        async def clear(values: dict) -> str | None:
            reason = values.get("reason", "")
            if not reason:
                return "a reason, please: why it is cleared by hand (audited)"
            try:
                done = await self.client.alarm_clear(a.id, reason)
            except FerryError as e:
                return self._problem(e)
            self.put(done)
            self.app.notify(f"alarm {done.id} ({esc(done.type)} on {esc(done.object)}) cleared: {esc(reason)}",
                            title="Clear", timeout=4)
            return None
        self.app.push_screen(FormScreen(f"Clear alarm {a.id} by hand?", [
            Field("reason", "Reason", placeholder="why it is cleared by hand (audited)")],
            confirm="Clear", intro=f"{a.severity.symbol} {a.type} on {a.object}: {a.summary}\n"
            "A condition still there raises it again at its next check.", check=clear))

    def action_silence(self) -> None:
        a = self.selected_alarm()
        if a is None:
            return
        from ferry.console.cli.ops import duration_arg
        from ferry.console.dialogs.vmforms import Field, FormScreen

        async def silence(values: dict) -> str | None:
            matchers = {k: values[k] for k in ("type", "object", "severity") if values.get(k)}
            if not matchers:
                return "at least one of type, object, severity (a value or a glob: host.*)"
            try:
                seconds = duration_arg(values.get("duration", ""))
            except Exception as e:      # argparse's ArgumentTypeError: the line it says
                return str(e)
            if not values.get("reason"):
                return "a reason, please: why these alarms may be quiet (kept with the silence, audited)"
            try:
                s = await self.client.silence_add(matchers, seconds, values["reason"])
            except FerryError as e:
                return self._problem(e)
            self.app.notify(f"silence {s.id} ({esc(matchers_text(s))}) until {fmt.stamp(s.expires)}",
                            title="Silence", timeout=5)
            self.poke()
            return None
        self.app.push_screen(FormScreen(f"Silence alarms like #{a.id}?", [
            Field("type", "Type", a.type, placeholder="a type or a glob: host.*"),
            Field("object", "Object", a.object, placeholder="an object or a glob: vm:web*"),
            Field("severity", "Severity", "", placeholder="any (or critical, major, minor, warning)"),
            Field("duration", "For", SILENCE_FOR, placeholder="2h, 30m, 1d, 1h30m"),
            Field("reason", "Reason", placeholder="why (kept with it, audited)")],
            confirm="Silence", intro="Alarms matching every field are still raised and listed, marked silenced, "
            "and not notified until the silence expires.", check=silence))
