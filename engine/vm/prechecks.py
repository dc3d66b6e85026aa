"""Whether a VM action may start: one set of rules, in the engine, for every front end.

The engine asks `precheck()` before it makes a task: `refusal()`'s rules over fresh facts (the
host's processes, state.db's busy marks, names in use, free space), so an action that cannot apply
is refused with one line and never becomes a failed task. Each task asks again when it runs, for
what changed in between. Front ends ask the engine too, never these rules themselves:
`precheck(kind, params)` before they act, and `vm_actions(vm)` (a VMActionCheck per action) to dim
the keys that cannot apply. A refusal reads the same everywhere; its way out is a command for the
CLI and a key for the console.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PermanentError, Refused
from .model import UNFINISHED_STATES, VMState, VMView

# The actions a VM or template may be asked for, by their console names (see action_of).
VM_ACTIONS = ("vm_start", "vm_stop", "vm_force_stop", "vm_reboot", "vm_hibernate", "vm_pause", "vm_resume",
              "vm_clone", "vm_deploy", "vm_convert", "vm_export", "vm_delete", "vm_restore", "vm_purge", "vm_serial",
              "vm_move")


@dataclass(frozen=True)
class Refusal:
    reason: str          # one line, naming the VM: the same in the console and the CLI
    hint: str = ""       # the way out, as a command
    key: str = ""        # the way out, as a console key

    @property
    def text(self) -> str:
        """What the console shows: the reason, and the key that is the way out."""
        return f"{self.reason}: {self.key}" if self.key else self.reason

    def error(self) -> Refused:
        return Refused(self.reason, self.hint)


@dataclass(frozen=True)
class VMActionCheck:
    """Whether an action applies to a VM now (`vm_actions`): refusal is None when it does."""
    action: str
    refusal: Refusal | None = None


def action_of(kind: str, params: dict[str, Any]) -> str | None:
    """The console's name of the action a task kind does (None: a kind with no VM rules)."""
    if kind == "vm.shutdown":
        return {"force": "vm_force_stop", "reboot": "vm_reboot"}.get(params.get("mode", ""), "vm_stop")
    if kind == "vm.clone":
        return "vm_deploy" if params.get("deploy") else "vm_clone"
    return {"vm.start": "vm_start", "vm.hibernate": "vm_hibernate", "vm.convert": "vm_convert",
            "vm.export": "vm_export", "vm.delete": "vm_delete", "vm.restore": "vm_restore",
            "vm.purge": "vm_purge", "vm.move": "vm_move", "vm.pause": "vm_pause", "vm.resume": "vm_resume"}.get(kind)


