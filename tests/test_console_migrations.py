"""The Migrations view of the console (issue 13): every migration of the workspace with its state,
the selected one's details, `/` by wave, the assessment report (refused before an assessment), the
override of a network check through its dialog (recorded and audited), and `a` submitting the
assessment as a task the Tasks view shows.

A real EngineClient on a throw-away workspace (the built-in folder lab: test_console_vms.lab_client),
two plan files applied by the engine. No assessment succeeds here (that takes an SSH source: test_migration_assess_cli.py):
the one `a` starts asks a port nothing listens on, and fails at once.

Sync, test launch and cutover (the second half): no VMs and no source; the records are put into the
store as the engine's tasks would leave them (a migration ready, with its sync rounds, a measure of what
changed and a passed test launch; one cutting over, half its steps done). The tasks the keys start
reach for a source or receiver on ports nothing listens on, and fail at once.
"""

from __future__ import annotations

import contextlib
import re
import textwrap
import time
from dataclasses import replace

import pytest
from textual.widgets import Button, Input, Markdown, Static

from ferry.console.app import FerryApp
from ferry.console.cli.migration import _show as show_text
from ferry.console.commands import console_commands
from ferry.console.dialogs.cutover import CutoverScreen
from ferry.console.dialogs.report import ReportScreen
from ferry.console.dialogs.vmforms import FormScreen, TypedNameScreen
from ferry.engine import api
from ferry.engine.api import MigrationState
# Imported for their task kinds too (migration.cutover, .rollback, .finalize; migration.test).
from ferry.engine.migration.cutover import STEPS, Finalize
from ferry.engine.migration.sync import describe
from ferry.engine.migration.testlaunch import TestLaunch
from ferry.engine.taskmodel import TaskState
from harness.pilot import text_of, until
from harness.sshd import free_port
from test_console_vms import FIXED_CLOCK, lab_client, notes

SIZE = (160, 30)


def migration_toml(name: str, port: int = 22, *, final: str | None = None, method: str = "file") -> str:
    """One migration of a plan: file-level (or `method`), its source on 127.0.0.1:port, its target on lab1
    (taking the address `final` once live, when given)."""
    return textwrap.dedent(f"""\
        [migrations.{name}]
        method = "{method}"
        [migrations.{name}.source]
        address = "127.0.0.1"
        port = {port}
        [migrations.{name}.target]
        host = "lab1"
        datastore = "lab1-local"
        network = "default"
        """) + (f'[migrations.{name}.final]\naddress = "{final}"\n' if final else "")


def plan(wave: str, name: str, port: int = 22) -> str:
    return f'[wave]\nname = "{wave}"\n' + migration_toml(name, port)


async def apply(c, wave: str, text: str) -> None:
    """A plan file of `wave` written into the client's workspace and applied."""
    f = c.workspace.root / f"{wave}.toml"
    f.write_text(text)
    await c.plan_apply(str(f))


@pytest.fixture
async def client():
    """An engine client with web01 (wave1) and db01 (wave2, its source a port nothing listens on) planned."""
    async with lab_client() as c:
        for wave, name, port in (("wave1", "web01", 22), ("wave2", "db01", free_port())):
            await apply(c, wave, plan(wave, name, port))
        yield c


def cells(app: FerryApp, name: str) -> dict[str, str]:
    """The row of migration `name` as shown: column key -> text."""
    table = app.migrations_view.table
    return {k.value: c.plain.strip() for k, c in zip(table.columns, table.get_row(name))}


def shown(app: FerryApp) -> list[str]:
    """The migrations listed, top to bottom."""
    return [row.key.value for row in app.migrations_view.table.ordered_rows]


async def select(pilot, app: FerryApp, name: str) -> None:
    if app.migrations_view.selected != name:
        await pilot.press("g")          # from the first row down
    for _ in range(5):
        if app.migrations_view.selected == name:
            return
        await pilot.press("j")
        await pilot.pause()
    raise AssertionError(f"{name} not reached")


@contextlib.asynccontextmanager
async def on_migration(client, name: str, *, count: int = 2):
    """The console with the Migrations view open (key 6), its `count` migrations listed and the cursor on
    `name`; yields (app, pilot)."""
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: app.current_view == "migrations" and len(shown(app)) == count,
                    what=f"{count} migration(s)")
        await select(pilot, app, name)
        yield app, pilot


