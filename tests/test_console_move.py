"""Moving a VM to another host from the console (m, or the palette): a dialog lists the site's other
hosts with the engine's precheck of the move to each, and an allowed one, confirmed, becomes a
vm.move task.

Cheap on purpose: the built-in folder lab and stopped VMs (a stopped VM only changes host; the live
move is test_vm_move.py's)."""

from __future__ import annotations

import pytest
from textual.widgets import Button, OptionList

from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import ConfirmScreen
from ferry.console.dialogs.move import ASKING, MoveScreen
from ferry.engine.client import EngineClient
from ferry.engine.errors import Refused
from ferry.engine.taskmodel import TaskState
from harness.pilot import until
from test_console_vms import FIXED_CLOCK, engine_said, make_vm, modal_text, rows_of, vm_cell
from test_console_vms import client as vm_client

client = vm_client    # the fixture: an engine client on a short workspace path


def row(app: FerryApp, host: str) -> str:
    """A host's row in the move dialog, as shown."""
    return app.screen.query_one("#move-hosts", OptionList).get_option(host).prompt.plain


def answered(app: FerryApp) -> bool:
    return isinstance(app.screen, MoveScreen) and all(ASKING not in row(app, h) for h in ("lab2", "lab3"))


async def make_diskless(client: EngineClient, name: str) -> None:
    tid = await client.vm_task("vm.create", {"name": name, "host": "lab1", "cpus": 1, "memory_mb": 128,
                                             "disks": [], "nics": [{"network": "default"}]})
    info = await client.wait_task(tid, timeout=30)
    assert info.state == TaskState.SUCCEEDED, info.error


async def move_tasks(client: EngineClient) -> list:
    return [t for t in await client.list_tasks() if t.kind == "vm.move"]


async def test_a_stopped_vm_moves_to_the_host_chosen_in_the_dialog(client):
    await make_diskless(client, "web1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["web1"], what="web1's row")
        assert vm_cell(app, "web1", "host") == "lab1"
        await until(pilot, lambda: engine_said(app, app.vms_view), what="the engine's answer for web1")

        # the palette's entry opens the same dialog
        palette = {c.name: c for c in console_commands(app)}
        assert "VM: Move web1 to another host…" in palette
        palette["VM: Move web1 to another host…"].run()
        await until(pilot, lambda: isinstance(app.screen, MoveScreen), what="the move dialog from the palette")
        await pilot.press("escape")                       # esc: back, nothing done
        await until(pilot, lambda: not isinstance(app.screen, MoveScreen), what="closed")

        await pilot.press("m")
        await until(pilot, lambda: isinstance(app.screen, MoveScreen), what="the move dialog")
        await until(pilot, lambda: answered(app), what="the engine's answer for each host")
        assert "web1 is stopped: only its host changes" in modal_text(app, "#dialog-body")
        assert [h.id for h in app.screen.query_one("#move-hosts", OptionList).options] == ["lab2", "lab3"]
        assert row(app, "lab2") == "✔ lab2  web1 can move here" and row(app, "lab3").startswith("✔ lab3")
        assert not app.screen.query_one("#confirm", Button).disabled
        await pilot.press("enter")                        # lab2, the first
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        assert modal_text(app, "#dialog-body") == "web1 is stopped: it only changes host, lab1 to lab2."
        assert app.focused.id == "cancel"                 # the safe choice is the default
        await pilot.press("right", "enter")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="confirmed")
        await until(pilot, lambda: vm_cell(app, "web1", "host") == "lab2", what="the table shows web1 on lab2")
        assert (await client.vm_get("web1")).host == "lab2"
        [task] = await move_tasks(client)
        assert task.state == TaskState.SUCCEEDED and task.title == "move web1 to lab2"


async def test_hosts_without_the_vms_datastore_are_refused_with_the_engines_reason(client):
    db = await make_vm(client, "db1", "lab1")             # its disk on lab1-local, which only lab1 has
    assert db.disks[0].datastore == "lab1-local"
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["db1"], what="db1's row")
        await pilot.press("m")
        await until(pilot, lambda: answered(app), what="the engine's answer for each host")
        for host in ("lab2", "lab3"):
            with pytest.raises(Refused) as engine:        # what `ferry vm move db1 --to HOST` is told
                await client.precheck("vm.move", {"vm": "db1", "to": host})
            assert f"which host {host} does not have" in engine.value.message
            assert row(app, host).split() == ["✖", host, *engine.value.message.split()]
        await pilot.press("down")                         # lab3: its way out under the list
        await until(pilot, lambda: modal_text(app, "#move-hint").startswith("hint: list lab3 in "
                                                                           "[datastores.lab1-local]"),
                    what="the hint of lab3")
        await pilot.press("enter")                        # a refused host: says so, stays open
        await until(pilot, lambda: modal_text(app, "#form-error") == "db1 cannot move to lab3: its row says why",
                    what="the refusal")
        assert isinstance(app.screen, MoveScreen) and app.screen.query_one("#confirm", Button).disabled
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, MoveScreen), what="closed")
        assert not isinstance(app.screen, ConfirmScreen)
        assert await move_tasks(client) == [] and (await client.vm_get("db1")).host == "lab1"
