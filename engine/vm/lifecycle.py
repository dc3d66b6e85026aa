"""VM lifecycle task kinds: start, safe shutdown/reboot, force stop, hibernate (start brings it back), pause
and resume (QMP stop and cont: the guest halted where it is, its memory kept in QEMU).

Each goes on after its Ferry process was killed at any instant (`ferry task resume`, or the same
command again): it saves, before it acts, a checkpoint saying what it is about to do, and a resumed
run looks at the VM as it is before doing it again. Start adopts a QEMU that an interrupted run
launched (never a second one); shutdown records a VM that is off as stopped, and asks again a guest it
does not know it asked; hibernate ends either hibernated (the state file complete under its final
name, and recorded) or running as before, then hibernates again: a state file is named final only
once complete and flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from pathlib import PurePosixPath
from typing import Any, AsyncIterator

from ..errors import FerryError, PermanentError, Refused, TransientError
from ..platform.liveboot import is_running, launch, stop as stop_process
from ..platform.qga import GuestAgent
from ..platform.qmp import QMPClient
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, vm_dir
from .model import UNFINISHED_STATES, VMSpec, VMState, resumed_text
from .prechecks import action_of, networks_ready
from .service import VMService

BOOT_TIMEOUT = 90.0
LAUNCH_SETTLE_S = 10.0    # a QEMU that daemonizes writes its pid file within this


@contextlib.asynccontextmanager
async def working_on(ctx: TaskContext, row: dict) -> AsyncIterator[None]:
    """Marks the VM busy with this task; refuses when another live task works on it."""
    svc = VMService.of(ctx.engine)
    fresh = await svc.store.call(svc.store.vm_row, row["id"])
    if fresh is None:
        raise PermanentError(f"VM {row['name']} no longer exists", "ferry vm list shows what exists")
    # Looking at the holder and marking the VM are one step: two tasks never both take it.
    other = await svc.store.call(svc.store.vm_take, row["id"], ctx.id, ctx.engine.task_gone)
    if other:
        who = await svc.busy_with({**fresh, "busy": other}, ctx.id) or f"task {other}"
        raise PermanentError(f"{row['name']} is busy with {who}",
                             f"wait for it, or cancel it: ferry task cancel {other}")
    try:
        yield
    finally:
        now = await svc.store.call(svc.store.vm_row, row["id"])
        # A record the task has not finished making or deleting stays its own until it is done or rolled back.
        if now is not None and not (now["state"] in UNFINISHED_STATES and now["busy"] == ctx.id):
            await svc.update(row["id"], busy=None)


def cancelled_for_good(ctx: TaskContext) -> bool:
    """Is the task being cancelled by an operator (not paused, nor left for the next engine)? Work kept
    for a resume is removed only then."""
    return ctx.stopping == "cancel"


class VMTask(TaskKind):
    """A task on one existing VM or template, named by params["vm"]; the client fills params["host"].

    `check` refuses what cannot apply (prechecks.refusal's rules for the kind's action, and whatever
    the kind adds): the engine asks it before the task is made, and `target` again when it runs."""

    max_retries = 0
    verb = ""
    recycled = False              # the VM is looked for in the recycle bin

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("vm"):
            raise PermanentError(f"{self.name} needs a VM name", f"ferry vm {self.verb} NAME")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]] if params.get("host") else []

    def title(self, params: dict[str, Any]) -> str:
        return f"{self.verb} {params['vm']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        """One unfinished task per VM and kind: the same command again goes on with it."""
        return f"vm:{params['vm']}"

    def rules(self, params: dict[str, Any]) -> dict[str, Any]:
        """What prechecks.refusal needs beyond the VM: the action, and `to` or `copies` where they matter."""
        return {"action": action_of(self.name, params)}

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        """The VM's record, spec and host when the action may apply to it now; Refused otherwise."""
        rules = self.rules(params)
        return await svc.checked(rules.pop("action"), params["vm"], own=own, recycled=self.recycled, task=own, **rules)

    async def target(self, ctx: TaskContext) -> tuple[VMService, dict, VMSpec, HostOps]:
        """The service, the VM's record and spec, and its host, checked again now that the task runs."""
        svc = VMService.of(ctx.engine)
        row, vm, h = await self.check(svc, ctx.params, ctx.id)
        return svc, row, vm, h


