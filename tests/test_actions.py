"""The one catalogue of actions (console/actions.py) is what the operator meets everywhere: the keys
and the footer of each view, the help screen, the command palette, the read-only console, the CLI's
verbs and their help, and the shell completion. A changed row changes all of them; a key remapped in
[console.keys] is remapped in all of them.

A real EngineClient on a throw-away workspace with the built-in lab site (VMs made by the engine's
own vm.create, never booted), as in test_console_vms.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console import actions as catalogue
from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import HelpScreen
from ferry.console.dialogs.serial import SerialScreen
from ferry.console.dialogs.vmforms import FormScreen
from ferry.engine.client import EngineClient
from ferry.engine.config import ConsoleSettings, lab_config
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.pilot import until
from test_console_vms import FIXED_CLOCK, engine_said, go_to, labels_under, make_vm, short_dir
from test_console_vms import client as vm_client

client = vm_client    # the fixture: an engine client on a short workspace path (QEMU's sockets)

VIEW_GROUPS = {"inventory": ("inventory", "vm"), "vms": ("vm", "vms"), "tasks": ("tasks",)}


def new_client(root: Path, **console) -> EngineClient:
    ws = Workspace(root)
    site = lab_config(ws.root)
    if console:
        from dataclasses import replace
        site = replace(site, console=ConsoleSettings(**console))
    return EngineClient(ws, site, adopt=False)


def footer(app: FerryApp) -> dict[str, tuple[str, str]]:
    """What the footer offers: action -> (key, title), as the operator sees it."""
    return {b.binding.action: (key, b.binding.description)
            for key, b in app.screen.active_bindings.items() if b.binding.show}


def help_text(app: FerryApp) -> str:
    return "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))


def notes(app: FerryApp) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


def rows_of(app: FerryApp, view: str) -> list[catalogue.Action]:
    """The catalogue's rows bound where `view` is shown: the app's and the view's (that it implements)."""
    widget = app.view_widget()
    return list(catalogue.group("app")) + [a for g in VIEW_GROUPS[view] for a in catalogue.group(g)
                                           if hasattr(widget, "action_" + a.method)]


async def on_vm_and_task(client: EngineClient):
    """A stopped VM web1 and a held task; returns (vm, task id)."""
    vm = await make_vm(client, "web1", "lab1")
    tid = await client.submit("test.hold", {"title": "held"})
    return vm, tid


async def show(pilot, app: FerryApp, view: str, tid: int) -> None:
    """Bring `view` up with the cursor on web1 (VM views) or on the held task, and the engine's answer in."""
    await pilot.press({"inventory": "1", "tasks": "2", "vms": "3"}[view])
    await until(pilot, lambda: app.current_view == view, what=view)
    if view == "inventory":
        await until(pilot, lambda: labels_under(app, "lab1") == ["■ web1"], what="web1 under lab1")
        await go_to(pilot, app, "web1")
    elif view == "vms":
        await until(pilot, lambda: app.vms_view.cursor_vm() is not None, what="a VM row")
    else:
        await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                    what="task running")
        app.tasks_view.select_task(tid)
    if view != "tasks":
        await until(pilot, lambda: engine_said(app, app.view_widget()), what="the engine's answer")
    await pilot.pause()


# ---------------------------------------------------------------------------------- footer, keys, help


def shadowed(app: FerryApp, active, action: catalogue.Action) -> bool:
    """The focused widget's own binding of the action's key wins (the tree's space, which marks a VM)."""
    return active is not None and active.binding.id != action.binding_id and active.node is app.focused