async def test_the_view_lists_every_migration_with_its_state_and_filters_by_wave(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("colon", *"migrations", "enter")
        await until(pilot, lambda: app.current_view == "migrations" and len(shown(app)) == 2, what="two migrations")
        header = [str(c.label).strip() for c in app.migrations_view.table.columns.values()]
        assert header == ["NAME ▲", "STATE", "ROUND", "LAST SYNC", "CHANGED", "DOWNTIME", "BLOCKERS", "WAVE",
                          "NETWORK"]
        assert shown(app) == ["db01", "web01"]
        assert cells(app, "web01") == {"name": "web01", "wave": "wave1", "state": "○ planned", "round": "0",
                                       "sync": "-", "network": "-", "blockers": "0", "changed": "-", "downtime": "-"}
        assert [cells(app, "db01")[k] for k in ("name", "wave", "state")] == ["db01", "wave2", "○ planned"]
        assert "2 migrations in 2 waves" in text_of(app, "#migrations-status")

        await select(pilot, app, "web01")
        detail = text_of(app, "#migration-detail")
        assert "web01  ○ planned  wave wave1 · round 0 · last sync -" in detail
        assert "source  root@127.0.0.1" in detail
        assert "target  host lab1, datastore lab1-local, network default" in detail
        assert "method  file" in detail and "no network check yet" in detail
        assert text_of(app, "#crumbs").endswith("web01")
        palette = {c.name for c in console_commands(app)}
        assert {"View: Migrations", "Assess the selected migration", "Assessment report of the selected migration",
                "Override the network check of the selected migration…", "Filter the migrations"} <= palette

        await pilot.press("slash", *"wave2", "enter")
        await until(pilot, lambda: shown(app) == ["db01"], what="wave2 only")
        assert app.migrations_view.selected == "db01"
        assert "db01" in text_of(app, "#migration-detail")
        await pilot.press("escape")                     # clears the filter
        await until(pilot, lambda: len(shown(app)) == 2, what="filter cleared")


async def test_the_report_of_a_migration_not_assessed_is_the_engines_refusal_in_one_line(client):
    async with on_migration(client, "web01") as (app, pilot):
        await pilot.press("R")
        await until(pilot, lambda: any("has not been assessed" in n for n in notes(app)), what="the refusal")
        said = next(n for n in notes(app) if "has not been assessed" in n)
        assert said == "migration web01 has not been assessed (hint: ferry migration assess web01)"
        assert not isinstance(app.screen, ReportScreen) and app.screen is app.screen_stack[0]


async def test_a_report_shows_full_screen_and_esc_goes_back(client):
    """The screen R opens, with a report as the engine writes it (Markdown)."""
    async with on_migration(client, "web01") as (app, pilot):
        app.push_screen(ReportScreen("assessment report of web01",
                                     "# Assessment of web01\n\n## Network check\n\nlatency 0.30 ms: passed\n"))
        await until(pilot, lambda: isinstance(app.screen, ReportScreen), what="the report")
        await pilot.pause()
        text = "\n".join(getattr(b.render(), "plain", "") for b in app.screen.query_one(Markdown).query(Static))
        assert "Assessment of web01" in text and "latency 0.30 ms: passed" in text
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ReportScreen), what="back")
        assert app.current_view == "migrations"


async def test_an_override_through_its_dialog_is_recorded_audited_and_shown(client):
    async with on_migration(client, "web01") as (app, pilot):
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the override dialog")
        form = app.screen
        await pilot.press("enter")                      # no reason: the engine refuses, the dialog stays
        await until(pilot, lambda: "an override needs a reason" in str(form.query_one("#form-error", Static).render()),
                    what="refused without a reason")
        assert app.screen is form and (await client.migration_get("web01")).override is None

        form.query_one("#f-reason", Input).value = "lab link, measured on a busy machine"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        m = await client.migration_get("web01")
        assert m.override == "lab link, measured on a busy machine"
        audit = [a for a in await client.audit_log(limit=50) if a.action == "migration.override"]
        assert [(a.target, a.params["reason"]) for a in audit] == [("web01", "lab link, measured on a busy machine")]
        await until(pilot, lambda: "override lab link, measured on a busy machine" in text_of(app, "#migration-detail"),
                    what="the reason in the detail pane")