async def wait_exit(h: HostOps, vm: VMSpec, timeout: float, ctx: TaskContext | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while await h.pid(vm) is not None:
        if time.monotonic() > deadline:
            return False
        if ctx:
            ctx.progress(item=f"waiting for {vm.name} to power off "
                         f"({int(deadline - time.monotonic())} s left)")
        await asyncio.sleep(0.2)
    return True


async def boot(ctx: TaskContext, vm: VMSpec, *, incoming: str | None = None, wait_agent: bool = True) -> dict:
    """Starts the VM's QEMU as a daemon of the host and waits for the guest agent (or the incoming state)."""
    svc = VMService.of(ctx.engine)
    out = await launch_qemu(ctx, vm, incoming=incoming)
    if incoming:
        await _wait_incoming(ctx, svc, vm)
    if wait_agent:
        ctx.progress(item="waiting for the guest agent", units_done=2)
        out["agent"] = await _wait_agent(svc, vm, BOOT_TIMEOUT)
        if not out["agent"]:
            ctx.log(f"the guest agent of {vm.name} did not answer within {BOOT_TIMEOUT:g} s; the VM runs",
                    "warning")
    ctx.progress(units_done=3, item="running")
    return out


async def launch_qemu(ctx: TaskContext, vm: VMSpec, *, incoming: str | None = None,
                      live: tuple[Any, dict] | None = None) -> dict[str, Any]:
    """Starts the VM's QEMU as a daemon of its host, its taps on their bridges: {vm, host, pid, accel}.
    `live`: the live image's role and parameters (HostOps.argv), whatever the VM's boot order says."""
    svc = VMService.of(ctx.engine)
    h = svc.host(vm.host)
    ctx.progress(item="live image", units_done=0, units_total=3)
    image = await h.live_image(await svc.image(lambda step, f: ctx.progress(item=f"building live image: {step}")))
    accel, reason = await svc.accel(h, image)
    if reason:
        ctx.log(reason)
    await disks_present(h, vm)
    nics = h.nics(vm)
    await h.ensure_bridges(nics)
    argv = h.argv(vm, image, accel, incoming=incoming, live=live)
    ctx.progress(item=f"starting QEMU on {h.name} ({accel})", units_done=1)
    pid = await launch(h.t, argv, h.paths(vm))
    ctx.log(f"QEMU of {vm.name} runs on {h.name} as pid {pid} ({accel})")
    try:
        await h.attach_taps(nics)
    except FerryError:
        await h.run(["kill", "-9", str(pid)], what="kill")   # a VM cut off from its network is not started
        raise
    for n in nics:
        if n.tap:
            ctx.log(f"NIC {n.index} of {vm.name} ({n.mac}) is on network {n.network.name}: tap {n.tap} on "
                    f"bridge {n.bridge}" + (f", VLAN {n.network.vlan}" if n.network.vlan else ""))
    return {"vm": vm.name, "host": h.name, "pid": pid, "accel": accel}


async def disks_present(h: HostOps, vm: VMSpec) -> None:
    """Refused, naming the first disk of the VM whose image is not on its host."""
    for d in vm.disks:
        if not await h.exists(d.path):
            raise Refused(f"disk {d.name} of {vm.name} is missing: {d.path} on {h.name}",
                          "restore the file, or delete the VM")


async def _wait_agent(svc: VMService, vm: VMSpec, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with await svc.agent(vm, timeout=2.0) as ga:
                await ga.ping(timeout=2.0)
                return True
        except FerryError:
            if await svc.host(vm.host).pid(vm) is None:
                raise PermanentError(f"QEMU of {vm.name} exited during boot",
                                     f"see the serial log {svc.host(vm.host).paths(vm).serial}") from None
            await asyncio.sleep(0.3)
    return False


async def _wait_incoming(ctx: TaskContext, svc: VMService, vm: VMSpec) -> None:
    """Waits for QEMU to load a hibernated state and run it."""
    deadline = time.monotonic() + 300
    async with await svc.qmp(vm) as q:
        while True:
            status = (await q.execute("query-status"))["status"]
            if status == "running":
                return
            mig = await q.execute("query-migrate")
            if mig.get("status") == "failed":
                raise PermanentError(f"{vm.name}: restoring the hibernated state failed: "
                                     f"{mig.get('error-desc', 'unknown error')}",
                                     "the state file may be damaged; start the VM fresh with --discard-state")
            if status == "postmigrate" or status == "paused" and mig.get("status") == "completed":
                await q.execute("cont")
            if time.monotonic() > deadline:
                raise TransientError(f"{vm.name}: the hibernated state did not load within 300 s", "retry")
            ctx.progress(item="restoring memory")
            await asyncio.sleep(0.2)


# ------------------------------------------------------------------ start / stop

async def _own_vm(ctx: TaskContext, svc: VMService) -> tuple[dict, VMSpec, HostOps] | None:
    """The record, spec and host of the VM an interrupted run of this task worked on (None: gone)."""
    row = await svc.store.call(svc.store.vm_row, (ctx.checkpoint or {}).get("vm_id", ""))
    if row is None:
        return None
    vm = VMSpec.from_dict(row["spec"])
    return row, vm, svc.host(vm.host)


async def _unrecorded_qemu(h: HostOps, vm: VMSpec) -> list[int]:
    """QEMUs of the VM that run without its pid file written (a launch cut short as it daemonized)."""
    pidfile = h.paths(vm).pidfile
    r = await h.t.run(["pgrep", "-f", "--", "-pidfile " + re.escape(pidfile)], timeout=30)
    pids = [int(x) for x in r.stdout.split() if x.isdigit()] if r.ok else []
    # The pid file must be an argument of its own (not part of a shell's command that names it).
    return [pid for pid in pids if await is_running(h.t, pid, pidfile)]


async def _launched(h: HostOps, vm: VMSpec) -> int | None:
    """The pid of the VM's QEMU when one runs; one whose launch was cut short before it wrote its pid
    file gets a few seconds to write it, and is killed if it does not (the task launches it again)."""
    pid = await h.pid(vm)
    if pid is not None:
        return pid
    stray = await _unrecorded_qemu(h, vm)
    if not stray:
        return None
    deadline = time.monotonic() + LAUNCH_SETTLE_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if (pid := await h.pid(vm)) is not None:
            return pid
    await h.t.run(["kill", "-KILL", *map(str, stray)], timeout=30)
    return None


@register
class StartVM(VMTask):
    name = "vm.start"
    verb = "start"

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        row, vm, h = await super().check(svc, params, own)
        if vm.hibernate_file and not params.get("discard_state") and not await h.exists(vm.hibernate_file):
            raise Refused(f"the hibernated state of {vm.name} is missing: {vm.hibernate_file}",
                          f"start it fresh: ferry vm start {vm.name} --discard-state")
        await disks_present(h, vm)
        await networks_ready(h, vm.nics)
        return row, vm, h

    async def rollback(self, ctx: TaskContext) -> None:
        """A start cancelled after its QEMU was launched: the VM runs (stopping it could lose the memory
        it resumed from), and its record says so; stopping it is the operator's call."""
        svc = VMService.of(ctx.engine)
        try:
            row = await svc.find(ctx.params["vm"])
        except Refused:
            return
        vm = VMSpec.from_dict(row["spec"])
        if await svc.host(vm.host).pid(vm) is not None:
            await svc.update(vm.id, state=VMState.RUNNING)
            ctx.log(f"{vm.name} had already started, and runs on: stop it with `ferry vm stop {vm.name}`", "warning")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        if (ctx.checkpoint or {}).get("launching"):
            out = await self._adopt(ctx)
            if out is not None:
                return out
        svc, row, vm, h = await self.target(ctx)
        async with working_on(ctx, row):
            incoming = bool(vm.hibernate_file) and not ctx.params.get("discard_state")
            # Before QEMU starts: a resumed run then looks for it instead of starting a second one.
            await ctx.save_checkpoint({"vm_id": vm.id, "launching": True, "incoming": incoming})
            if incoming:
                ctx.log(f"resuming {vm.name} from {vm.hibernate_file}")
                out = await boot(ctx, vm, incoming="exec:cat " + shlex.quote(vm.hibernate_file), wait_agent=False)
                await h.t.remove(vm.hibernate_file)
                vm = vm.with_(hibernate_file="")
                out["resumed"] = True
            else:
                if vm.hibernate_file:
                    ctx.log(f"discarding the hibernated state of {vm.name}", "warning")
                    await h.t.remove(vm.hibernate_file)
                    vm = vm.with_(hibernate_file="")
                out = await boot(ctx, vm, wait_agent=not ctx.params.get("no_wait"))
            await svc.update(vm.id, state=VMState.RUNNING, spec=vm)
        return out

    async def _adopt(self, ctx: TaskContext) -> dict[str, Any] | None:
        """An interrupted run launched QEMU: when it runs, wait for it as boot would have, and record it
        running. None when it does not run (the task starts it again)."""
        svc = VMService.of(ctx.engine)
        found = await _own_vm(ctx, svc)
        if found is None:
            return None
        row, vm, h = found
        pid = await _launched(h, vm)
        if pid is None:
            return None
        async with working_on(ctx, row):
            ctx.log(f"QEMU of {vm.name} already runs on {h.name} as pid {pid}, launched before this task was "
                    "interrupted: not launched again")
            # The run may have died between QEMU making its taps and their joining the bridges.
            await h.attach_taps(h.nics(vm))
            out: dict[str, Any] = {"vm": vm.name, "host": h.name, "pid": pid, "adopted": True}
            if ctx.checkpoint.get("incoming"):
                await _wait_incoming(ctx, svc, vm)
                out["resumed"] = True
            elif not ctx.params.get("no_wait"):
                ctx.progress(item="waiting for the guest agent", units_done=2, units_total=3)
                out["agent"] = await _wait_agent(svc, vm, BOOT_TIMEOUT)
            if vm.hibernate_file:      # loaded, or discarded: of no use any more
                await h.t.remove(vm.hibernate_file)
                vm = vm.with_(hibernate_file="")
            ctx.progress(units_done=3, units_total=3, item="running")
            await svc.update(vm.id, state=VMState.RUNNING, spec=vm)
        return out


@register
class ShutdownVM(VMTask):
    """Safe shutdown or reboot through the guest agent; force stop powers off at once."""
    name = "vm.shutdown"
    verb = "shutdown"

    def title(self, params: dict[str, Any]) -> str:
        mode = params.get("mode", "powerdown")
        return f"{'force stop' if mode == 'force' else 'reboot' if mode == 'reboot' else 'shut down'} {params['vm']}"

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        """As VMTask.check; a safe shutdown or reboot also needs the guest agent to answer."""
        row, vm, h = await super().check(svc, params, own)
        if params.get("mode", "powerdown") != "force":
            await (await self._agent(svc, vm, params)).close()
        return row, vm, h

    @staticmethod
    async def _agent(svc: VMService, vm: VMSpec, params: dict[str, Any]) -> GuestAgent:
        """The guest agent a safe shutdown or reboot goes through; Refused, with --force as the way out,
        when it does not answer."""
        try:
            return await svc.agent(vm)
        except PermanentError as e:
            what = "reboot" if params.get("mode") == "reboot" else "shut down"
            raise Refused(f"cannot {what} {vm.name} safely: {e.message}",
                          f"force it off instead: ferry vm stop {vm.name} --force") from None

    async def _settle(self, ctx: TaskContext, mode: str, timeout: float) -> dict[str, Any] | None:
        """An interrupted run asked the VM to go off (or reboot): the result when that is done now, or
        None when the task asks again."""
        svc = VMService.of(ctx.engine)
        found = await _own_vm(ctx, svc)
        if found is None:
            return None
        row, vm, h = found
        async with working_on(ctx, row):
            if mode == "reboot":
                if ctx.checkpoint.get("sent") and await h.pid(vm) is not None:
                    ctx.progress(item="waiting for the guest agent")
                    return {"vm": vm.name, "mode": mode, "agent": await _wait_agent(svc, vm, BOOT_TIMEOUT)}
                return None
            if mode != "force" and await h.pid(vm) is not None:
                if not ctx.checkpoint.get("sent"):
                    # Killed before it knew the guest was asked: asked (again: a second ask does no harm),
                    # not waited for in vain; a guest already going down may no longer answer.
                    with contextlib.suppress(FerryError):
                        async with await svc.agent(vm) as ga:
                            await ga.shutdown("powerdown")
                await wait_exit(h, vm, timeout, ctx)     # the guest may still be shutting down
            if await h.pid(vm) is not None:
                return None
            await svc.update(vm.id, state=VMState.STOPPED)
            ctx.log(f"{vm.name} is off (it was asked to before this task was interrupted)")
            return {"vm": vm.name, "mode": mode}

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        mode = ctx.params.get("mode", "powerdown")
        timeout = float(ctx.params.get("timeout", 120))
        if (ctx.checkpoint or {}).get("asked"):
            done = await self._settle(ctx, mode, timeout)
            if done is not None:
                return done
        svc, row, vm, h = await self.target(ctx)
        async with working_on(ctx, row):
            await ctx.save_checkpoint({"vm_id": vm.id, "asked": True})
            if mode == "force":
                ctx.progress(item="powering off")
                await stop_process(h.t, h.paths(vm).pidfile)
                ctx.log(f"{vm.name} was powered off (forced)", "warning")
                await svc.update(vm.id, state=VMState.STOPPED)
                return {"vm": vm.name, "mode": mode}
            ga = await self._agent(svc, vm, ctx.params)
            if mode == "reboot":
                async with await svc.qmp(vm) as q:
                    with q.subscribe("RESET") as sub:
                        async with ga:
                            await ga.shutdown("reboot")
                        await ctx.save_checkpoint({"vm_id": vm.id, "asked": True, "sent": True})
                        ctx.progress(item="waiting for the guest to reboot")
                        await sub.wait_for("RESET", timeout=timeout)
                ctx.progress(item="waiting for the guest agent")
                agent = await _wait_agent(svc, vm, BOOT_TIMEOUT)
                return {"vm": vm.name, "mode": mode, "agent": agent}
            async with ga:
                await ga.shutdown("powerdown")
            await ctx.save_checkpoint({"vm_id": vm.id, "asked": True, "sent": True})
            if not await wait_exit(h, vm, timeout, ctx):
                raise PermanentError(f"{vm.name} did not power off within {timeout:g} s after the agent's shutdown",
                                     f"look at its console, or force it: ferry vm stop {vm.name} --force")
            await svc.update(vm.id, state=VMState.STOPPED)
            ctx.log(f"{vm.name} shut down through its guest agent")
            return {"vm": vm.name, "mode": mode}


# ------------------------------------------------------------------ pause / resume

class _RunState(VMTask):
    """Pause or resume: QEMU told to (unless it is there already), then the record. A run asked again
    after a kill finds it done, and records it."""
    command = ""                    # QMP: stop or cont
    records = VMState.RUNNING

    def said(self, vm: str, host: str, was: str) -> str:
        return f"{vm} is {self.records} on {host}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc, row, vm, h = await self.target(ctx)
        async with working_on(ctx, row):
            async with await svc.qmp(vm) as q:
                was = (await q.execute("query-status"))["status"]
                if (was == "running") == (self.command == "stop"):
                    await q.execute(self.command)
            await svc.update(vm.id, state=self.records)
        ctx.log(self.said(vm.name, h.name, was))
        return {"vm": vm.name, "host": h.name, "was": was}


@register
class PauseVM(_RunState):
    """Halts a running guest where it is (QMP stop), recorded paused: its memory stays in QEMU until
    `vm.resume` continues it."""
    name = "vm.pause"
    verb = "pause"
    command = "stop"
    records = VMState.PAUSED


@register
class ResumeVM(_RunState):
    """Continues a paused guest (QMP cont), recorded running: one paused on request, or one QEMU stopped
    on an I/O error (werror=enospc: a full datastore), whose failed requests QEMU then retries."""
    name = "vm.resume"
    verb = "resume"
    command = "cont"

    def said(self, vm: str, host: str, was: str) -> str:
        return resumed_text(vm, host, was)


# ------------------------------------------------------------------ hibernate

MIGRATING = ("setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "postcopy-active")


@register
class HibernateVM(VMTask):
    """Saves memory and device state to a file next to the disks and stops QEMU; start resumes it.

    The state goes to NAME.state.part; once the migration completed and the file is flushed it is renamed
    NAME.state and recorded, then QEMU quits. A resumed (or cancelled) run finds the VM in one of three
    states: the final file exists (complete: recorded hibernated, QEMU made to quit), QEMU still runs
    (paused, or its migration going on or done: the migration is cancelled and the guest goes on running,
    the .part removed; a resume then hibernates it again), or neither (it stopped without a state)."""
    name = "vm.hibernate"
    verb = "hibernate"

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        row, vm, h = await super().check(svc, params, own)
        await h.ensure_space(self._datastore(h, vm), vm.memory_mb << 20, f"the memory of {vm.name}")
        return row, vm, h

    @staticmethod
    def _datastore(h: HostOps, vm: VMSpec):
        return h.datastore(vm.disks[0].datastore if vm.disks else None)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        if ctx.checkpoint:
            done = await self._settle(ctx, finish=True)
            if done is not None:
                return done
        svc, row, vm, h = await self.target(ctx)
        ds = self._datastore(h, vm)
        folder = str(PurePosixPath(vm.disks[0].path).parent) if vm.disks else vm_dir(ds, vm.name)
        state_file = f"{folder}/{vm.name}.state"
        tmp = state_file + ".part"
        async with working_on(ctx, row):
            await h.t.mkdir(folder)
            await ctx.track(h.name, tmp, role="temp")
            # A state file left by an earlier hibernation belongs to no record now (the VM runs): it goes,
            # so that a file under the final name is always this run's, complete.
            await h.t.remove(state_file)
            await ctx.save_checkpoint({"vm_id": vm.id, "state_file": state_file})
            async with await svc.qmp(vm) as q:
                await q.execute("stop")
                try:
                    await q.execute("migrate", {"uri": "exec:cat > " + shlex.quote(tmp)})
                    await _follow_migration(ctx, q, vm)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await _run_on(q)
                    with contextlib.suppress(Exception):
                        await h.t.remove(tmp)
                    raise
                await h.run(["sync", tmp], what="sync")
                await h.move(tmp, state_file)
                await svc.update(vm.id, state=VMState.HIBERNATED, spec=vm.with_(hibernate_file=state_file))
                with contextlib.suppress(FerryError):
                    await q.execute("quit")
            await wait_exit(h, vm, 30)
            size = (await h.t.stat(state_file)).size
        ctx.log(f"{vm.name} hibernated: {size >> 20} MiB of state in {state_file}")
        return {"vm": vm.name, "state_file": state_file, "bytes": size}

    async def _settle(self, ctx: TaskContext, *, finish: bool) -> dict[str, Any] | None:
        """Brings the VM an interrupted run left to a consistent state: the result when it is hibernated
        (finish=True: recorded so, its QEMU gone), None when it runs as before (finish=False: also when
        the state was saved: a rollback removes it)."""
        svc = VMService.of(ctx.engine)
        found = await _own_vm(ctx, svc)
        if found is None:
            return None
        row, vm, h = found
        state_file = ctx.checkpoint["state_file"]
        pid = await h.pid(vm)
        saved = await h.exists(state_file)
        async with working_on(ctx, row):
            if saved and (finish or pid is None):
                # Complete: it is named so only after the migration completed and the file was flushed.
                if row["state"] != VMState.HIBERNATED or vm.hibernate_file != state_file:
                    await svc.update(vm.id, state=VMState.HIBERNATED, spec=vm.with_(hibernate_file=state_file))
                if pid is not None:
                    with contextlib.suppress(FerryError):
                        async with await svc.qmp(vm) as q:
                            await q.execute("quit")
                    await wait_exit(h, vm, 30)
                size = (await h.t.stat(state_file)).size
                ctx.log(f"{vm.name} hibernated: {size >> 20} MiB of state in {state_file} (saved before this "
                        "task was interrupted)")
                if not finish:
                    raise PermanentError(f"the hibernation of {vm.name} had finished; its memory is saved in "
                                         f"{state_file}", f"resume it: ferry vm start {vm.name}")
                return {"vm": vm.name, "state_file": state_file, "bytes": size}
            if pid is None:
                await h.t.remove(state_file + ".part")
                raise PermanentError(f"{vm.name} stopped while it was being hibernated, and its memory was not "
                                     "saved", f"start it again: ferry vm start {vm.name}")
            async with await svc.qmp(vm) as q:
                await _run_on(q)
            await h.t.remove(state_file + ".part")
            if saved:
                await h.t.remove(state_file)
            if row["state"] != VMState.RUNNING or vm.hibernate_file:
                await svc.update(vm.id, state=VMState.RUNNING, spec=vm.with_(hibernate_file=""))
            ctx.log(f"{vm.name} runs on as before: the hibernation begun before this task was interrupted was "
                    "undone")
        return None

    async def rollback(self, ctx: TaskContext) -> None:
        """The VM runs on as before: its migration cancelled, the guest continued, a saved state removed
        (unless QEMU is gone: then the hibernation finished, and is kept)."""
        if ctx.checkpoint:
            await self._settle(ctx, finish=False)


async def cancel_migration(q: QMPClient) -> None:
    """A migration of this QEMU's guest (to a state file, or to another host) cancelled and waited out."""
    if (await q.execute("query-migrate")).get("status") in MIGRATING:
        await q.execute("migrate_cancel")
        while (await q.execute("query-migrate")).get("status") in MIGRATING:
            await asyncio.sleep(0.05)


async def _run_on(q: QMPClient) -> None:
    """The guest runs again: the migration to a state file cancelled (and waited out), QEMU continued."""
    await cancel_migration(q)
    if (await q.execute("query-status"))["status"] != "running":
        await q.execute("cont")


async def _follow_migration(ctx: TaskContext, q: QMPClient, vm: VMSpec) -> None:
    while True:
        mig = await q.execute("query-migrate")
        status = mig.get("status")
        ram = mig.get("ram", {})
        if ram.get("total"):
            ctx.progress(bytes_done=ram.get("transferred", 0), bytes_total=ram["total"], item="saving memory")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise PermanentError(f"{vm.name}: saving the memory state failed: {mig.get('error-desc', status)}",
                                 "check the free space of the VM's datastore")
        await asyncio.sleep(0.1)