async def footer_check(root: Path) -> None:
    """In the inventory, VMs and Tasks views, the footer offers exactly the catalogue's shown rows of
    the view (and the app) that apply there, under their catalogue key and title."""
    client = new_client(root)
    await client.start()
    try:
        _, tid = await on_vm_and_task(client)
        app = FerryApp(client, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(160, 30)) as pilot:
            for view in ("inventory", "vms", "tasks"):
                await show(pilot, app, view, tid)
                widget = app.view_widget()
                shown = footer(app)
                active = app.screen.active_bindings
                wanted = {a.name: a for a in rows_of(app, view)
                          if a.show and (a.group == "app" or widget.check_action(a.method, ()) is not False)
                          and not shadowed(app, active.get(a.key.split(",")[0]), a)}
                assert set(shown) == set(wanted), (view, set(shown) ^ set(wanted))
                for name, (key, title) in shown.items():      # quit has three keys: q, ctrl+c, ctrl+q
                    rows = [a for a in catalogue.CATALOGUE if a.name == name and a.group in ("app",) + VIEW_GROUPS[view]]
                    assert any(key in a.key.split(",") and title == a.title for a in rows), (view, name, key)
    finally:
        await client.close()
        shutil.rmtree(root, ignore_errors=True)


ALL_SHOWN = """
    import asyncio, dataclasses, sys
    from ferry.console import actions
    actions.CATALOGUE = tuple(dataclasses.replace(a, show=True) if a.group != "table" else a
                              for a in actions.CATALOGUE)
    import test_actions
    asyncio.run(test_actions.footer_check(test_actions.short_dir()))
    print("footer ok")
"""


async def test_every_shown_action_is_in_the_footer_of_its_view():
    await footer_check(short_dir())
    # a catalogue that shows every row: every footer follows it
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(ALL_SHOWN)], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0 and "footer ok" in out.stdout, out.stderr[-3000:]


async def test_a_key_remapped_in_config_is_remapped_in_footer_help_and_palette(tmp_path):
    c = new_client(tmp_path / "ws", keys={"tasks.cancel": "C", "view.tasks": "T", "inventory.probe": "P"})
    await c.start()
    try:
        tid = await c.submit("test.hold", {"title": "held"})
        app = FerryApp(c, clock=lambda: FIXED_CLOCK, first_view="inventory")
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.press("2")
            await pilot.pause()
            assert app.current_view == "inventory"                       # 2 no longer goes to Tasks
            await pilot.press("T")
            await until(pilot, lambda: app.current_view == "tasks", what="T shows Tasks")
            await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                        what="task running")
            app.tasks_view.select_task(tid)
            await pilot.pause()
            assert footer(app)["cancel_task"] == ("C", "Cancel")
            palette = {cmd.name: cmd.help for cmd in console_commands(app)}
            assert palette["View: Tasks"].endswith("(T)"), palette["View: Tasks"]
            assert palette[f"Cancel task {tid} (held)"].endswith("(C)")
            assert all(h.endswith("(P)") for n, h in palette.items() if n.startswith("Probe host"))
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            shown = help_text(app)
            assert "Cancel the selected task" in shown and "view.tasks" in shown and "tasks.cancel" in shown
    finally:
        await c.close()


CHANGED_ROW = """
    import dataclasses, json, pathlib, sys
    from ferry.console import actions
    # The catalogue as a new capability would change it: another key, title and help for the task log,
    # another CLI help line for `ferry task show`.
    actions.CATALOGUE = tuple(dataclasses.replace(a, key="L", title="Whole log", help="Read the whole log of it",
                                                  cli_help="show a task with its whole log")
                              if a.id == "tasks.log" else a for a in actions.CATALOGUE)
    import asyncio
    import harness.kinds
    from ferry.console.app import FerryApp
    from ferry.console.cli import build_parser
    from ferry.console.commands import console_commands
    from ferry.engine.client import EngineClient
    from ferry.engine.config import lab_config
    from ferry.engine.workspace import Workspace

    async def main():
        ws = Workspace(pathlib.Path(sys.argv[1]))
        c = EngineClient(ws, lab_config(ws.root), adopt=False)
        await c.start()
        try:
            tid = await c.submit("test.hold", {"title": "held"})
            app = FerryApp(c)
            async with app.run_test(size=(120, 30)) as pilot:
                await pilot.press("2")
                while not (tid in app.feed.tasks and app.view_widget() is app.tasks_view):
                    await pilot.pause(0.05)
                app.tasks_view.select_task(tid)
                await pilot.pause()
                footer = {b.binding.action: [k, b.binding.description] for k, b in app.screen.active_bindings.items()
                          if b.binding.show}
                help = app.help_rows(app.tasks_view.BINDINGS)
                palette = {cmd.name: cmd.help for cmd in console_commands(app)}
            parser = build_parser()
            task = next(a for a in parser._actions if a.dest == "command").choices["task"]
            shows = next(a for a in task._actions if a.dest == "task_command")._choices_actions
            cli = next(c.help for c in shows if c.dest == "show")
            print(json.dumps({"footer": footer, "help": help, "palette": palette, "cli": cli}))
        finally:
            await c.close()
    asyncio.run(main())
"""


