"""VMs in the console: the tree shows them under their host, the detail pane their hardware,
and the keys act on them through real engine tasks.

A real EngineClient on a throw-away workspace (the built-in lab, local transport). The VMs are
made by the engine's own vm.create with 16 MiB disks and never booted (booting is tested in
test_vm.py): records and real qcow2 files, stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.widgets import Button, DataTable, Input, Select, Static, Tree

from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import ConfirmScreen, HelpScreen
from ferry.console.dialogs.vmforms import FormScreen, TypedNameScreen
from ferry.engine.api import AgentReport, AgentState, VMState, VMView
from ferry.engine.client import EngineClient
from ferry.engine.config import lab_config
from ferry.engine.errors import Refused
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.pilot import text_of, until
from harness.waiting import until as wait_until

FIXED_CLOCK = time.mktime((2024, 5, 17, 9, 30, 0, 0, 0, -1))


def new_client(root: Path) -> EngineClient:
    ws = Workspace(root)
    return EngineClient(ws, lab_config(ws.root), adopt=False)


def short_dir() -> Path:
    """A short path: QEMU's UNIX sockets live under the workspace and their paths are limited."""
    return Path(tempfile.mkdtemp(prefix="fv", dir="/tmp"))


@contextlib.asynccontextmanager
async def lab_client(site_of: Callable[[Any], Any] | None = None, *, under: str = "ws"):
    """A started EngineClient on the built-in lab of a throw-away short folder (its workspace `under`
    it), closed and the folder removed after; `site_of(site)` changes the lab's site first."""
    root = short_dir()
    ws = Workspace(root / under)
    site = lab_config(ws.root)
    c = EngineClient(ws, site_of(site) if site_of else site, adopt=False)
    await c.start()
    try:
        yield c
    finally:
        await c.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def client():
    async with lab_client(under="") as c:
        yield c


FIXED_MACS = {"web1": "52:00:00:00:00:01", "db1": "52:00:00:00:00:02", "tpl1": "52:00:00:00:00:03"}


async def make_vm(client: EngineClient, name: str, host: str = "lab1", *, template: bool = False) -> VMView:
    tid = await client.vm_task("vm.create", {"name": name, "host": host, "cpus": 2, "memory_mb": 128,
                                             "disks": [{"size": "16M"}],
                                             # a fixed MAC: the detail pane shows it, snapshots compare it
                                             "nics": [{"network": "default", "mac": FIXED_MACS.get(name, "")}]})
    info = await client.wait_task(tid, timeout=30)
    assert info.state == TaskState.SUCCEEDED, info.error
    if template:
        info = await client.wait_task(await client.vm_task("vm.convert", {"vm": name, "to": "template"}), timeout=30)
        assert info.state == TaskState.SUCCEEDED, info.error
    return await client.vm_get(name)


def modal_text(app: FerryApp, selector: str) -> str:
    visual = app.screen.query_one(selector, Static).render()
    return getattr(visual, "plain", str(visual))


def labels_under(app: FerryApp, host: str) -> list[str]:
    return [str(n.label) for n in app.inventory._host_nodes[host].children]


def notes(app: FerryApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def names_are(client: EngineClient, expected: set[str], **kw) -> bool:
    return {v.name for v in await client.vm_list(**kw)} == expected


async def made(client: EngineClient, name: str) -> bool:
    """The VM exists and its task finished making it (a record being made shows as incomplete)."""
    return any(v.name == name and v.state is VMState.STOPPED for v in await client.vm_list())


@contextlib.asynccontextmanager
async def on_new_vm(client: EngineClient, name: str = "web1", host: str = "lab1"):
    """The console at 80x24, the cursor on a stopped VM just made; yields (app, pilot)."""
    await make_vm(client, name, host)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: labels_under(app, host) == [f"■ {name}"], what=f"{name} under {host}")
        await go_to(pilot, app, name)
        yield app, pilot


def engine_said(app: FerryApp, view: Any = None) -> bool:
    """The engine has said which actions apply to the VM under the view's cursor (the keys are dimmed by it)."""
    view = view or app.inventory
    vm = view.cursor_vm()
    return vm is not None and view.checks_of(vm) is not None and view.vm_checks[vm.id][0] == vm


@contextlib.contextmanager
def stand_in_qemu(client: EngineClient, vm: VMView):
    """A test double for a running VM: a process (not QEMU: booting one is test_vm.py's job) whose pid
    file and command line are those the engine looks for, so the engine sees the VM running."""
    pidfile = Path(client.site.hosts[vm.host].runtime) / f"vm-{vm.id[:8]}.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(pidfile)])
    pidfile.write_text(f"{proc.pid}\n")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        pidfile.unlink(missing_ok=True)


async def go_to(pilot, app: FerryApp, name: str) -> None:
    """Move the tree cursor with the arrow keys until it rests on `name` (the way an operator does)."""
    tree = app.query_one("#tree", Tree)
    for _ in range(40):
        if app.inventory.selected.name == name:
            return
        lines = [tree.get_node_at_line(i) for i in range(tree.last_line + 1)]
        target = next((n.line for n in lines if n is not None and isinstance(n.data, type(app.inventory.selected))
                       and n.data.name == name), None)
        assert target is not None, f"{name} is not shown in the tree"
        await pilot.press("down" if target > tree.cursor_line else "up")
        await pilot.pause()
    raise AssertionError(f"{name} not reached in the tree; cursor on {tree.cursor_node}")


# ---------------------------------------------------------------------------------- tree and detail


