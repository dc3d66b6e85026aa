"""The migration wizard of the console (issue 13): `N` on the Migrations view opens one form that saves a
migration into its wave's plan file (TOML, tomli-w), checked by the engine as `ferry plan check` checks
it; a second migration saved into the same file keeps the first; a bad field shows its one-line problem
and writes nothing; a file of another wave is refused; "Apply now" records the plan and the view shows
the new migration with the cursor on it.

A real EngineClient on a throw-away workspace (the built-in folder lab, no config.toml); `ferry plan
check` is the real command line, whose engine service reads the same workspace.
"""

from __future__ import annotations

import asyncio
import tomllib

import pytest
from textual.widgets import Button, Input, Select, Static

from ferry.console.app import FerryApp
from ferry.console.dialogs.wizard import WizardScreen
from harness.cli import ferry, kill_engines
from harness.pilot import until
from test_console_vms import FIXED_CLOCK
from test_console_vms import client as vm_client

SIZE = (120, 32)


client = vm_client      # the fixture: an engine client on a throw-away workspace


@pytest.fixture(autouse=True)
def no_engine_left(client):
    """`ferry plan check` started the workspace's engine service (outside the test's tmp_path)."""
    yield
    kill_engines(client.workspace.root)


def status(screen: WizardScreen) -> str:
    visual = screen.query_one("#wizard-status", Static).render()
    return getattr(visual, "plain", str(visual))


def shown(app: FerryApp) -> list[str]:
    return [row.key.value for row in app.migrations_view.table.ordered_rows]


async def open_wizard(pilot, app: FerryApp) -> WizardScreen:
    await pilot.press("N")
    await until(pilot, lambda: isinstance(app.screen, WizardScreen), what="the wizard")
    return app.screen


def fill(screen: WizardScreen, **values: str) -> None:
    for key, value in values.items():
        widget = screen.query_one(f"#f-{key}")
        widget.value = value


async def save_with_enter(pilot, screen: WizardScreen) -> None:
    """Enter on the last field saves."""
    screen.query_one("#f-park_address", Input).focus()
    await pilot.press("enter")


async def plan_check(ws, path) -> tuple[int, str]:
    r = await asyncio.to_thread(ferry, ws, "plan", "check", str(path))
    return r.code, r.out + r.err


async def test_the_wizard_saves_a_checked_plan_keeps_the_first_migration_and_applies(client, tmp_path):
    ws = client.workspace.root
    key = tmp_path / "id_ed25519"
    key.write_text("not read by the check: only its presence\n")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: app.current_view == "migrations" and app.migrations_view.ok, what="the view")
        wiz = await open_wizard(pilot, app)
        path = ws / "plans" / "wave1.toml"
        assert wiz.query_one("#f-path", Input).value == str(path)      # the workspace's plans/<wave>.toml
        assert str(wiz.query_one("#f-host", Select).value) == "lab1"
        assert str(wiz.query_one("#f-datastore", Select).value) == "lab1-local"
        assert wiz.query_one("#apply", Button).disabled

        fill(wiz, name="web01", address="127.0.0.1", port="2222", user="admin", identity=str(key), method="file",
             services="nginx, cron", excludes="/tmp/*, /var/cache/apt/*", cpus="2", memory="2G", disks="20G, 50G",
             final_address="10.231.1.50/24", final_gateway="10.231.1.1", sync_interval="6h",
             park_address="10.231.1.99/24")
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: status(wiz).startswith("saved "), what="saved")
        assert f"saved {path}: web01 in wave wave1, no problems" in status(wiz)
        assert not wiz.query_one("#apply", Button).disabled

        doc = tomllib.loads(path.read_text())
        assert doc == {"wave": {"name": "wave1"}, "migrations": {"web01": {
            "method": "file", "excludes": ["/tmp/*", "/var/cache/apt/*"], "services": ["nginx", "cron"],
            "sync_interval": "6h",
            "source": {"address": "127.0.0.1", "port": 2222, "user": "admin", "identity": str(key)},
            "target": {"host": "lab1", "datastore": "lab1-local", "cpus": 2, "memory": "2G", "disks": ["20G", "50G"]},
            "final": {"address": "10.231.1.50/24", "gateway": "10.231.1.1"},
            "cutover": {"park_address": "10.231.1.99/24"}}}}
        assert await plan_check(ws, path) == (0, f"{path}: 1 migrations in wave wave1, no problems\n")
        assert sorted(p.name for p in path.parent.iterdir()) == ["wave1.toml"]      # no temporary file left

        # a second migration into the same file: the first one stays as it was
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, WizardScreen), what="closed")
        wiz = await open_wizard(pilot, app)
        fill(wiz, name="db01", address="127.0.0.2")
        await pilot.click("#save")
        await until(pilot, lambda: status(wiz).startswith("saved "), what="saved again")
        assert f"saved {path}: db01 in wave wave1, kept web01, no problems" in status(wiz)
        again = tomllib.loads(path.read_text())
        assert again["migrations"]["web01"] == doc["migrations"]["web01"]
        assert again["migrations"]["db01"] == {"method": "auto", "source": {"address": "127.0.0.2", "port": 22,
                                               "user": "root"}, "target": {"host": "lab1", "datastore": "lab1-local"}}
        assert await plan_check(ws, path) == (0, f"{path}: 2 migrations in wave wave1, no problems\n")
        assert shown(app) == []                         # saved, not applied

        await pilot.click("#apply")
        await until(pilot, lambda: not isinstance(app.screen, WizardScreen), what="applied and closed")
        await until(pilot, lambda: shown(app) == ["db01", "web01"], what="both migrations listed")
        await until(pilot, lambda: app.migrations_view.selected == "db01", what="the cursor on the new one")
        assert (await client.migration_get("db01")).spec.source.address == "127.0.0.2"
        assert (await client.migration_get("web01")).spec.source.port == 2222


