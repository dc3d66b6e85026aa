"""The console's Backups view (issue 14, F5): the backups here with their checksum, the backup schedules
and the retention settings; `b` backs up now (the archive on disk and in the list), `p` shows the
engine's prune dry run and removes nothing until Prune is pressed (Cancel is the default), `R` asks
for the backup's id typed (a wrong one refuses and starts nothing) and restores through
`ferry backup restore` run as a child process, the engine stopped and started again and the console
attached again by itself; the Overview's Backups tile opens the view.

A real EngineClient on a throw-away workspace for the view's flows; a real engine service (RemoteEngine,
as `ferry` opens the console) for the restore.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import Button, Input, Static

from ferry.console.app import FIRST_VIEW, FerryApp
from ferry.console.dialogs.modals import ConfirmScreen
from ferry.console.dialogs.vmforms import FormScreen, TypedNameScreen
from ferry.console.views.backups import restore_argv
from ferry.engine import fmt
from ferry.engine.config import ScheduleSpec
from ferry.engine.ops import backup as bk
from ferry.engine.ops.backupconfig import DEFAULT_KEEP, BackupSettings
from ferry.engine.workspace import Workspace
from harness.pilot import text_of, until
from test_console_overview import focus_tile
from test_console_vms import FIXED_CLOCK, lab_client, notes

SIZE = (160, 40)
DAY = 86400.0
T0 = 1_800_000_000.0          # 2027-01-15 08:00 UTC


@pytest.fixture
async def client():
    """The lab site with a nightly backup schedule and [backup.keep] daily = 1."""
    def nightly(site):
        return replace(site, schedules={"nightly": ScheduleSpec("nightly", "daily 02:00", "0 2 * * *",
                                                                "backup daily")},
                       backup=BackupSettings(keep={**DEFAULT_KEEP, "daily": 1}))
    async with lab_client(nightly) as c:
        yield c


def rows(app: FerryApp) -> dict[str, list[str]]:
    table = app.backups_view.table
    return {row.key.value: [c.plain.strip() for c in table.get_row(row.key.value)] for row in table.ordered_rows}


def archives(client) -> set[str]:
    """The backups on disk: their ids."""
    d = bk.local_dir(client.workspace.root, client.site)
    return {p.name.split("-", 2)[2].removesuffix(".tar.gz") for p in d.glob("ferry-*.tar.gz")} if d.exists() else set()


async def test_backup_now_from_the_view_is_on_disk_and_listed_with_the_schedule_and_retention(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view=FIRST_VIEW)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("9")
        view = app.backups_view
        await until(pilot, lambda: app.current_view == "backups" and view.ok, what="the Backups view asked")
        assert "no backups yet: b backs up now" in text_of(app, "#backups-status")
        detail = text_of(app, "#backups-detail")
        assert "nightly: daily 02:00 → backup daily · next " in detail and "never ran" in detail
        assert "retention hourly 24 · daily 1 · weekly 4 · monthly 2 · manual 7 · before-restore 5 · remote 30" \
            in detail

        await pilot.press("b")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="where to back up")
        await pilot.click("#confirm")               # the default: here
        await until(pilot, lambda: any(n.startswith("backup ") for n in notes(app)), timeout=60, what="done, said")
        [made] = archives(client)
        assert made.endswith("-manual") and any(n.startswith(f"backup {made}: ") for n in notes(app))
        await until(pilot, lambda: f"local\t{made}" in rows(app), what="listed")
        assert rows(app)[f"local\t{made}"][1:3] == ["local", "manual"]
        assert rows(app)[f"local\t{made}"][5] == "✔ verified"
        assert "1 backup in 1 place" in text_of(app, "#backups-status")
        assert f"{made} local · manual" in text_of(app, "#backups-detail")
        await pilot.press("0")          # the Overview, which asked before: its tile has it without waiting
        await until(pilot, lambda: "last backup" in text_of(app, "#tile-backups"), what="the tile says it")
        assert "manual · local · " in text_of(app, "#tile-backups") and "1 kept" in text_of(app, "#tile-backups")


async def test_prune_shows_the_dry_run_and_removes_nothing_until_prune_is_pressed(client):
    ws = client.workspace.root
    made = [bk.make_archive(ws, client.site, "daily", T0 + i * DAY).id for i in range(3)]
    assert archives(client) == set(made)
    expected = (await client.backup_prune(True)).backups
    assert [b.id for b in expected] == made[:2]             # daily = 1: the two oldest would go

    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="backups")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(rows(app)) == 3, what="three backups")
        assert [k.split("\t")[1] for k in rows(app)] == made[::-1]         # the newest first
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the prune preview")
        body = str(app.screen.query_one("#dialog-body", Static).render())
        assert [line.split()[1] for line in body.splitlines() if line.startswith("local ")] == made[:2]
        assert app.focused is app.screen.query_one("#cancel", Button)
        await pilot.press("enter")                  # the default: Cancel
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="closed")
        assert archives(client) == set(made)

        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the prune preview again")
        await pilot.click("#confirm")
        await until(pilot, lambda: any(n.startswith("pruned 2 backups") for n in notes(app)), what="pruned, said")
        assert archives(client) == {made[2]}
        await until(pilot, lambda: list(rows(app)) == [f"local\t{made[2]}"], what="the list without them")


async def test_restore_needs_the_typed_id_and_a_console_of_the_engine_service(client):
    made = bk.make_archive(client.workspace.root, client.site, "daily", T0)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="backups")
    async with app.run_test(size=SIZE) as pilot:
        view = app.backups_view
        await until(pilot, lambda: view.selected == f"local\t{made.id}", what="the backup selected")
        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="the restore dialog")
        dialog = app.screen
        body = str(dialog.query_one("#dialog-body", Static).render())
        for said in ("tasks must be idle", "The engine is stopped, and started again",
                     "The current state is backed up first"):
            assert said in body, said
        dialog.query_one("#typed", Input).value = made.id[:-1]         # one letter short
        await pilot.press("enter")
        await until(pilot, lambda: f"type the backup's id exactly: {made.id}" in
                    str(dialog.query_one("#form-error", Static).render()), what="refused")
        assert dialog.query_one("#confirm", Button).disabled and app.screen is dialog
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is not dialog, what="closed")
        assert view.restores == [] and archives(client) == {made.id}     # nothing ran, nothing backed up first

        # the id typed: a console whose engine runs in its own process cannot stop it, and says so
        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="the restore dialog again")
        app.screen.query_one("#typed", Input).value = made.id
        await pilot.press("enter")
        await until(pilot, lambda: any("runs the engine in its own process" in n for n in notes(app)),
                    what="the refusal")
        assert any(f"ferry backup restore {made.id} --confirm {made.id}" in n for n in notes(app))
        assert view.restores == [] and archives(client) == {made.id}

    remote = replace(made, where="remote offsite")
    assert restore_argv(Path("/w"), made) == [sys.executable, "-m", "ferry.console.cli", "--workspace", "/w", "backup",
                                              "restore", made.id, "--confirm", made.id, "--json"]
    assert restore_argv(Path("/w"), remote)[-5:] == ["--confirm", made.id, "--remote", "offsite", "--json"]


async def test_the_overview_backups_tile_opens_the_backups_view(client):
    made = bk.make_archive(client.workspace.root, client.site, "daily", T0)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view=FIRST_VIEW)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "last backup" in text_of(app, "#tile-backups"), what="the tile")
        assert app.overview.tile_widget("backups").border_title == "Backups (9)"
        await focus_tile(pilot, app, "backups")
        await pilot.press("enter")
        await until(pilot, lambda: app.current_view == "backups" and f"local\t{made.id}" in rows(app),
                    what="the Backups view with the backup")
        assert "backups" in text_of(app, "#crumbs")
        await pilot.pause()
        table = app.backups_view.table.region
        row = [strip.text for strip in app.screen._compositor.render_strips()][table.y + 1]     # under the header
        assert row.lstrip().startswith(made.id), row
        assert f"{fmt.stamp(made.created)} " in row and "✔ verified" in row      # at 80 columns, not cut


async def test_restore_from_the_console_runs_ferry_backup_restore_and_the_console_attaches_again(tmp_path):
    from ferry.engine.remote import RemoteEngine
    from test_ops_backup import workspace

    ws = Workspace(workspace(tmp_path))
    client = RemoteEngine(ws, client="console", reconnect=True, site=ws.load_config())
    app = FerryApp(client, own_client=True, clock=lambda: FIXED_CLOCK, first_view="backups")
    async with app.run_test(size=SIZE) as pilot:
        view = app.backups_view
        await until(pilot, lambda: client.engine_state == "running" and view.ok, timeout=60, what="attached")
        kept = await client.silence_add({"type": "test.*"}, 86400, "kept in the backup")
        await pilot.press("b")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="where to back up")
        await pilot.click("#confirm")
        await until(pilot, lambda: len(view.backups) == 1, timeout=60, what="the backup listed")
        [made] = view.backups.values()
        await client.silence_remove(kept.id)
        assert await client.silence_list() == []
        first = client.engine_pid

        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="the restore dialog")
        app.screen.query_one("#typed", Input).value = made.id
        await pilot.press("enter")
        await until(pilot, lambda: any(n.startswith(f"restored backup {made.id}") for n in notes(app)), timeout=120,
                    what="the restore said")
        said = next(n for n in notes(app) if n.startswith(f"restored backup {made.id}"))
        assert "the engine started again" in said and "before it is backup " in said
        assert view.restores == [restore_argv(ws.root, made)]
        await until(pilot, lambda: client.engine_state == "running" and client.engine_pid != first, timeout=60,
                    what="the console attached to the engine started again")
        assert [(s.id, s.reason) for s in await client.silence_list()] == [(kept.id, "kept in the backup")]
        await until(pilot, lambda: {b.kind for b in view.backups.values()} == {"manual", "before-restore"},
                    timeout=60, what="the state before it, backed up first, listed")
