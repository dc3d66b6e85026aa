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
    group: str                      # where it is bound: app, vm, tasks, inventory, vms, overview, alarms, health,
                                    # table, log
    show: bool = False              # in the footer
    changes: bool = False           # changes a task, a VM or a template: gone in a read-only console
    precheck: str | None = None     # the engine's rule: a VM action name, or "task:<action>"
    cli: str | None = None          # the CLI verb doing the same: "vm start" ("vm stop --force": with an option)
    cli_help: str = ""              # that verb's help line in the CLI (`cli_help`), said of "a VM", not "the selected"
    palette: str | None = ""        # the palette's entry: "" the title, None not listed; may name {vm}, {what}
                                    # ("VM"/"template"), {other} (the kind it converts to), {task}, {host}
    marks: bool = False             # applies to every marked VM when VMs are marked
    priority: bool = False          # a Textual priority binding (works even in an input)

    @property
    def binding_id(self) -> str:
        return "ferry." + self.id

    @property
    def method(self) -> str:
        """The method name without arguments: vm_start, view."""
        return self.name.split("(", 1)[0]


def _vm(key: str, name: str, title: str, help: str, *, palette: str, cli: str | None, cli_help: str = "",
        show: bool = False, changes: bool = True, precheck: bool = True, marks: bool = False) -> Action:
    return Action(f"vm_{name}", f"inventory.vm.{name}", key, title, help, "vm", show=show, changes=changes,
                  precheck=f"vm_{name}" if precheck else None, cli=cli, cli_help=cli_help, palette=palette,
                  marks=marks)


