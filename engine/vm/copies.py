"""Clones, templates and deploys: full copies (also of a running VM), linked clones, conversions."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import FerryError, PermanentError
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, disk_path
from .lifecycle import VMTask, make_vm, working_on
from .model import (DiskSpec, NicSpec, VMKind, VMSpec, VMState, check_hardware, check_name, new_id,
                    parse_size)
from .service import VMService

LINKED_OVERHEAD = 1 << 20


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

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        svc = VMService.of(ctx.engine)
        row = await svc.find(p["src"])
        src = VMSpec.from_dict(row["spec"])
        h = svc.host(src.host)
        names: list[str] = p["names"]
        as_template = bool(p.get("as_template"))
        linked = bool(p.get("linked"))
        overrides = p.get("overrides") or {}
        if linked and not src.is_template:
            raise PermanentError(f"{src.name} is a VM; linked clones are made from templates, whose disks never change",
                                 f"convert it first (ferry template convert {src.name}) or make a full clone")
        if linked and as_template:
            raise PermanentError("a template cannot be a linked clone", "make a full copy for a new template")
        if src.hibernate_file:
            raise PermanentError(f"{src.name} is hibernated; its disks belong to the saved memory state",
                                 f"resume it (ferry vm start {src.name}) or shut it down first")
        running = await h.pid(src) is not None
        if running and len(names) > 1:
            raise PermanentError(f"{src.name} is running; a running VM is cloned one copy at a time",
                                 "clone it once, then clone the copy")
        taken = await svc.names_in_use()
        clash = [n for n in names if n in taken]
        if clash:
            raise PermanentError(f"a VM or template named {clash[0]!r} already exists",
                                 "choose other names (ferry vm list shows the names in use)")
        ds = h.datastore(p.get("datastore") or (src.disks[0].datastore if src.disks else None))
        if overrides.get("network"):
            h.check_network(overrides["network"])
        grow = parse_size(overrides["disk_size"], "disk size") if overrides.get("disk_size") else None
        if grow is not None and src.disks and grow < src.disks[0].size:
            raise PermanentError(f"disk size {overrides['disk_size']} is smaller than {src.name}'s first disk "
                                 f"({src.disks[0].size >> 20} MiB)", "disks only grow; give a larger size")

        per_copy = LINKED_OVERHEAD * len(src.disks) if linked else await _allocated(h, src)
        await h.ensure_space(ds, per_copy * len(names), f"{len(names)} cop{'y' if len(names) == 1 else 'ies'} of {src.name}")

        made = []
        async with working_on(ctx, row):
            for i, name in enumerate(names):
                spec = _copy_spec(src, name, ds, as_template=as_template, linked=linked, overrides=overrides,
                                  grow=grow)
                label = f"{name} ({i + 1}/{len(names)})"

                async def fill(ctx: TaskContext, h: HostOps, vm: VMSpec, label=label, i=i) -> None:
                    if linked:
                        for d, sd in zip(vm.disks, src.disks):
                            ctx.progress(item=f"{label}: linking {d.name}", units_done=i, units_total=len(names))
                            await h.qemu_img("create", "-q", "-f", "qcow2", "-b", sd.path, "-F", "qcow2",
                                             d.path, str(d.size))
                    elif running:
                        await _backup_running(ctx, svc, src, vm, label)
                    else:
                        await _convert(ctx, h, src, vm, label, i, len(names))
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


async def _allocated(h: HostOps, vm: VMSpec) -> int:
    """Bytes a full copy of the VM's disks will take (allocated clusters along each backing chain)."""
    total = 0
    for d in vm.disks:
        info = await h.image_info(d.path)
        total += int(info.get("actual-size", 0))
        if info.get("backing-filename"):
            total += int((await h.image_info(info.get("full-backing-filename") or info["backing-filename"]))
                         .get("actual-size", 0))
    return total + (1 << 20)


