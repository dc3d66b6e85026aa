"""Moving a VM to another host (REQUIREMENTS D1, change host; D5, the migration network).

A running VM moves live: QEMU is started on the target host waiting for its state (`-incoming
defer`, then listening on the target's migration address at a port the kernel picks), the source
QEMU sends memory in rounds until what is left fits the downtime, the guest goes on on the target
and the source QEMU quits. Its disks stay where they are: every one must be on a datastore both
hosts share (moving storage is another task). Its NICs keep their MACs, so on a network that spans
both hosts the VM keeps its address. A stopped VM just changes host.

Kill Ferry at any instant and a resume (or the same command again) looks at both QEMUs before it
acts: the migration completed (the target runs the guest: recorded there, the source made to quit),
still going (followed to its end), or failed or never begun (the target QEMU stopped, the move begun
again). A cancel puts the guest back where it was, running on the source; after the migration
completed there is nothing to undo, and the VM stays on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..hostfacts import migration_address
from ..platform.qmp import QMPClient
from ..tasks import TaskContext, register
from .hostops import HostOps
from .lifecycle import MIGRATING, VMTask, _launched, _own_vm, cancel_migration, launch_qemu, wait_exit, working_on
from .model import RUNNING_STATES, VMSpec, VMState
from .prechecks import networks_ready
from .service import VMService

DOWNTIME_MS = 300              # what QEMU may stop the guest for at the end (its own default)
START_TIMEOUT = 60.0           # for the target QEMU to listen


@register
class MoveVM(VMTask):
    name = "vm.move"
    verb = "move"

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if not params.get("to"):
            raise PermanentError("a move needs the host to move to", f"ferry vm move {params['vm']} --to HOST")
        bw = params.get("bandwidth_mib")
        if bw is not None and (not isinstance(bw, int) or bw < 1):
            raise PermanentError(f"--bandwidth {bw!r} is not a number of MiB/s above 0", "for example --bandwidth 200")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [*super().hosts(params), params["to"]]

    def title(self, params: dict[str, Any]) -> str:
        return f"move {params['vm']} to {params['to']}"

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        row, vm, h = await super().check(svc, params, own)
        to = params["to"]
        if own is not None and vm.host == to and (own == row.get("busy")):
            return row, vm, h       # this task moved it already (a resumed run finishes up)
        if to not in svc.site.hosts:
            raise Refused(f"unknown host {to!r}", f"hosts in this site: {', '.join(sorted(svc.site.hosts))}")
        if vm.host == to:
            raise Refused(f"{vm.name} is already on {to}", "nothing to do")
        for d in vm.disks:
            ds = svc.site.datastores.get(d.datastore)
            if ds is None or to not in ds.hosts:
                raise Refused(f"disk {d.name} of {vm.name} is on datastore {d.datastore}, which host {to} does not "
                              "have: a move keeps the disks where they are",
                              f"list {to} in [datastores.{d.datastore}] hosts of config.toml if it shares that "
                              "storage, or move the VM to a host that has it")
        ht = svc.host(to)
        ht.check_nics(vm.nics)
        await networks_ready(ht, vm.nics)
        if VMState(row["state"]) in RUNNING_STATES and ht.spec.cpu_model != h.spec.cpu_model:
            raise Refused(f"hosts {h.name} and {to} give VMs different CPUs ({h.spec.cpu_model or 'default'} and "
                          f"{ht.spec.cpu_model or 'default'}): a running guest cannot change CPU",
                          "give both hosts the same cpu_model in config.toml, or stop the VM and move it stopped")
        if await ht.pid(vm.with_(host=to)) is not None:
            raise Refused(f"a QEMU of {vm.name} already runs on {to} ({ht.paths(vm).pidfile})",
                          "hosts that share a runtime folder are one machine: a VM cannot move between them")
        return row, vm, h

    # -------------------------------------------------------------- the move

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        if ctx.checkpoint:
            done = await self._settle(ctx, finish=True)
            if done is not None:
                return done
        svc, row, vm, h = await self.target(ctx)
        to = ctx.params["to"]
        ht = svc.host(to)
        async with working_on(ctx, row):
            if VMState(row["state"]) not in RUNNING_STATES or await h.pid(vm) is None:
                await svc.update(vm.id, host=to, spec=vm.with_(host=to))
                ctx.log(f"{vm.name} ({row['state']}) is now on {to}; its disks stayed where they are")
                return {"vm": vm.name, "from": h.name, "to": to, "live": False}
            return await self._live(ctx, svc, vm, h, ht)

    async def _live(self, ctx: TaskContext, svc: VMService, vm: VMSpec, h: HostOps, ht: HostOps) -> dict[str, Any]:
        vt = vm.with_(host=ht.name)
        image = await h.live_image(await svc.image(lambda step, f: None))
        accel_src, _ = await svc.accel(h, image)
        accel_dst, _ = await svc.accel(ht, await ht.live_image(await svc.image(lambda step, f: None)))
        if accel_src != accel_dst:
            raise Refused(f"{vm.name} runs with {accel_src} on {h.name}, and {ht.name} would run it with "
                          f"{accel_dst}: a running guest cannot change accelerator",
                          "stop the VM and move it stopped, or set the same accel for both hosts")
        # Before the target QEMU starts: a resumed run looks for it instead of starting a second one.
        paused = await _status(svc, vm) == "paused"
        await ctx.save_checkpoint({"vm_id": vm.id, "from": h.name, "phase": "launching", "paused": paused})
        await launch_qemu(ctx, vt, incoming="defer")
        address, _default = migration_address(ht.spec)
        try:
            async with await svc.qmp(vt) as qt:
                await qt.execute("migrate-incoming", {"uri": f"tcp:{_bracket(address)}:0"})
                port = await _listening_port(qt)
            uri = f"tcp:{_bracket(address)}:{port}"
            await ctx.save_checkpoint({"vm_id": vm.id, "from": h.name, "phase": "migrating", "uri": uri,
                                       "paused": paused})
            ctx.log(f"moving {vm.name} from {h.name} to {ht.name} live, over {uri} "
                    f"({'its management address' if _default else 'its migration network'})")
            async with await svc.qmp(vm) as q:
                await q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "auto-converge", "state": True}]})
                bw = ctx.params.get("bandwidth_mib")
                await q.execute("migrate-set-parameters", {
                    "downtime-limit": DOWNTIME_MS,
                    "max-bandwidth": (bw << 20) if bw else (1 << 40)})
                await q.execute("migrate", {"uri": uri})
                mig = await _follow(ctx, q, vm, ht.name)
        except BaseException:
            with contextlib.suppress(Exception):
                await _undo(svc, vm, vt, h, ht, paused)
            raise
        return await self._finish(ctx, svc, vm, h, ht, mig)

    async def _finish(self, ctx: TaskContext, svc: VMService, vm: VMSpec, h: HostOps, ht: HostOps,
                      mig: dict | None) -> dict[str, Any]:
        """The migration completed: the guest runs on the target (continued if QEMU left it paused,
        unless it was paused on the source), recorded there, and the source QEMU quits."""
        vt = vm.with_(host=ht.name)
        paused = bool(ctx.checkpoint.get("paused"))
        async with await svc.qmp(vt) as qt:
            deadline = time.monotonic() + START_TIMEOUT
            while (status := (await qt.execute("query-status"))["status"]) != "running":
                if status == "paused" and paused:
                    break           # it was paused on the source, and stays so
                if status == "paused" and (await qt.execute("query-migrate")).get("status") in ("completed", None):
                    await qt.execute("cont")
                if time.monotonic() > deadline:
                    # The source still holds the guest's state: it runs there again, the target stopped.
                    await _undo(svc, vm, vt, h, ht, paused)
                    raise PermanentError(f"{vm.name} did not resume on {ht.name} after its memory arrived "
                                         f"(QEMU there says {status}); it runs on {h.name} again",
                                         f"see the serial log {ht.paths(vt).serial}")
                await asyncio.sleep(0.1)
        await svc.update(vm.id, host=ht.name, spec=vt, state=VMState.PAUSED if paused else VMState.RUNNING)
        if await h.pid(vm) is not None:
            with contextlib.suppress(FerryError):
                async with await svc.qmp(vm) as q:
                    await q.execute("quit")
            if not await wait_exit(h, vm, 30):
                ctx.log(f"the QEMU {vm.name} left on {h.name} did not quit; kill it: it no longer runs the guest",
                        "warning")
        out: dict[str, Any] = {"vm": vm.name, "from": h.name, "to": ht.name, "live": True}
        if mig:
            ram = mig.get("ram", {})
            out.update(downtime_ms=mig.get("downtime"), total_ms=mig.get("total-time"),
                       bytes=ram.get("transferred", 0), rounds=ram.get("dirty-sync-count", 0))
            ctx.log(f"{vm.name} moved from {h.name} to {ht.name} live: {ram.get('transferred', 0) >> 20} MiB in "
                    f"{mig.get('total-time', 0) / 1000:.1f} s, {ram.get('dirty-sync-count', 0)} round(s), "
                    f"the guest stopped for {mig.get('downtime', '?')} ms")
        else:
            ctx.log(f"{vm.name} moved from {h.name} to {ht.name} live (completed before this task was interrupted)")
        return out

    async def _settle(self, ctx: TaskContext, *, finish: bool) -> dict[str, Any] | None:
        """Looks at both QEMUs an interrupted run left. finish=True: the result when the move is done
        (or completed now), None when the move is to begin again (the target QEMU stopped). finish=False
        (a rollback): the guest runs on the source as before, unless the migration had completed."""
        svc = VMService.of(ctx.engine)
        found = await _own_vm(ctx, svc)
        if found is None:
            return None
        row, vm, _h = found
        src_name, to = ctx.checkpoint["from"], ctx.params["to"]
        if vm.host == to:           # recorded on the target: only the source's quitting may be left
            vm = vm.with_(host=src_name)
        h, ht = svc.host(src_name), svc.host(to)
        vt = vm.with_(host=to)
        async with working_on(ctx, row):
            src_pid, dst_pid = await h.pid(vm), await _launched(ht, vt)
            src_mig = await _query(svc, vm) if src_pid is not None else None
            dst_status = await _status(svc, vt) if dst_pid is not None else None
            # A QEMU that itself arrived by a migration also says "completed" (of its incoming one):
            # only a source that sent the guest away is left in "postmigrate".
            sent = ctx.checkpoint.get("phase") == "migrating" and (src_mig or {}).get("status") == "completed" \
                and await _status(svc, vm) == "postmigrate"
            completed = sent or (src_pid is None and dst_status in ("running", "paused")) or row["host"] == to
            if completed and dst_pid is not None:
                if not finish:
                    ctx.log(f"the move of {vm.name} to {to} had completed: it stays there", "warning")
                return await self._finish(ctx, svc, vm, h, ht, src_mig)
            if src_pid is None:
                if dst_pid is not None:
                    await _stop(svc, ht, vt)
                raise PermanentError(f"QEMU of {vm.name} on {src_name} exited while it was being moved, before its "
                                     "memory reached the target", f"start it again: ferry vm start {vm.name}")
            if finish and (src_mig or {}).get("status") in MIGRATING and dst_pid is not None:
                ctx.log(f"the move of {vm.name} begun before this task was interrupted goes on")
                async with await svc.qmp(vm) as q:
                    mig = await _follow(ctx, q, vm, to)
                return await self._finish(ctx, svc, vm, h, ht, mig)
            await _undo(svc, vm, vt, h, ht, bool(ctx.checkpoint.get("paused")))
            ctx.log(f"{vm.name} runs on {src_name} as before: the move begun before this task was interrupted "
                    + ("begins again" if finish else "was undone"))
        return None

    async def rollback(self, ctx: TaskContext) -> None:
        if ctx.checkpoint:
            await self._settle(ctx, finish=False)


async def _follow(ctx: TaskContext, q: QMPClient, vm: VMSpec, to: str) -> dict:
    """Follows the source's migration to its end, showing each round: what is left, the dirty rate,
    the expected downtime. The last query-migrate on completion; PermanentError when it failed."""
    while True:
        mig = await q.execute("query-migrate")
        status = mig.get("status")
        ram = mig.get("ram", {})
        if status == "completed":
            ctx.progress(bytes_done=ram.get("total", 0), bytes_total=ram.get("total", 0),
                         item=f"moved to {to}: downtime {mig.get('downtime', '?')} ms")
            return mig
        if status in ("failed", "cancelled"):
            raise PermanentError(f"moving {vm.name} to {to} failed: {mig.get('error-desc', status)}",
                                 "the VM runs on where it was; check the migration network between the hosts")
        if ram.get("total"):
            left = ram.get("remaining", 0)
            rate = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)
            ctx.progress(bytes_done=max(0, ram["total"] - left), bytes_total=ram["total"],
                         item=f"memory round {ram.get('dirty-sync-count', 0) + 1}: {left >> 20} MiB left, "
                              f"dirtied {rate >> 20} MiB/s, expected downtime {mig.get('expected-downtime', '?')} ms")
        await asyncio.sleep(0.2)


async def _listening_port(qt: QMPClient) -> int:
    """The port the target QEMU listens on for the incoming migration (it was asked for port 0)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for a in (await qt.execute("query-migrate")).get("socket-address", []):
            if a.get("type") == "inet" and str(a.get("port", "0")) != "0":
                return int(a["port"])
        await asyncio.sleep(0.1)
    raise PermanentError("the target QEMU did not say where it listens for the migration",
                         "QEMU 4.0 or newer reports it; check the target host's QEMU")