async def test_vms_show_under_their_host_with_their_hardware(client):
    web = await make_vm(client, "web1", "lab1")
    await make_vm(client, "tpl1", "lab2", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"], what="web1 under lab1")
        assert labels_under(app, "lab2") == ["◇ tpl1"]           # a template: ◇, not a colour alone
        await go_to(pilot, app, "lab1")
        assert "1 VM" in text_of(app, "#detail-body")

        await go_to(pilot, app, "web1")
        assert text_of(app, "#crumbs").endswith("lab1 › web1")
        detail = text_of(app, "#detail-body")
        assert "web1  ■ stopped  VM" in detail
        assert "CPUs       2" in detail and "Memory     128 MiB" in detail
        assert "disk0 16.0 MiB virtio on lab1-local" in detail
        assert "NICs       default" in detail and "Boot       disk, live" in detail
        assert "the VM is not running" in detail                   # no agent asked for a stopped VM
        # which keys apply is the engine's answer (vm_actions), listed with its reasons
        await until(pilot, lambda: "x X r h: web1 is not running (stopped)" in text_of(app, "#detail-body"),
                    what="the engine's answer in the detail")
        assert "s start" in text_of(app, "#detail-body")
        assert os.path.getsize(web.disks[0].path) > 0             # the qcow2 the engine made is real

        # a VM appearing above the cursor (sorted before it) does not move the cursor off web1
        await make_vm(client, "a0", "lab1")
        app.inventory.refresh_vms()
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ a0", "■ web1"], what="a0 added")
        tree = app.query_one("#tree", Tree)
        assert tree.cursor_node.data.name == "web1" and app.inventory.selected.name == "web1"

        # keys and palette
        await until(pilot, lambda: engine_said(app), what="the engine's answer for web1")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        shown = "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))
        for text in ("Start the selected VM", "Power the selected VM off", "Delete the selected VM",
                     "Make VMs from the selected template", "Export", "Import", "recycle bin"):
            assert text in shown, text
        await pilot.press("escape")
        palette = [c.name for c in console_commands(app)]
        assert "VM: Start web1" in palette and "VM: Delete web1…" in palette and "VM: create…" in palette
        assert not any(n.startswith("VM: Deploy") for n in palette)   # web1 is no template
        assert not any("Shut down web1" in n for n in palette)        # nor running


async def test_start_on_a_template_is_refused_with_the_reason(client):
    await make_vm(client, "tpl1", "lab2", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab2") == ["◇ tpl1"], what="tpl1 under lab2")
        await go_to(pilot, app, "tpl1")
        inv = app.inventory
        await until(pilot, lambda: engine_said(app), what="the engine's answer for tpl1")
        assert inv.check_action("vm_start", ()) is None             # dimmed in the footer
        assert inv.check_action("vm_deploy", ()) is True
        await pilot.press("s")
        await until(pilot, lambda: any("a template never starts" in n for n in notes(app)), what="refusal")
        assert "a template never starts" in text_of(app, "#detail-body")
        # The reason is the engine's own: asked to start it (as `ferry vm start` does), the engine refuses
        # with the same words before it makes a task.
        with pytest.raises(Refused) as refused:
            await client.vm_task("vm.start", {"vm": "tpl1"})
        assert refused.value.message == "tpl1 is a template, and a template never starts"
        assert any(n.startswith(refused.value.message) for n in notes(app))
        assert f"s: {refused.value.message}" in text_of(app, "#detail-body")
        assert not [t for t in await client.list_tasks() if t.kind == "vm.start"]   # nothing was submitted
        # a VM-only key on a host says what to select
        await pilot.press("up")
        await pilot.press("x")
        await until(pilot, lambda: any("select a VM or template" in n for n in notes(app)), what="select a VM")


# ---------------------------------------------------------------------------------- actions


async def test_delete_needs_the_name_typed(client):
    web = await make_vm(client, "web1", "lab1")
    disk = web.disks[0].path
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"], what="web1 under lab1")
        await go_to(pilot, app, "web1")
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="delete dialog")
        confirm = app.screen.query_one("#confirm", Button)
        assert app.focused is app.screen.query_one("#typed", Input)
        assert confirm.disabled
        await pilot.press(*"web")
        await pilot.press("enter")                       # not the name yet: enter does nothing but say so
        await pilot.pause()
        assert isinstance(app.screen, TypedNameScreen) and confirm.disabled
        assert "type the name exactly" in modal_text(app, "#form-error")
        await pilot.press("2")
        assert confirm.disabled                           # web2 is not web1
        await pilot.press("backspace", "1")
        assert not confirm.disabled
        await pilot.click("#confirm")
        await until(pilot, lambda: not isinstance(app.screen, TypedNameScreen), what="dialog closed")
        await until(pilot, lambda: any("delete web1" in n for n in notes(app)), what="task notification")
        await until(pilot, lambda: names_are(client, set()), what="web1 gone from the engine")
        assert not os.path.exists(disk)
        await until(pilot, lambda: labels_under(app, "lab1") == [], what="web1 gone from the tree")
        await until(pilot, lambda: app.inventory.selected.name == "lab1", what="cursor back on the host")
        assert any(t.kind == "vm.delete" and t.state == TaskState.SUCCEEDED for t in app.feed.tasks.values())


async def test_create_through_the_dialog_on_the_selected_host(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await go_to(pilot, app, "lab2")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="create dialog")
        form = app.screen
        assert form.query_one("#f-host", Select).value == "lab2"     # preset to the selected host
        form.query_one("#f-name", Input).value = "bad name"
        await pilot.press("enter")                          # the engine's precheck says why, in the form
        await until(pilot, lambda: "VM name 'bad name' is not valid" in modal_text(app, "#form-error"),
                    what="the engine's refusal in the form")
        assert isinstance(app.screen, FormScreen) and "hint: use 1-63 letters" in modal_text(app, "#form-error")
        form.query_one("#f-name", Input).value = "new1"
        form.query_one("#f-disk", Input).value = "16M"
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="dialog closed")
        # made: its record is there from the start (reserved, incomplete), stopped once its disk is
        await until(pilot, lambda: made(client, "new1"), what="new1 made", timeout=60)
        vm = await client.vm_get("new1")
        assert vm.host == "lab2" and vm.cpus == 1 and vm.disks[0].size == 16 << 20
        assert os.path.exists(vm.disks[0].path)
        await until(pilot, lambda: labels_under(app, "lab2") == ["■ new1"], what="new1 in the tree")
        await until(pilot, lambda: any("create new1 done" in n for n in notes(app)), what="done notification")