async def _convert(ctx: TaskContext, h: HostOps, src: VMSpec, vm: VMSpec, label: str, i: int, n: int) -> None:
    for k, (d, sd) in enumerate(zip(vm.disks, src.disks)):
        def report(f: float, k=k) -> None:
            ctx.progress(units_done=i, units_total=n, item=f"{label}: copying {d.name} {f * 100:.0f}%",
                         detail={"disk": d.name, "fraction": round((k + f) / max(1, len(vm.disks)), 3)})
        await h.qemu_img_progress(["convert", "-O", "qcow2", sd.path, d.path], report)


async def _backup_running(ctx: TaskContext, svc: VMService, src: VMSpec, vm: VMSpec, label: str) -> None:
    """A point-in-time copy of every disk of a running VM: one QMP transaction of drive-backup jobs,
    with the guest's filesystems frozen for the instant the jobs start (when its agent answers)."""
    frozen = False
    ga = None
    job_ids = [f"clone-{vm.short_id}-{j}" for j in range(len(vm.disks))]
    with contextlib.suppress(FerryError):
        ga = await svc.agent(src, timeout=2.0)
    async with await svc.qmp(src) as q:
        with q.subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") as sub:
            try:
                if ga:
                    with contextlib.suppress(FerryError):
                        await ga.fsfreeze_freeze(timeout=30)
                        frozen = True
                actions = [{"type": "drive-backup",
                            "data": {"device": f"drive{j}", "job-id": job_ids[j],
                                     "target": d.path, "format": "qcow2", "sync": "full",
                                     "mode": "absolute-paths"}}
                           for j, d in enumerate(vm.disks)]
                if actions:
                    await q.execute("transaction", {"actions": actions})
            finally:
                if frozen:
                    with contextlib.suppress(FerryError):
                        await ga.fsfreeze_thaw()
                if ga:
                    await ga.close()
            ctx.log(f"point-in-time copy of {src.name} started" + (" (filesystems frozen)" if frozen else ""))
            pending = set(job_ids)
            try:
                while pending:
                    jobs = {j["device"]: j for j in await q.execute("query-block-jobs")}
                    done = sum(jobs[p]["offset"] for p in pending if p in jobs)
                    total = sum(jobs[p]["len"] for p in pending if p in jobs)
                    if total:
                        ctx.progress(bytes_done=done, bytes_total=total, item=f"{label}: copying while it runs")
                    try:
                        ev = await sub.get(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    job = ev.data.get("device")
                    if job in pending:
                        if ev.name == "BLOCK_JOB_CANCELLED" or ev.data.get("error"):
                            raise PermanentError(f"copying {src.name} failed: {ev.data.get('error', 'cancelled')}",
                                                 "check the free space of the datastore")
                        pending.discard(job)
            except BaseException:
                for job in pending:
                    with contextlib.suppress(Exception):
                        await q.execute("block-job-cancel", {"device": job, "force": True})
                raise


@register
class ConvertVM(VMTask):
    """VM -> template (stopped) or template -> VM (no linked clones)."""
    name = "vm.convert"
    verb = "convert"

    def title(self, params: dict[str, Any]) -> str:
        return f"convert {params['vm']} to a {params.get('to', 'template')}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        to = ctx.params.get("to", "template")
        svc, row, vm, h = await self.target(ctx)
        if to == "template":
            if vm.is_template:
                raise PermanentError(f"{vm.name} is already a template", "nothing to do")
            if await h.pid(vm) is not None or vm.hibernate_file:
                raise PermanentError(f"{vm.name} must be stopped to become a template",
                                     f"shut it down first: ferry vm stop {vm.name}")
            new, state = vm.with_(kind=VMKind.TEMPLATE), VMState.TEMPLATE
        else:
            if not vm.is_template:
                raise PermanentError(f"{vm.name} is already a VM", "nothing to do")
            await svc.refuse_if_linked(vm, "delete them, or deploy a full VM from the template")
            new, state = vm.with_(kind=VMKind.VM), VMState.STOPPED
        async with working_on(ctx, row):
            await svc.update(vm.id, kind=new.kind, state=state, spec=new)
        ctx.log(f"{vm.name} is now a {'template' if to == 'template' else 'VM'}")
        return {"vm": vm.name, "kind": str(new.kind)}
