"""The console's daily round (issue 14): the Overview it opens on (hosts, VMs, alarms by severity with the
silenced and suppressed ones apart, tasks, the last health run; a tile's Enter opens its view, filtered),
the Alarms view (acknowledge, clear with a reason, silence from the selected alarm, the history, the
events) and the Health view (each check's state, its details and history, `r` starting a health run).

A real EngineClient on a throw-away workspace (the built-in folder lab). Alarms are raised through the
engine's own alarms API (Ops.raise_alarm), check results recorded as a health round records them
(engine/ops/health.record); what the keys change is read back through the client.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from textual.widgets import Input, Markdown, Select, Static

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console.app import FIRST_VIEW, FerryApp
from ferry.console.views.overview import TILES
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import HelpScreen
from ferry.console.dialogs.report import ReportScreen
from ferry.console.dialogs.vmforms import FormScreen
from ferry.engine.api import AlarmState, CheckState, TaskState
from ferry.engine.ops import health
from ferry.engine.ops.healthconfig import Checklist, HealthSettings
from ferry.engine.ops.nagios import CheckResult
from harness.pilot import text_of, until
from harness.waiting import until as wait_until
from test_console_vms import FIXED_CLOCK, lab_client, make_vm, notes

SIZE = (160, 40)


@pytest.fixture
async def client():
    async with lab_client() as c:
        yield c


async def raise_alarms(client) -> dict[str, int]:
    """Two critical, one major active, one acknowledged, one silenced, one suppressed (its host is down)."""
    ops = client.ops
    ids = {}
    for key, (type_, obj, sev, summary, details) in {
        "full": ("datastore.full", "datastore:shared", "critical", "shared is 97% full", None),
        "down": ("host.down", "host:lab1", "critical", "lab1 does not answer", None),
        "failed": ("task.failed", "task:7", "major", "task 7 failed: no space left", None),
        "clock": ("time.offset", "host:lab2", "major", "lab2's clock is 9 s off", None),
        "raid": ("raid.degraded", "host:lab2", "minor", "md0 degraded", None),
        "agent": ("vm.agent", "vm:web9", "warning", "web9's agent does not answer", {"host": "lab1"}),
    }.items():
        ids[key] = (await ops.raise_alarm(type_, obj, sev, summary, details=details)).id
    await client.alarm_ack(ids["clock"], "on it")
    await client.silence_add({"type": "raid.*"}, 3600, "disk ordered")
    return ids


def result(host: str, check: str, state: CheckState, summary: str, *, attempts: int = 1, details: str = "",
           perfdata: str = "") -> health.Found:
    from ferry.engine.ops.nagios import parse_perfdata
    return health.Found(host, check, CheckResult(state, summary, details, parse_perfdata(perfdata) if perfdata else ()),
                        max_attempts=attempts, alarm_type=None, alarm_object=f"host:{host}")


async def record_checks(client) -> None:
    """As a health round leaves them: lab1 ssh OK, its datastore CRITICAL (hard), lab2's load WARNING (soft,
    attempt 1 of 3), the site's tasks check UNKNOWN; the datastore checked twice (its history)."""
    store = client.store
    await store.call(health.record, store, [result("lab1", "datastore:shared", CheckState.WARNING, "shared 85% used",
                                                   perfdata="'shared'=85%;80;90;0;100")], FIXED_CLOCK - 600)
    await store.call(health.record, store, [
        result("lab1", "ssh", CheckState.OK, "ssh round trip 0.01 s", perfdata="rtt=0.01s;1;5"),
        result("lab1", "datastore:shared", CheckState.CRITICAL, "shared 97% used", details="/srv/shared: 97% of 10G",
               perfdata="'shared'=97%;80;90;0;100"),
        result("lab2", "load", CheckState.WARNING, "load 2.5 per core", attempts=3),
        result("", "tasks", CheckState.UNKNOWN, "the task list could not be read"),
    ], FIXED_CLOCK)


def tile(app: FerryApp, name: str) -> str:
    return text_of(app, f"#tile-{name}")