async def test_recycle_bin_and_restore(client):
    async with on_new_vm(client) as (app, pilot):
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="delete dialog")
        app.screen.query_one("#mode", Select).value = "delayed"
        await pilot.pause()
        assert not app.screen.query_one("#keep", Input).disabled
        await pilot.press(*"web1", "enter")
        await until(pilot, lambda: names_are(client, {"web1"}, recycled=True), what="web1 in the bin")
        await until(pilot, lambda: app.inventory._bin_node is not None, what="recycle bin node")
        assert "recycle bin (1)" in str(app.inventory._bin_node.label)
        await go_to(pilot, app, "recycle bin")
        await pilot.press("enter")                        # open it
        await go_to(pilot, app, "web1")
        assert app.inventory.selected.kind == "recycled"
        assert "in the recycle bin" in text_of(app, "#detail-body")
        await until(pilot, lambda: engine_said(app), what="the engine's answer for web1 in the bin")
        await pilot.press("s")                            # nothing but restore and purge applies
        await until(pilot, lambda: any("restore it first" in n for n in notes(app)), what="refusal")
        await pilot.press("u")
        await until(pilot, lambda: names_are(client, {"web1"}), what="web1 restored")
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"] and app.inventory._bin_node is None,
                    what="back under lab1, bin gone")
        await until(pilot, lambda: app.inventory.selected.kind == "site", what="cursor on the site")  # the bin went


async def test_force_stop_asks_first_and_defaults_to_back(client):
    async with on_new_vm(client) as (app, pilot):
        await until(pilot, lambda: engine_said(app), what="the engine's answer for web1")
        await pilot.press("X")
        await until(pilot, lambda: any("web1 is not running" in n for n in notes(app)), what="refusal")
        assert not isinstance(app.screen, ConfirmScreen)

        with stand_in_qemu(client, app.inventory.cursor_vm()):
            app.inventory.refresh_vms()
            await until(pilot, lambda: labels_under(app, "lab1") == ["▶ web1"], what="label follows the state")
            await until(pilot, lambda: app.inventory.check_action("vm_force_stop", ()) is True, what="X applies")
            assert app.inventory.check_action("vm_start", ()) is None
            # the selected running VM's agent is asked (for real: nothing answers on its channel, and it says so)
            await until(pilot, lambda: "web1 has no guest-agent channel" in text_of(app, "#detail-body"),
                        what="agent answer in the detail")
            assert "Agent      ◆ not running" in text_of(app, "#detail-body")
            await pilot.press("X")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="force stop confirmation")
            assert app.focused.id == "cancel"                 # the safe choice is the default
            await pilot.press("enter")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="closed")
            await pilot.pause(0.2)
            assert not [t for t in await client.list_tasks() if t.kind == "vm.shutdown"]


async def test_a_key_asks_the_engine_before_its_dialog_opens(client):
    """x (safe shutdown) on a VM whose guest agent does not answer: the key applies to a running VM, and
    the engine's precheck of that very shutdown refuses it; the console says the engine's words and way
    out, and opens no confirmation."""
    async with on_new_vm(client) as (app, pilot):
        with stand_in_qemu(client, app.inventory.cursor_vm()):
            app.inventory.refresh_vms()
            await until(pilot, lambda: labels_under(app, "lab1") == ["▶ web1"], what="web1 running")
            await until(pilot, lambda: app.inventory.check_action("vm_stop", ()) is True, what="x applies to it")
            with pytest.raises(Refused) as engine:
                await client.precheck("vm.shutdown", {"vm": "web1", "mode": "powerdown"})
            await pilot.press("x")
            await until(pilot, lambda: any(n.startswith(engine.value.message) for n in notes(app)),
                        what="the engine's refusal")
            note = next(n for n in app._notifications if str(n.message).startswith(engine.value.message))
            assert f"hint: {engine.value.hint}" in str(note.message) and note.severity == "warning"
            assert "cannot shut down web1 safely" in engine.value.message and "--force" in engine.value.hint
            await pilot.pause(0.2)
            assert not isinstance(app.screen, ConfirmScreen)
            assert not [t for t in await client.list_tasks() if t.kind == "vm.shutdown"]


