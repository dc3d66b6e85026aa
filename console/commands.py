"""The command palette's provider: every console action, found by fuzzy search."""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

from textual.command import DiscoveryHit, Hit, Hits, Provider

from ferry.console.keys import is_destructive
from ferry.console.views.tasks import ALLOWED


class Command(NamedTuple):
    name: str
    help: str
    run: Callable[[], object]


def console_commands(app) -> list[Command]:
    """Every action of the console, in the order the palette shows them before anything is typed."""
    cmds = [
        Command("View: Inventory", "site, clusters, hosts, VMs and templates  (1, :inventory)", partial(app.action_view, "inventory")),
        Command("View: Tasks", "tasks with live progress  (2, :tasks)", partial(app.action_view, "tasks")),
        Command("View: VMs", "every VM and template with its agent's facts  (3, :vms)", partial(app.action_view, "vms")),
        Command("View: Audit", "who did what: the engine's audit log  (4, :audit)", partial(app.action_view, "audit")),
        Command("View: Events", "what this console heard from the engine this session  (5, :events)",
                partial(app.action_view, "events")),
        Command("Keys of this view", "what each key does here  (?)", app.action_help),
        Command("Command line", "jump to a view by name, k9s style  (:)", app.action_command_line),
        Command("Refresh", "ask every host again and re-read the task list  (ctrl+r)", app.action_refresh),
    ]
    for name in app.theme_names():
        cmds.append(Command(f"Theme: {name}", "switch the colour theme (remembered)", partial(app.choose_theme, name)))
    for host in sorted(app.client.site.hosts):
        cmds.append(Command(f"Probe host {host}", "measure latency and throughput to the host",
                            partial(app.start_probe, host)))
    view = app.view_widget()
    readonly = getattr(app, "readonly", False)
    for name, text, run in (view if hasattr(view, "vm_commands") else app.inventory).vm_commands():
        if readonly and is_destructive(getattr(getattr(run, "func", run), "__name__", "").removeprefix("action_")):
            continue
        cmds.append(Command(name, text, run))
    for info in sorted(app.feed.tasks.values(), key=lambda t: -t.id) if not readonly else ():
        label = f"task {info.id} ({info.title})"
        for action, verb, text in (("pause", "Pause", "stop it at its checkpoint; resume later"),
                                   ("resume", "Resume", "continue from its last checkpoint"),
                                   ("cancel", "Cancel", "stop it for good")):
            if info.state in ALLOWED[action]:
                cmds.append(Command(f"{verb} {label}", text, partial(app.control_task, action, info.id)))
    cmds.append(Command("Quit", "close the console  (q)", app.action_quit))
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
