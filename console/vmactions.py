"""What the operator can do to the VM or template under the cursor, in every view that lists VMs.

Mixed into the inventory view (a tree) and the VMs view (a table), so the keys are the view's
bindings; each view says what is under its cursor (`cursor_vm`). Whether an action may apply is
the engine's to say, never the console's: `vm_actions` tells which actions apply to the VM under
the cursor now (the keys that do not are dimmed and say why when pressed), and a key press asks
the engine again before it opens a dialog or acts (`vm_actions`, and `precheck` for the exact
request). A form asks the engine's `precheck` with the values it would submit, and shows the
refusal in the form. Accepted actions submit a task through `client.vm_task` (which prechecks once
more) in a worker; the task shows in the Tasks view like any other.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import PurePosixPath
from typing import Any, Awaitable, Callable

from textual.timer import Timer

from ferry.engine.api import Refusal, VMActionCheck, VMState, VMView
from ferry.engine.errors import FerryError, Refused
from ferry.engine.taskmodel import TaskState
from ferry.engine.vm.model import expand_pattern

from ferry.console import actions as catalogue, keys as opkeys
from ferry.console.actions import CATALOGUE
from ferry.console.messages import VMsUpdated
from ferry.console.dialogs.modals import ConfirmScreen, esc
from ferry.console.dialogs.move import MoveScreen
from ferry.console.poller import VMList, VMPoller
from ferry.console.dialogs.serial import SerialScreen
from ferry.console.dialogs.vmforms import Field, FormScreen, TypedNameScreen

NO_VM = "select a VM or template first"
CHECKS_DEBOUNCE_S = 0.1     # the cursor rests this long on a VM before the engine is asked what applies to it

# The VM keys of every view that lists VMs: the catalogue's "vm" rows.
VM_BINDINGS = opkeys.bindings("vm")
VM_KEYS = {a.name: (a.key.split(",")[0], a.title) for a in catalogue.group("vm")}   # action -> (key, what)
SHOWN = frozenset(a.name for a in catalogue.group("vm") if a.show)
TITLES = {a.name: a.title for a in catalogue.group("vm")}
DEFAULT_DISK = "1G"
MARKS_ACT = frozenset(a.method for a in CATALOGUE if a.marks)    # keys that act on every marked VM


class VMActions:
    """The VM keys of a view, and the polled VM list they act on. The view provides vms and recycled
    (records by id, from the VMsUpdated messages), BINDINGS, check_action, action_refusal, cursor_vm
    and `shown`, and calls `ask_vm_checks` when its cursor or its list changed."""

    app: Any
    vms: dict[str, VMView]
    recycled: dict[str, VMView]
    BINDINGS: list
    shown: bool
    check_action: Callable[[str, tuple], bool | None]
    action_refusal: Callable[[str], str | None]
    post_message: Callable[[Any], bool]
    refresh_bindings: Callable[[], None]
    set_timer: Callable[..., Timer]
    run_worker: Callable[..., Any]

    def __init__(self, client: Any, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client
        self.site = client.site
        self.clock = clock
        self.vm_poller: VMPoller | None = None
        self.mine: dict[int, str] = {}                # tasks submitted from this view -> what they do
        self._vm_task_states: dict[int, str] = {}
        # What the engine said applies to a VM (by id): the record it was asked about, each action's refusal.
        self.vm_checks: dict[str, tuple[VMView, dict[str, Refusal | None]]] = {}
        self._checks_timer: Timer | None = None
        self.marked: set[str] = set()                 # VM ids marked with space (k9s): survive list refreshes

    # ------------------------------------------------------------------ the VM list

    def make_vm_poller(self, interval: float | None = None) -> VMPoller:
        """Polls the VM list while the view is shown; each result comes back as a VMsUpdated message."""
        self.vm_poller = VMPoller(self._fetch_vms, lambda vl: self.post_message(VMsUpdated(vl)),
                                  active=lambda: self.shown, clock=self.clock,
                                  **({"interval": interval} if interval is not None else {}))
        return self.vm_poller

    async def _fetch_vms(self) -> tuple[list[VMView], list[VMView]]:
        return await self.client.vm_list(), await self.client.vm_list(recycled=True)

    def refresh_vms(self) -> None:
        """Ask for the VM list again now (after the running poll, if one runs)."""
        if self.vm_poller:
            self.vm_poller.poke()

    def vms_listed(self, vl: VMList) -> None:
        """A new VM list: forget the engine's answers for VMs gone, ask again for the one under the cursor."""
        ids = {v.id for v in vl.vms} | {v.id for v in vl.recycled}
        for vid in [v for v in self.vm_checks if v not in ids]:
            del self.vm_checks[vid]
        if vl.ok and self.marked - ids:       # a VM gone takes its mark along
            self.marked &= ids
            self.marks_changed()
        self.ask_vm_checks()

    # ------------------------------------------------------------------ what is selected

    def cursor_vm(self) -> VMView | None:
        """The VM or template under the view's cursor (None: something else, or nothing)."""
        raise NotImplementedError

    def cursor_host(self) -> str:
        """The host a new VM goes to: the selected VM's, else the first host."""
        vm = self.cursor_vm()
        if vm and vm.host in self.site.hosts:
            return vm.host
        return sorted(self.site.hosts)[0]

    def busy_task(self, vm: VMView | None) -> str | None:
        """'task 12 (start web1)' when a live task works on the VM (a finished one's mark is stale)."""
        tid = vm.busy if vm is not None else None
        if not tid:
            return None
        feed = getattr(self.app, "feed", None)
        info = feed.tasks.get(tid) if feed is not None else None
        if info is None:
            return f"task {tid}"
        if info.state.final:
            return None
        return f"task {tid} ({info.title}, {info.state})"

    # ------------------------------------------------------------------ what the engine says applies

    def ask_vm_checks(self) -> None:
        """Ask the engine, soon, which actions apply to the VM under the cursor (a cursor moving over
        many VMs asks for none of them but the last)."""
        if self._checks_timer is not None:
            self._checks_timer.stop()
            self._checks_timer = None
        if self.cursor_vm() is not None and self.shown:
            self._checks_timer = self.set_timer(CHECKS_DEBOUNCE_S, self._checks_due)

    def _checks_due(self) -> None:
        self._checks_timer = None
        vm = self.cursor_vm()
        if vm is not None:
            self.run_worker(partial(self._ask_checks, vm), name=f"actions of {vm.name}", group="vm-checks",
                            exclusive=True, exit_on_error=False)

    async def _ask_checks(self, vm: VMView) -> list[VMActionCheck] | None:
        try:
            checks = await self.client.vm_actions(vm.id, recycled=vm.in_bin)
        except FerryError:      # gone meanwhile, or the engine away: the keys stay as they were
            return None
        self._got_checks(vm, checks)
        return checks

    def _got_checks(self, vm: VMView, checks: list[VMActionCheck]) -> None:
        answers = {c.action: c.refusal for c in checks}
        old = self.vm_checks.get(vm.id)
        self.vm_checks[vm.id] = (vm, answers)
        if old is None or old[1] != answers:
            self.refresh_bindings()
            self.vm_checks_changed(vm.id)

    def vm_checks_changed(self, vm_id: str) -> None:
        """The engine's answers for a VM changed: a view redraws what shows them."""

    def checks_of(self, vm: VMView) -> dict[str, Refusal | None] | None:
        """The engine's last answers for the VM (None: not asked yet)."""
        got = self.vm_checks.get(vm.id)
        return got[1] if got is not None else None

    def refusal_of(self, action: str, vm: VMView | None) -> Refusal | None:
        """The engine's refusal of `action` for the VM, as it last said (None: it applies, or the
        engine has not said yet: the key asks it when pressed)."""
        if action in ("vm_create", "vm_import"):
            return None
        if vm is None:
            return Refusal(NO_VM)
        checks = self.checks_of(vm)
        if checks is None:
            return None
        if action == "vm_delete" and vm.in_bin:
            action = "vm_purge"
        return checks.get(action)

    def vm_refusal(self, action: str) -> str | None:
        if action == "vm_unmark" and not self.marked:
            return "no VM is marked (space marks the VM under the cursor)"
        if action in MARKS_ACT and self.marked:
            return None
        why = self.refusal_of(action, self.cursor_vm())
        return why.text if why else None

    def vm_check(self, action: str) -> bool | None:
        """check_action for the VM keys: hidden from the footer where no VM is selected, dimmed when refused."""
        if action in ("vm_create", "vm_import", "vm_mark"):
            return True
        if action == "vm_unmark":
            return True if self.marked else None
        if action in MARKS_ACT and self.marked:
            return True            # the engine is asked for each marked VM when the key is pressed
        vm = self.cursor_vm()
        if vm is None:
            return False if action in SHOWN else None
        if action == "vm_restore" and not vm.in_bin:
            return False
        return None if self.refusal_of(action, vm) else True

    def vm_keys(self, vm: VMView) -> list[tuple[str, str, str | None]] | None:
        """(key, what, why refused) of the actions that make sense for the VM, for its detail pane;
        None until the engine said which apply."""
        if self.checks_of(vm) is None:
            return None
        if vm.in_bin:
            wanted = ("vm_restore", "vm_delete")
        elif vm.is_template:
            wanted = ("vm_deploy", "vm_clone", "vm_convert", "vm_export", "vm_delete", "vm_start")
        else:
            # pause and resume are a running (or paused) VM's keys: a stopped one's list stays short
            pause = ("vm_pause", "vm_resume") if vm.running else ()
            wanted = ("vm_start", "vm_stop", "vm_force_stop", "vm_reboot", "vm_hibernate", *pause, "vm_clone",
                      "vm_convert", "vm_export", "vm_delete")
        out = []
        for a in wanted:
            key, what = VM_KEYS[a]
            key = {"delete": "del"}.get(key, key)
            what = what.lower()
            if vm.in_bin and a == "vm_delete":
                what = "purge"
            if a == "vm_convert":
                what = "to VM" if vm.is_template else "to template"
            why = self.refusal_of(a, vm)
            out.append((key, what, why.text if why else None))
        return out

    def refusal_for_key(self, key: str) -> tuple[str, str] | None:
        """(title, reason) when `key` is one of this view's keys and it was refused just now."""
        keymap = getattr(self.app, "keymap", None) or {}
        for b in self.BINDINGS:
            keys = keymap.get(b.id, b.key) if b.id else b.key
            if key in [k.strip() for k in keys.split(",")]:
                if self.check_action(b.action, ()) is True:
                    return None
                why = self.action_refusal(b.action)
                return (b.description, why) if why else None
        return None

    # ------------------------------------------------------------------ asking the engine before acting

    def _refused(self, title: str, reason: str, hint: str) -> None:
        self.app.notify(esc(reason) + (f"\nhint: {esc(hint)}" if hint else ""), title=esc(title),
                        severity="warning", timeout=10)

    def ask_then(self, action: str, then: Callable[[VMView], None],
                 request: Callable[[VMView], tuple[str, dict]] | None = None) -> None:
        """Ask the engine whether `action` applies to the VM under the cursor now (and, given `request`,
        its precheck of that exact task), then `then(vm)`; a refusal is shown, with its way out."""
        vm = self.cursor_vm()
        title = TITLES.get(action, "VM")
        if vm is None:
            self._refused(title, NO_VM, "")
            return
        self.app.run_worker(partial(self._ask_then, action, vm, then, request), name=f"precheck {action} {vm.name}",
                            group="vm-precheck", exclusive=True, exit_on_error=False)

    async def _ask_then(self, action: str, vm: VMView, then: Callable[[VMView], None],
                        request: Callable[[VMView], tuple[str, dict]] | None) -> None:
        title = TITLES.get(action, "VM")
        try:
            checks = await self.client.vm_actions(vm.id, recycled=vm.in_bin)
            self._got_checks(vm, checks)
            why = self.refusal_of(action, vm)
            if why is not None:
                self._refused(title, why.reason, why.key or why.hint)
                return
            if request is not None:
                await self.client.precheck(*request(vm))
        except Refused as e:
            self._refused(title, e.message, e.hint)
            return
        except FerryError as e:
            self.app.notify(esc(e.message) + (f"\nhint: {esc(e.hint)}" if e.hint else ""), title=esc(title),
                            severity="error", timeout=10)
            return
        then(vm)

    def engine_check(self, kind: str, params_of: Callable[[dict], dict]) -> Callable[[dict], Awaitable[str | None]]:
        """A form's check: the engine's precheck of the task the form's values would submit."""
        async def check(values: dict) -> str | None:
            try:
                await self.client.precheck(kind, params_of(values))
            except FerryError as e:
                return e.message + (f"\nhint: {e.hint}" if e.hint else "")
            return None
        return check

    # ------------------------------------------------------------------ submitting

    def submit_vm_task(self, kind: str, params: dict, what: str) -> None:
        self.app.run_worker(partial(self._submit_vm_task, kind, params, what), name=f"{kind} {what}",
                            group="vm-actions", exit_on_error=False)

    async def _submit_vm_task(self, kind: str, params: dict, what: str) -> None:
        app = self.app
        try:
            tid = await self.client.vm_task(kind, params)
        except Refused as e:      # the engine's precheck (what changed since it was asked): no task was made
            self._refused(what, e.message, e.hint)
            return
        except FerryError as e:
            app.notify(esc(e.message) + (f"\nhint: {esc(e.hint)}" if e.hint else ""), title=esc(what),
                       severity="error", timeout=10)
            return
        self.mine[tid] = what
        app.notify(f"task {tid}: {esc(what)} · follow it in Tasks (2)", title=esc(what), timeout=4)
        feed = getattr(app, "feed", None)
        if feed is not None:
            await feed.refresh()
        self.refresh_vms()

    def task_ended(self, info: Any) -> None:
        """A task submitted from here ended: say so (a failure with its error and hint)."""
        what = self.mine.pop(info.id, info.title)
        if info.state == TaskState.SUCCEEDED:
            self.app.notify(f"task {info.id}: {esc(what)} done", title=esc(what), timeout=3)
        elif info.state == TaskState.FAILED:
            text = f"task {info.id} failed: {esc(info.error or 'no reason given')}"
            if info.hint:
                text += f"\nhint: {esc(info.hint)}"
            self.app.notify(text, title=esc(what), severity="error", timeout=10)
        else:
            self.app.notify(f"task {info.id}: {esc(what)} {info.state}", title=esc(what), timeout=4)

    def tasks_changed(self, tasks: dict) -> None:
        """The task feed changed: a VM task that changed state means the VM list changed too."""
        poke = False
        for tid, info in tasks.items():
            if not info.kind.startswith("vm."):
                continue
            state = str(info.state)
            old = self._vm_task_states.get(tid)
            if old != state:
                self._vm_task_states[tid] = state
                poke = True
                if info.state.final and tid in self.mine:
                    self.task_ended(info)
        if len(self._vm_task_states) > 2 * len(tasks) + 100:      # forget tasks the feed no longer holds
            self._vm_task_states = {t: st for t, st in self._vm_task_states.items() if t in tasks}
        if poke:
            self.refresh_vms()

    def _confirm(self, title: str, body: str, button: str, then: Callable[[], None], *, danger: bool = True) -> None:
        def done(ok: bool | None) -> None:
            if ok:
                then()
        self.app.push_screen(ConfirmScreen(title, body, confirm=button, cancel="Back", danger=danger), done)

    def _form(self, screen: FormScreen, then: Callable[[dict], None]) -> None:
        def done(values: dict | None) -> None:
            if values is not None:
                then(values)
        self.app.push_screen(screen, done)

    # ------------------------------------------------------------------ marked VMs (k9s)

    def marks_changed(self) -> None:
        """Marks were set, cleared or dropped: a view redraws what shows them."""

    def action_vm_mark(self) -> None:
        """space: mark the VM under the cursor, or unmark it."""
        vm = self.cursor_vm()
        if vm is None:
            self._refused("Mark", NO_VM, "")
            return
        self.marked ^= {vm.id}
        self.marks_changed()
        self.refresh_bindings()

    def action_vm_unmark(self) -> None:
        """M: clear every mark."""
        if self.marked:
            self.marked.clear()
            self.marks_changed()
            self.refresh_bindings()

    def marked_vms(self) -> list[VMView]:
        """The marked VMs still listed, by name."""
        found = [self.vms.get(i) or self.recycled.get(i) for i in self.marked]
        return sorted((v for v in found if v is not None), key=lambda v: (v.name, v.id))

    def act_on_marked(self, action: str) -> bool:
        """When VMs are marked, `action` acts on all of them (True): the engine is asked for each, one
        dialog lists which will be acted on and which are refused and why, one confirmation, one task each."""
        if not self.marked or action not in MARKS_ACT:
            return False
        vms = self.marked_vms()
        self.app.run_worker(partial(self._ask_marked, action, vms), name=f"precheck {action} of {len(vms)} marked",
                            group="vm-precheck", exclusive=True, exit_on_error=False)
        return True

    async def _ask_marked(self, action: str, vms: list[VMView]) -> None:
        go: list[VMView] = []
        refused: list[tuple[VMView, str]] = []
        for vm in vms:
            kind, params = bulk_request(action, vm)
            try:
                self._got_checks(vm, await self.client.vm_actions(vm.id, recycled=vm.in_bin))
                why = self.refusal_of(action, vm)
                if why is not None:
                    refused.append((vm, why.reason))
                    continue
                await self.client.precheck(kind, params)
            except FerryError as e:        # Refused, or gone meanwhile, or the engine away: not acted on
                refused.append((vm, e.message))
                continue
            go.append(vm)
        self._marked_dialog(action, go, refused)

    def _marked_dialog(self, action: str, go: list[VMView], refused: list[tuple[VMView, str]]) -> None:
        verb = BULK_VERBS[action]
        lines = []
        if go:
            lines.append(f"Will {verb} ({len(go)}): " + ", ".join(v.name for v in go))
        if refused:
            lines.append(f"Refused ({len(refused)}), left as they are:")
            lines += [f"  {v.name}: {why}" for v, why in refused]
        body = "\n".join(lines)
        title = f"{verb.capitalize()} {len(go)} marked VM{'' if len(go) == 1 else 's'}?"
        if not go:
            self._refused(f"{verb.capitalize()} the marked VMs", f"none of the {len(refused)} marked VMs can be "
                          f"acted on:\n" + "\n".join(f"{v.name}: {why}" for v, why in refused), "")
            return
        if action == "vm_delete":
            def delete(v: dict | None) -> None:
                if v:
                    self.submit_many([bulk_request(action, vm, v) for vm in go], f"{verb} {len(go)} VMs")
            self.app.push_screen(TypedNameScreen(
                str(len(go)), title=f"Delete {len(go)} marked VM{'' if len(go) == 1 else 's'}?", body=body,
                what="the number of VMs", modes=any(not vm.in_bin for vm in go)), delete)
            return
        self._confirm(title, body, verb.capitalize(),
                      lambda: self.submit_many([bulk_request(action, vm) for vm in go], f"{verb} {len(go)} VMs"),
                      danger=action not in SAFE_BULK)

    def submit_many(self, requests: list[tuple[str, dict]], what: str) -> None:
        self.app.run_worker(partial(self._submit_many, requests, what), name=what, group="vm-actions",
                            exit_on_error=False)

    async def _submit_many(self, requests: list[tuple[str, dict]], what: str) -> None:
        """One task per VM; what the engine refuses now (changed since it was asked) is said, the rest go on."""
        made, failed = [], []
        for kind, params in requests:
            try:
                tid = await self.client.vm_task(kind, params)
            except FerryError as e:
                failed.append(f"{params['vm']}: {e.message}")
                continue
            self.mine[tid] = f"{kind.removeprefix('vm.')} {params['vm']}"
            made.append(tid)
        if made:
            self.app.notify(f"{len(made)} task{'' if len(made) == 1 else 's'} ({', '.join(map(str, made))}): "
                            f"{esc(what)} · follow them in Tasks (2)", title=esc(what), timeout=4)
        if failed:
            self.app.notify(esc("\n".join(failed)), title=esc(what), severity="warning", timeout=10)
        feed = getattr(self.app, "feed", None)
        if feed is not None:
            await feed.refresh()
        self.refresh_vms()

    # ------------------------------------------------------------------ the actions

    def action_vm_start(self) -> None:
        if self.act_on_marked("vm_start"):
            return
        def start(vm: VMView) -> None:
            verb = "resume" if vm.state is VMState.HIBERNATED else "start"
            self.submit_vm_task("vm.start", {"vm": vm.name}, f"{verb} {vm.name}")
        self.ask_then("vm_start", start, lambda vm: ("vm.start", {"vm": vm.name}))

    def _confirmed(self, action: str, kind: str, params: dict, title: str, body: str, button: str, *,
                   danger: bool = True) -> None:
        """A key that asks first: the engine's precheck of task `kind` for the VM under the cursor, a
        confirmation (its title and body may name {name} and {memory}), then the task."""
        def confirm(vm: VMView) -> None:
            name = vm.name
            said = {"name": name, "memory": vm.memory_mb}
            self._confirm(title.format(**said), body.format(**said), button,
                          lambda: self.submit_vm_task(kind, {"vm": name, **params}, f"{button.lower()} {name}"),
                          danger=danger)
        self.ask_then(action, confirm, lambda vm: (kind, {"vm": vm.name, **params}))

    def action_vm_stop(self) -> None:
        if self.act_on_marked("vm_stop"):
            return
        self._confirmed("vm_stop", "vm.shutdown", {"mode": "powerdown"}, "Shut down {name}?",
                        "The guest agent asks the guest to power off cleanly.\n"
                        "Its services stop; start it again with s.", "Shut down")

    def action_vm_force_stop(self) -> None:
        if self.act_on_marked("vm_force_stop"):
            return
        self._confirmed("vm_force_stop", "vm.shutdown", {"mode": "force"}, "Force stop {name}?",
                        "Powers it off at once, like pulling the plug: what the guest has not\n"
                        "written to disk is lost. Prefer x (safe shutdown) when the guest answers.", "Force stop")

    def action_vm_reboot(self) -> None:
        if self.act_on_marked("vm_reboot"):
            return
        self._confirmed("vm_reboot", "vm.shutdown", {"mode": "reboot"}, "Reboot {name}?",
                        "The guest agent asks the guest to reboot; its services stop for a moment.", "Reboot")

    def action_vm_hibernate(self) -> None:
        if self.act_on_marked("vm_hibernate"):
            return
        self._confirmed("vm_hibernate", "vm.hibernate", {}, "Hibernate {name}?",
                        "Saves its memory ({memory} MiB) next to its disks and stops it;\n"
                        "start (s) resumes it where it was.", "Hibernate", danger=False)

    def action_vm_pause(self) -> None:
        if self.act_on_marked("vm_pause"):
            return
        self._confirmed("vm_pause", "vm.pause", {}, "Pause {name}?",
                        "Its guest halts where it is: its services stop answering until Z resumes it;\n"
                        "its memory stays in QEMU.", "Pause")

    def action_vm_resume(self) -> None:
        """Z: no dialog; continuing a guest loses nothing (also one QEMU stopped on an I/O error)."""
        if self.act_on_marked("vm_resume"):
            return
        self.ask_then("vm_resume", lambda vm: self.submit_vm_task("vm.resume", {"vm": vm.name}, f"resume {vm.name}"),
                      lambda vm: ("vm.resume", {"vm": vm.name}))

    def action_vm_move(self) -> None:
        self.ask_then("vm_move", self._move_dialog)

    def _move_dialog(self, vm: VMView) -> None:
        """The site's other hosts with the engine's precheck of the move to each; an allowed one chosen,
        one line says what will happen and asks, then the task is submitted."""
        name, source = vm.name, vm.host
        others = [h for h in sorted(self.site.hosts) if h != source]
        if not others:
            self._refused(TITLES["vm_move"], f"{name} has no other host to go to: {source} is the site's only host",
                          "add a host to config.toml")
            return

        async def check(to: str) -> tuple[str, str] | None:
            try:
                await self.client.precheck("vm.move", {"vm": name, "to": to})
            except FerryError as e:      # refused, or the engine away: not a host to choose now
                return e.message, e.hint
            return None

        live = vm.running
        if live:
            intro = f"{name} runs: it moves live; its disks stay where they are, on a datastore both hosts share."
        else:
            intro = (f"{name} is {'a template' if vm.is_template else 'stopped'}: only its host changes; its disks "
                     "stay where they are.")

        def chosen(to: str | None) -> None:
            if not to:
                return
            if live:
                line = (f"Move {name} from {source} to {to} while it runs: its memory is copied, then the guest "
                        "pauses for a moment.")
            else:
                line = (f"{name} is {'a template' if vm.is_template else 'stopped'}: it only changes host, "
                        f"{source} to {to}.")
            self._confirm(f"Move {name} to {to}?", line, "Move",
                          lambda: self.submit_vm_task("vm.move", {"vm": name, "to": to}, f"move {name} to {to}"),
                          danger=False)

        self.app.push_screen(MoveScreen(name, source, others, check, intro=intro), chosen)

    def action_vm_create(self) -> None:
        hosts = sorted(self.site.hosts)
        host = self.cursor_host()

        def params_of(v: dict) -> dict:
            nets = self.site.hosts[v["host"]].networks or ("default",)
            return {"name": v["name"], "host": v["host"], "cpus": int(v["cpus"] or 0),
                    "memory_mb": int(v["memory_mb"] or 0), "disks": [{"size": v["disk"]}] if v["disk"] else [],
                    "nics": [{"network": nets[0]}], "boot": ["disk", "live"]}

        self._form(FormScreen("New VM", [
            Field("name", "Name", "", placeholder="e.g. web-01"),
            Field("host", "Host", host, kind="select", options=tuple((h, h) for h in hosts)),
            Field("cpus", "CPUs", "1", restrict=r"[0-9]*"),
            Field("memory_mb", "Memory MiB", "256", restrict=r"[0-9]*"),
            Field("disk", "Disk size", DEFAULT_DISK, placeholder="e.g. 10G, 512M; empty: no disk"),
        ], confirm="Create", check=self.engine_check("vm.create", params_of)),
            lambda v: self.submit_vm_task("vm.create", params_of(v), f"create {v['name']}"))

    def action_vm_clone(self) -> None:
        self.ask_then("vm_clone", self._clone_form)

    def target_fields(self, vm: VMView) -> list[Field]:
        """Where copies of `vm` go: a host (its own by default; another one needs a datastore both
        share, which the engine's precheck says) and a datastore (by default its disks' own)."""
        hosts = sorted(self.site.hosts)
        stores = sorted(self.site.datastores.values(), key=lambda d: d.name)
        own = vm.disks[0].datastore if vm.disks else None
        return [
            Field("host", "Host", vm.host, kind="select", options=tuple((h, h) for h in hosts)),
            Field("datastore", "Datastore", "", kind="select", options=(
                (f"as {vm.name}" + (f" ({own})" if own else ""), ""),
                *((f"{d.name} (shared: {', '.join(d.hosts)})" if d.shared else f"{d.name} ({d.hosts[0]})", d.name)
                  for d in stores))),
        ]

    @staticmethod
    def target_params(v: dict) -> dict:
        return {"host": v["host"], **({"datastore": v["datastore"]} if v.get("datastore") else {})}

    def _clone_form(self, vm: VMView) -> None:
        src, tpl = vm.name, vm.is_template

        def params_of(v: dict) -> dict:
            return {"src": src, "names": [v["name"]], "as_template": tpl, "linked": False, **self.target_params(v)}

        what = "template" if tpl else "VM"
        intro = (f"A full copy of {src} (its disks are copied" + (", while it runs" if vm.state is VMState.RUNNING
                                                                   else "") + f"); the copy is a {what}.")
        self._form(FormScreen(f"Clone {what} {src}", [Field("name", "New name", f"{src}-copy"),
                                                      *self.target_fields(vm)], confirm="Clone",
                              intro=intro, check=self.engine_check("vm.clone", params_of)),
                   lambda v: self.submit_vm_task("vm.clone", params_of(v), f"clone {src} -> {v['name']}"))

    def action_vm_convert(self) -> None:
        def to_of(vm: VMView) -> str:
            return "vm" if vm.is_template else "template"

        def confirm(vm: VMView) -> None:
            name, to = vm.name, to_of(vm)
            if to == "vm":
                title, body = (f"Convert template {name} to a VM?",
                               "It becomes an ordinary VM that can start; no more VMs can be deployed from it.")
            else:
                title, body = (f"Convert {name} to a template?",
                               "A template never runs: VMs are deployed from it (d), linked or full.\n"
                               "Convert it back with t while it has no linked clones.")
            self._confirm(title, body, "Convert",
                          lambda: self.submit_vm_task("vm.convert", {"vm": name, "to": to},
                                                      f"convert {name} to a {'VM' if to == 'vm' else 'template'}"),
                          danger=False)
        self.ask_then("vm_convert", confirm, lambda vm: ("vm.convert", {"vm": vm.name, "to": to_of(vm)}))

    def action_vm_deploy(self) -> None:
        self.ask_then("vm_deploy", self._deploy_form)

    def _deploy_form(self, vm: VMView) -> None:
        src = vm.name

        def params_of(v: dict) -> dict:
            count = int(v["count"] or 0)
            pattern = v["pattern"]
            names = expand_pattern(pattern, count) if count > 1 or "#" in pattern or "{n" in pattern else [pattern]
            return {"src": src, "names": names, "linked": bool(v["linked"]), "deploy": True, "as_template": False,
                    **self.target_params(v)}

        def submit(v: dict) -> None:
            params = params_of(v)
            names = params["names"]
            what = f"deploy {src} -> {names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1 else "") + \
                (" linked" if params["linked"] else "") + (f" on {params['host']}" if params["host"] != vm.host else "")
            self.submit_vm_task("vm.clone", params, what)

        self._form(FormScreen(f"Deploy from template {src}", [
            Field("pattern", "Names", f"{src}-##", placeholder="web-## or web-{n:02}"),
            Field("count", "How many", "1", restrict=r"[0-9]*"),
            Field("linked", "Linked", True, kind="check", placeholder="linked clones (else full copies)"),
            *self.target_fields(vm),
        ], confirm="Deploy", check=self.engine_check("vm.clone", params_of),
            intro="## or {n:02} is replaced by 01, 02, ...; linked clones share the template's disks "
                  "(fast, small), full ones are independent copies."), submit)

    def action_vm_export(self) -> None:
        self.ask_then("vm_export", self._export_form)

    def _export_form(self, vm: VMView) -> None:
        name = vm.name

        def params_of(v: dict) -> dict:
            out = v["out"]
            if v["format"] == "ova" and not out.endswith(".ova"):
                out += ".ova"
            if v["format"] == "ovf" and out.endswith(".ova"):
                out = out[:-4]
            return {"vm": name, "out": out, "ova": v["format"] == "ova"}

        self._form(FormScreen(f"Export {name}", [
            Field("out", "Output path", f"/var/tmp/{name}.ova"),
            Field("format", "Format", "ova", kind="select",
                  options=(("OVA (one file)", "ova"), ("OVF (a folder)", "ovf"))),
        ], confirm="Export", check=self.engine_check("vm.export", params_of),
            intro=f"The package is written on {vm.host}, in a folder that exists there; disks become VHD."),
            lambda v: self.submit_vm_task("vm.export", params_of(v), f"export {name} -> {params_of(v)['out']}"))

    def action_vm_import(self) -> None:
        hosts = sorted(self.site.hosts)

        def params_of(v: dict) -> dict:
            return {"path": v["path"], "host": v["host"], **({"name": v["name"]} if v["name"] else {})}

        self._form(FormScreen("Import a VM", [
            Field("path", "Package", "", placeholder="/var/tmp/web01.ova or an OVF folder"),
            Field("host", "Host", self.cursor_host(), kind="select", options=tuple((h, h) for h in hosts)),
            Field("name", "Name", "", placeholder="empty: the name in the package"),
        ], confirm="Import", check=self.engine_check("vm.import", params_of)),
            lambda v: self.submit_vm_task("vm.import", params_of(v), f"import {PurePosixPath(v['path']).name}"))

    def action_vm_delete(self) -> None:
        if self.act_on_marked("vm_delete"):
            return
        self.ask_then("vm_delete", self._delete_dialog)

    def _delete_dialog(self, vm: VMView) -> None:
        name = vm.name
        if vm.in_bin:
            def purge(v: dict) -> None:
                self.submit_vm_task("vm.purge", {"vm": name, "confirm": v["confirm"]}, f"purge {name}")
            self.app.push_screen(TypedNameScreen(
                name, title=f"Purge {name} from the recycle bin?",
                body="Its disks are removed for good; it cannot come back.", confirm="Purge", modes=False),
                lambda v: purge(v) if v else None)
            return
        what = "template" if vm.is_template else "VM"

        def delete(v: dict) -> None:
            params = {"vm": name, "mode": v["mode"], "confirm": v["confirm"]}
            if "keep_days" in v:
                params["keep_days"] = v["keep_days"]
            self.submit_vm_task("vm.delete", params, f"delete {name}" + ("" if v["mode"] == "normal"
                                                                         else f" ({v['mode']})"))
        disks = ", ".join(f"{d.name} on {d.datastore}" for d in vm.disks) or "no disks"
        self.app.push_screen(TypedNameScreen(
            name, title=f"Delete {what} {name}?", body=f"Its record and its disks ({disks}) go away."),
            lambda v: delete(v) if v else None)

    def action_vm_serial(self) -> None:
        vm = self.cursor_vm()
        if vm is None:
            self._refused(TITLES["vm_serial"], NO_VM, "")
            return
        self.app.push_screen(SerialScreen(self.client, vm.name))     # the engine says there if it cannot

    def action_vm_restore(self) -> None:
        self.ask_then("vm_restore", lambda vm: self.submit_vm_task("vm.restore", {"vm": vm.name}, f"restore {vm.name}"),
                      lambda vm: ("vm.restore", {"vm": vm.name}))

    # ------------------------------------------------------------------ the command palette