async def test_assess_submits_a_task_the_tasks_view_shows_and_its_end_is_said(client):
    async with on_migration(client, "db01") as (app, pilot):
        await pilot.press("a")
        await until(pilot, lambda: any(t.kind == "migration.assess" for t in app.feed.tasks.values()), what="a task")
        task = next(t for t in app.feed.tasks.values() if t.kind == "migration.assess")
        assert task.title == "assess db01"
        await until(pilot, lambda: app.feed.tasks[task.id].state == TaskState.FAILED, what="the task failed")
        await until(pilot, lambda: any(f"task {task.id} failed" in n for n in notes(app)), what="said")
        said = next(n for n in notes(app) if f"task {task.id} failed" in n)
        assert "127.0.0.1" in said, said
        assert (await client.migration_get("db01")).state == MigrationState.PLANNED
        await pilot.press("2")
        await until(pilot, lambda: str(task.id) in app.tasks_view.table.keys(), what="in the Tasks view")


# ---------------------------------------------------------------------------------- sync, test launch, cutover


def cut_plan(port: int) -> str:
    """web01 and db01, their sources on a port nothing listens on; the targets take 10.231.1.77/.78."""
    return ('[wave]\nname = "wave3"\n' + migration_toml("web01", port, final="10.231.1.77/24")
            + migration_toml("db01", port, final="10.231.1.78/24"))


def prepared(name: str, port: int, method: str = "file") -> dict:
    """A file-level (or block-level) target as migration.prepare records it (no VM behind it: its receiver
    does not answer)."""
    target = {"vm": f"{name}-target", "vm_id": f"no-vm-{name}", "host": "lab1", "method": method,
              "address": "127.0.0.1", "prefix": 24, "ssh_port": port,
              "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerry", "fingerprint": "SHA256:none",
              "disks": [{"name": "disk0", "device": "/dev/vda", "size": 4 << 30}], "prepared_at": time.time()}
    if method == "block":
        target["disks"][0]["source"] = "vda"
    else:
        target["partitions"] = [{"disk": "disk0", "device": "/dev/vda1", "size": 4 << 30, "fstype": "ext4",
                                 "label": "root", "uuid": "0b7c-uuid", "source": "/"}]
    return target


async def syncing(st, name: str, port: int, rounds: list[dict], *, method: str = "file") -> None:
    """Planned `name` assessed, its target prepared and its sync `rounds` recorded (syncing), as the
    engine's tasks leave it."""
    await st.call(st.migration_transition, name, "assessed", allowed_from=("planned",))
    await st.call(st.migration_prepared, name, prepared(name, port, method), ready="assessed",
                  prepared="target_prepared")
    await st.call(st.migration_transition, name, "syncing", allowed_from=("target_prepared",))
    for k, rec in enumerate(rounds, 1):
        await st.call(st.migration_round, name, {"round": k, "label": "initial" if k == 1 else "incremental",
                                                 "deleted": 0, "task": None, **rec}, allowed_from=("syncing",))


def ended(now: float, ago: float, took: float, **rec) -> dict:
    """A round record's times: it ended `ago` seconds before `now` after `took` seconds."""
    return {"started": now - ago - took, "ended": now - ago, "duration_s": took, **rec}


TESTED = {"passed": True, "boot_s": 41.5, "checks_s": 3.2, "tools_s": 1.5, "agent_s": 2.5, "services": {"nginx": "active"}, "ports": {"80": True},
          "task": None}


def half_done(now: float) -> dict:
    """A cutover record with four steps done, the fifth running, as migration.cutover writes it."""
    steps = []
    for i, s in enumerate(STEPS):
        started = now - 100 + 10 * i if i <= 4 else None
        state = "done" if i < 4 else "running" if i == 4 else "pending"
        steps.append({"name": s.name, "title": s.title, "state": state, "started": started,
                      "ended": started + 7.5 if state == "done" else None,
                      "detail": "stopped: nginx" if s.name == "stop_services" else None})
    return {"steps": steps, "step": 4, "downtime_from": now - 75, "measured_downtime_s": None, "updated": now,
            "predicted_downtime": {"total_s": 85.0, "boot_measured": True, "parts": {
                "final_sync_s": 16.3, "switch_s": 5.0, "boot_s": 55.0, "checks_s": 8.7}}}