def few(names: list[str], n: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def refusal(action: str, vm: VMView | None, *, busy_task: str | None = None,
            clones: list[str] | None = None, to: str | None = None, copies: int = 1,
            linked: bool = False, task: int | None = None) -> Refusal | None:
    """Why `action` cannot apply to `vm` (as its host reports it now) now; None when it can.

    `busy_task` describes a live task that works on the VM, `clones` names the template's linked clones,
    `to` is where a conversion goes (None: the other kind), `copies` how many copies a clone makes and
    `linked` whether they are linked clones. `task`: the task asking (when it runs), whose own half-made
    or half-deleted record is no obstacle to it."""
    if action in ("vm_create", "vm_import"):
        return None
    if vm is None:
        return Refusal("select a VM or template first")
    name = vm.name
    st = vm.state
    tpl = vm.is_template
    if vm.in_bin:
        if action == "vm_restore" and st is VMState.DELETING and not (task and vm.busy == task):
            if vm.busy:
                return _unfinished(action, vm, st, busy_task)
            return Refusal(f"{name} was partly purged", f"finish the purge: ferry vm purge {name} --confirm {name}",
                           "del purges it to the end")
        if action in ("vm_restore", "vm_delete", "vm_purge"):
            return None
        return Refusal(f"{name} is in the recycle bin", f"restore it first: ferry vm restore {name}",
                       "restore it first (u)")
    if action in ("vm_restore", "vm_purge"):
        return Refusal(f"{name} is not in the recycle bin", "ferry vm list --recycled shows what is")
    if st in UNFINISHED_STATES and not (task and vm.busy == task):
        why = _unfinished(action, vm, st, busy_task)
        if why is not None:
            return why
    elif busy_task and action != "vm_serial":     # a guest's console may be watched while a task works on it
        tid = vm.busy
        return Refusal(f"{name} is busy with {busy_task}",
                       f"wait for it, or cancel it: ferry task cancel {tid}" if tid else "wait for it, or cancel it",
                       "wait for it, or cancel it in Tasks")
    running = vm.running
    hibernated = st is VMState.HIBERNATED
    if action == "vm_start":
        if tpl:
            return Refusal(f"{name} is a template, and a template never starts",
                           f"deploy a VM from it: ferry template deploy {name} NEW-NAME", "deploy a VM from it (d)")
        if st is VMState.PAUSED:
            return Refusal(f"{name} is paused", f"continue it: ferry vm resume {name}", "Z resumes it")
        if running:
            return Refusal(f"{name} is already running", "nothing to do")
        return None
    if action in ("vm_pause", "vm_resume"):
        if tpl:
            return Refusal(f"{name} is a template, which never runs", "nothing to do")
        if not running:
            return Refusal(f"{name} is not running ({st})", f"start it: ferry vm start {name}", "s starts it")
        if action == "vm_pause" and st is VMState.PAUSED:
            return Refusal(f"{name} is already paused", f"continue it: ferry vm resume {name}", "Z resumes it")
        return None
    if action in ("vm_stop", "vm_force_stop", "vm_reboot", "vm_hibernate"):
        if tpl:
            return Refusal(f"{name} is a template, which never runs: it cannot be stopped, rebooted or hibernated",
                           "nothing to do")
        if not running:
            return Refusal(f"{name} is not running ({st})", f"start it: ferry vm start {name}",
                           "s starts it" + (" again" if st is VMState.MISSING else ""))
        if st is VMState.PAUSED and action in ("vm_stop", "vm_reboot"):
            # else the guest agent's timeout would say it "does not answer", as if it were broken
            return Refusal(f"{name} is paused: its guest agent answers once it runs again",
                           f"continue it first (ferry vm resume {name}), or force it off: ferry vm stop {name} --force",
                           "Z resumes it, or X forces it off")
        return None
    if action in ("vm_clone", "vm_deploy"):
        if action == "vm_deploy" and not tpl:
            return Refusal(f"{name} is a VM, and VMs are deployed from templates",
                           f"convert it first (ferry template convert {name}) or clone it (ferry vm clone {name} NEW)",
                           "convert it first (t) or clone it (c)")
        if linked and not tpl:
            return Refusal(f"{name} is a VM; linked clones are made from templates, whose disks never change",
                           f"convert it first (ferry template convert {name}) or make a full clone")
        if hibernated:
            return Refusal(f"{name} is hibernated; its disks belong to the saved memory state",
                           f"resume it (ferry vm start {name}) or shut it down first",
                           "resume it (s) or shut it down first")
        if running and copies > 1:
            return Refusal(f"{name} is running; a running VM is cloned one copy at a time",
                           "clone it once, then clone the copy")
        return None
    if action == "vm_convert":
        to = to or ("vm" if tpl else "template")
        if to == "template":
            if tpl:
                return Refusal(f"{name} is already a template", "nothing to do")
            if running or hibernated:
                return Refusal(f"{name} must be stopped to become a template", f"shut it down first: ferry vm stop {name}",
                               "x stops it")
            return None
        if not tpl:
            return Refusal(f"{name} is already a VM", "nothing to do")
        if clones:
            return Refusal(f"template {name} has linked clones, whose disks depend on it: {few(clones)}",
                           "delete them, or deploy a full VM from the template", "delete them first")
        return None
    if action == "vm_serial":
        if tpl:
            return Refusal(f"{name} is a template, which never runs: it has no serial console",
                           f"deploy a VM from it: ferry template deploy {name} NEW-NAME", "deploy a VM from it (d)")
        if not running:
            return Refusal(f"{name} is not running ({st}): its serial console is there while it runs",
                           f"start it: ferry vm start {name}", "s starts it")
        return None
    if action == "vm_move":
        if hibernated:
            return Refusal(f"{name} is hibernated; its saved memory resumes where it was saved",
                           f"resume it (ferry vm start {name}), then move it", "resume it (s), then move it")
        if st is VMState.MISSING:
            return Refusal(f"{name} is recorded as running, but its QEMU is gone",
                           f"start it again (ferry vm start {name}), then move it", "s starts it again")
        return None
    if action == "vm_export":
        if running or hibernated:
            return Refusal(f"{name} must be stopped to be exported (its disks change while it runs)",
                           f"shut it down first (ferry vm stop {name}), or export a clone of it",
                           "x stops it, or export a clone")
        return None
    if action == "vm_delete":
        if running:
            return Refusal(f"{name} is running; a running VM is never deleted", f"stop it first: ferry vm stop {name}",
                           "x stops it")
        if tpl and clones:
            return Refusal(f"template {name} has linked clones, whose disks depend on it: {few(clones)}",
                           "delete those first (or purge them from the recycle bin)", "delete them first")
        return None
    return None


def _unfinished(action: str, vm: VMView, st: VMState, busy_task: str | None) -> Refusal | None:
    """Why nothing but its own task may act on a VM being made or deleted (a delete may finish a delete)."""
    name, tid = vm.name, vm.busy
    doing = "being made" if st is VMState.INCOMPLETE else "being deleted"
    if busy_task:       # its task runs now
        return Refusal(f"{name} is {doing} by {busy_task}", f"wait for it, or roll it back: ferry task cancel {tid}",
                       "wait for it, or cancel it in Tasks")
    if action == "vm_delete" and (st is VMState.DELETING or not tid):
        return None     # a delete that stopped half-way, finished by a delete
    if tid:
        return Refusal(f"{name} is {doing} by task {tid}, which stopped before it finished",
                       f"finish it (ferry task resume {tid}) or roll it back (ferry task cancel {tid})",
                       "resume or cancel it in Tasks")
    if st is VMState.DELETING:
        return Refusal(f"{name} was partly deleted", f"finish the delete: ferry vm delete {name} --confirm {name}",
                       "del deletes it to the end")
    return Refusal(f"{name} was left half-made by a task that is gone", f"delete it: ferry vm delete {name} --confirm {name}",
                   "del deletes it")


# Prints each bridge named in "$@" that is not a bridge on the host: "missing NAME" or "notbridge NAME".
_BRIDGES_THERE = ('for b in "$@"; do if [ -d "/sys/class/net/$b/bridge" ]; then :; '
                  'elif [ -e "/sys/class/net/$b" ]; then echo "notbridge $b"; else echo "missing $b"; fi; done')


async def networks_ready(h: Any, nics: Any) -> None:
    """Refused, naming the network, its bridge and the host, when a NIC would join a bridge that is not
    on host `h` (a HostOps) and that Ferry may not create (create = false). One round trip, and only
    for such networks; the start asks the host again just before QEMU (hostops.ensure_bridges)."""
    from .nics import plan
    fixed: dict[str, str] = {}                  # bridge -> the first network on it
    for p in plan(h.site, h.name, "", nics):
        if p.tap is not None and not p.network.create:
            fixed.setdefault(p.bridge, p.network.name)
    if not fixed:
        return
    r = await h.t.run(["sh", "-c", _BRIDGES_THERE, "sh", *fixed], timeout=30)
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        what, _, br = line.partition(" ")
        if br not in fixed:
            continue
        net = fixed[br]
        if what == "notbridge":
            raise Refused(f"network {net}: {br} on host {h.name} is not a bridge",
                          f"make {br} a bridge on {h.name}, or name another bridge in [networks.{net}] of config.toml")
        raise Refused(f"network {net}: bridge {br} is missing on host {h.name}, and Ferry may not create it "
                      "(create = false)",
                      f"create {br} on {h.name} (ip link add {br} type bridge), or let Ferry make it: "
                      f"create = true in [networks.{net}] of config.toml")


def refused(e: PermanentError) -> Refused:
    """A bad parameter found before any task exists, as the refusal it is."""
    return e if isinstance(e, Refused) else Refused(e.message, e.hint)


async def precheck(engine: Any, kind: str, params: dict[str, Any]) -> None:
    """Refused (one line and a hint) when the task would be refused; before it is made, so nothing is."""
    from ..tasks import kind_of
    k = kind_of(kind)
    try:
        k.validate(params)
        for host in k.hosts(params):
            engine.site.host(host)
    except PermanentError as e:
        raise refused(e) from None
    check = getattr(k, "check", None)
    if check is not None:
        from .service import VMService
        await check(VMService.of(engine), params)
