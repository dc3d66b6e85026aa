"""Clones, templates and deploys: full copies (also of a running VM), linked clones, conversions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import FerryError, PermanentError, Refused
from ..platform.qga import GuestAgent
from ..platform.qmp import EventSubscription, QMPClient, QMPTimeout
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, disk_path
from .create import make_vm
from .lifecycle import VMTask, working_on
from .model import (DiskSpec, NicSpec, VMKind, VMSpec, VMState, check_hardware, check_name, new_id,
                    parse_size)
from .progress import ByteMeter, reporter
from .service import VMService

LINKED_OVERHEAD = 1 << 20
JOB_POLL_S = 1.0           # how often a running copy's block jobs are asked how far they are
JOB_STALL_S = 300.0        # a copy whose jobs move no byte for this long has stalled: it is given up
FREEZE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Plan:
    """What a clone will do, once it may: checked before the task is made and again when it runs."""
    row: dict
    src: VMSpec
    h: HostOps
    ds: Any
    running: bool
    grow: int | None
    sizes: tuple[int, ...]       # virtual size of each of the source's disks


@register
class CloneVM(TaskKind):
    """VM -> VM, VM -> template, template -> template, template -> VM (deploy, full or linked, N at once)."""
    name = "vm.clone"
    max_retries = 0

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("src"):
            raise PermanentError("clone needs a source VM or template", "ferry vm clone SRC NEW-NAME")
        names = params.get("names") or []
        if not names:
            raise PermanentError("clone needs a name for the copy", "ferry vm clone SRC NEW-NAME")
        for n in names:
            check_name(n)
        if len(set(names)) != len(names):
            raise PermanentError("the same name is given twice", "give each copy its own name")
        if params.get("linked") and params.get("as_template"):
            raise PermanentError("a template cannot be a linked clone", "make a full copy for a new template")
        o = params.get("overrides") or {}
        if "cpus" in o or "memory_mb" in o:
            check_hardware(cpus=int(o.get("cpus", 1)), memory_mb=int(o.get("memory_mb", 256)))
        if o.get("disk_size"):
            parse_size(o["disk_size"], "disk size")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]] if params.get("host") else []

    def title(self, params: dict[str, Any]) -> str:
        names = params["names"]
        what = "deploy" if params.get("deploy") else "clone"
        target = names[0] if len(names) == 1 else f"{len(names)} VMs ({names[0]} ...)"
        return f"{what} {params['src']} -> {target}" + (" (linked)" if params.get("linked") else "")

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None) -> _Plan:
        """What the clone will do, once the source may be copied now, the names are free and the
        datastore has room; Refused otherwise."""
        names: list[str] = p["names"]
        linked = bool(p.get("linked"))
        row, src, h = await svc.checked("vm_deploy" if p.get("deploy") else "vm_clone", p["src"], own=own,
                                        copies=len(names), linked=linked)
        running = await h.pid(src) is not None
        taken = await svc.names_in_use()
        clash = [n for n in names if n in taken]
        if clash:
            raise Refused(f"a VM or template named {clash[0]!r} already exists",
                          "choose other names (ferry vm list shows the names in use)")
        ds = h.datastore(p.get("datastore") or (src.disks[0].datastore if src.disks else None))
        overrides = p.get("overrides") or {}
        if overrides.get("network"):
            h.check_network(overrides["network"])
        grow = parse_size(overrides["disk_size"], "disk size") if overrides.get("disk_size") else None
        if grow is not None and src.disks and grow < src.disks[0].size:
            raise Refused(f"disk size {overrides['disk_size']} is smaller than {src.name}'s first disk "
                          f"({src.disks[0].size >> 20} MiB)", "disks only grow; give a larger size")
        allocated, sizes = await _sizes(h, src)
        per_copy = LINKED_OVERHEAD * len(src.disks) if linked else allocated
        await h.ensure_space(ds, per_copy * len(names),
                             f"{len(names)} cop{'y' if len(names) == 1 else 'ies'} of {src.name}")
        return _Plan(row, src, h, ds, running, grow, sizes)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        svc = VMService.of(ctx.engine)
        plan = await self.check(svc, p, ctx.id)
        src, h, grow, running = plan.src, plan.h, plan.grow, plan.running
        names: list[str] = p["names"]
        as_template = bool(p.get("as_template"))
        linked = bool(p.get("linked"))
        overrides = p.get("overrides") or {}
        # Every byte of every disk of every copy, counted as its copy goes (zero regions too, as
        # qemu-img and the block jobs count them); a linked clone copies nothing.
        meter = None if linked else ByteMeter(reporter(ctx), sum(plan.sizes) * len(names))

        made = []
        async with working_on(ctx, plan.row):
            for i, name in enumerate(names):
                spec = _copy_spec(src, name, plan.ds, as_template=as_template, linked=linked, overrides=overrides,
                                  grow=grow)
                label = f"{name} ({i + 1}/{len(names)})" if len(names) > 1 else name

                async def fill(ctx: TaskContext, h: HostOps, vm: VMSpec, label=label, i=i) -> None:
                    if linked:
                        for d, sd in zip(vm.disks, src.disks):
                            ctx.progress(item=f"{label}: linking {d.name}", units_done=i, units_total=len(names))
                            await h.qemu_img("create", "-q", "-f", "qcow2", "-b", sd.path, "-F", "qcow2",
                                             d.path, str(d.size))
                    elif running:
                        await _backup_running(ctx, svc, src, vm, label, plan.sizes, meter)
                    else:
                        await _convert(h, src, vm, label, plan.sizes, meter)
                    if grow is not None and vm.disks and not linked:
                        await h.qemu_img("resize", "-q", vm.disks[0].path, str(grow))

                state = VMState.TEMPLATE if spec.is_template else VMState.STOPPED
                made.append(await make_vm(ctx, h, spec, fill, state=state))
        kind = "template" if as_template else "VM"
        ctx.log(f"made {len(made)} {kind}{'s' if len(made) > 1 else ''} from {src.name}"
                + (" while it ran" if running else "") + (" (linked)" if linked else ""))
        return {"src": src.name, "made": made, "linked": linked, "from_running": running}


def _copy_spec(src: VMSpec, name: str, ds, *, as_template: bool, linked: bool, overrides: dict,
               grow: int | None) -> VMSpec:
    disks = []
    for j, d in enumerate(src.disks):
        size = grow if (grow is not None and j == 0) else d.size
        disks.append(DiskSpec(d.name, ds.name, disk_path(ds, name, d.name), size, d.bus, ds.shared,
                              backing=d.path if linked else None))
    nics = src.nics
    if overrides.get("network"):
        nics = tuple(NicSpec(overrides["network"]) for _ in (src.nics or (None,)))
    cpus = int(overrides.get("cpus", src.cpus))
    return src.with_(id=new_id(), name=name, disks=tuple(disks), nics=nics, cpus=cpus,
                     max_cpus=max(cpus, src.max_cpus), memory_mb=int(overrides.get("memory_mb", src.memory_mb)),
                     kind=VMKind.TEMPLATE if as_template else VMKind.VM, origin=src.name, hibernate_file="")


async def _sizes(h: HostOps, vm: VMSpec) -> tuple[int, tuple[int, ...]]:
    """Bytes a full copy of the VM's disks will take (allocated clusters along each backing chain),
    and the virtual size of each disk (what a copy goes through)."""
    total, sizes = 0, []
    for d in vm.disks:
        info = await h.image_info(d.path)
        sizes.append(int(info.get("virtual-size", d.size)))
        total += int(info.get("actual-size", 0))
        if info.get("backing-filename"):
            total += int((await h.image_info(info.get("full-backing-filename") or info["backing-filename"]))
                         .get("actual-size", 0))
    return total + (1 << 20), tuple(sizes)


async def _convert(h: HostOps, src: VMSpec, vm: VMSpec, label: str, sizes: tuple[int, ...],
                   meter: ByteMeter) -> None:
    for d, sd, size in zip(vm.disks, src.disks, sizes):
        item = f"{label}: copying {d.name}"
        await h.qemu_img_progress(["convert", "-O", "qcow2", sd.path, d.path],
                                  lambda f, item=item, size=size: meter.show(int(size * f), item))
        meter.advance(size, item)


@contextlib.asynccontextmanager
async def frozen(ctx: TaskContext, svc: VMService, vm: VMSpec) -> AsyncIterator[None]:
    """The guest's filesystems frozen through its agent for the duration (when the agent answers),
    and thawed on every way out, success, failure or cancellation; the task's log says which."""
    try:
        ga = await svc.agent(vm, timeout=2.0)
    except FerryError as e:
        ctx.log(f"the filesystems of {vm.name} are not frozen for the copy ({e.message}): "
                "the copy is crash-consistent", "warning")
        yield
        return
    try:
        try:
            n = await ga.fsfreeze_freeze(timeout=FREEZE_TIMEOUT_S)
            ctx.log(f"froze {n} filesystem{'' if n == 1 else 's'} of {vm.name} through its guest agent")
        except FerryError as e:
            # It may have frozen some before failing: the thaw below runs all the same.
            ctx.log(f"freezing the filesystems of {vm.name} failed ({e.message}): the copy is crash-consistent",
                    "warning")
        yield
    finally:
        await asyncio.shield(_thaw(ctx, ga, vm))