async def test_deploy_convert_export_and_import_through_dialogs(client):
    await make_vm(client, "tpl1", "lab2", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab2") == ["◇ tpl1"], what="tpl1 under lab2")
        await go_to(pilot, app, "tpl1")
        await pilot.press("d")                             # deploy: two linked clones
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="deploy dialog")
        app.screen.query_one("#f-pattern", Input).value = "w-##"
        app.screen.query_one("#f-count", Input).value = "2"
        await pilot.press("enter")
        await until(pilot, lambda: names_are(client, {"tpl1", "w-01", "w-02"}), what="deployed")
        await until(pilot, lambda: labels_under(app, "lab2") == ["■ w-01", "■ w-02", "◇ tpl1"], what="in the tree")
        tpl_disk = (await client.vm_get("tpl1")).disks[0].path
        assert (await client.vm_get("w-01")).disks[0].backing == tpl_disk
        await go_to(pilot, app, "w-01")
        assert "linked to tpl1/disk0.qcow2" in text_of(app, "#detail-body")
        assert "Origin     tpl1" in text_of(app, "#detail-body")

        await pilot.press("up")
        assert app.inventory.selected.name == "lab2"
        await go_to(pilot, app, "tpl1")
        await until(pilot, lambda: "linked clones" in (app.inventory.vm_refusal("vm_convert") or ""),
                    what="convert refused while w-01/w-02 hang on it")

        await go_to(pilot, app, "w-02")
        await pilot.press("t")                             # convert the VM to a template, after a confirmation
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="convert confirmation")
        await pilot.click("#confirm")
        await until(pilot, lambda: labels_under(app, "lab2") == ["■ w-01", "◇ tpl1", "◇ w-02"], what="w-02 a template")
        await until(pilot, lambda: app.query_one("#tree", Tree).cursor_node.data.name == "w-02",
                    what="the cursor moved with it")

        await pilot.press("e")                             # export w-02 (the cursor stayed on it) as an OVA
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="export dialog")
        assert app.screen.query_one("#f-out", Input).value == "/var/tmp/w-02.ova"
        app.screen.query_one("#f-out", Input).value = "/nonexistent-ferry-dir/w-02.ova"
        await pilot.press("enter")                         # the engine's precheck refuses it: the form says why
        await until(pilot, lambda: "folder /nonexistent-ferry-dir does not exist on lab2" in modal_text(app, "#form-error"),
                    what="the engine's refusal in the form")
        assert "hint:" in modal_text(app, "#form-error") and isinstance(app.screen, FormScreen)
        assert not [t for t in await client.list_tasks() if t.kind == "vm.export"], "a refusal makes no task"
        out = str(Path(client.workspace.root) / "w-02.ova")
        app.screen.query_one("#f-out", Input).value = out  # corrected in the same dialog
        await pilot.press("enter")
        await until(pilot, lambda: os.path.exists(out) and any("export w-02" in n and "done" in n for n in notes(app)),
                    what="package written", timeout=30)

        await pilot.press("i")                             # and import it on lab3 under another name
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="import dialog")
        app.screen.query_one("#f-path", Input).value = out
        app.screen.query_one("#f-host", Select).value = "lab3"
        app.screen.query_one("#f-name", Input).value = "imp1"
        await pilot.press("enter")
        await until(pilot, lambda: labels_under(app, "lab3") == ["◇ imp1"], what="imported template on lab3",
                    timeout=30)


async def test_reconcile_on_start_reports_missing_vms(client):
    from ferry.engine.vm.service import VMService
    vm = await make_vm(client, "web1", "lab1")
    # recorded as running, but no QEMU process: what a host reboot leaves behind
    await VMService.of(client.engine).update(vm.id, state=VMState.RUNNING)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: any("recorded as running but gone: web1 on lab1" in n for n in notes(app)),
                    what="reconcile notification")
        await until(pilot, lambda: labels_under(app, "lab1") == ["✖ web1"], what="web1 shown missing")
        await go_to(pilot, app, "web1")
        assert "its QEMU process is gone" in text_of(app, "#detail-body")
        await until(pilot, lambda: engine_said(app), what="the engine's answer for web1")
        assert app.inventory.check_action("vm_start", ()) is True      # starting it again is the way out


async def test_vm_polls_never_overlap_and_stop_while_hidden(client):
    from ferry.console.poller import VMPoller
    inflight = most = 0
    shown = True

    async def fetch():
        nonlocal inflight, most
        inflight += 1
        most = max(most, inflight)
        try:
            return await client.vm_list(), await client.vm_list(recycled=True)
        finally:
            inflight -= 1

    updates = []
    poller = VMPoller(fetch, updates.append, interval=0.05, active=lambda: shown)
    runner = asyncio.create_task(poller.run())
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            poller.poke()
            await asyncio.sleep(0.002)
        assert most == 1 and poller.polls >= 3 and all(u.ok for u in updates)
        shown = False
        await wait_until(lambda: inflight == 0, what="the running poll to end")
        before = poller.polls
        for _ in range(20):
            poller.poke()
            await asyncio.sleep(0.01)
        assert poller.polls == before                    # hidden: no polls, however often poked
        shown = True
        poller.poke()
        await wait_until(lambda: poller.polls > before, what="a poll once shown again")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


# ---------------------------------------------------------------------------------- the VMs view


def rows_of(app: FerryApp) -> list[str]:
    """The NAME column of the VMs view, top to bottom."""
    table = app.query_one("#vm-table", DataTable)
    return [table.get_row_at(i)[0].plain.strip() for i in range(table.row_count)]


def vm_cell(app: FerryApp, name: str, column: str) -> str:
    table = app.query_one("#vm-table", DataTable)
    vid = next(v.id for v in {**app.vms_view.vms, **app.vms_view.recycled}.values() if v.name == name)
    return table.get_cell(vid, column).plain.strip()


def vm_cell_dim(app: FerryApp, name: str, column: str) -> bool:
    table = app.query_one("#vm-table", DataTable)
    vid = next(v.id for v in app.vms_view.vms.values() if v.name == name)
    return bool(table.get_cell(vid, column).style.dim)


