"""The Migrations view of the console (issue 13): every migration of the workspace with its state,
the selected one's details, `/` by wave, the assessment report (refused before an assessment), the
override of a network check through its dialog (recorded and audited), and `a` submitting the
assessment as a task the Tasks view shows.

A real EngineClient on a throw-away workspace (the built-in folder lab), two plan files applied by
the engine. No assessment succeeds here (that takes an SSH source: test_migration_assess_cli.py):
the one `a` starts asks a port nothing listens on, and fails at once.
"""

from __future__ import annotations

import contextlib
import shutil
import textwrap

import pytest
from textual.widgets import Input, Markdown, Static

from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.report import ReportScreen
from ferry.console.dialogs.vmforms import FormScreen
from ferry.engine.api import MigrationState
from ferry.engine.taskmodel import TaskState
from harness.pilot import text_of, until
from harness.sshd import free_port
from test_console_vms import FIXED_CLOCK, new_client, notes, short_dir

SIZE = (160, 30)


def plan(wave: str, name: str, port: int = 22) -> str:
    return textwrap.dedent(f"""\
        [wave]
        name = "{wave}"
        [migrations.{name}]
        method = "file"
        [migrations.{name}.source]
        address = "127.0.0.1"
        port = {port}
        [migrations.{name}.target]
        host = "lab1"
        datastore = "lab1-local"
        network = "default"
        """)


@pytest.fixture
async def client():
    """An engine client with web01 (wave1) and db01 (wave2, its source a port nothing listens on) planned."""
    root = short_dir()
    c = new_client(root / "ws")
    await c.start()
    try:
        for wave, name, port in (("wave1", "web01", 22), ("wave2", "db01", free_port())):
            f = root / f"{wave}.toml"
            f.write_text(plan(wave, name, port))
            await c.plan_apply(str(f))
        yield c
    finally:
        await c.close()
        shutil.rmtree(root, ignore_errors=True)


def cells(app: FerryApp, name: str) -> list[str]:
    """The row of migration `name` as shown, one string per column."""
    table = app.migrations_view.table
    return [c.plain.strip() for c in table.get_row(name)]


def shown(app: FerryApp) -> list[str]:
    """The migrations listed, top to bottom."""
    return [row.key.value for row in app.migrations_view.table.ordered_rows]


async def select(pilot, app: FerryApp, name: str) -> None:
    for _ in range(5):
        if app.migrations_view.selected == name:
            return
        await pilot.press("j")
        await pilot.pause()
    raise AssertionError(f"{name} not reached")


@contextlib.asynccontextmanager
async def on_migration(client, name: str):
    """The console with the Migrations view open (key 6) and the cursor on `name`; yields (app, pilot)."""
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: app.current_view == "migrations" and len(shown(app)) == 2, what="two migrations")
        await select(pilot, app, name)
        yield app, pilot


async def test_the_view_lists_every_migration_with_its_state_and_filters_by_wave(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("colon", *"migrations", "enter")
        await until(pilot, lambda: app.current_view == "migrations" and len(shown(app)) == 2, what="two migrations")
        header = [str(c.label).strip() for c in app.migrations_view.table.columns.values()]
        assert header[:7] == ["NAME ▲", "WAVE", "STATE", "ROUND", "LAST SYNC", "NETWORK", "BLOCKERS"]
        assert header[7:] == ["DATA CHANGED", "PREDICTED DOWNTIME"]
        assert shown(app) == ["db01", "web01"]
        assert cells(app, "web01") == ["web01", "wave1", "○ planned", "0", "-", "-", "0", "-", "-"]
        assert cells(app, "db01")[:3] == ["db01", "wave2", "○ planned"]
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