@pytest.fixture
async def cut_client():
    """web01 ready for its cutover (two sync rounds, 5 MiB changed since, a passed test launch) and db01
    cutting over (four steps done, the fifth running)."""
    async with lab_client() as c:
        (c.workspace.root / "keys").mkdir(exist_ok=True)
        await apply(c, "wave3", cut_plan(free_port()))
        st = c.store
        now = time.time()
        await syncing(st, "web01", free_port(), [ended(now, 4000, 300.0, bytes=2 << 30, items=1000),
                                                 ended(now, 700, 100.0, bytes=40 << 20, items=500)])
        await st.call(st.migration_transition, "db01", "assessed", allowed_from=("planned",))
        await st.call(st.migration_prepared, "db01", prepared("db01", free_port()), ready="assessed",
                      prepared="target_prepared")
        await st.call(st.migration_changed, "web01", {"bytes": 5 << 20, "items": 12, "at": now - 60})
        await st.call(st.migration_tested, "web01", {**TESTED, "at": now - 300}, to="ready", allowed_from=("syncing",))
        await st.call(st.migration_transition, "db01", "cutting_over", allowed_from=("target_prepared",))
        await st.call(st.migration_cutover, "db01", half_done(now), to=None, allowed_from=("cutting_over",))
        yield c


def table_lines(app: FerryApp) -> list[str]:
    """The migration table as the terminal shows it, header first."""
    table = app.migrations_view.table
    return [table.render_line(y).text.rstrip() for y in range(table.size.height)]


async def test_at_80x24_the_columns_that_matter_are_on_screen(cut_client):
    """In an 80x24 terminal each migration's name, state, round, last sync, data changed, predicted
    downtime and blockers are on screen, with no sideways scrolling; the wave and network columns
    give their room first (the wave is still a filter: /wave3)."""
    app = FerryApp(cut_client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: app.current_view == "migrations" and len(shown(app)) == 2, what="two migrations")
        await until(pilot, lambda: cells(app, "web01")["downtime"] != "-", what="web01's predicted downtime")
        await pilot.pause()
        table = app.migrations_view.table
        assert table.virtual_size.width <= table.size.width
        header, *rows = table_lines(app)
        assert re.match(r" *NAME\b.* STATE .* ROUND .* LAST SYNC .* CHANGED .* DOWNTIME .* BLOCKERS", header), header
        web = next(r for r in rows if r.strip().startswith("web01"))
        assert re.search(r"● ready +2 +\d\d:\d\d:\d\d +5\.0 MiB +~\d+m\d\ds +0", web), web
        db = next(r for r in rows if r.strip().startswith("db01"))
        assert re.search(r"▶ cutting_over +0 +- +- +~1m25s +0", db), db
        await pilot.press("slash", *"wave3", "enter")
        await until(pilot, lambda: "/wave3 2 shown" in text_of(app, "#migrations-status"), what="filtered by wave")

        # The widest cells the first six columns take: they still fit, without scrolling sideways.
        view = app.migrations_view
        view.put(replace(view.migrations["db01"], state=MigrationState.TARGET_PREPARED,
                         last_sync=time.time() - 400 * 86400, bytes_changed_since=(1 << 30) - (100 << 10),
                         cutover={"measured_downtime_s": 754.0, "predicted_downtime": {"total_s": 760.0}}))
        await until(pilot, lambda: cells(app, "db01")["state"] == "◑ target_prepared", what="the widest row")
        await pilot.pause()
        assert table.virtual_size.width <= table.size.width
        db = next(r for r in table_lines(app)[1:] if r.strip().startswith("db01"))
        assert re.search(r"◑ target_prepared +0 +\d{4}-\d\d-\d\d \d\d:\d\d +1023\.9 MiB +12m34s \(~12m40s\)", db), db


def screen_text(app: FerryApp) -> str:
    """What the cutover screen shows, top to bottom."""
    return "\n".join(text_of(app.screen, sel) for sel in ("#cutover-title", "#cutover-summary", "#cutover-steps",
                                                          "#cutover-status"))


async def test_the_table_and_detail_show_data_changed_predicted_downtime_the_test_launch_and_the_steps(cut_client):
    async with on_migration(cut_client, "web01") as (app, pilot):
        assert cells(app, "web01")["state"] == "● ready"
        assert cells(app, "web01")["changed"] == "5.0 MiB"
        await until(pilot, lambda: cells(app, "web01")["downtime"] != "-", what="web01's predicted downtime")
        assert re.fullmatch(r"~(\d+m\d\ds|\d+s)", cells(app, "web01")["downtime"]), cells(app, "web01")
        assert cells(app, "db01")["state"] == "▶ cutting_over" and cells(app, "db01")["downtime"] == "~1m25s"
        detail = text_of(app, "#migration-detail")
        assert "sync    round 2 · last incremental: 40.0 MiB, 500 file(s) in 1m40s · 5.0 MiB changed since" in detail
        assert "test    ✔ passed" in detail and "booted in 41.5 s, checks 3.2 s · nginx active, port 80 listens" in detail

        await select(pilot, app, "db01")
        detail = text_of(app, "#migration-detail")
        assert "cutover  downtime so far" in detail and "predicted 1m25s" in detail
        assert "✔ arm the go-live timer on the source" in detail
        assert "▶ take the source off the network" in detail
        assert "○ go live" in detail
        palette = {c.name for c in console_commands(app)}
        assert {"Sync the selected migration now", "Test-launch the selected migration",
                "Cut the selected migration over…", "Roll the selected migration back…",
                "Finalize the selected migration…"} <= palette