async def test_vms_view_rows_filter_and_enter_to_the_inventory(client):
    await make_vm(client, "web1", "lab1")
    await make_vm(client, "tpl1", "lab2", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("colon", *"vms", "enter")
        assert app.current_view == "vms" and app.focused is app.query_one("#vm-table")
        await until(pilot, lambda: rows_of(app) == ["web1", "tpl1"], what="rows")
        assert (vm_cell(app, "web1", "host"), vm_cell(app, "web1", "state"), vm_cell(app, "web1", "vcpu"),
                vm_cell(app, "web1", "disk")) == ("lab1", "■ stopped", "2", "16M")
        assert vm_cell(app, "web1", "agent") == "-" and vm_cell(app, "web1", "ip") == "-"   # stopped: no agent
        assert vm_cell(app, "tpl1", "state") == "◇ template" and vm_cell(app, "tpl1", "agent") == ""
        assert text_of(app, "#crumbs").endswith("vms › web1")

        # a VM made elsewhere (the CLI, another console) shows up; the cursor stays on web1
        await make_vm(client, "app1", "lab3")
        app.vms_view.refresh_vms()
        await until(pilot, lambda: rows_of(app) == ["app1", "web1", "tpl1"], what="app1 added")
        assert vm_cell(app, "app1", "host") == "lab3" and app.vms_view.cursor_vm().name == "web1"

        await pilot.press("slash", *"lab2")                  # filter by host, as you type
        await until(pilot, lambda: rows_of(app) == ["tpl1"], what="filtered by host")
        await pilot.press("enter")                           # keeps it; back in the table
        assert app.focused is app.query_one("#vm-table") and "/lab2" in text_of(app, "#vms-status")
        await pilot.press("slash", "ctrl+u", *"WEB")
        await until(pilot, lambda: rows_of(app) == ["web1"], what="filtered by name, any case")
        await pilot.press("escape")                          # esc clears the filter, stays in the view
        await until(pilot, lambda: rows_of(app) == ["app1", "web1", "tpl1"], what="filter cleared")
        assert app.current_view == "vms"

        await pilot.press("question_mark")
        shown = "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))
        assert "VMs view" in shown and "Filter the rows" in shown and "Delete the selected VM" in shown
        await pilot.press("escape")
        assert "View: VMs" in [c.name for c in console_commands(app)]
        await until(pilot, lambda: engine_said(app, app.vms_view), what="the engine's answer for web1")
        assert "VM: Start web1" in [c.name for c in console_commands(app)]     # the VM under this cursor

        await pilot.press("enter")                           # the VM in the inventory, with its details
        await until(pilot, lambda: app.current_view == "inventory" and app.inventory.selected.name == "web1",
                    what="web1 selected in the inventory")
        assert "web1  ■ stopped  VM" in text_of(app, "#detail-body")
        await pilot.press("escape")                          # and back
        assert app.current_view == "vms"


async def test_delete_from_the_vms_view(client):
    await make_vm(client, "db1", "lab2")
    web = await make_vm(client, "web1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["db1", "web1"], what="rows")
        await pilot.press("down")
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="delete dialog")
        assert "web1" in modal_text(app, "#dialog-title")
        await pilot.press(*"web1", "enter")
        await until(pilot, lambda: rows_of(app) == ["db1"], what="web1's row gone")
        assert await names_are(client, {"db1"}) and not os.path.exists(web.disks[0].path)
        await until(pilot, lambda: any("delete web1 done" in n for n in notes(app)), what="done notification")
        assert app.vms_view.cursor_vm().name == "db1"


async def test_vms_view_agent_columns_walk_one_at_a_time(client, monkeypatch):
    import ferry.console.views.vms
    from ferry.engine.errors import PermanentError
    await make_vm(client, "db1", "lab1")
    await make_vm(client, "web1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    calls: list[str] = []
    inflight = most = 0
    broken: set[str] = {"db1"}

    async def fake_vm_agent(name: str) -> AgentReport:
        """Test double for client.vm_agent: these VMs never booted, the facts are made up."""
        nonlocal inflight, most
        calls.append(name)
        inflight += 1
        most = max(most, inflight)
        try:
            await asyncio.sleep(0.05)
            if name in broken:
                raise PermanentError("no answer from the guest agent")
            return AgentReport(name, AgentState.RUNNING, time.time(), ips=("127.0.0.1/8", "fe80::1/64", "10.0.2.15/24"),
                               cpu_percent=12.3, mem_total=218 << 20, mem_used=42 << 20)
        finally:
            inflight -= 1
    monkeypatch.setattr(client, "vm_agent", fake_vm_agent)
    monkeypatch.setattr(ferry.console.views.vms, "AGENT_REFRESH_S", 0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        # A fake, named as such: the engine's list says both run (booting a real VM is test_vm.py's job).
        real = app.vms_view.vm_poller.fetch

        async def says_running():
            vms, binned = await real()
            return [v.with_(state=VMState.RUNNING, pid=4242) for v in vms], binned
        app.vms_view.vm_poller.fetch = says_running
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["db1", "web1"] and vm_cell(app, "web1", "agent") == "✔ running",
                    what="web1's agent facts")
        assert calls[0] == "db1"                              # the cursor's row first
        assert (vm_cell(app, "web1", "ip"), vm_cell(app, "web1", "cpu"), vm_cell(app, "web1", "mem")) == \
            ("10.0.2.15", "12%", "42M/218M")
        assert vm_cell(app, "db1", "agent") == "?" and vm_cell(app, "db1", "ip") == "?"   # failed, nothing before
        await until(pilot, lambda: len(calls) >= 6, what="asked again")
        broken.add("web1")                                    # now web1's agent stops answering: last value, dimmed
        await until(pilot, lambda: vm_cell_dim(app, "web1", "agent"), what="web1 dimmed")
        assert vm_cell(app, "web1", "agent") == "✔ running" and vm_cell(app, "web1", "ip") == "10.0.2.15"
        assert most == 1                                      # never two at once

        await pilot.press("question_mark")                    # a modal is up: the walk stops
        await until(pilot, lambda: inflight == 0, what="the agent asked last to answer")
        before = len(calls)
        await pilot.pause(0.8)
        assert len(calls) == before
        await pilot.press("escape")
        await until(pilot, lambda: len(calls) > before, what="walk resumed")
        await pilot.press("1")                                # hidden: it stops too
        await until(pilot, lambda: inflight == 0, what="the agent asked last to answer")
        before = len(calls)
        await pilot.pause(0.8)
        assert len(calls) == before


# ---------------------------------------------------------------------------------- snapshot


def snapshot_with_three_vms(snap_compare, then: Callable[[Any, FerryApp], Any]) -> bool:
    """web1 and db1 on lab1, the template tpl1 on lab2; `then(pilot, app)` moves to what is shown at 80x24."""
    root = short_dir()
    app = FerryApp(new_client(root), clock=lambda: FIXED_CLOCK, own_client=True, first_view="inventory")

    async def ready(pilot):
        await until(pilot, lambda: app.client.engine_state == "running", what="engine")
        await make_vm(app.client, "web1", "lab1")
        await make_vm(app.client, "db1", "lab1")
        await make_vm(app.client, "tpl1", "lab2", template=True)
        await then(pilot, app)
        await pilot.pause(0.3)
    try:
        return snap_compare(app, terminal_size=(80, 24), run_before=ready)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_snapshot_inventory_with_a_vm_80x24(snap_compare):
    async def on_web1(pilot, app: FerryApp) -> None:
        app.inventory.refresh_vms()
        await until(pilot, lambda: all(s.ok for s in app.inventory.status.values()), what="all hosts answered")
        await until(pilot, lambda: len(app.inventory._vm_nodes) == 3, what="VMs in the tree")
        await go_to(pilot, app, "web1")
        await until(pilot, lambda: engine_said(app), what="the engine's answer for web1")
    assert snapshot_with_three_vms(snap_compare, on_web1)


def test_snapshot_vms_view_80x24(snap_compare):
    async def vms_view_on_web1(pilot, app: FerryApp) -> None:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["db1", "web1", "tpl1"], what="rows")
        await pilot.press("down")
        await until(pilot, lambda: engine_said(app, app.vms_view), what="the engine's answer for web1")
    assert snapshot_with_three_vms(snap_compare, vms_view_on_web1)


# ---------------------------------------------------------------------------------- issue 11: views


def status_of(app: FerryApp) -> str:
    return text_of(app, "#vms-status")


async def test_vms_view_sorts_naturally_filters_states_and_keeps_its_row(client):
    for name in ("web10", "web2", "web1"):
        await make_vm(client, name, "lab1")
    await make_vm(client, "tpl1", "lab2", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["web1", "web2", "web10", "tpl1"], what="natural order")
        await pilot.press("down")                           # on web2
        await until(pilot, lambda: app.vms_view.cursor_vm().name == "web2", what="cursor on web2")
        await make_vm(client, "app1", "lab3")              # comes above it: the cursor stays on web2
        app.vms_view.refresh_vms()
        await until(pilot, lambda: rows_of(app)[0] == "app1", what="app1 added")
        assert app.vms_view.cursor_vm().name == "web2" and text_of(app, "#crumbs").endswith("vms › web2")
        await pilot.press("O")                             # the other way round
        await until(pilot, lambda: rows_of(app)[0] == "tpl1", what="reversed")
        assert rows_of(app)[1:4] == ["web10", "web2", "web1"] and app.vms_view.cursor_vm().name == "web2"
        assert "sorted by name ▼" in status_of(app)
        await pilot.press("slash", *"template")              # states match too
        await until(pilot, lambda: rows_of(app) == ["tpl1"], what="filtered by state")
        await pilot.press("escape")
        await until(pilot, lambda: len(rows_of(app)) == 5, what="filter cleared")


async def test_marking_vms_and_deleting_them_all_at_once(client):
    web1 = await make_vm(client, "web1", "lab1")
    web2 = await make_vm(client, "web2", "lab2")
    db1 = await make_vm(client, "db1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    with stand_in_qemu(client, db1):
        await marked_and_deleted(app, client, web1, web2, db1)


async def marked_and_deleted(app: FerryApp, client: EngineClient, web1: VMView, web2: VMView, db1: VMView) -> None:
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: rows_of(app) == ["db1", "web1", "web2"], what="rows")
        await until(pilot, lambda: app.vms_view.cursor_vm().state is VMState.RUNNING, what="db1 seen running")
        await pilot.press("space", "down", "space", "down", "space")      # all three marked
        await until(pilot, lambda: rows_of(app) == ["✓ db1", "✓ web1", "✓ web2"], what="marks shown")
        assert "✓ 3 marked" in status_of(app)
        await make_vm(client, "app1", "lab3")              # a refresh keeps the marks, by VM id
        app.vms_view.refresh_vms()
        await until(pilot, lambda: rows_of(app) == ["app1", "✓ db1", "✓ web1", "✓ web2"], what="marks kept")

        await pilot.press("delete")                        # the engine is asked for each: db1 runs
        await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="delete dialog")
        body = modal_text(app, "#dialog-body")
        assert "Will delete (2): web1, web2" in body and "Refused (1)" in body, body
        assert "db1: db1 is running" in body, body
        assert "Delete 2 marked VMs?" in modal_text(app, "#dialog-title")
        await pilot.press(*"db1", "enter")                 # not the count: nothing happens
        await pilot.pause()
        assert isinstance(app.screen, TypedNameScreen) and app.screen.query_one("#confirm", Button).disabled
        await pilot.press("ctrl+u", "2", "enter")
        await until(pilot, lambda: names_are(client, {"db1", "app1"}), what="web1 and web2 deleted, one task each")
        assert not os.path.exists(web1.disks[0].path) and not os.path.exists(web2.disks[0].path)
        assert os.path.exists(db1.disks[0].path)
        assert sum(t.kind == "vm.delete" for t in app.feed.tasks.values()) == 2
        await until(pilot, lambda: rows_of(app) == ["app1", "✓ db1"], what="the gone ones' marks dropped")
        assert "✓ 1 marked" in status_of(app)
        await pilot.press("M")                             # clears every mark
        await until(pilot, lambda: rows_of(app) == ["app1", "db1"], what="marks cleared")
        assert "marked" not in status_of(app)