def test_a_changed_catalogue_row_changes_keys_footer_help_palette_and_cli(tmp_path):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CHANGED_ROW), str(tmp_path / "ws")],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["footer"]["log"] == ["L", "Whole log"]
    assert ["L", "Read the whole log of it", "tasks.log"] in got["help"]
    assert any(h == "Read the whole log of it  (L)" for n, h in got["palette"].items() if n.startswith("Log of task"))
    assert got["cli"] == "show a task with its whole log"


# ---------------------------------------------------------------------------------- read-only


async def test_readonly_drops_every_changing_action_from_keys_palette_and_help(client):
    vm, tid = await on_vm_and_task(client)
    full = FerryApp(client, clock=lambda: FIXED_CLOCK)
    palettes = {}
    async with full.run_test(size=(160, 30)) as pilot:
        for view in ("inventory", "vms", "tasks"):
            await show(pilot, full, view, tid)
            palettes[view] = {cmd.name for cmd in console_commands(full)}
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, readonly=True)
    changing = [a for a in catalogue.CATALOGUE if a.changes]
    async with app.run_test(size=(160, 30)) as pilot:
        for view in ("inventory", "vms", "tasks"):
            await show(pilot, app, view, tid)
            rows = rows_of(app, view)
            shown = footer(app)
            assert not [a.name for a in changing if a.name in shown], (view, shown)
            assert [a.name for a in rows if a.show and not a.changes and a.name not in shown] == [], view

            palette = {cmd.name for cmd in console_commands(app)}
            assert palette < palettes[view]
            names = {"vm": vm.name, "what": "VM", "other": "template", "task": f"{tid} (held)", "host": "lab1"}
            for a in changing:
                assert (a.palette or a.title).format(**names) not in {n.removeprefix("VM: ") for n in palette}, a.id
            # what only looks stays: the view's own actions that change nothing
            looks = [(a.palette or a.title).format(**names) for a in rows
                     if a.group == view and a.palette and not a.changes and a.method != "probe"
                     and app.view_widget().check_action(a.method, ()) is True]
            assert looks and set(looks) <= palette, (view, looks, palette)

            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            text = help_text(app)
            assert [a.id for a in changing if a.help in text] == [], view
            first = {a.name: a for a in reversed(rows)}       # one help line per action (q, ctrl+c: quit)
            assert [a.id for a in first.values() if not a.changes and a.help not in text] == [], view
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help closed")
            # and the key of a changing action says why instead of acting
            before = len(app._notifications)
            await pilot.press({"tasks": "c"}.get(view, "s"))
            await until(pilot, lambda: len(app._notifications) > before, what="a notice")
            assert "read-only console" in notes(app)
            assert app.screen is app.screen_stack[0]


# ---------------------------------------------------------------------------------- palette


