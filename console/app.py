"""The Ferry console: a Textual app that reaches the engine only through EngineClient.

Views (overview, inventory, VMs, tasks, audit, events, migrations, alarms, health, backups) sit in a content
switcher under a one-line header; the console opens on the Overview; `:` jumps to a view by
name, `?` shows the keys of the view, `esc` goes back, ctrl+p holds every action.
Keys are remapped from config.toml's [console.keys]; read-only mode (--readonly, or [console]
readonly = true) removes every action that changes something (console/keys.py). A production site
shows its frame and label whatever the theme (console/framed.py).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from functools import partial
from typing import Any, Callable

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual import events
from textual.css.query import NoMatches
from textual.binding import ActiveBinding
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.theme import Theme
from textual.widgets import ContentSwitcher, Input
from textual.worker import Worker, WorkerState

from ferry.engine.errors import FerryError
from ferry.engine.taskmodel import TaskState

from ferry.console import keys as opkeys
from ferry.console.views.audit import AuditView, EventsView
from ferry.console.commands import FerryCommands
from ferry.console.feed import TaskFeed
from ferry.console.widgets.footer import FerryFooter
from ferry.console.widgets.framed import FramedScreen
from ferry.console.widgets.header import FerryHeader
from ferry.console.views.inventory import InventoryView
from ferry.console.messages import CrumbsChanged, TasksChanged
from ferry.console.dialogs.modals import ConfirmScreen, HelpScreen, esc
from ferry.console.styles import CSS as FERRY_CSS
from ferry.console.views.tasks import ALLOWED, TasksView
from ferry.console.theming import DEFAULT_THEME, PRODUCTION_THEME, load_themes, theme_dirs, variable_defaults
from ferry.console.views.alarms import AlarmsView
from ferry.console.views.backups import BackupsView
from ferry.console.views.performance import PerformanceView
from ferry.console.views.health import HealthView
from ferry.console.views.migrations import MigrationsView
from ferry.console.views.overview import OverviewView
from ferry.console.views.vms import VMsView

log = logging.getLogger("ferry.console")
HEAP_FREEZE_AT = 2000     # records, nodes or rows built at once: see FerryApp.heap_grew

VIEWS = ("overview", "inventory", "tasks", "vms", "audit", "events", "migrations", "alarms", "health", "backups",
         "performance")
FIRST_VIEW = "overview"     # what the console opens on
VIEW_NAMES = {
    "inventory": "inventory", "inv": "inventory", "in": "inventory", "i": "inventory",
    "hosts": "inventory", "host": "inventory", "ho": "inventory", "clusters": "inventory",
    "vms": "vms", "vm": "vms", "v": "vms", "templates": "vms", "template": "vms",
    "tasks": "tasks", "task": "tasks", "tk": "tasks", "t": "tasks", "jobs": "tasks",
    "audit": "audit", "au": "audit", "events": "events", "ev": "events", "event": "events",
    "migrations": "migrations", "migration": "migrations", "mig": "migrations", "mi": "migrations",
    "overview": "overview", "ov": "overview", "o": "overview", "home": "overview", "summary": "overview",
    "alarms": "alarms", "alarm": "alarms", "al": "alarms", "alerts": "alarms", "silences": "alarms",
    "health": "health", "he": "health", "checks": "health", "check": "health",
    "backups": "backups", "backup": "backups", "ba": "backups", "bk": "backups",
    "performance": "performance", "perf": "performance", "metrics": "performance", "pe": "performance",
}
LINE_COMMANDS = ("overview", "inventory", "inv", "hosts", "vms", "tasks", "audit", "events", "migrations", "alarms",
                 "health", "backups", "performance", "perf", "theme ", "help", "refresh", "quit")
DEFAULT_PROBE = {"pings": 20, "size_mib": 64}


class CommandLine(Input):
    """The `:` line at the bottom (k9s style). Enter runs it, tab completes, esc closes it."""

    BINDINGS = [Binding("tab", "cursor_right", "Complete", show=False, id="ferry.command.complete")]

    def on_blur(self) -> None:
        self.remove_class("-open")


class MainScreen(FramedScreen):
    """The screen under every modal; views skip drawing while covered and catch up when it returns."""

    @property
    def active_bindings(self) -> dict[str, ActiveBinding]:
        """What the footer shows: in read-only mode, nothing that changes anything."""
        found = super().active_bindings
        if getattr(self.app, "readonly", False):
            found = {k: b for k, b in found.items() if not opkeys.is_destructive(b.binding.action)}
        return found

    def on_screen_resume(self) -> None:
        app = self.app
        if isinstance(app, FerryApp):
            try:
                app.view_widget().catch_up()
            except NoMatches:   # not composed yet
                pass


class FerryApp(App[int]):
    CSS = FERRY_CSS
    TITLE = "Ferry"
    COMMANDS = {FerryCommands}
    COMMAND_PALETTE_DISPLAY = "^p"
    NOTIFICATION_TIMEOUT = 6
    BINDINGS = opkeys.bindings("app")

    def __init__(self, client: Any, *, clock: Callable[[], float] = time.time, theme: str | None = None,
                 own_client: bool = False, probe: dict | None = None, poll: dict | None = None,
                 readonly: bool = False, first_view: str = FIRST_VIEW) -> None:
        super().__init__()
        if first_view not in VIEWS:
            raise ValueError(first_view)
        self.first_view = first_view
        self.client = client
        self.site = client.site
        settings = getattr(self.site, "console", None)
        self.readonly = readonly or bool(getattr(settings, "readonly", False))
        self._freeze_due = False
        self.config_keys = opkeys.config_keymap(dict(getattr(settings, "keys", None) or {}))
        self.clock = clock
        self.own_client = own_client
        self.probe_params = {**DEFAULT_PROBE, **(probe or {})}
        self.poll = poll
        self.feed = TaskFeed(client, self._feed_changed)
        self.current_view = first_view
        self.history: list[str] = []
        self.crumbs: dict[str, tuple[str, ...]] = {}
        self.start_error: FerryError | None = None
        self._started_client = False

        root = getattr(getattr(client, "workspace", None), "root", None)
        self.theme_files, self.theme_problems = load_themes(theme_dirs(root))
        for tf in self.theme_files.values():
            self.register_theme(tf.theme)
        # --theme (this session only) > the theme chosen with :theme (remembered) > [site] theme > default
        self.explicit_theme = theme
        self.default_theme = self.site.theme or (PRODUCTION_THEME if self.site.production else DEFAULT_THEME)
        first = theme if theme in self.theme_files else self.default_theme
        if first in self.theme_files:
            self.theme = first
        if self.config_keys:
            self.set_keymap(self.config_keys)

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return {**super().get_theme_variable_defaults(), **variable_defaults()}

    # ------------------------------------------------------------------ layout and lifecycle

    def get_default_screen(self) -> Screen:
        return MainScreen(id="main")

    def compose(self) -> ComposeResult:
        yield FerryHeader(self.site.name, self.site.production, clock=self.clock,
                          engine_state=lambda: self.client.engine_state, readonly=self.readonly)
        with ContentSwitcher(initial=self.first_view, id="views"):
            yield OverviewView(self.client, poll=self.poll)
            yield InventoryView(self.client, clock=self.clock, poll=self.poll)
            yield TasksView(self.client, self.feed)
            yield VMsView(self.client, clock=self.clock, poll=self.poll)
            yield AuditView(self.client)
            yield EventsView(self.feed)
            yield MigrationsView(self.client, poll=self.poll)
            yield AlarmsView(self.client, poll=self.poll)
            yield HealthView(self.client, poll=self.poll)
            yield BackupsView(self.client, poll=self.poll)
            yield PerformanceView(self.client, poll=self.poll)
        yield CommandLine(placeholder="overview · inventory · vms · tasks · alarms · health · backups · audit · events · migrations · "
                                      "theme NAME · help · quit   (esc closes)",
                          suggester=SuggestFromList(LINE_COMMANDS, case_sensitive=False), id="cmdline")
        yield FerryFooter()

    async def on_mount(self) -> None:
        if self.own_client and self.client.engine_state != "running":
            try:
                await self.client.start()
                self._started_client = True
                self.site = self.client.site
            except FerryError as e:
                self.start_error = e
                self.exit(1, return_code=1)
                return
        self.query_one(FerryHeader).tick()
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        for problem in self.theme_problems:
            self.notify(esc(problem), title="Theme file skipped", severity="warning")
        if self.explicit_theme and self.explicit_theme not in self.theme_files:
            self._unknown_theme(self.explicit_theme)
        unknown = opkeys.unknown_ids(self.config_keys, self.binding_ids())
        if unknown:
            self.notify(f"config.toml [console.keys]: no action named {esc(', '.join(unknown))}; those keys are "
                        "left as they were (hint: ? lists each action's id next to its keys)",
                        title="Keys", severity="warning", timeout=15)
        self.run_worker(partial(self.feed.run_events), name="task events", group="feed-events", exit_on_error=False)
        self.run_worker(partial(self.feed.run_poll), name="task poll", group="feed-poll", exit_on_error=False)
        self.run_worker(partial(self._load_settings), name="settings", group="settings", exit_on_error=False)
        self.run_worker(partial(self._reconcile), name="VM reconcile", group="reconcile", exit_on_error=False)
        self.switch_view(self.first_view, remember=False)

    async def _reconcile(self) -> None:
        """Once at start: QEMU processes without a record (orphans) and VMs whose process is gone (missing)."""
        report = await self.client.vm_reconcile()
        orphans, missing = report.orphans, report.missing
        if not orphans and not missing:
            return
        lines = []
        if missing:
            names = ", ".join(f"{m.vm} on {m.host}" for m in missing[:4]) + (" …" if len(missing) > 4 else "")
            lines.append(f"{len(missing)} VM{'s' if len(missing) > 1 else ''} recorded as running but gone: {names}")
        if orphans:
            procs = ", ".join(f"{o.process} pid {o.pid} on {o.host}" for o in orphans[:3]) + \
                (" …" if len(orphans) > 3 else "")
            lines.append(f"{len(orphans)} QEMU process{'es' if len(orphans) > 1 else ''} without a record: {procs}")
        lines.append("hint: start a missing VM again with s; `ferry vm reconcile` lists everything")
        self.notify(esc("\n".join(lines)), title="Reconcile", severity="warning", timeout=15)
        self.inventory.refresh_vms()
        self.vms_view.refresh_vms()

    def binding_ids(self) -> set[str]:
        """Every action id the keymap may name."""
        from ferry.console.dialogs.log import TaskLogScreen
        from ferry.console.dialogs.report import ReportScreen
        from ferry.console.widgets.table import KeyedTable, TableFilter
        return opkeys.binding_ids([type(self), CommandLine, InventoryView, TasksView, VMsView, AuditView, EventsView,
                                   MigrationsView, OverviewView, AlarmsView, HealthView, BackupsView, PerformanceView, KeyedTable, TableFilter,
                                   TaskLogScreen, ReportScreen, ConfirmScreen, HelpScreen])

    async def _load_settings(self) -> None:
        if not self.explicit_theme:
            saved = await self.client.get_setting("theme", None)
            if saved:
                if saved in self.theme_files:
                    self.theme = saved
                else:
                    self._unknown_theme(saved)

    async def on_unmount(self) -> None:
        if self._started_client:
            self._started_client = False
            await self.client.close()

    # ------------------------------------------------------------------ views and navigation

    @property
    def inventory(self) -> InventoryView:
        return self.query_one(InventoryView)

    @property
    def tasks_view(self) -> TasksView:
        return self.query_one(TasksView)

    @property
    def vms_view(self) -> VMsView:
        return self.query_one(VMsView)

    @property
    def audit_view(self) -> AuditView:
        return self.query_one(AuditView)

    @property
    def events_view(self) -> EventsView:
        return self.query_one(EventsView)

    @property
    def migrations_view(self) -> MigrationsView:
        return self.query_one(MigrationsView)

    @property
    def overview(self) -> OverviewView:
        return self.query_one(OverviewView)

    @property
    def alarms_view(self) -> AlarmsView:
        return self.query_one(AlarmsView)

    @property
    def health_view(self) -> HealthView:
        return self.query_one(HealthView)

    @property
    def backups_view(self) -> BackupsView:
        return self.query_one(BackupsView)

    @property
    def performance_view(self) -> PerformanceView:
        return self.query_one(PerformanceView)

    def view_widget(self, name: str | None = None) -> Any:
        """The view named `name` (default: the one shown)."""
        name = name or self.current_view
        return self.query_one("#views", ContentSwitcher).get_child_by_id(name)

    def action_view(self, name: str) -> None:
        self.switch_view(name)

    def switch_view(self, name: str, *, remember: bool = True) -> None:
        if name not in VIEWS:
            raise ValueError(name)
        if remember and name != self.current_view:
            self.history = (self.history + [self.current_view])[-20:]
        self.current_view = name
        self.query_one("#views", ContentSwitcher).current = name
        view = self.view_widget(name)
        view.activate()
        self._show_crumbs()
        self.refresh_bindings()

    def show_view(self, name: str, filter_text: str = "") -> None:
        """Switch to a view with its `/` filter set to `filter_text` (the Overview's tiles: "failed", "down")."""
        self.switch_view(name)
        if filter_text:
            from ferry.console.widgets.table import TableFilter
            line = self.view_widget(name).query_one(TableFilter)
            line.value = filter_text
            line.table.set_filter(filter_text)
            self.view_widget(name).post_crumbs()

    def action_back(self) -> None:
        line = self.query_one(CommandLine)
        if line.has_class("-open"):
            self._close_command_line()
        elif getattr(self.view_widget(), "clear_filter", lambda: False)():
            pass        # esc clears the filter first (k9s)
        elif self.history:
            self.switch_view(self.history.pop(), remember=False)

    def heap_grew(self, objects: int) -> None:
        """A view just built `objects` records, nodes or rows that live long (the first VM list of a
        big site). Past HEAP_FREEZE_AT, soon after, the collector is told everything there is long-lived
        (gc.freeze): its full collections walk every object and held the screen for 0.1-0.3 s every
        few seconds at 10,000 VMs. Objects are still freed when no longer used; only cycles among those
        frozen wait (removed tree nodes, a few per VM deleted)."""
        if objects >= HEAP_FREEZE_AT and not self._freeze_due:
            self._freeze_due = True
            self.set_timer(0.5, self._freeze_heap)

    def _freeze_heap(self) -> None:
        self._freeze_due = False
        gc.freeze()

    def on_crumbs_changed(self, message: CrumbsChanged) -> None:
        self.set_crumbs(message.view, message.crumbs)

    def set_crumbs(self, view: str, crumbs: tuple[str, ...]) -> None:
        self.crumbs[view] = crumbs
        if view == self.current_view:
            self._show_crumbs()

    def _show_crumbs(self) -> None:
        try:
            self.query_one(FerryHeader).crumbs = self.crumbs.get(self.current_view, (self.current_view,))
        except NoMatches:   # the app is closing: its widgets are gone before the last messages
            pass

    def _feed_changed(self) -> None:
        try:
            self.tasks_view.post_message(TasksChanged())
            self.query_one(FerryHeader).engine_state = self.feed.engine_state
            self.inventory.tasks_changed(self.feed.tasks)
            self.vms_view.tasks_changed(self.feed.tasks)
            self.events_view.feed_changed()
            self.migrations_view.tasks_changed(self.feed.tasks)
            self.overview.tasks_changed(self.feed.tasks)
            self.health_view.tasks_changed(self.feed.tasks)
        except NoMatches:   # the app is closing
            pass

    def on_key(self, event: events.Key) -> None:
        """A view's key that was refused (dimmed) says why, instead of doing nothing."""
        if not isinstance(self.screen, MainScreen) or self.focused is None:
            return
        view = self.view_widget()
        if view not in self.focused.ancestors_with_self:
            return
        if self.readonly and self.destructive_key(view, event.key):
            return      # run_action said why
        refusal = getattr(view, "refusal_for_key", None)
        found = refusal(event.key) if refusal else None
        if found:
            title, why = found
            self.notify(esc(why), title=esc(title), severity="warning", timeout=4)

    # ------------------------------------------------------------------ the command line

    def action_command_line(self) -> None:
        line = self.query_one(CommandLine)
        line.value = ""
        line.add_class("-open")
        line.focus()

    def _close_command_line(self) -> None:
        line = self.query_one(CommandLine)
        line.remove_class("-open")
        line.value = ""
        self.view_widget().activate()

    @on(Input.Submitted, "#cmdline")
    def _command_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip().lstrip(":").strip()
        self._close_command_line()
        if text:
            self.run_command(text)

    def run_command(self, text: str) -> None:
        """One `:` command: a view name (or alias), `theme NAME`, `help`, `refresh`, `quit`."""
        word, _, rest = text.partition(" ")
        word = word.lower()
        if word in VIEW_NAMES:
            self.switch_view(VIEW_NAMES[word])
        elif word in ("theme", "themes", "skin"):
            if rest.strip():
                self.choose_theme(rest.strip())
            else:
                self.notify("themes: " + ", ".join(self.theme_names()) + f" (now: {self.theme})", title="Themes")
        elif word in ("help", "h", "keys"):
            self.action_help()
        elif word in ("refresh", "r"):
            self.action_refresh()
        elif word in ("q", "quit", "q!", "exit"):
            self.run_worker(partial(self.action_quit), group="quit")
        else:
            self.notify(f"unknown command {esc(text)!r}", title="Command", severity="error")
            self.notify("views: :overview, :inventory (:inv, :hosts), :vms, :tasks, :audit, :events, :migrations, "
                        ":alarms, :health, :backups, :perf; also :theme NAME, :help, :refresh, :quit",
                        title="Hint", severity="information")

    # ------------------------------------------------------------------ help, refresh, quit

    def help_rows(self, bindings: list) -> list[tuple[str, str, str]]:
        """One row per action bound here: its keys (after any remapping), the catalogue's help line,
        and its id for [console.keys]; in read-only mode, none that changes anything."""
        keymap = self.keymap
        keys: dict[str, list[str]] = {}
        desc: dict[str, str] = {}
        ids: dict[str, str] = {}
        for b in bindings:
            if not isinstance(b, Binding):
                continue
            row = opkeys.action_of(b)
            if self.readonly and (row.changes if row else opkeys.is_destructive(b.action)):
                continue
            keys.setdefault(b.action, []).extend(
                self.get_key_display(Binding(k, "")) for k in opkeys.keys_of(b, keymap))
            desc.setdefault(b.action, row.help if row else b.tooltip or b.description)
            ids.setdefault(b.action, opkeys.short_id(b.id))
        return [(", ".join(k), desc[a], ids[a]) for a, k in keys.items()]

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        view = self.view_widget()
        from ferry.console.widgets.table import KeyedTable
        own = self.help_rows(view.BINDINGS)
        if view is self.inventory:
            own = [("↑ ↓", "Move in the tree", ""),
                   ("enter", "Open or close a cluster, a host's VMs or the recycle bin", "")] + own
        elif view is self.vms_view:
            own = [("↑ ↓", "Move between VMs (the agents of those on screen are asked every 15 s)", ""),
                   ("enter", "Show the VM in the inventory, with its details", "")] + own
        elif view is self.overview:
            own = [("tab", "The next tile (as j does)", "")] + own
        sections = [(f"{view.TITLE} view", own)]
        if view.query(KeyedTable):
            sections.append(("Table", [("↑ ↓", "Move between rows", "")]
                             + self.help_rows(KeyedTable.BINDINGS)
                             + [("click a header", "Sort by that column; again: the other way", "")]))
        sections += [
            ("Everywhere", self.help_rows(self.BINDINGS) + [(self.get_key_display(Binding("ctrl+p", "")),
                                                             "Command palette: every action, by name", "")]),
            ("Command line (:)", [(":overview :ov", "Overview: the daily round at a glance", ""),
                                  (":inventory :inv :hosts", "Inventory", ""), (":vms :vm :templates", "VMs", ""),
                                  (":tasks :tk", "Tasks", ""), (":audit", "Who did what (the audit log)", ""),
                                  (":events", "What this console heard from the engine this session", ""),
                                  (":migrations :mig", "Server migrations", ""),
                                  (":alarms :al", "Alarms: acknowledge, clear, silence; history, events", ""),
                                  (":health :checks", "Health checks: states, run now, details and history", ""),
                                  (":backups :bk", "Backups: list, schedules, back up now, prune, restore", ""),
                                  (":performance :perf", "Performance: hosts side by side, a host's history", ""),
                                  (":theme NAME", "Switch theme (remembered): " + ", ".join(self.theme_names()), ""),
                                  (":help :refresh :quit", "", "")]),
        ]
        note = ("read-only: actions that change something are not available" if self.readonly else "")
        self.push_screen(HelpScreen(f"Keys · {view.TITLE}", sections, note=note))

    @property
    def keymap(self) -> dict[str, str]:
        """Binding id -> keys, as remapped by config.toml's [console.keys]."""
        return dict(self._keymap)

    # ------------------------------------------------------------------ read-only mode

    def destructive_key(self, view: Any, key: str) -> bool:
        """Whether `key` is bound, in `view`, to an action that changes something."""
        return any(isinstance(b, Binding) and opkeys.is_destructive(b.action) and key in opkeys.keys_of(b, self.keymap)
                   for b in view.BINDINGS)

    def refuse_readonly(self, what: str) -> None:
        self.notify(esc(opkeys.READONLY_NOTICE.format(what=what)), title="Read-only", severity="warning", timeout=5)

    async def run_action(self, action: Any, default_namespace: Any = None, namespaces: Any = None) -> bool:
        """Every key press and footer click comes through here: in read-only mode, what changes
        something is refused with a one-line notice."""
        if self.readonly and isinstance(action, str) and opkeys.is_destructive(action):
            what = next((b.description for b in getattr(default_namespace, "BINDINGS", [])
                         if isinstance(b, Binding) and b.action == action), action)
            self.refuse_readonly(what.lower())
            return True
        return await super().run_action(action, default_namespace, namespaces)

    def action_refresh(self) -> None:
        self.inventory.refresh_all()
        self.vms_view.refresh_vms()
        self.run_worker(partial(self.feed.refresh), group="feed-refresh", exclusive=True, exit_on_error=False)
        self.notify("asking every host again and re-reading tasks", title="Refresh", timeout=2)

    def active_tasks(self) -> list:
        """Tasks queued, running or waiting for an answer, in the engine."""
        return sorted((t for t in self.feed.tasks.values()
                       if t.state in (TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING)), key=lambda t: t.id)

    async def action_quit(self) -> None:
        """q, ctrl+c, :quit: while tasks are active, one question that says they go on in the engine;
        otherwise the console closes at once."""
        if isinstance(self.screen, ConfirmScreen):
            return      # already asking something
        active = self.active_tasks()
        if not active:
            self.exit(0)
            return
        n = len(active)
        ids = ", ".join("#" + str(t.id) for t in active[:5]) + ("…" if n > 5 else "")
        waiting = [t for t in active if t.state == TaskState.WAITING]
        body = (f"{n} task{'s are' if n > 1 else ' is'} active ({ids}). {'They go' if n > 1 else 'It goes'} on in "
                "the engine after you quit: open `ferry` again, or `ferry task list`, to follow "
                f"{'them' if n > 1 else 'it'}.")
        if waiting:
            body += "\n" + ", ".join("#" + str(t.id) for t in waiting) + " wait" + ("s" if len(waiting) == 1 else "") + \
                " for your answer, in a console."

        def done(ok: bool | None) -> None:
            if ok:
                self.exit(0)
        self.push_screen(ConfirmScreen("Quit the console?", body, confirm="Quit", cancel="Stay", danger=False,
                                       changes=False), done)

    # ------------------------------------------------------------------ themes

    def theme_names(self) -> list[str]:
        return sorted(self.theme_files)

    def choose_theme(self, name: str, *, persist: bool = True) -> None:
        if name not in self.theme_files:
            self._unknown_theme(name)
            return
        self.theme = name
        if persist:
            self.run_worker(partial(self.client.set_setting, "theme", name), group="settings-save", exit_on_error=False)
        self.notify(f"theme {name}" + (" (remembered)" if persist else ""), title="Theme", timeout=2)

    def _unknown_theme(self, name: str) -> None:
        root = getattr(getattr(self.client, "workspace", None), "root", None)
        where = f"{root}/themes/{name}.toml" if root else f"themes/{name}.toml"
        self.notify(f"no theme named {esc(name)!r}; using {self.theme}. Themes: {', '.join(self.theme_names())}. "
                    f"To add one, copy themes/dark.toml to {esc(where)}", title="Theme", severity="warning")

    def _theme_changed(self, theme: Theme) -> None:
        try:
            self.inventory.relabel()
            self.tasks_view.restyle()
            self.vms_view.restyle()
            self.audit_view.restyle()
            self.events_view.restyle()
            self.migrations_view.restyle()
            self.alarms_view.restyle()
            self.health_view.restyle()
            self.backups_view.restyle()
            self.performance_view.restyle()
            self.overview.restyle()
        except Exception:   # the views may be gone while the app closes
            pass

    # ------------------------------------------------------------------ operator actions

    def start_probe(self, host: str) -> None:
        self.run_worker(partial(self._probe, host), name=f"probe {host}", group="actions", exit_on_error=False)

    async def _probe(self, host: str) -> None:
        tid = await self.client.start_probe(host, **self.probe_params)
        self.notify(f"probe of {esc(host)} started as task {tid}", title="Probe", timeout=3)
        await self.feed.refresh()
        self.switch_view("tasks")
        self.tasks_view.select_task(tid)

    def control_task(self, action: str, task_id: int | None) -> None:
        """Pause, resume or cancel a task, after a confirmation whose default is to do nothing."""
        if self.readonly:
            self.refuse_readonly(f"{action} a task")
            return
        info = self.feed.tasks.get(task_id) if task_id is not None else None
        if info is None:
            self.notify("select a task first", title=action.capitalize(), severity="warning")
            return
        if info.state not in ALLOWED[action]:
            self.notify(f"task {info.id} is {info.state}; it cannot be {action}d", title=action.capitalize(),
                        severity="warning")
            return
        verb, button, effect = {
            "pause": ("Pause", "Pause", "It stops at its last checkpoint and can be resumed later."),
            "resume": ("Resume", "Resume", "It continues from its last checkpoint."),
            "cancel": ("Cancel", "Cancel task", "It stops for good; work done so far is not undone."),
        }[action]
        title = f"{verb} task {info.id}?"
        body = f"#{info.id} {info.title}  ({info.state.symbol} {info.state})\n{effect}"

        def done(ok: bool | None) -> None:
            if ok:
                self.run_worker(partial(self._control, action, info.id), name=f"{action} {info.id}", group="actions",
                                exit_on_error=False)
        self.push_screen(ConfirmScreen(title, body, confirm=button, cancel="Back", danger=action == "cancel"), done)

    async def _control(self, action: str, task_id: int) -> None:
        info = await getattr(self.client, action)(task_id)
        reached = {"pause": {TaskState.PAUSED}, "resume": {TaskState.QUEUED, TaskState.RUNNING},
                   "cancel": {TaskState.CANCELLED}}[action]
        if info.state in reached:
            text = f"task {task_id}: {info.state.symbol} {info.state}"
        else:
            # Running elsewhere (another Ferry process) or still stopping: the owner applies it shortly.
            text = f"task {task_id}: {action} requested (now {info.state.symbol} {info.state})"
        self.notify(text, title=action.capitalize(), timeout=3)
        await self.feed.refresh()

    # ------------------------------------------------------------------ errors from workers

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        err = event.worker.error
        if isinstance(err, FerryError):
            text = esc(err.message) + (f"\nhint: {esc(err.hint)}" if err.hint else "")
            self.notify(text, title="Error", severity="error", timeout=10)
        else:
            log.error("console worker %s failed: %r", event.worker.name, err, exc_info=err)
            self.notify(f"internal error in {esc(event.worker.name)}: {esc(type(err).__name__)}: {esc(str(err))}\n"
                        "hint: see logs/ferry.log in the workspace", title="Error", severity="error", timeout=10)


def run_console(ws: Any, site: Any, theme: str | None = None, opener: Any = None, readonly: bool = False) -> int:
    """Open the console on `site`; returns an exit code. Never ends with a traceback for expected failures.
    `opener` reaches the engine of another machine (`ferry --engine`, engine/remote_ssh.py)."""
    from ferry.engine.remote import RemoteEngine
    try:
        from ferry.engine.logs import setup_logging
        setup_logging(ws)
    except Exception:   # logging is a help, not a precondition
        pass
    # The console is a client of the workspace's engine service (started, detached, when none runs):
    # quitting or losing the console never stops a task, and it reconnects when the engine restarts.
    client = RemoteEngine(ws, client="console", reconnect=True, site=site, opener=opener)
    app = FerryApp(client, theme=theme, own_client=True, readonly=readonly, first_view=FIRST_VIEW)
    try:
        code = app.run()
    except KeyboardInterrupt:
        code = 130
    if app.start_error is not None:
        print(f"ferry: {app.start_error}", file=sys.stderr)
        return 1
    if app.return_code not in (None, 0):
        return app.return_code
    return code if isinstance(code, int) else 0