async def test_marks_show_in_the_tree_and_stop_says_which_are_refused(client):
    await make_vm(client, "web1", "lab1")
    await make_vm(client, "web2", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1", "■ web2"], what="VMs in the tree")
        await go_to(pilot, app, "web1")
        await pilot.press("space")
        await go_to(pilot, app, "web2")
        await pilot.press("space")
        await until(pilot, lambda: labels_under(app, "lab1") == ["✓ ■ web1", "✓ ■ web2"], what="marked")
        assert "✓ 2 marked" in text_of(app, "#inventory-status")
        await pilot.press("x")                             # nothing runs: all refused, no dialog, no task
        await until(pilot, lambda: any("none of the 2 marked VMs" in n for n in notes(app)), what="refusal")
        assert "web1: web1 is not running" in "\n".join(notes(app))
        assert app.screen is app.screen_stack[0]
        assert not [t for t in app.feed.tasks.values() if t.kind == "vm.shutdown"]


async def test_inventory_filter_keeps_parents_and_esc_clears(client):
    await make_vm(client, "web1", "lab1")
    await make_vm(client, "db1", "lab2")
    await make_vm(client, "tpl1", "lab3", template=True)
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(100, 30)) as pilot:
        inv = app.inventory
        await until(pilot, lambda: len(inv._vm_nodes) == 3, what="VMs in the tree")
        await pilot.press("slash", *"web")
        await until(pilot, lambda: set(inv._host_nodes) == {"lab1"}, what="only web1's host")
        assert set(inv._cluster_nodes) == {"lab"} and labels_under(app, "lab1") == ["■ web1"]
        assert "/web" in text_of(app, "#inventory-status")
        await pilot.press("ctrl+u", *"template")          # a state
        await until(pilot, lambda: set(inv._host_nodes) == {"lab3"}, what="the template's host")
        assert set(inv._cluster_nodes) == {"lab-b"} and labels_under(app, "lab3") == ["◇ tpl1"]
        await pilot.press("ctrl+u", *"lab2")              # a host: it shows with what it holds
        await until(pilot, lambda: set(inv._host_nodes) == {"lab2"}, what="lab2")
        assert labels_under(app, "lab2") == ["■ db1"]
        await pilot.press("enter")                          # keeps it; the tree has the keys again
        await go_to(pilot, app, "db1")
        assert "db1  ■ stopped" in text_of(app, "#detail-body")
        await pilot.press("escape")                         # clears it; the cursor stays on db1
        await until(pilot, lambda: set(inv._host_nodes) == {"lab1", "lab2", "lab3"}, what="everything again")
        assert len(inv._vm_nodes) == 3 and inv.selected.name == "db1"
        assert app.query_one("#tree", Tree).cursor_node.data.name == "db1"