async def _query(svc: VMService, vm: VMSpec) -> dict | None:
    with contextlib.suppress(FerryError):
        async with await svc.qmp(vm) as q:
            return await q.execute("query-migrate")
    return None


async def _status(svc: VMService, vm: VMSpec) -> str | None:
    with contextlib.suppress(FerryError):
        async with await svc.qmp(vm) as q:
            return (await q.execute("query-status"))["status"]
    return None


async def _stop(svc: VMService, h: HostOps, vm: VMSpec) -> None:
    """The QEMU of `vm` on `h` quits (killed if it does not); the guest never ran there."""
    with contextlib.suppress(FerryError):
        async with await svc.qmp(vm, timeout=5) as q:
            await q.execute("quit")
    if not await wait_exit(h, vm, 10):
        pid = await h.pid(vm)
        if pid is not None:
            await h.t.run(["kill", "-KILL", str(pid)], timeout=30)
            await wait_exit(h, vm, 10)


async def _undo(svc: VMService, vm: VMSpec, vt: VMSpec, h: HostOps, ht: HostOps, paused: bool) -> None:
    """The guest runs on the source as before: its migration cancelled (and waited out), the waiting
    QEMU on the target stopped, the source continued (unless it was paused before the move)."""
    with contextlib.suppress(FerryError):
        async with await svc.qmp(vm) as q:
            await cancel_migration(q)
    if await ht.pid(vt) is not None:
        await _stop(svc, ht, vt)
    with contextlib.suppress(FerryError):
        async with await svc.qmp(vm) as q:
            if not paused and (await q.execute("query-status"))["status"] != "running":
                await q.execute("cont")


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address
