"""The one catalogue of the operator's actions: every key binding, palette entry, help line and CLI
verb is built from it (never imports Textual: the headless CLI reads it too).

An action has a name (the view's method is `action_<name>`), the view group it belongs to (its
binding id is `ferry.<id>`, the name config.toml's `[console.keys]` remaps without "ferry."), its
default keys, the title the footer and the palette show, the line the help screen and the tooltip
show, the engine's precheck that says whether it applies now (a VM action of the engine's
`vm_actions`, or a task action of `taskmodel.TASK_ACTIONS`), the CLI verb that does the same from a
shell, and whether it changes anything (read-only consoles drop those).

Adding a capability (snapshots, migrations, alarms) means adding its rows here; the console's
bindings (`console.keys.bindings`), the palette (`console.commands`), the help screen, the CLI's
help texts (`cli_help`) and the shell completion follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Action:
    name: str                       # the view's method: action_<name>; may carry arguments: view('tasks')
    id: str                         # binding id without "ferry.": what [console.keys] remaps
    key: str                        # default keys, comma-separated, as Textual names them
    title: str                      # footer and palette
    help: str                       # help screen line and tooltip
    group: str                      # where it is bound: app, vm, tasks, inventory, vms, table, log
    show: bool = False              # in the footer
    changes: bool = False           # changes a task, a VM or a template: gone in a read-only console
    precheck: str | None = None     # the engine's rule: a VM action name, or "task:<action>"
    cli: str | None = None          # the CLI verb doing the same: "vm start"
    palette: bool = True            # listed in the command palette
    marks: bool = False             # applies to every marked VM when VMs are marked
    priority: bool = False          # a Textual priority binding (works even in an input)

    @property
    def binding_id(self) -> str:
        return "ferry." + self.id

    @property
    def method(self) -> str:
        """The method name without arguments: vm_start, view."""
        return self.name.split("(", 1)[0]


def _vm(key: str, name: str, title: str, help: str, *, cli: str | None, show: bool = False,
        changes: bool = True, precheck: bool = True, marks: bool = False) -> Action:
    return Action(f"vm_{name}", f"inventory.vm.{name}", key, title, help, "vm", show=show, changes=changes,
                  precheck=f"vm_{name}" if precheck else None, cli=cli, marks=marks)


CATALOGUE: tuple[Action, ...] = (
    # ------------------------------------------------------------------ everywhere
    Action("command_line", "command", "colon", "Cmd", "Jump to a view by name (:tasks, :inv)", "app", show=True),
    Action("help", "help", "question_mark", "Keys", "The keys of this view", "app", show=True),
    Action("back", "back", "escape", "Back", "Close the command line / previous view", "app", palette=False),
    Action("view('inventory')", "view.inventory", "1", "Inventory",
           "Inventory: site, clusters, hosts, VMs and templates", "app"),
    Action("view('tasks')", "view.tasks", "2", "Tasks", "Tasks: live progress, pause, resume, cancel", "app",
           cli="tasks"),
    Action("view('vms')", "view.vms", "3", "VMs",
           "VMs: every VM and template in a table, with what its guest agent says", "app", cli="vm list"),
    Action("view('audit')", "view.audit", "4", "Audit", "Audit: who did what, from the engine's audit log", "app",
           cli="audit"),
    Action("view('events')", "view.events", "5", "Events",
           "Events: what this console heard from the engine this session", "app"),
    Action("refresh", "refresh", "ctrl+r", "Refresh", "Ask every host again and re-read the task list", "app"),
    Action("quit", "quit", "q", "Quit",
           "Quit the console (tasks go on in the engine; asks first while some are active)", "app", show=True),
    Action("quit", "quit.ctrlc", "ctrl+c", "Quit", "Quit the console (asks as q does)", "app", palette=False),
    Action("quit", "quit.ctrl", "ctrl+q", "Quit", "Quit the console (asks as q does)", "app", palette=False,
           priority=True),
    # ------------------------------------------------------------------ the VM or template under the cursor
    _vm("s", "start", "Start", "Start the selected VM (a hibernated one resumes)", cli="vm start", show=True,
        marks=True),
    _vm("x", "stop", "Stop", "Shut the selected VM down safely through its guest agent (asks first)",
        cli="vm stop", show=True, marks=True),
    _vm("X", "force_stop", "Force stop", "Power the selected VM off at once (asks first)", cli="vm stop --force",
        marks=True),
    _vm("r", "reboot", "Reboot", "Reboot the selected VM through its guest agent (asks first)", cli="vm reboot",
        marks=True),
    _vm("h", "hibernate", "Hibernate", "Save the selected VM's memory to disk and stop it; start resumes it",
        cli="vm hibernate", marks=True),
    _vm("n", "create", "New VM", "Create a VM on the selected host", cli="vm create", precheck=False),
    _vm("c", "clone", "Clone", "Copy the selected VM (or template) under a new name, to a host and datastore",
        cli="vm clone"),
    _vm("t", "convert", "Template/VM", "Convert the selected VM to a template, or a template back to a VM",
        cli="template convert"),
    _vm("d", "deploy", "Deploy", "Make VMs from the selected template: a name pattern, a count, linked or full, "
        "on a host and datastore", cli="template deploy"),
    _vm("e", "export", "Export", "Export the selected VM or template as OVA or OVF on its host", cli="vm export"),
    _vm("i", "import", "Import", "Import an OVA/OVF package from a host", cli="vm import", precheck=False),
    _vm("delete", "delete", "Delete", "Delete the selected VM or template (type its name to confirm); "
        "in the recycle bin: purge it for good", cli="vm delete", show=True, marks=True),
    _vm("u", "restore", "Restore", "Bring the selected VM back from the recycle bin", cli="vm restore"),
    _vm("a", "serial", "Serial", "Attach to the selected VM's serial console: keys go to the guest, ctrl+] leaves",
        cli=None),
    _vm("space", "mark", "Mark", "Mark or unmark the selected VM; start, stop, reboot, hibernate and delete act "
        "on every marked VM", cli=None, changes=False, precheck=False),
    _vm("M", "unmark", "Unmark all", "Clear every mark", cli=None, changes=False, precheck=False),
    # ------------------------------------------------------------------ the Inventory
    Action("probe", "inventory.probe", "p", "Probe", "Probe the selected host: latency and throughput (a task)",
           "inventory", cli="probe"),
    Action("refresh_facts", "inventory.facts", "f", "Facts now",
           "Facts now: ask the selected host(s) again without waiting (VMs: the list and the agent)", "inventory",
           cli="hosts"),
    Action("filter", "inventory.filter", "slash", "Filter",
           "Filter the tree: a part of a name, a host, a state (esc clears it)", "inventory"),
    # ------------------------------------------------------------------ the VMs table
    Action("filter", "vms.filter", "slash", "Filter", "Filter the rows: a part of a name, a host or a state "
           "(esc clears it)", "vms"),
    Action("refresh_now", "vms.refresh", "f", "Now", "Ask for the list and the agent of the VM under the cursor now",
           "vms"),
    # ------------------------------------------------------------------ the Tasks view
    Action("pause", "tasks.pause", "p", "Pause", "Pause the selected task; it keeps its checkpoint", "tasks",
           show=True, changes=True, precheck="task:pause", cli="task pause"),
    Action("resume", "tasks.resume", "r", "Resume", "Resume the selected paused, interrupted or failed task",
           "tasks", show=True, changes=True, precheck="task:resume", cli="task resume"),
    Action("cancel_task", "tasks.cancel", "c", "Cancel", "Cancel the selected task; what it made is rolled back",
           "tasks", show=True, changes=True, precheck="task:cancel", cli="task cancel"),
    Action("log", "tasks.log", "l", "Log", "The selected task's whole log, full screen", "tasks", show=True,
           cli="task show"),
    Action("copy_error", "tasks.copy", "y", "Copy error",
           "Copy the selected task's error and hint to the clipboard (OSC 52)", "tasks"),
    Action("filter", "tasks.filter", "slash", "Filter",
           "Filter the tasks: part of a title, a state, a kind or a host (esc clears it)", "tasks", show=True),
    Action("hide_finished", "tasks.finished", "f", "Hide done",
           "Hide or show the tasks that succeeded or were cancelled (failed ones stay)", "tasks"),
    # ------------------------------------------------------------------ every table
    Action("cursor_down", "table.down", "j", "Down", "The next row", "table", palette=False),
    Action("cursor_up", "table.up", "k", "Up", "The previous row", "table", palette=False),
    Action("scroll_top", "table.first", "g,home", "First", "The first row", "table", palette=False),
    Action("scroll_bottom", "table.last", "G,end", "Last", "The last row", "table", palette=False),
    Action("sort_next", "table.sort", "o", "Sort", "Sort by the next column (a click on a header sorts by it)",
           "table", palette=False),
    Action("sort_flip", "table.sort.flip", "O", "Sort ⇅", "Sort the other way round", "table", palette=False),
)


def group(name: str) -> tuple[Action, ...]:
    """The actions bound in one view group, in catalogue order."""
    return tuple(a for a in CATALOGUE if a.group == name)


def by_name(name: str, group_name: str | None = None) -> Action:
    """The action called `name` (the first one; in `group_name` when given)."""
    for a in CATALOGUE:
        if a.name == name and (group_name is None or a.group == group_name):
            return a
    raise KeyError(name)


def changing_methods() -> frozenset[str]:
    """The method names of the actions that change something (dropped by a read-only console)."""
    return frozenset(a.method for a in CATALOGUE if a.changes)


def cli_verbs() -> Iterator[tuple[str, Action]]:
    """(CLI verb, action) for every action that a shell command also does."""
    for a in CATALOGUE:
        if a.cli:
            yield a.cli, a


def cli_help(verb: str, default: str) -> str:
    """The help line of a CLI verb ("vm start"), from the action that does the same in the console."""
    for v, a in cli_verbs():
        if v == verb:
            return a.help
    return default