async def test_palette_lists_the_catalogue_vm_actions_that_apply(client):
    vm = await make_vm(client, "web1", "lab1")
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(120, 30)) as pilot:
        await show(pilot, app, "inventory", 0)
        inv = app.inventory
        palette = {cmd.name: cmd for cmd in console_commands(app)}
        names = {"vm": vm.name, "what": "VM", "other": "template"}
        expected = {"VM: " + a.palette.format(**names) for a in catalogue.group("vm")
                    if hasattr(inv, "action_" + a.method) and a.precheck and inv.vm_check(a.method) is True}
        listed = {n for n in palette if n.startswith("VM: ") and n not in ("VM: create…", "VM: import…")}
        assert expected <= listed and {"VM: Start web1", "VM: Delete web1…", "VM: Clone web1…"} <= listed
        assert "VM: create…" in palette and "VM: import…" in palette
        # what the engine refuses for a stopped VM is not offered
        for refused in ("VM: Shut down web1 (safe)", "VM: Serial console of web1", "VM: Reboot web1"):
            assert refused not in palette, refused
        assert palette["VM: Start web1"].help == "Start the selected VM (a hibernated one resumes)  (s)"
        assert palette["VM: create…"].help == "Create a VM on lab1  (n)"
        palette["VM: Clone web1…"].run()
        await until(pilot, lambda: isinstance(app.screen, FormScreen), what="the clone form")
        await pilot.pause()                     # the form is mounted whole (its selects) before it closes
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), what="the clone form closed")


# ---------------------------------------------------------------------------------- CLI


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:      # argparse has no public way to walk a parser
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, word: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return next(c.help for c in action._choices_actions if c.dest == word)
    raise KeyError(word)


def test_every_cli_verb_of_the_catalogue_exists_with_its_help_and_completes(tmp_path):
    from ferry.console.cli import build_parser
    parser = build_parser()
    verbs = list(catalogue.cli_verbs())
    assert len(verbs) >= 20
    for verb, action in verbs:
        words = [w for w in verb.split() if not w.startswith("-")]
        options = [w for w in verb.split() if w.startswith("-")]
        p, parent = parser, parser
        for w in words:
            assert w in _subparsers(p), f"{verb}: no {w!r} in the CLI"
            parent, p = p, _subparsers(p)[w]
        if options:
            found = {o: a for a in p._actions for o in a.option_strings}
            for o in options:
                assert o in found, f"{verb}: no {o}"
                assert found[o].help == catalogue.cli_help(verb)
        else:
            assert _help_of(parent, words[-1]) == catalogue.cli_help(verb), verb

    env = {**os.environ, "FERRY_WORKSPACE": str(tmp_path / "ws")}
    scripts = {shell: subprocess.run([sys.executable, "-m", "ferry.console.cli", "completion", shell], env=env,
                                     capture_output=True, text=True, timeout=60, check=True).stdout
               for shell in ("bash", "zsh")}
    for verb, action in verbs:
        words = [w for w in verb.split() if not w.startswith("-")]
        prefix = "_shtab_ferry" + "".join("_" + w for w in words[:-1])
        listed = next(line for line in scripts["bash"].splitlines() if line.startswith(prefix + "_subparsers=("))
        assert words[-1] in listed.split("=(", 1)[1].rstrip(")").split(), verb
        assert f"{words[-1]}:'{catalogue.cli_help(verb)}'" in scripts["zsh"] or verb.count("--"), verb


# ---------------------------------------------------------------------------------- serial


async def test_serial_key_is_dimmed_and_says_why_on_a_stopped_vm(client):
    await make_vm(client, "web1", "lab1")
    checks = {c.action: c.refusal for c in await client.vm_actions("web1")}
    assert "not running" in checks["vm_serial"].reason                     # the engine's rule
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(120, 30)) as pilot:
        await show(pilot, app, "inventory", 0)
        assert app.inventory.check_action("vm_serial", ()) is None         # dimmed
        before = len(app._notifications)
        await pilot.press("a")
        await until(pilot, lambda: len(app._notifications) > before, what="why")
        assert "web1 is not running (stopped)" in notes(app) and "s starts it" in notes(app)
        await pilot.pause(0.2)
        assert not isinstance(app.screen, SerialScreen)
        palette = {cmd.name for cmd in console_commands(app)}
        assert "VM: Serial console of web1" not in palette