async def test_site_page_counts_problems_and_an_idle_host_has_no_tick(client):
    await make_vm(client, "web1", "lab1")
    shutil.rmtree(client.site.datastores["shared"].path)      # the shared datastore is gone on every host
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(100, 40)) as pilot:
        inv = app.inventory
        await until(pilot, lambda: all(s.ok for s in inv.status.values()), what="all hosts answered")
        inv.render_detail()
        site = text_of(app, "#detail-body")
        assert "Problems   ◆ 1 datastore missing" in site.replace("▲", "◆"), site
        assert "shared missing on lab1, lab2, lab3" in site, site
        await go_to(pilot, app, "lab1")
        await until(pilot, lambda: "1 VM (none running)" in text_of(app, "#detail-body"), what="lab1's page")
        assert "✔ 0 running" not in text_of(app, "#detail-body")


async def test_clone_form_offers_host_and_datastore(client):
    src = await make_vm(client, "web1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"], what="web1 under lab1")
        await go_to(pilot, app, "web1")
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="clone dialog")
        app.screen.query_one("#f-name", Input).value = "web1-b"
        app.screen.query_one("#f-host", Select).value = "lab2"
        app.screen.query_one("#f-datastore", Select).value = "lab1-local"
        await pilot.click("#confirm")                       # not shared with lab2: the engine says so in the form
        await until(pilot, lambda: "not shared by host lab1" in modal_text(app, "#form-error"), what="refused")
        assert "lab2" in modal_text(app, "#form-error")
        app.screen.query_one("#f-datastore", Select).value = "shared"
        await pilot.pause()
        app.screen.query_one("#confirm", Button).press()
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="the form closed")
        await until(pilot, lambda: any(t.kind == "vm.clone" and t.state == TaskState.SUCCEEDED
                                       for t in app.feed.tasks.values()), what="cloned")
        copy = await client.vm_get("web1-b")
        assert copy.host == "lab2" and copy.disks[0].datastore == "shared" and os.path.exists(copy.disks[0].path)
        await until(pilot, lambda: labels_under(app, "lab2") == ["■ web1-b"], what="the copy under lab2")
        assert src.host == "lab1"


