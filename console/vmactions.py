"""What the operator can do to the VM or template under the cursor, in every view that lists VMs.

Mixed into the inventory view (a tree) and the VMs view (a table), so the keys are the view's
bindings; each view says what is under its cursor (`cursor_vm`). Every action first asks
`refusal()` (console/vms.py: the engine's own prechecks, which it applies again before it makes a
task); a refused key is dimmed and says why when pressed. Accepted ones
open a dialog when they need input or a confirmation, then submit a task through
`client.vm_task` in a worker; the task shows in the Tasks view like any other.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import PurePosixPath
from typing import Any, Callable

from textual.binding import Binding

from ferry.engine.errors import FerryError, Refused
from ferry.engine.taskmodel import TaskState
from ferry.engine.vm.model import check_hardware, check_name, expand_pattern, parse_size

from .messages import VMsUpdated
from .modals import ConfirmScreen, esc
from .poller import VMPoller
from .vmdialogs import Field, FormScreen, TypedNameScreen
from .vms import is_template, linked_clones, refusal

# action -> (what the operator calls it, shown in the footer)
VM_KEYS: dict[str, tuple[str, str]] = {}


def _b(key: str, action: str, desc: str, tip: str, *, show: bool = False) -> Binding:
    VM_KEYS[f"vm_{action}"] = (key.split(",")[0], desc)
    return Binding(key, f"vm_{action}", desc, show=show, id=f"ferry.inventory.vm.{action}", tooltip=tip)


VM_BINDINGS = [
    _b("s", "start", "Start", "Start the selected VM (a hibernated one resumes)", show=True),
    _b("x", "stop", "Stop", "Shut the selected VM down safely through its guest agent (asks first)", show=True),
    _b("X", "force_stop", "Force stop", "Power the selected VM off at once (asks first)"),
    _b("r", "reboot", "Reboot", "Reboot the selected VM through its guest agent (asks first)"),
    _b("h", "hibernate", "Hibernate", "Save the selected VM's memory to disk and stop it; start resumes it"),
    _b("n", "create", "New VM", "Create a VM on the selected host"),
    _b("c", "clone", "Clone", "Copy the selected VM (or template) under a new name"),
    _b("t", "convert", "Template/VM", "Convert the selected VM to a template, or a template back to a VM"),
    _b("d", "deploy", "Deploy", "Make VMs from the selected template: a name pattern, a count, linked or full"),
    _b("e", "export", "Export", "Export the selected VM or template as OVA or OVF on its host"),
    _b("i", "import", "Import", "Import an OVA/OVF package from a host"),
    _b("delete", "delete", "Delete", "Delete the selected VM or template (type its name to confirm); "
                                     "in the recycle bin: purge it for good", show=True),
    _b("u", "restore", "Restore", "Bring the selected VM back from the recycle bin"),
]
SHOWN = frozenset(b.action for b in VM_BINDINGS if b.show)
TITLES = {b.action: b.description for b in VM_BINDINGS}
DEFAULT_DISK = "1G"


class VMActions:
    """The VM keys of a view, and the polled VM list they act on. The view provides vms and recycled
    (dicts by record id, from the VMsUpdated messages), BINDINGS, check_action, action_refusal,
    cursor_vm and `shown`."""

    app: Any
    vms: dict[str, dict]
    recycled: dict[str, dict]
    BINDINGS: list
    shown: bool
    check_action: Callable[[str, tuple], bool | None]
    action_refusal: Callable[[str], str | None]
    post_message: Callable[[Any], bool]

    def __init__(self, client: Any, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client
        self.site = client.site
        self.clock = clock
        self.vm_poller: VMPoller | None = None
        self.mine: dict[int, str] = {}                # tasks submitted from this view -> what they do
        self._vm_task_states: dict[int, str] = {}

    # ------------------------------------------------------------------ the VM list

    def make_vm_poller(self, interval: float | None = None) -> VMPoller:
        """Polls the VM list while the view is shown; each result comes back as a VMsUpdated message."""
        self.vm_poller = VMPoller(self._fetch_vms, lambda vl: self.post_message(VMsUpdated(vl)),
                                  active=lambda: self.shown, clock=self.clock,
                                  **({"interval": interval} if interval is not None else {}))
        return self.vm_poller

    async def _fetch_vms(self) -> tuple[list[dict], list[dict]]:
        return await self.client.vm_list(), await self.client.vm_list(recycled=True)

    def refresh_vms(self) -> None:
        """Ask for the VM list again now (after the running poll, if one runs)."""
        if self.vm_poller:
            self.vm_poller.poke()

    # ------------------------------------------------------------------ what is selected

    def cursor_vm(self) -> dict | None:
        """The VM or template under the view's cursor (None: something else, or nothing)."""
        raise NotImplementedError

    def cursor_host(self) -> str:
        """The host a new VM goes to: the selected VM's, else the first host."""
        vm = self.cursor_vm()
        if vm and vm.get("host") in self.site.hosts:
            return vm["host"]
        return sorted(self.site.hosts)[0]

    def busy_task(self, vm: dict | None) -> str | None:
        """'task 12 (start web1)' when a live task works on the VM (a finished one's mark is stale)."""
        tid = (vm or {}).get("busy")
        if not tid:
            return None
        feed = getattr(self.app, "feed", None)
        info = feed.tasks.get(tid) if feed is not None else None
        if info is None:
            return f"task {tid}"
        if info.state.final:
            return None
        return f"task {tid} ({info.title}, {info.state})"

    def vm_refusal(self, action: str) -> str | None:
        vm = self.cursor_vm()
        clones = linked_clones(vm, list(self.vms.values()), list(self.recycled.values())) \
            if vm is not None and is_template(vm) else None
        return refusal(action, vm, busy_task=self.busy_task(vm), clones=clones)

    def vm_check(self, action: str) -> bool | None:
        """check_action for the VM keys: hidden from the footer where no VM is selected, dimmed when refused."""
        if action in ("vm_create", "vm_import"):
            return True
        if self.cursor_vm() is None:
            return False if action in SHOWN else None
        if action == "vm_restore" and not (self.cursor_vm() or {}).get("recycled"):
            return False
        return None if self.vm_refusal(action) else True

    def vm_keys(self, vm: dict) -> list[tuple[str, str, str | None]]:
        """(key, what, why refused) of the actions that make sense for the VM, for its detail pane."""
        if vm.get("recycled"):
            wanted = ("vm_restore", "vm_delete")
        elif is_template(vm):
            wanted = ("vm_deploy", "vm_clone", "vm_convert", "vm_export", "vm_delete", "vm_start")
        else:
            wanted = ("vm_start", "vm_stop", "vm_force_stop", "vm_reboot", "vm_hibernate", "vm_clone",
                      "vm_convert", "vm_export", "vm_delete")
        out = []
        for a in wanted:
            key, what = VM_KEYS[a]
            key = {"delete": "del"}.get(key, key)
            what = what.lower()
            if vm.get("recycled") and a == "vm_delete":
                what = "purge"
            if a == "vm_convert":
                what = "to VM" if is_template(vm) else "to template"
            out.append((key, what, self.vm_refusal(a)))
        return out

    def _guard(self, action: str) -> dict | None:
        why = self.vm_refusal(action)
        if why:
            self.app.notify(esc(why), title=TITLES.get(action, "VM"), severity="warning")
            return None
        return self.cursor_vm()

    def refusal_for_key(self, key: str) -> tuple[str, str] | None:
        """(title, reason) when `key` is one of this view's keys and it was refused just now."""
        keymap = getattr(self.app, "_keymap", {}) or {}
        for b in self.BINDINGS:
            keys = keymap.get(b.id, b.key) if b.id else b.key
            if key in [k.strip() for k in keys.split(",")]:
                if self.check_action(b.action, ()) is True:
                    return None
                why = self.action_refusal(b.action)
                return (b.description, why) if why else None
        return None

    # ------------------------------------------------------------------ submitting

    def submit_vm_task(self, kind: str, params: dict, what: str) -> None:
        self.app.run_worker(partial(self._submit_vm_task, kind, params, what), name=f"{kind} {what}",
                            group="vm-actions", exit_on_error=False)

    async def _submit_vm_task(self, kind: str, params: dict, what: str) -> None:
        app = self.app
        try:
            tid = await self.client.vm_task(kind, params)
        except Refused as e:      # the engine's precheck (what the console could not see itself): no task was made
            app.notify(esc(e.message) + (f"\nhint: {esc(e.hint)}" if e.hint else ""), title=esc(what),
                       severity="warning", timeout=10)
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

    def _name_free(self, name: str) -> str | None:
        if any(v.get("name") == name for v in self.vms.values()):
            return f"a VM or template named {name} already exists"
        return None

    # ------------------------------------------------------------------ the actions

    def action_vm_start(self) -> None:
        vm = self._guard("vm_start")
        if vm:
            verb = "resume" if vm.get("state") == "hibernated" else "start"
            self.submit_vm_task("vm.start", {"vm": vm["name"]}, f"{verb} {vm['name']}")

    def _shutdown(self, action: str, mode: str, title: str, body: str, button: str) -> None:
        vm = self._guard(action)
        if vm:
            name = vm["name"]
            self._confirm(title.format(name=name), body.format(name=name), button,
                          lambda: self.submit_vm_task("vm.shutdown", {"vm": name, "mode": mode},
                                                      f"{button.lower()} {name}"))

    def action_vm_stop(self) -> None:
        self._shutdown("vm_stop", "powerdown", "Shut down {name}?",
                       "The guest agent asks the guest to power off cleanly.\n"
                       "Its services stop; start it again with s.", "Shut down")

    def action_vm_force_stop(self) -> None:
        self._shutdown("vm_force_stop", "force", "Force stop {name}?",
                       "Powers it off at once, like pulling the plug: what the guest has not\n"
                       "written to disk is lost. Prefer x (safe shutdown) when the guest answers.", "Force stop")

    def action_vm_reboot(self) -> None:
        self._shutdown("vm_reboot", "reboot", "Reboot {name}?",
                       "The guest agent asks the guest to reboot; its services stop for a moment.", "Reboot")

    def action_vm_hibernate(self) -> None:
        vm = self._guard("vm_hibernate")
        if vm:
            name = vm["name"]
            self._confirm(f"Hibernate {name}?",
                          f"Saves its memory ({vm.get('memory_mb', '?')} MiB) next to its disks and stops it;\n"
                          "start (s) resumes it where it was.", "Hibernate",
                          lambda: self.submit_vm_task("vm.hibernate", {"vm": name}, f"hibernate {name}"),
                          danger=False)

    def action_vm_create(self) -> None:
        hosts = sorted(self.site.hosts)
        host = self.cursor_host()

        def check(v: dict) -> str | None:
            try:
                check_name(v["name"])
                check_hardware(cpus=int(v["cpus"] or 0), memory_mb=int(v["memory_mb"] or 0))
                if v["disk"]:
                    if parse_size(v["disk"], "disk size") < 1 << 20:
                        return "the disk must have at least 1 MiB"
            except FerryError as e:
                return e.message + (f" ({e.hint})" if e.hint else "")
            return self._name_free(v["name"])

        def submit(v: dict) -> None:
            nets = self.site.hosts[v["host"]].networks or ("default",)
            params = {"name": v["name"], "host": v["host"], "cpus": int(v["cpus"]), "memory_mb": int(v["memory_mb"]),
                      "disks": [{"size": v["disk"]}] if v["disk"] else [], "nics": [{"network": nets[0]}],
                      "boot": ["disk", "live"]}
            self.submit_vm_task("vm.create", params, f"create {v['name']}")

        self._form(FormScreen("New VM", [
            Field("name", "Name", "", placeholder="e.g. web-01"),
            Field("host", "Host", host, kind="select", options=tuple((h, h) for h in hosts)),
            Field("cpus", "CPUs", "1", restrict=r"[0-9]*"),
            Field("memory_mb", "Memory MiB", "256", restrict=r"[0-9]*"),
            Field("disk", "Disk size", DEFAULT_DISK, placeholder="e.g. 10G, 512M; empty: no disk"),
        ], confirm="Create", check=check), submit)

    def action_vm_clone(self) -> None:
        vm = self._guard("vm_clone")
        if not vm:
            return
        src, tpl = vm["name"], is_template(vm)

        def check(v: dict) -> str | None:
            try:
                check_name(v["name"])
            except FerryError as e:
                return e.message
            return self._name_free(v["name"])

        what = "template" if tpl else "VM"
        intro = (f"A full copy of {src} (its disks are copied" + (", while it runs" if vm.get("state") == "running"
                                                                   else "") + f"); the copy is a {what}.")
        self._form(FormScreen(f"Clone {what} {src}", [Field("name", "New name", f"{src}-copy")], confirm="Clone",
                              intro=intro, check=check),
                   lambda v: self.submit_vm_task("vm.clone", {"src": src, "names": [v["name"]], "as_template": tpl,
                                                              "linked": False}, f"clone {src} -> {v['name']}"))

    def action_vm_convert(self) -> None:
        vm = self._guard("vm_convert")
        if not vm:
            return
        name = vm["name"]
        if is_template(vm):
            title, body, to = (f"Convert template {name} to a VM?",
                               "It becomes an ordinary VM that can start; no more VMs can be deployed from it.", "vm")
        else:
            title, body, to = (f"Convert {name} to a template?",
                               "A template never runs: VMs are deployed from it (d), linked or full.\n"
                               "Convert it back with t while it has no linked clones.", "template")
        self._confirm(title, body, "Convert",
                      lambda: self.submit_vm_task("vm.convert", {"vm": name, "to": to},
                                                  f"convert {name} to a {'VM' if to == 'vm' else 'template'}"),
                      danger=False)

    def action_vm_deploy(self) -> None:
        vm = self._guard("vm_deploy")
        if not vm:
            return
        src = vm["name"]

        def names_of(v: dict) -> list[str]:
            count = int(v["count"] or 0)
            pattern = v["pattern"]
            if count > 1 or "#" in pattern or "{n" in pattern:
                return expand_pattern(pattern, count)
            return [check_name(pattern)]

        def check(v: dict) -> str | None:
            try:
                names = names_of(v)
            except FerryError as e:
                return e.message + (f" ({e.hint})" if e.hint else "")
            for n in names:
                if self._name_free(n):
                    return self._name_free(n)
            return None

        def submit(v: dict) -> None:
            names = names_of(v)
            linked = bool(v["linked"])
            what = f"deploy {src} -> {names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1 else "") + \
                (" linked" if linked else "")
            self.submit_vm_task("vm.clone", {"src": src, "names": names, "linked": linked, "deploy": True,
                                             "as_template": False}, what)

        self._form(FormScreen(f"Deploy from template {src}", [
            Field("pattern", "Names", f"{src}-##", placeholder="web-## or web-{n:02}"),
            Field("count", "How many", "1", restrict=r"[0-9]*"),
            Field("linked", "Linked", True, kind="check", placeholder="linked clones (else full copies)"),
        ], confirm="Deploy", check=check,
            intro="## or {n:02} is replaced by 01, 02, ...; linked clones share the template's disks "
                  "(fast, small), full ones are independent copies."), submit)

    def action_vm_export(self) -> None:
        vm = self._guard("vm_export")
        if not vm:
            return
        name = vm["name"]

        def out_of(v: dict) -> str:
            out = v["out"]
            if v["format"] == "ova" and not out.endswith(".ova"):
                out += ".ova"
            if v["format"] == "ovf" and out.endswith(".ova"):
                out = out[:-4]
            return out

        def check(v: dict) -> str | None:
            if not v["out"] or not v["out"].startswith("/"):
                return f"give an absolute path on {vm.get('host')}, e.g. /var/tmp/{name}.ova"
            return None

        self._form(FormScreen(f"Export {name}", [
            Field("out", "Output path", f"/var/tmp/{name}.ova"),
            Field("format", "Format", "ova", kind="select",
                  options=(("OVA (one file)", "ova"), ("OVF (a folder)", "ovf"))),
        ], confirm="Export", check=check,
            intro=f"The package is written on {vm.get('host')}, in a folder that exists there; disks become VHD."),
            lambda v: self.submit_vm_task("vm.export", {"vm": name, "out": out_of(v), "ova": v["format"] == "ova"},
                                          f"export {name} -> {out_of(v)}"))

    def action_vm_import(self) -> None:
        hosts = sorted(self.site.hosts)

        def check(v: dict) -> str | None:
            if not v["path"].startswith("/"):
                return "give the absolute path of an .ova file or an OVF folder on the host"
            if v["name"]:
                try:
                    check_name(v["name"])
                except FerryError as e:
                    return e.message
                return self._name_free(v["name"])
            return None

        def submit(v: dict) -> None:
            params = {"path": v["path"], "host": v["host"]}
            if v["name"]:
                params["name"] = v["name"]
            self.submit_vm_task("vm.import", params, f"import {PurePosixPath(v['path']).name}")

        self._form(FormScreen("Import a VM", [
            Field("path", "Package", "", placeholder="/var/tmp/web01.ova or an OVF folder"),
            Field("host", "Host", self.cursor_host(), kind="select", options=tuple((h, h) for h in hosts)),
            Field("name", "Name", "", placeholder="empty: the name in the package"),
        ], confirm="Import", check=check), submit)

    def action_vm_delete(self) -> None:
        vm = self._guard("vm_delete")
        if not vm:
            return
        name = vm["name"]
        if vm.get("recycled"):
            def purge(v: dict) -> None:
                self.submit_vm_task("vm.purge", {"vm": name, "confirm": v["confirm"]}, f"purge {name}")
            self.app.push_screen(TypedNameScreen(
                name, title=f"Purge {name} from the recycle bin?",
                body="Its disks are removed for good; it cannot come back.", confirm="Purge", modes=False),
                lambda v: purge(v) if v else None)
            return
        what = "template" if is_template(vm) else "VM"

        def delete(v: dict) -> None:
            params = {"vm": name, "mode": v["mode"], "confirm": v["confirm"]}
            if "keep_days" in v:
                params["keep_days"] = v["keep_days"]
            self.submit_vm_task("vm.delete", params, f"delete {name}" + ("" if v["mode"] == "normal"
                                                                         else f" ({v['mode']})"))
        disks = ", ".join(f"{d.get('name')} on {d.get('datastore')}" for d in vm.get("disks") or ()) or "no disks"
        self.app.push_screen(TypedNameScreen(
            name, title=f"Delete {what} {name}?", body=f"Its record and its disks ({disks}) go away."),
            lambda v: delete(v) if v else None)

    def action_vm_restore(self) -> None:
        vm = self._guard("vm_restore")
        if vm:
            self.submit_vm_task("vm.restore", {"vm": vm["name"]}, f"restore {vm['name']}")

    # ------------------------------------------------------------------ the command palette

    def vm_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        """Palette entries: create and import anywhere, and what applies to the VM under the cursor."""
        cmds: list[tuple[str, str, Callable[[], object]]] = [
            ("VM: create…", f"a new VM on {self.cursor_host()}  (n)", self.action_vm_create),
            ("VM: import…", "an OVA/OVF package from a host  (i)", self.action_vm_import),
        ]
        vm = self.cursor_vm()
        if vm is None:
            return cmds
        name = vm["name"]
        for action, text in (
            ("vm_start", f"Start {name}"), ("vm_stop", f"Shut down {name} (safe)"),
            ("vm_force_stop", f"Force stop {name}"), ("vm_reboot", f"Reboot {name}"),
            ("vm_hibernate", f"Hibernate {name}"), ("vm_clone", f"Clone {name}…"),
            ("vm_convert", f"Convert template {name} to a VM" if is_template(vm) else f"Convert {name} to a template"),
            ("vm_deploy", f"Deploy VMs from template {name}…"), ("vm_export", f"Export {name}…"),
            ("vm_delete", f"Purge {name}…" if vm.get("recycled") else f"Delete {name}…"),
            ("vm_restore", f"Restore {name} from the recycle bin"),
        ):
            if self.vm_refusal(action) is None:
                key = VM_KEYS[action][0]
                what = "template" if is_template(vm) else "VM"
                shown_key = "del" if key == "delete" else key
                cmds.append((f"VM: {text}", f"the selected {what}  ({shown_key})", getattr(self, f"action_{action}")))
        return cmds