async def test_a_key_the_engine_refuses_says_why_in_one_line_and_starts_nothing(cut_client):
    async with on_migration(cut_client, "db01") as (app, pilot):
        for key, said in (("s", "migration db01 is cutting_over: it syncs once its target is prepared and until its "
                                "cutover (hint: ferry migration show db01)"),
                          ("t", "migration db01 is cutting_over: a test launch needs a synced target "
                                "(hint: ferry migration show db01)"),
                          ("F", "migration db01 is cutting_over: it is finalized once it has gone live "
                                "(hint: ferry migration show db01)")):
            await pilot.press(key)
            await until(pilot, lambda: said in notes(app), what=f"the refusal of {key}")
        assert app.screen is app.screen_stack[0]
        kinds = {"migration.sync", TestLaunch.name, Finalize.name}
        assert not [t for t in await cut_client.list_tasks() if t.kind in kinds]


async def test_the_cutover_screen_shows_the_summary_and_starts_only_on_the_exact_name(cut_client):
    async with on_migration(cut_client, "web01") as (app, pilot):
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CutoverScreen) and app.screen.summary is not None,
                    what="the cutover screen with its summary")
        text = screen_text(app)
        assert "cutover of web01  ● ready" in text
        assert re.search(r"last sync +1[01]m\d\ds ago +round 2", text), text
        assert "data changed    5.0 MiB since the last sync" in text
        assert "switch 7.0 s · boot 41.5 s · hypervisor tools 1.5 s · guest agent 2.5 s · checks 3.2 s" in text \
            and "downtime        about " in text
        assert "test launch     ✔ passed" in text and "nginx active, port 80 listens" in text
        assert "blockers        none" in text
        assert " 1. final incremental sync while the source runs" in text and "12. go live" in text

        button = app.screen.query_one("#confirm", Button)
        assert button.disabled
        for typed in ("web0", "Web01", "web01 ", "web011"):
            app.screen.query_one("#typed", Input).value = typed
            await pilot.pause()
            assert button.disabled, typed
            await pilot.press("enter")              # refused on screen; nothing starts
            await until(pilot, lambda: "type the migration's name exactly: web01" in screen_text(app), what="said")
        assert not [t for t in await cut_client.list_tasks() if t.kind == "migration.cutover"]

        app.screen.query_one("#typed", Input).value = ""
        await pilot.click("#typed")
        await pilot.press(*"web01")
        await until(pilot, lambda: not button.disabled, what="the button enabled")
        await pilot.press("enter")
        await until(pilot, lambda: app.screen.following, what="the screen follows the cutover")
        tasks = [t for t in await cut_client.list_tasks() if t.kind == "migration.cutover"]
        assert [(t.params["migration"], t.params["confirm"]) for t in tasks] == [("web01", "web01")]
        assert not app.screen.query_one("#cutover-confirm").display
        # No receiver answers here: the first step fails, the cutover rolls back (nothing on the source was
        # touched yet) and the screen says so with the task's error.
        await until(pilot, lambda: "↩ final incremental sync while the source runs" in screen_text(app),
                    timeout=60, what="the first step failed and rolled back")
        text = screen_text(app)
        assert f"task #{tasks[0].id} cut web01 over" in text and "✖ failed" in text, text
        assert "↩ rolled back" in text, text
        assert "○ go live" in text and "Traceback" not in text


