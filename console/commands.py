"""The command palette's provider: every console action, found by fuzzy search, built from the one
catalogue of actions (console/actions.py) as the keys and the help screen are.

Before anything is typed it lists: the app's actions (views, keys, command line, refresh), the themes,
a probe of each host, the actions of the view shown (those that apply now), the VM actions that apply
to the VM under the cursor (the engine's answer, as the keys are dimmed by it), each task's pause,
resume and cancel where its state allows them (taskmodel.TASK_ACTIONS), and quit. A read-only
console lists nothing that changes something.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

from textual.actions import parse
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

from ferry.engine.taskmodel import TASK_ACTIONS

from ferry.console import actions as catalogue
from ferry.console.actions import Action


class Command(NamedTuple):
    name: str
    help: str
    run: Callable[[], object]


def _key(app: Any, action: Action) -> str:
    """The first key of an action as the operator presses it (after any remapping), for the help line."""
    keys = app.keymap.get(action.binding_id, action.key) if hasattr(app, "keymap") else action.key
    first = keys.split(",")[0].strip()
    return app.get_key_display(Binding(first, "")) if first else ""


def _help(app: Any, action: Action, text: str | None = None) -> str:
    key = _key(app, action)
    return (text or action.help) + (f"  ({key})" if key else "")


def _entry(action: Action, **names: object) -> str:
    return (action.palette or action.title).format(**names)


def _method(target: Any, action: Action) -> Callable[[], object] | None:
    """`target`'s method for the action, with the arguments the action names (view('tasks'))."""
    _, name, params = parse(action.name)
    method = getattr(target, f"action_{name}", None)
    if method is None or not params:
        return method
    return partial(method, *params)


def console_commands(app) -> list[Command]:
    """Every action of the console, in the order the palette shows them before anything is typed."""
    from ferry.console.vmactions import VMActions

    readonly = getattr(app, "readonly", False)

    def allowed(a: Action) -> bool:
        return a.palette is not None and not (readonly and a.changes)

    cmds: list[Command] = []
    quit_ = []
    for a in catalogue.group("app"):
        run = _method(app, a) if allowed(a) else None
        if run is not None:
            (quit_ if a.method == "quit" else cmds).append(Command(_entry(a), _help(app, a), run))
    for name in app.theme_names():
        cmds.append(Command(f"Theme: {name}", "switch the colour theme (remembered)", partial(app.choose_theme, name)))

    probe = catalogue.by_name("probe", "inventory")
    if allowed(probe):
        for host in sorted(app.client.site.hosts):
            cmds.append(Command(_entry(probe, host=host), _help(app, probe, "latency and throughput to the host (a task)"),
                                partial(app.start_probe, host)))

    view = app.view_widget()
    task = view.selected_task() if hasattr(view, "selected_task") else None
    for a in catalogue.group(getattr(view, "VIEW", "")):
        if a is probe or a.precheck or not allowed(a) or view.check_action(a.method, ()) is not True:
            continue
        run = _method(view, a)
        if run is not None:
            cmds.append(Command(_entry(a, task=f"{task.id} ({task.title})" if task else ""), _help(app, a), run))

    vm_view = view if isinstance(view, VMActions) else app.inventory
    cmds += vm_commands(app, vm_view, allowed)

    for info in sorted(app.feed.tasks.values(), key=lambda t: -t.id):
        label = f"{info.id} ({info.title})"
        for a in catalogue.group("tasks"):
            verb = (a.precheck or "").removeprefix("task:")
            if verb in TASK_ACTIONS and allowed(a) and info.state in TASK_ACTIONS[verb]:
                cmds.append(Command(_entry(a, task=label), _help(app, a, a.help.replace("the selected task", f"task {info.id}")),
                                    partial(app.control_task, verb, info.id)))
    return cmds + quit_


def vm_commands(app: Any, view: Any, allowed: Callable[[Action], bool]) -> list[Command]:
    """The catalogue's VM actions: those needing no VM (create, import) always, the others for the VM
    under the view's cursor when the engine said they apply to it."""
    vm = view.cursor_vm()
    cmds = []
    for a in catalogue.group("vm"):
        run = _method(view, a)
        if run is None or not allowed(a):
            continue
        if a.precheck is None and a.method in ("vm_create", "vm_import"):
            cmds.append(Command("VM: " + _entry(a), _help(app, a, a.help.replace("the selected host", view.cursor_host())),
                                run))
            continue
        if vm is None or view.vm_check(a.method) is not True:
            continue
        what = "template" if vm.is_template else "VM"
        text = _entry(a, vm=vm.name, what=what, other="VM" if vm.is_template else "template")
        if a.method == "vm_delete" and vm.in_bin:
            text = f"Purge {vm.name}…"
        cmds.append(Command("VM: " + text, _help(app, a), run))
    return cmds


class FerryCommands(Provider):
    async def discover(self) -> Hits:
        for cmd in console_commands(self.app):
            yield DiscoveryHit(cmd.name, cmd.run, help=cmd.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for cmd in console_commands(self.app):
            score = matcher.match(cmd.name)
            if score > 0:
                yield Hit(score, matcher.highlight(cmd.name), cmd.run, help=cmd.help)