CATALOGUE: tuple[Action, ...] = (
    # ------------------------------------------------------------------ everywhere
    Action("command_line", "command", "colon", "Cmd", "Jump to a view by name (:tasks, :inv, :alarms)", "app",
           show=True,
           palette="Command line"),
    Action("help", "help", "question_mark", "Keys", "The keys of this view", "app", show=True,
           palette="Keys of this view"),
    Action("back", "back", "escape", "Back", "Close the command line / previous view", "app", palette=None),
    Action("view('inventory')", "view.inventory", "1", "Inventory",
           "Inventory: site, clusters, hosts, VMs and templates", "app", palette="View: Inventory"),
    Action("view('tasks')", "view.tasks", "2", "Tasks", "Tasks: live progress, pause, resume, cancel", "app",
           palette="View: Tasks", cli="tasks", cli_help="list tasks"),
    Action("view('vms')", "view.vms", "3", "VMs",
           "VMs: every VM and template in a table, with what its guest agent says", "app", palette="View: VMs",
           cli="vm list", cli_help="VMs and templates with their state"),
    Action("view('audit')", "view.audit", "4", "Audit", "Audit: who did what, from the engine's audit log", "app",
           palette="View: Audit", cli="audit", cli_help="the audit log: who did what, when, with what result"),
    Action("view('events')", "view.events", "5", "Events",
           "Events: what this console heard from the engine this session", "app", palette="View: Events"),
    Action("view('migrations')", "view.migrations", "6", "Migrations",
           "Migrations: every server migration with its state, round, last sync and network check", "app",
           palette="View: Migrations", cli="migration list",
           cli_help="the migrations with their state, round and last sync"),
    Action("view('overview')", "view.overview", "0", "Overview",
           "Overview: hosts up and down, VMs by state, alarms by severity, tasks, the last health run and "
           "backup; each tile opens its view", "app", palette="View: Overview"),
    Action("view('alarms')", "view.alarms", "7", "Alarms",
           "Alarms: the open alarms by severity; acknowledge, clear, silence; the history and the events", "app",
           palette="View: Alarms"),
    Action("view('health')", "view.health", "8", "Health",
           "Health: every check's state (OK, WARNING, CRITICAL, UNKNOWN), soft or hard; run a checklist now",
           "app", palette="View: Health"),
    Action("view('backups')", "view.backups", "9", "Backups",
           "Backups: the management-data backups here and on remotes, their schedules and retention; back up "
           "now, prune, restore", "app", palette="View: Backups"),
    Action("view('performance')", "view.performance", "P", "Performance",
           "Performance: every host's CPU, memory, load, network and disk side by side (v: every VM's CPU and "
           "memory); the selected one's history as sparklines over 1h, 1d or 30d", "app", palette="View: Performance"),
    Action("refresh", "refresh", "ctrl+r", "Refresh", "Ask every host again and re-read the task list", "app"),
    Action("quit", "quit", "q", "Quit",
           "Quit the console (tasks go on in the engine; asks first while some are active)", "app", show=True),
    Action("quit", "quit.ctrlc", "ctrl+c", "Quit", "Quit the console (asks as q does)", "app", palette=None),
    Action("quit", "quit.ctrl", "ctrl+q", "Quit", "Quit the console (asks as q does)", "app", palette=None,
           priority=True),
    # ------------------------------------------------------------------ the VM or template under the cursor
    _vm("s", "start", "Start", "Start the selected VM (a hibernated one resumes)", palette="Start {vm}",
        cli="vm start", cli_help="start (or resume a hibernated VM)", show=True, marks=True),
    _vm("x", "stop", "Stop", "Shut the selected VM down safely through its guest agent (asks first)",
        palette="Shut down {vm} (safe)", cli="vm stop",
        cli_help="safe shutdown through the guest agent (--force: power off at once)", show=True, marks=True),
    _vm("X", "force_stop", "Force stop", "Power the selected VM off at once (asks first)", palette="Force stop {vm}",
        cli="vm stop --force", cli_help="power off at once (no agent needed)", marks=True),
    _vm("r", "reboot", "Reboot", "Reboot the selected VM through its guest agent (asks first)",
        palette="Reboot {vm}", cli="vm reboot", cli_help="safe reboot through the guest agent", marks=True),
    _vm("h", "hibernate", "Hibernate", "Save the selected VM's memory to disk and stop it; start resumes it",
        palette="Hibernate {vm}", cli="vm hibernate", cli_help="save memory to a file and stop; start resumes it",
        marks=True),
    _vm("z", "pause", "Pause", "Pause the selected VM: its guest halts where it is, its memory kept in QEMU "
        "(asks first); Z resumes it", palette="Pause {vm}", cli="vm pause",
        cli_help="halt the guest where it is (QMP stop), its memory kept; resume continues it", marks=True),
    _vm("Z", "resume", "Resume", "Continue the selected paused VM (also one QEMU stopped on an I/O error, such "
        "as a full datastore)", palette="Resume {vm}", cli="vm resume",
        cli_help="continue a paused VM (also one QEMU stopped on an I/O error, once its datastore has room)",
        marks=True),
    _vm("m", "move", "Move", "Move the selected VM to another host (live while it runs; its disks stay on "
        "a datastore both hosts share)", palette="Move {vm} to another host…", cli="vm move",
        cli_help="move to another host: live while it runs (memory copied in rounds, a short pause at the "
                 "end), its disks staying on a shared datastore"),
    _vm("n", "create", "New VM", "Create a VM on the selected host", palette="create…",
        cli="vm create", cli_help="create an empty VM", precheck=False),
    _vm("c", "clone", "Clone", "Copy the selected VM (or template) under a new name, to a host and datastore",
        palette="Clone {vm}…", cli="vm clone",
        cli_help="full copy of a VM (also while it runs: a point-in-time copy), on its host or on another "
                 "that shares the datastore"),
    _vm("t", "convert", "Template/VM", "Convert the selected VM to a template, or a template back to a VM",
        palette="Convert {what} {vm} to a {other}", cli="template convert",
        cli_help="turn a stopped VM into a template"),
    _vm("d", "deploy", "Deploy", "Make VMs from the selected template: a name pattern, a count, linked or full, "
        "on a host and datastore", palette="Deploy VMs from template {vm}…", cli="template deploy",
        cli_help="make VMs from a template: linked (default) or full clones, N at once, on a host"),
    _vm("e", "export", "Export", "Export the selected VM or template as OVA or OVF on its host",
        palette="Export {vm}…", cli="vm export",
        cli_help="export as OVF (a folder) or OVA (one file) on the host of the VM"),
    _vm("i", "import", "Import", "Import an OVA/OVF package from a host", palette="import…",
        cli="vm import", cli_help="import an OVF or OVA (the manifest is verified first)", precheck=False),
    _vm("delete", "delete", "Delete", "Delete the selected VM or template (type its name to confirm); "
        "in the recycle bin: purge it for good", palette="Delete {vm}…", cli="vm delete",
        cli_help="delete a VM (asks for its name); --secure overwrites, --delayed keeps it in the recycle bin",
        show=True, marks=True),
    _vm("u", "restore", "Restore", "Bring the selected VM back from the recycle bin",
        palette="Restore {vm} from the recycle bin", cli="vm restore", cli_help="bring a VM back from the recycle bin"),
    _vm("a", "serial", "Serial", "Attach to the selected VM's serial console: keys go to the guest, ctrl+] leaves",
        palette="Serial console of {vm}", cli=None),
    _vm("space", "mark", "Mark", "Mark or unmark the selected VM; start, stop, reboot, hibernate, pause, resume "
        "and delete act on every marked VM", palette="Mark or unmark {vm}", cli=None, changes=False, precheck=False),
    _vm("M", "unmark", "Unmark all", "Clear every mark", palette="Unmark every VM", cli=None, changes=False,
        precheck=False),
    # ------------------------------------------------------------------ the Inventory
    Action("probe", "inventory.probe", "p", "Probe", "Probe the selected host: latency and throughput (a task)",
           "inventory", show=True, palette="Probe host {host}", cli="probe",
           cli_help="measure latency and throughput to a host"),
    Action("refresh_facts", "inventory.facts", "f", "Facts now",
           "Facts now: ask the selected host(s) again without waiting (VMs: the list and the agent)", "inventory",
           show=True, palette="Facts now: ask the selected host(s) again", cli="hosts",
           cli_help="facts of every host, gathered in parallel"),
    Action("filter", "inventory.filter", "slash", "Filter",
           "Filter the tree: a part of a name, a host, a state (esc clears it)", "inventory", show=True,
           palette="Filter the tree"),
    # ------------------------------------------------------------------ the VMs table
    Action("filter", "vms.filter", "slash", "Filter", "Filter the rows: a part of a name, a host or a state (esc clears it)",
           "vms", show=True, palette="Filter the VMs"),
    Action("refresh_now", "vms.refresh", "f", "Now", "Ask for the list and the agent of the VM under the cursor now",
           "vms", palette="Ask for the VM list now"),
    # ------------------------------------------------------------------ the Tasks view
    Action("pause", "tasks.pause", "p", "Pause", "Pause the selected task; it keeps its checkpoint", "tasks",
           show=True, changes=True, precheck="task:pause", palette="Pause task {task}", cli="task pause",
           cli_help="pause a task (it keeps its checkpoint)"),
    Action("resume", "tasks.resume", "r", "Resume", "Resume the selected paused, interrupted or failed task",
           "tasks", show=True, changes=True, precheck="task:resume", palette="Resume task {task}", cli="task resume",
           cli_help="resume a paused, interrupted or failed task from its checkpoint"),
    Action("cancel_task", "tasks.cancel", "c", "Cancel", "Cancel the selected task; what it made is rolled back",
           "tasks", show=True, changes=True, precheck="task:cancel", palette="Cancel task {task}", cli="task cancel",
           cli_help="cancel a task; what it made is rolled back (also of a paused, interrupted or failed one)"),
    Action("log", "tasks.log", "l", "Log", "The selected task's whole log, full screen", "tasks", show=True,
           palette="Log of task {task}", cli="task show", cli_help="the details and log of a task"),
    Action("copy_error", "tasks.copy", "y", "Copy error",
           "Copy the selected task's error and hint to the clipboard (OSC 52)", "tasks",
           palette="Copy the error of task {task}"),
    Action("filter", "tasks.filter", "slash", "Filter",
           "Filter the tasks: part of a title, a state, a kind or a host (esc clears it)", "tasks", show=True,
           palette="Filter the tasks"),
    Action("hide_finished", "tasks.finished", "f", "Hide done",
           "Hide or show the tasks that succeeded or were cancelled (failed ones stay)", "tasks",
           palette="Hide or show the finished tasks"),
    # ------------------------------------------------------------------ the Migrations view
    Action("assess", "migrations.assess", "a", "Assess",
           "Assess the selected migration: the source's facts over SSH, the network check, findings and a "
           "recommendation (a task)", "migrations", show=True, changes=True, palette="Assess the selected migration",
           cli="migration assess",
           cli_help="collect the facts of the source over SSH, check the network, judge and recommend"),
    Action("report", "migrations.report", "R", "Report",
           "The selected migration's assessment report, full screen (esc goes back)", "migrations", show=True,
           palette="Assessment report of the selected migration", cli="migration report",
           cli_help="the assessment report as Markdown (--out FILE.md) or JSON"),
    Action("override", "migrations.override", "n", "Override net",
           "Go on despite a failed network check of the selected migration: asks for the reason (audited)",
           "migrations", show=True, changes=True, palette="Override the network check of the selected migration…",
           cli="migration netcheck --override", cli_help="why the migration may go on below the thresholds"),
    Action("sync_round", "migrations.sync", "s", "Sync",
           "A sync round of the selected migration now: its receiver pulls from the source directly (the first "
           "round copies everything, later ones what changed; a task)", "migrations", show=True, changes=True,
           palette="Sync the selected migration now", cli="migration sync",
           cli_help="a sync round: the receiver pulls from the source (the first round copies all)"),
    Action("test_launch", "migrations.test", "t", "Test launch",
           "Test-launch the selected migration: a throw-away copy of its target boots on an isolated network and "
           "is checked; the syncs go on (a task)", "migrations", show=True, changes=True,
           palette="Test-launch the selected migration", cli="migration test",
           cli_help="test launch: a throw-away copy of the target boots isolated and is checked"),
    Action("cutover", "migrations.cutover", "c", "Cutover…",
           "The cutover screen of the selected migration: the summary and the name typed to start; then each step "
           "live, with a rollback key", "migrations", show=True, changes=True,
           palette="Cut the selected migration over…", cli="migration cutover",
           cli_help="the cutover runbook, after a confirmation screen (type the name)"),
    Action("rollback", "migrations.rollback", "b", "Rollback…",
           "Back to the source (type the name): a running cutover is cancelled and rolls back; a migration "
           "before its cutover is given up", "migrations", show=True, changes=True,
           palette="Roll the selected migration back…", cli="migration rollback",
           cli_help="back to the source: a running cutover is cancelled and rolled back"),
    Action("finalize", "migrations.finalize", "F", "Finalize…",
           "After go-live: Ferry's key and files leave the selected migration's source, which shuts down "
           "(asks first)", "migrations", changes=True, palette="Finalize the selected migration…"),
    # (`ferry migration finalize` once the CLI takes its help line from here: its own has an apostrophe,
    # which zsh's completion escapes)
    Action("new_migration", "migrations.new", "N", "New…",
           "The migration wizard: a migration written into its wave's plan file (the engine checks it first, "
           "as ferry plan check does), then applied if you want", "migrations", show=True, changes=True,
           palette="New migration… (the wizard writes the wave's plan file)"),
    Action("filter", "migrations.filter", "slash", "Filter",
           "Filter the migrations: a part of a name, a wave, a state or a host (esc clears it)", "migrations",
           show=True, palette="Filter the migrations"),
    Action("refresh_now", "migrations.refresh", "f", "Now", "Ask for the migrations now", "migrations",
           palette="Ask for the migrations now"),
    # ------------------------------------------------------------------ the Overview
    Action("open_tile", "overview.open", "enter", "Open",
           "Open the view of the tile under the cursor, filtered to what needs a look (hosts down, failed "
           "tasks, checks with a problem)", "overview", show=True, palette="Open the view of the selected tile"),
    Action("tile(1)", "overview.next", "j,down,right", "Next", "The next tile", "overview", palette=None),
    Action("tile(-1)", "overview.previous", "k,up,left", "Previous", "The previous tile", "overview",
           palette=None),
    Action("refresh_now", "overview.refresh", "f", "Now", "Ask for the overview now", "overview",
           palette="Ask for the overview now"),
    # ------------------------------------------------------------------ the Alarms view
    Action("ack", "alarms.ack", "a", "Ack…",
           "Acknowledge the selected alarm (someone is on it), with a comment (audited)", "alarms", show=True,
           changes=True, palette="Acknowledge the selected alarm…"),
    Action("clear_alarm", "alarms.clear", "C", "Clear…",
           "Clear the selected alarm by hand, with a reason (audited); it goes to the history", "alarms", show=True,
           changes=True, palette="Clear the selected alarm…", cli="alarm clear",
           cli_help="clear an open alarm by hand, with a reason (audited)"),
    Action("silence", "alarms.silence", "S", "Silence…",
           "Silence alarms like the selected one (its type, object and severity prefilled; globs allowed) for a "
           "while, with a reason: still listed, marked, not notified", "alarms", show=True, changes=True,
           palette="Silence alarms like the selected one…", cli="silence add",
           cli_help="silence alarms matching every --match until --for has passed"),
    Action("history", "alarms.history", "H", "History", "Show or hide the cleared alarms (the history)", "alarms",
           show=True, palette="Show or hide the cleared alarms"),
    Action("events", "alarms.events", "e", "Events",
           "The lower pane: the events of alarms and silences (raised, acknowledged, cleared, silenced), newest "
           "first; again: the selected alarm's details", "alarms", show=True,
           palette="Events of alarms and silences", cli="events",
           cli_help="what happened to alarms and silences, newest first"),
    Action("filter", "alarms.filter", "slash", "Filter",
           "Filter the alarms: a severity, a state, a type, an object, silenced or suppressed (esc clears it)",
           "alarms", show=True, palette="Filter the alarms"),
    Action("refresh_now", "alarms.refresh", "f", "Now", "Ask for the alarms now", "alarms",
           palette="Ask for the alarms now"),
    # ------------------------------------------------------------------ the Health view
    Action("run_health", "health.run", "r", "Run now…",
           "Run health checks now: a checklist (daily, weekly, monthly or the site's own) or every check of one "
           "host; a task, followed in Tasks", "health", show=True, changes=True,
           palette="Run health checks now…", cli="health run",
           cli_help="run a checklist (default daily) or every check of one host, as a task"),
    Action("details", "health.details", "enter", "Details",
           "The selected check's details full screen: its long output, performance data and history", "health",
           palette="Details and history of the selected check", cli="health history",
           cli_help="the newest results of a check, newest first"),
    Action("filter", "health.filter", "slash", "Filter",
           "Filter the checks: a host, a check, a state (OK, WARNING, CRITICAL, UNKNOWN, problem), SOFT or HARD "
           "(esc clears it)", "health", show=True, palette="Filter the checks"),
    Action("refresh_now", "health.refresh", "f", "Now", "Ask for the checks now", "health",
           palette="Ask for the checks now"),
    # ------------------------------------------------------------------ the Backups view
    Action("backup_now", "backups.now", "b", "Back up now…",
           "Back up the management data now: here, or here and uploaded to a configured remote (verified on "
           "the server); a notice says when it is done", "backups", show=True, changes=True,
           palette="Back up now…", cli="backup now",
           cli_help="back up state.db, config.toml, known_hosts and themes now (kind manual)"),
    Action("prune", "backups.prune", "p", "Prune…",
           "What a prune would remove (the backups past [backup.keep], oldest first), then Prune removes them; "
           "Cancel is the default", "backups", show=True, changes=True, palette="Prune backups…",
           cli="backup prune", cli_help="remove the backups past [backup.keep] (oldest first)"),
    Action("restore_backup", "backups.restore", "R", "Restore…",
           "Restore the selected backup (type its id): tasks must be idle, the engine stops and starts again, "
           "the current state is backed up first", "backups", show=True, changes=True,
           palette="Restore the selected backup…"),
    Action("filter", "backups.filter", "slash", "Filter",
           "Filter the backups: a part of an id, a kind, where it is, or problem (esc clears it)", "backups",
           show=True, palette="Filter the backups"),
    Action("refresh_now", "backups.refresh", "f", "Now", "Ask for the backups and their schedules now", "backups",
           palette="Ask for the backups now"),
    # ------------------------------------------------------------------ the Performance view
    Action("toggle_objects", "performance.objects", "v", "Hosts/VMs",
           "The table shows the VMs (name, host, CPU, memory) instead of the hosts, or the hosts again",
           "performance", show=True, palette="Performance: VMs instead of hosts (or hosts again)"),
    Action("cycle_window", "performance.window", "w", "Window",
           "The window of the selected host's or VM's history: 1h (a point per 10 s), 1d (1 min), 30d (10 min)",
           "performance", show=True, palette="Performance: the next window (1h, 1d, 30d)"),
    Action("filter", "performance.filter", "slash", "Filter",
           "Filter the hosts or VMs: a part of a name, a VM's host, or nosample (esc clears it)",
           "performance", show=True, palette="Filter the hosts or VMs"),
    Action("refresh_now", "performance.refresh", "f", "Now", "Ask for the newest samples now", "performance",
           palette="Ask for the newest samples now"),
    # ------------------------------------------------------------------ every table
    Action("cursor_down", "table.down", "j", "Down", "The next row", "table", palette=None),
    Action("cursor_up", "table.up", "k", "Up", "The previous row", "table", palette=None),
    Action("scroll_top", "table.first", "g,home", "First", "The first row", "table", palette=None),
    Action("scroll_bottom", "table.last", "G,end", "Last", "The last row", "table", palette=None),
    Action("sort_next", "table.sort", "o", "Sort", "Sort by the next column (a click on a header sorts by it)",
           "table", palette=None),
    Action("sort_flip", "table.sort.flip", "O", "Sort ⇅", "Sort the other way round", "table", palette=None),
    # ------------------------------------------------------------------ the Audit and Events tables
    Action("filter", "table.filter", "slash", "Filter", "Filter the rows (esc clears it)", "records", show=True,
           palette="Filter the rows"),
    Action("copy_row", "table.copy", "y", "Copy", "Copy the selected row to the clipboard (OSC 52)", "records",
           palette="Copy the selected row"),
    # ------------------------------------------------------------------ a task's full-screen log
    Action("close", "log.back", "escape,q", "Back", "Back to the Tasks view", "log", show=True, palette=None),
    Action("scroll_by(1)", "log.down", "j,down", "Down", "One line down", "log", palette=None),
    Action("scroll_by(-1)", "log.up", "k,up", "Up", "One line up", "log", palette=None),
    Action("top", "log.top", "g,home", "Top", "The oldest lines", "log", palette=None),
    Action("bottom", "log.end", "G,end", "End", "The newest lines; new ones follow", "log", show=True, palette=None),
    Action("copy_log", "log.copy", "y", "Copy log", "Copy the whole log to the clipboard (OSC 52)", "log", show=True,
           palette=None),
    Action("copy_error", "log.error", "e", "Copy error", "Copy the task's error and hint", "log", show=True,
           palette=None),
    # ------------------------------------------------------------------ a full-screen report
    Action("close", "report.back", "escape,q", "Back", "Back to the view it was opened from", "report", show=True,
           palette=None),
    # ------------------------------------------------------------------ a migration's cutover screen
    Action("close", "cutover.back", "escape,q", "Back",
           "Back to the Migrations view (a running cutover goes on in the engine)", "cutover", show=True,
           palette=None),
    Action("rollback", "cutover.rollback", "b", "Roll back…",
           "Roll the cutover back (the name typed once more): the target stopped, the source's address and "
           "services back", "cutover", show=True, changes=True, palette=None),
    Action("log", "cutover.log", "l", "Log", "The cutover task's whole log, full screen", "cutover", show=True,
           palette=None),
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


def by_id(action_id: str) -> Action | None:
    """The action whose binding id is `action_id` ("tasks.cancel" or "ferry.tasks.cancel")."""
    short = action_id.removeprefix("ferry.")
    return next((a for a in CATALOGUE if a.id == short), None)


def cli_verbs() -> Iterator[tuple[str, Action]]:
    """(CLI verb, action) for every action that a shell command also does."""
    for a in CATALOGUE:
        if a.cli:
            yield a.cli, a


def cli_help(verb: str) -> str:
    """The help line of a CLI verb ("vm start"; "vm stop --force" for an option), from the action that
    does the same in the console: one row says it for both front ends."""
    for v, a in cli_verbs():
        if v == verb:
            return a.cli_help or a.help
    raise KeyError(f"no action of the catalogue has the CLI verb {verb!r}")