async def test_a_cutover_under_way_shows_each_step_live_and_b_asks_for_the_name(cut_client):
    async with on_migration(cut_client, "db01") as (app, pilot):
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CutoverScreen) and app.screen.polls >= 1,
                    what="the cutover screen following db01")
        screen = app.screen
        text = screen_text(app)
        assert "cutover of db01  ▶ cutting_over  follows the cutover live" in text
        assert "steps 4/12 done" in text
        assert re.search(r"✔ stop the source's services +7\.5 s  stopped: nginx", text), text
        assert re.search(r"▶ take the source off the network +1m0\ds…", text), text
        assert re.search(r"^○ start the target and check it$", text, re.M), text
        assert re.search(r"downtime so far 1m1\ds · predicted 1m25s", text), text
        assert "final sync 16.3 s · switch 5.0 s · boot 55.0 s · checks 8.7 s" in text
        polls = screen.polls
        await until(pilot, lambda: screen.polls >= polls + 2, what="asked again, about once a second")

        await pilot.press("b")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="asked for the name")
        dialog = app.screen
        assert "Roll db01 back?" in text_of(dialog, "#dialog-title")
        assert "Type the name to roll back" in text_of(dialog, "#dialog-body")
        button = dialog.query_one("#confirm", Button)
        await pilot.press(*"db0")
        assert button.disabled
        await pilot.press("1")
        await until(pilot, lambda: not button.disabled, what="the button enabled")
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is screen, what="back on the cutover screen")
        await until(pilot, lambda: any(t.kind == "migration.rollback" for t in app.feed.tasks.values()),
                    what="the rollback task")
        rb = next(t for t in await cut_client.list_tasks() if t.kind == "migration.rollback")
        assert rb.params["migration"] == "db01"
        await until(pilot, lambda: f"task #{rb.id} roll back db01" in screen_text(app), what="the screen follows it")


async def test_a_migration_read_carries_its_predicted_and_measured_downtime(cut_client):
    """`ferry migration show --json` (migration_get): a ready migration's predicted downtime now, with
    its parts; one cutting over keeps what was predicted when it began; measured only once cut over."""
    web = api.to_builtins(await cut_client.migration_get("web01"))
    assert web["state"] == "ready" and web["predicted_downtime_s"] > 0 and web["measured_downtime_s"] is None
    assert set(web["predicted_downtime_parts"]) == {"final_sync_s", "switch_s", "boot_s", "tools_s", "agent_s",
                                                    "checks_s"}
    assert web["predicted_downtime_parts"]["boot_s"] == 41.5        # the test launch's measure
    db = api.to_builtins(await cut_client.migration_get("db01"))
    assert db["state"] == "cutting_over" and db["predicted_downtime_s"] == 85.0
    assert db["predicted_downtime_parts"]["boot_s"] == 55.0 and db["measured_downtime_s"] is None


@pytest.fixture
async def block_client():
    """app01, block-level and syncing: its initial round sent 256 of the 1024 chunks of its 4 GiB disk,
    its second 12 of them (48 MiB); 2 chunks changed since."""
    async with lab_client() as c:
        await apply(c, "wave4", '[wave]\nname = "wave4"\n' + migration_toml("app01", free_port(), method="block"))
        st, now = c.store, time.time()
        await syncing(st, "app01", free_port(), [ended(now, 4000, 300.0, bytes=1 << 30, items=256, chunks=1024),
                                                 ended(now, 700, 30.0, bytes=48 << 20, items=12, chunks=1024)],
                      method="block")
        await st.call(st.migration_changed, "app01", {"bytes": 8 << 20, "items": 2, "at": now - 60, "chunks": 1024})
        yield c


async def test_a_block_level_migrations_rounds_are_said_in_chunks_not_files(block_client):
    """What a block round moved is chunks of a disk: `ferry migration show`, the detail pane and the
    cutover's step lines (sync.describe) say how many of the disks' chunks, never "files"."""
    m = await block_client.migration_get("app01")
    text = show_text(m)
    assert "  round    1 initial: 1.0 GiB, 256 of 1024 chunk(s) sent, 300.0 s" in text
    assert "  round    2 incremental: 48.0 MiB, 12 of 1024 chunk(s) sent, 30.0 s" in text
    assert "changed    8.0 MiB in 2 of 1024 chunk(s) since the last round" in text
    assert "file(s)" not in text
    assert describe(m.rounds[-1]) == "round 2 (incremental): 48.0 MiB, 12 of 1024 chunk(s) sent, in 30.0 s"
    async with on_migration(block_client, "app01", count=1) as (app, pilot):
        detail = text_of(app, "#migration-detail")
        assert "sync    round 2 · last incremental: 48.0 MiB, 12 of 1024 chunk(s) sent in 30.0 s · 8.0 MiB changed since" \
            in detail, detail
        assert "file" not in detail