async def _thaw(ctx: TaskContext, ga: GuestAgent, vm: VMSpec) -> None:
    try:
        n = await ga.fsfreeze_thaw(timeout=FREEZE_TIMEOUT_S)
        ctx.log(f"thawed {n} filesystem{'' if n == 1 else 's'} of {vm.name}")
    except FerryError as e:
        ctx.log(f"thawing the filesystems of {vm.name} failed ({e.message}); writes in the guest may hang "
                f"until they are thawed (guest-fsfreeze-thaw through its agent, or fsfreeze -u in the guest)", "error")
    finally:
        await ga.close()


async def _backup_running(ctx: TaskContext, svc: VMService, src: VMSpec, vm: VMSpec, label: str,
                          sizes: tuple[int, ...], meter: ByteMeter) -> None:
    """A point-in-time copy of every disk of a running VM: one QMP transaction of drive-backup jobs,
    with the guest's filesystems frozen for the instant the jobs start (when its agent answers)."""
    job_ids = [f"clone-{vm.short_id}-{j}" for j in range(len(vm.disks))]
    async with await svc.qmp(src) as q:
        with q.subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") as sub:
            async with frozen(ctx, svc, src):
                actions = [{"type": "drive-backup",
                            "data": {"device": f"drive{j}", "job-id": job_ids[j],
                                     "target": d.path, "format": "qcow2", "sync": "full",
                                     "mode": "absolute-paths"}}
                           for j, d in enumerate(vm.disks)]
                if actions:
                    await q.execute("transaction", {"actions": actions})
            ctx.log(f"point-in-time copy of {src.name} started ({len(actions)} disk{'' if len(actions) == 1 else 's'})")
            await _follow_jobs(q, sub, src, dict(zip(job_ids, sizes)),
                               lambda done: meter.show(done, f"{label}: copying while it runs"))
            meter.advance(sum(sizes), f"{label}: copied")