async def test_production_delete_says_so_and_defaults_to_the_recycle_bin():
    from dataclasses import replace
    root = short_dir()
    ws = Workspace(root)
    c = EngineClient(ws, replace(lab_config(ws.root), production=True), adopt=False)
    await c.start()
    try:
        web = await make_vm(c, "web1", "lab1")
        app = FerryApp(c, clock=lambda: FIXED_CLOCK, first_view="inventory")
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"], what="web1 under lab1")
            await go_to(pilot, app, "web1")
            await pilot.press("c")                          # a form says production too
            await until(pilot, lambda: isinstance(app.screen, FormScreen), what="clone dialog")
            assert "PRODUCTION" in modal_text(app, "#dialog-production")
            await pilot.press("escape")
            await pilot.press("delete")
            await until(pilot, lambda: isinstance(app.screen, TypedNameScreen), what="delete dialog")
            assert "production site lab" in modal_text(app, "#dialog-production")
            assert app.screen.query_one("#mode", Select).value == "delayed"
            assert not app.screen.query_one("#keep", Input).disabled
            await pilot.press(*"web1", "enter")
            await until(pilot, lambda: names_are(c, {"web1"}, recycled=True), what="web1 in the recycle bin")
            assert await names_are(c, set())
            await until(pilot, lambda: not any(t.state != TaskState.SUCCEEDED for t in app.feed.tasks.values()),
                        what="the delete done")
            assert (await c.vm_list(recycled=True))[0].id == web.id                # it can come back (u)
            assert [t.params["mode"] for t in app.feed.tasks.values() if t.kind == "vm.delete"] == ["delayed"]
    finally:
        await c.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
async def test_pause_asks_first_and_resume_continues_a_booted_vm(client, monkeypatch):
    """The one VM of this module that boots for real (its QEMU, its guest agent): pause and resume are
    QMP's stop and cont, which no stand-in can answer. Stopped: z is refused with the engine's reason.
    Running: z asks first (Back is the default), then QEMU halts the guest and its row says paused; the
    inventory's keys say what applies to a paused VM; Z continues it at once, no dialog."""
    from harness.qemu import image_cache, kill_all
    from ferry.engine.vm.service import VMService

    monkeypatch.setenv("FERRY_IMAGE_CACHE", str(image_cache()))     # the suite's live image, built once
    svc = VMService.of(client.engine)

    async def qmp_status() -> str:
        async with await svc.qmp(await svc.spec("web1")) as q:
            return (await q.execute("query-status"))["status"]

    await make_vm(client, "web1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            view = app.vms_view
            await pilot.press("3")
            await until(pilot, lambda: rows_of(app) == ["web1"], what="web1's row")
            await until(pilot, lambda: engine_said(app, view), what="the engine's answer for web1")
            assert view.check_action("vm_pause", ()) is None and view.check_action("vm_resume", ()) is None
            await pilot.press("z")
            await until(pilot, lambda: any("web1 is not running (stopped)" in n for n in notes(app)), what="refusal")
            assert not isinstance(app.screen, ConfirmScreen)

            info = await client.wait_task(await client.vm_task("vm.start", {"vm": "web1"}), timeout=300)
            assert info.state == TaskState.SUCCEEDED and info.result["agent"] is True, info.error
            view.refresh_vms()
            await until(pilot, lambda: vm_cell(app, "web1", "state") == "▶ running", what="web1 running")
            await until(pilot, lambda: view.check_action("vm_pause", ()) is True, what="z applies")

            await pilot.press("z")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="pause confirmation")
            assert modal_text(app, "#dialog-title") == "Pause web1?" and app.focused.id == "cancel"
            assert "services stop answering until Z resumes it" in modal_text(app, "#dialog-body")
            await pilot.press("enter")                          # Back: nothing is done
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="closed")
            await pilot.pause(0.2)
            assert not [t for t in await client.list_tasks() if t.kind == "vm.pause"]
            await pilot.press("z")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="pause confirmation")
            await pilot.click("#confirm")
            await until(pilot, lambda: vm_cell(app, "web1", "state") == "⏸ paused", what="web1 paused")
            assert await qmp_status() == "paused"
            await until(pilot, lambda: any("pause web1 done" in n for n in notes(app)), what="done notification")

            await pilot.press("enter")                          # its keys, in the inventory's detail pane
            await until(pilot, lambda: app.current_view == "inventory" and engine_said(app), what="web1's keys")
            await until(pilot, lambda: "Z resume" in text_of(app, "#detail-body"), what="Z offered")
            detail = text_of(app, "#detail-body")
            assert "z: web1 is already paused: Z resumes it" in detail and "s: web1 is paused: Z resumes it" in detail
            assert "x r: web1 is paused: its guest agent answers once it runs again" in detail, detail
            await pilot.press("escape")

            await pilot.press("Z")                              # no dialog
            await until(pilot, lambda: vm_cell(app, "web1", "state") == "▶ running", what="web1 running again")
            assert not isinstance(app.screen, ConfirmScreen)
            assert await qmp_status() == "running"
            assert (await client.vm_agent("web1")).agent is AgentState.RUNNING
            await until(pilot, lambda: view.check_action("vm_pause", ()) is True, what="z applies again")
    finally:
        kill_all(Path(client.workspace.root))