# What each key that acts on marked VMs does to one of them: the verb its dialog says, the task it submits.
BULK_VERBS = {"vm_start": "start", "vm_stop": "shut down", "vm_force_stop": "force stop", "vm_reboot": "reboot",
              "vm_hibernate": "hibernate", "vm_pause": "pause", "vm_resume": "resume", "vm_delete": "delete"}
SAFE_BULK = frozenset({"vm_start", "vm_resume"})     # their one confirmation is not a red one


def bulk_request(action: str, vm: VMView, typed: dict | None = None) -> tuple[str, dict]:
    """(task kind, parameters) of `action` on one marked VM; `typed`: the delete dialog's answer (mode,
    days). Prechecked with the safest mode the dialog offers before it is asked."""
    name = vm.name
    if action in ("vm_start", "vm_hibernate", "vm_pause", "vm_resume"):
        return "vm." + action.removeprefix("vm_"), {"vm": name}
    if action in ("vm_stop", "vm_force_stop", "vm_reboot"):
        mode = {"vm_stop": "powerdown", "vm_force_stop": "force", "vm_reboot": "reboot"}[action]
        return "vm.shutdown", {"vm": name, "mode": mode}
    if vm.in_bin:
        return "vm.purge", {"vm": name, "confirm": name}
    params: dict[str, Any] = {"vm": name, "confirm": name, "mode": (typed or {}).get("mode", "normal")}
    if typed and "keep_days" in typed:
        params["keep_days"] = typed["keep_days"]
    return "vm.delete", params