async def _follow_jobs(q: QMPClient, sub: EventSubscription, vm: VMSpec, jobs: dict[str, int], report) -> None:
    """Waits for the block jobs to end, reporting the bytes they have copied. A copy takes as long as
    its data needs, so there is no deadline on the whole; a copy that moves no byte for JOB_STALL_S is
    given up. The jobs are cancelled when this ends any other way than by their completion."""
    pending = dict(jobs)
    # How far each job was last seen: a job that ended before its event was read is no longer listed,
    # and must not count as nothing copied.
    copied = dict.fromkeys(jobs, 0)
    moved, last = -1, time.monotonic()
    try:
        while pending:
            try:
                ev = await sub.get(timeout=JOB_POLL_S)
            except QMPTimeout:
                ev = None
            if ev is not None and ev.data.get("device") in pending:
                if ev.name == "BLOCK_JOB_CANCELLED" or ev.data.get("error"):
                    raise PermanentError(f"copying {vm.name} failed: {ev.data.get('error', 'the copy was cancelled')}",
                                         "check the free space of the datastore")
                job = ev.data["device"]
                copied[job] = pending.pop(job)
                continue
            for j in await q.execute("query-block-jobs"):
                if j.get("device") in pending:
                    copied[j["device"]] = max(copied[j["device"]], int(j.get("offset", 0)))
            done = sum(copied.values())
            report(done)
            now = time.monotonic()
            if done > moved:
                moved, last = done, now
            elif now - last > JOB_STALL_S:
                raise PermanentError(f"copying {vm.name} stalled: no progress for {JOB_STALL_S:g} s "
                                     f"({done >> 20} of {sum(jobs.values()) >> 20} MiB copied)",
                                     "check the host's storage (full, failing or overloaded), then clone again")
    except BaseException:
        for job in pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(q.execute("block-job-cancel", {"device": job, "force": True}))
        raise


@register
class ConvertVM(VMTask):
    """VM -> template (stopped) or template -> VM (no linked clones)."""
    name = "vm.convert"
    verb = "convert"

    def title(self, params: dict[str, Any]) -> str:
        return f"convert {params['vm']} to a {params.get('to', 'template')}"

    def rules(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**super().rules(params), "to": params.get("to", "template")}

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        to = ctx.params.get("to", "template")
        svc, row, vm, h = await self.target(ctx)
        if to == "template":
            new, state = vm.with_(kind=VMKind.TEMPLATE), VMState.TEMPLATE
        else:
            new, state = vm.with_(kind=VMKind.VM), VMState.STOPPED
        async with working_on(ctx, row):
            await svc.update(vm.id, kind=new.kind, state=state, spec=new)
        ctx.log(f"{vm.name} is now a {'template' if to == 'template' else 'VM'}")
        return {"vm": vm.name, "kind": str(new.kind)}