def rows(app: FerryApp, view) -> dict[str, list[str]]:
    table = view.table
    return {row.key.value: [c.plain.strip() for c in table.get_row(row.key.value)] for row in table.ordered_rows}


def screen_lines(app: FerryApp) -> list[str]:
    """What the terminal shows now, line by line."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def line_with(app: FerryApp, *parts: str) -> str:
    """The one line on screen that has every part (what a user reads across one row)."""
    found = [ln for ln in screen_lines(app) if all(p in ln for p in parts)]
    assert len(found) == 1, (parts, screen_lines(app))
    return found[0]


async def focus_tile(pilot, app: FerryApp, name: str) -> None:
    for _ in range(8):
        if app.overview.focused_tile == name and app.focused is app.overview.tile_widget(name):
            return
        await pilot.press("j")
    raise AssertionError(f"tile {name} not reached")


# ---------------------------------------------------------------------------------- the Overview


async def test_the_overview_counts_what_the_engine_has_and_each_tile_opens_its_view_filtered(client):
    await raise_alarms(client)
    await record_checks(client)
    await make_vm(client, "web1", "lab1")
    failed = await client.submit("test.flaky", {"permanent": True})
    await wait_until(lambda: state_is(client, failed, TaskState.FAILED), what="the task failed")
    hosts = len(client.site.hosts)

    assert FIRST_VIEW == "overview"         # what `ferry` opens on (run_console)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view=FIRST_VIEW)
    async with app.run_test(size=SIZE) as pilot:
        assert app.current_view == "overview" and app.focused is app.overview.tile_widget("hosts")
        await until(pilot, lambda: f"✔ {hosts} up" in tile(app, "hosts"), what="every host answered")
        assert "✖ 0 down" in tile(app, "hosts")
        await until(pilot, lambda: "critical" in tile(app, "alarms"), what="the alarms")
        assert tile(app, "alarms").splitlines() == [
            "✖ 2 critical  ▲ 1 major", "● 0 minor  ◆ 0 warning", "1 acknowledged · 1 silenced · 1 suppressed"]
        await until(pilot, lambda: "1 VM" in tile(app, "vms"), what="the VMs")
        assert tile(app, "vms").splitlines()[0] == "1 VM: ■ 1 stopped"
        await until(pilot, lambda: "✖ 1 failed" in tile(app, "tasks"), what="the failed task")
        assert "last checked" in tile(app, "health")
        assert tile(app, "health").splitlines()[1:] == ["✔ 1 OK  ◆ 1 WARNING", "✖ 1 CRITICAL  ? 1 UNKNOWN"]
        if hasattr(client, "backup_list"):          # (the backups landing beside this: the tile once they have)
            await until(pilot, lambda: "no backups yet" in tile(app, "backups"), what="the backups")
        else:
            assert not app.overview.tile_widget("backups").display

        await focus_tile(pilot, app, "alarms")
        await pilot.press("enter")
        await until(pilot, lambda: app.current_view == "alarms" and len(rows(app, app.alarms_view)) == 6,
                    what="the Alarms view with the six open alarms")
        await pilot.press("0")
        await until(pilot, lambda: app.current_view == "overview" and app.focused is app.overview.tile_widget("alarms"),
                    what="back on the Overview, on the same tile")

        await focus_tile(pilot, app, "tasks")
        await pilot.press("enter")
        await until(pilot, lambda: app.current_view == "tasks" and app.tasks_view.table.filter_text == "failed",
                    what="the Tasks view, the failed ones")
        assert app.tasks_view.table.shown_keys == {str(failed)}
        await pilot.press("escape", "escape")           # the filter, then back
        await until(pilot, lambda: app.current_view == "overview", what="back")

        await focus_tile(pilot, app, "health")
        await pilot.press("enter")
        await until(pilot, lambda: app.current_view == "health" and len(app.health_view.table.model) == 4,
                    what="the Health view")
        assert app.health_view.table.filter_text == "problem" and len(app.health_view.table.shown_keys) == 3
        assert "health › /problem" in text_of(app, "#crumbs")


async def test_at_80x24_the_overview_opens_first_and_each_tile_by_enter_or_click_opens_its_view(client):
    await raise_alarms(client)
    await record_checks(client)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)           # as `ferry` opens it, on the smallest terminal
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.current_view == "overview"
        up = f"✔ {len(client.site.hosts)} up"
        await until(pilot, lambda: up in tile(app, "hosts") and "critical" in tile(app, "alarms")
                    and "last checked" in tile(app, "health") and "asking" not in tile(app, "vms"),
                    what="the tiles filled")
        # every tile: its title with its view's key, and what it counts, down to its last line
        screen = "\n".join(screen_lines(app))
        for said in ("Hosts (1)", up, "VMs (3)", "no VMs yet", "Alarms (7)",
                     "✖ 2 critical", "◆ 0 warning", "suppressed", "Tasks (2)", "✖ 0 failed", "Health (8)",
                     "last checked", "✖ 1 CRITICAL  ? 1 UNKNOWN"):
            assert said in screen, said
        assert "⏎ Open" in screen_lines(app)[-1] and "q Quit" in screen_lines(app)[-1]

        shown = [t.tile for t in app.overview.tiles()]
        assert shown[:5] == ["hosts", "vms", "alarms", "tasks", "health"]
        for name in shown:
            await focus_tile(pilot, app, name)
            await pilot.press("enter")
            await until(pilot, lambda: app.current_view == TILES[name][1], what=f"enter on {name}")
            await pilot.press("0")
            await until(pilot, lambda: app.current_view == "overview", what="back")
        for name in reversed(shown):
            await pilot.click(f"#tile-{name}")
            await until(pilot, lambda: app.current_view == TILES[name][1], what=f"a click on {name}")
            await pilot.press("0")
            await until(pilot, lambda: app.current_view == "overview", what="back")
            assert app.focused is app.overview.tile_widget(name)


async def test_at_80x24_the_alarms_and_health_rows_show_what_is_wrong_and_the_footer_their_keys(client):
    ids = await raise_alarms(client)
    await record_checks(client)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("7")
        await until(pilot, lambda: len(rows(app, app.alarms_view)) == 6, what="six alarms")
        await pilot.pause()
        # severity, state, type, object and the summary's start on one line; the quiet ones say why in STATE
        line_with(app, "✖ CRIT", "active", "datastore.full", "datastore:shared", "shared is 97%")
        line_with(app, "◆ WARN", "suppressed", "vm.agent", "vm:web9", "web9's agent")
        line_with(app, "● MIN", "silenced", "raid.degraded", "host:lab2", "md0 degraded")
        line_with(app, "▲ MAJ", "acknowledged", "time.offset", "host:lab2", "lab2's clock")
        assert rows(app, app.alarms_view)[str(ids["raid"])][1] == "silenced"
        footer = screen_lines(app)[-1]
        for key in ("a Ack", "C Clear", "S Silence", "H History", "e Events", "? Keys"):
            assert key in footer, key
        assert any(ln.strip().startswith(f"#{ids['down']} host.down on host:lab1") for ln in screen_lines(app)), \
            "the selected alarm's details below the table"

        await pilot.press("8")
        await until(pilot, lambda: len(rows(app, app.health_view)) == 4, what="four checks")
        await pilot.pause()
        line_with(app, "lab1", "datastore:shared", "✖ CRIT", "HARD", "shared 97% used")
        line_with(app, "lab2", "load", "◆ WARN", "SOFT", "load 2.5 per core")
        assert "4 checks on 3 hosts" in "\n".join(screen_lines(app))
        assert "r Run now" in screen_lines(app)[-1]


async def state_is(client, tid: int, state: TaskState) -> bool:
    return (await client.get_task(tid)).state == state


# ---------------------------------------------------------------------------------- the Alarms view


async def select_alarm(pilot, app: FerryApp, alarm_id: int) -> None:
    await pilot.press("g")
    for _ in range(10):
        if app.alarms_view.selected == str(alarm_id):
            return
        await pilot.press("j")
    raise AssertionError(f"alarm {alarm_id} not reached")


async def by_id(client, alarm_id: int, **kw):
    return next(a for a in await client.alarms(**kw) if a.id == alarm_id)


async def test_acknowledge_clear_and_silence_from_the_alarms_view_change_the_alarms(client):
    ids = await raise_alarms(client)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view=FIRST_VIEW)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("7")
        view = app.alarms_view
        await until(pilot, lambda: app.current_view == "alarms" and len(rows(app, view)) == 6, what="six alarms")
        header = [str(c.label).strip() for c in view.table.columns.values()]
        assert header[:5] == ["SEV ▲", "STATE", "TYPE", "OBJECT", "COUNT"]
        # worst first: the critical ones, then the majors
        assert [k for k in (r.key.value for r in view.table.ordered_rows)][:2] == \
            [str(ids["down"]), str(ids["full"])]
        assert rows(app, view)[str(ids["full"])][:5] == ["✖ CRIT", "active", "datastore.full", "datastore:shared",
                                                         "1"]
        assert rows(app, view)[str(ids["clock"])][7] == "acked by " + (await by_id(client, ids["clock"])).acked_by
        assert rows(app, view)[str(ids["raid"])][7].startswith("silenced by ")
        assert rows(app, view)[str(ids["agent"])][7] == "suppressed by host.down on lab1"

        # a: acknowledge, with a comment
        await select_alarm(pilot, app, ids["full"])
        assert "shared is 97% full" in text_of(app, "#alarm-detail")
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the acknowledge dialog")
        app.screen.query_one("#f-comment", Input).value = "moving VMs off it"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        a = await by_id(client, ids["full"])
        assert a.state == AlarmState.ACKNOWLEDGED and a.ack_comment == "moving VMs off it"
        await until(pilot, lambda: rows(app, view)[str(ids["full"])][1] == "acknowledged", what="shown acknowledged")

        # C: clear by hand; no reason is refused in the dialog and changes nothing
        await pilot.press("C")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the clear dialog")
        form = app.screen
        await pilot.press("enter")
        await until(pilot, lambda: "a reason" in str(form.query_one("#form-error", Static).render()), what="refused")
        assert (await by_id(client, ids["full"])).state == AlarmState.ACKNOWLEDGED
        form.query_one("#f-reason", Input).value = "datastore grown to 20G"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        cleared = await by_id(client, ids["full"], all=True)
        assert cleared.state == AlarmState.CLEARED and cleared.clear_reason == "datastore grown to 20G"
        await until(pilot, lambda: str(ids["full"]) not in rows(app, view), what="gone from the open alarms")

        # H: the history shows it again, cleared
        await pilot.press("H")
        await until(pilot, lambda: str(ids["full"]) in rows(app, view), what="the history")
        assert rows(app, view)[str(ids["full"])][1] == "cleared"
        await pilot.press("H")
        await until(pilot, lambda: str(ids["full"]) not in rows(app, view), what="the history hidden")

        # S: silence alarms like the selected one (its type and object prefilled)
        await select_alarm(pilot, app, ids["failed"])
        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the silence dialog")
        form = app.screen
        assert form.query_one("#f-type", Input).value == "task.failed"
        assert form.query_one("#f-object", Input).value == "task:7"
        form.query_one("#f-duration", Input).value = "30m"
        form.query_one("#f-reason", Input).value = "known, fixed tomorrow"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        silenced = await by_id(client, ids["failed"])
        assert silenced.silenced_by is not None
        [s] = [s for s in await client.silence_list() if s.id == silenced.silenced_by]
        assert s.matchers == {"type": "task.failed", "object": "task:7"} and s.reason == "known, fixed tomorrow"
        assert 1790 <= s.expires - s.created <= 1810
        await until(pilot, lambda: rows(app, view)[str(ids["failed"])][7] == f"silenced by {s.id}",
                    what="shown silenced")

        # /: a filter by severity; e: the events of alarms and silences
        await pilot.press("slash", *"critical", "enter")
        await until(pilot, lambda: view.table.shown_keys == {str(ids["down"])}, what="the critical one")
        await pilot.press("escape")
        await pilot.press("e")
        await until(pilot, lambda: "events of alarms and silences" in text_of(app, "#alarm-detail"), what="events")
        events = text_of(app, "#alarm-detail")
        for said in ("acknowledged: moving VMs off it", "cleared by hand: datastore grown to 20G",
                     "known, fixed tomorrow"):
            assert said in events, said

        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        help_text = "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))
        for line in ("Acknowledge the selected alarm", "Clear the selected alarm by hand", "Show or hide the cleared"):
            assert line in help_text, line
        await pilot.press("escape")
        palette = {c.name for c in console_commands(app)}
        assert {"View: Overview", "View: Alarms", "View: Health", "Acknowledge the selected alarm…",
                "Silence alarms like the selected one…"} <= palette


# ---------------------------------------------------------------------------------- the Health view


@pytest.fixture
async def checked_client():
    """A site whose soft problems are re-checked after 0.05 s (not a minute), with its own checklist."""
    def quick(site):
        return replace(site, health=HealthSettings(retry_interval=0.05,
                                                   checklists={"quick": Checklist("quick", ("ssh", "load"))}))
    async with lab_client(quick) as c:
        yield c


async def test_the_health_view_shows_each_check_its_details_and_r_starts_a_health_run(checked_client):
    client = checked_client
    await record_checks(client)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view=FIRST_VIEW)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("colon", *"health", "enter")
        view = app.health_view
        await until(pilot, lambda: app.current_view == "health" and len(rows(app, view)) == 4, what="four checks")
        shown = [rows(app, view)[r.key.value] for r in view.table.ordered_rows]
        # the worst first; the state as a symbol and a word, SOFT/HARD and the attempt
        assert [r[:5] for r in shown] == [
            ["lab1", "datastore:shared", "✖ CRIT", "HARD", "1/1"],
            ["(site)", "tasks", "? UNKNOWN", "HARD", "1/1"],
            ["lab2", "load", "◆ WARN", "SOFT", "1/3"],
            ["lab1", "ssh", "✔ OK", "HARD", "1/1"],
        ]
        assert shown[0][6] == "shared 97% used"
        crit = view.table.get_row("lab1\tdatastore:shared")[2]
        assert crit.style.color is not None and crit.style.color.name.lower() == \
            app.theme_variables["sev-crit"].lower()
        assert "4 checks on 3 hosts" in text_of(app, "#health-status")

        await pilot.press("g", "enter")            # the datastore check, full screen with its history
        await until(pilot, lambda: isinstance(app.screen, ReportScreen), what="the details")
        await pilot.pause()
        text = "\n".join(getattr(b.render(), "plain", "") for b in app.screen.query_one(Markdown).query(Static))
        for said in ("datastore:shared on lab1", "/srv/shared: 97% of 10G", "shared=97%;80;90;0;100",
                     "shared 85% used", "◆ WARN"):
            assert said in text, said
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ReportScreen), what="back")

        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the checklist chooser")
        choices = [label for label, _ in app.screen.query_one("#f-what", Select)._options]
        assert choices[:4] == ["checklist daily", "checklist monthly", "checklist quick", "checklist weekly"]
        assert choices[4] == "every check of host lab1"          # the selected check's host first
        assert app.focused is app.screen.query_one("#confirm")   # enter: OK, as the help line says
        await pilot.press("enter")                 # the default: the daily checklist
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        runs = [t for t in await client.list_tasks() if t.kind == "health.run"]
        assert [t.title for t in runs] == ["health daily"]
        tid = runs[0].id
        await until(pilot, lambda: tid in app.feed.tasks, what="the Tasks view's feed has it")
        await until(pilot, lambda: any(f"task {tid}: health daily:" in n for n in notes(app)), timeout=60,
                    what="its end said")
        assert any(n.startswith(f"task {tid}: health daily") for n in notes(app))