async def test_a_bad_field_shows_its_one_line_problem_and_writes_nothing(client):
    ws = client.workspace.root
    path = ws / "plans" / "wave1.toml"
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: app.current_view == "migrations" and app.migrations_view.ok, what="the view")
        wiz = await open_wizard(pilot, app)
        fill(wiz, host="lab2")                          # the datastores offered follow the host
        await until(pilot, lambda: wiz.query_one("#f-datastore", Select).value == "lab2-local", what="lab2's")
        fill(wiz, host="lab1")
        await until(pilot, lambda: wiz.query_one("#f-datastore", Select).value == "lab1-local", what="lab1's")
        fill(wiz, name="web01", address="127.0.0.1", port="abc")
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: "nothing was written" in status(wiz), what="the problem")
        problem = status(wiz).splitlines()[0]
        assert problem.startswith(f"{path}:") and problem.endswith(
            ": migrations.web01.source.port: must be an integer, got 'abc' (hint: for example: port = 22)"), problem
        assert not (ws / "plans").exists()              # no file, no folder, no temporary file
        assert wiz.query_one("#apply", Button).disabled

        fill(wiz, port="22")                            # mended: saved
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: status(wiz).startswith("saved "), what="saved")
        saved = path.read_bytes()

        # into the same file, a migration with a bad memory size: the file stays as it was
        fill(wiz, name="db01", address="127.0.0.2", memory="lots")
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: "nothing was written" in status(wiz), what="the second problem")
        assert "migrations.db01.target.memory: is not a size: 'lots'" in status(wiz)
        assert path.read_bytes() == saved and sorted(p.name for p in path.parent.iterdir()) == ["wave1.toml"]

        # a file of another wave: refused in one line naming the file and both waves
        fill(wiz, wave="wave2", memory="")
        await until(pilot, lambda: wiz.query_one("#f-path", Input).value == str(ws / "plans" / "wave2.toml"),
                    what="the plan file following the wave")
        fill(wiz, path=str(path))
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: "holds wave" in status(wiz), what="refused")
        assert status(wiz).startswith(f"{path} holds wave 'wave1', not wave 'wave2' (hint: ")
        assert path.read_bytes() == saved

        # a missing required field, before the engine is asked
        fill(wiz, wave="wave1", address="")
        await save_with_enter(pilot, wiz)
        await until(pilot, lambda: status(wiz) == "Source: required", what="required")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, WizardScreen), what="closed")
        assert shown(app) == [] and await client.migration_list() == []
