"""Clones, templates and deploys: full copies (also of a running VM), linked clones, conversions.

A clone makes its copies as create.py says (reserved first, files tracked, each disk written under a
temporary name, flushed and renamed into place, the copies made usable together once all are in
place), so a clone or a deploy of N killed at any instant is resumed without making a copy or a disk
twice, or rolled back leaving none of them. The copy of a running
VM is one point in time across its disks: written again as a whole unless all its disks are in
place. Its block jobs live in the source's QEMU and outlive Ferry: they are named after the task
(clone-t<ID>-...), and a resume or a rollback cancels those still running before anything else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import FerryError, PermanentError, Refused, TransientError
from ..platform.qga import GuestAgent
from ..platform.qmp import EventSubscription, QMPClient, QMPTimeout
from ..tasks import TaskContext, register
from .hostops import HostOps, disk_path
from .create import Maker, MakesVMs, names_clash
from .lifecycle import VMTask, working_on
from .model import (DiskSpec, NicSpec, VMKind, VMSpec, VMState, check_hardware, check_name, new_id,
                    parse_size)
from .prechecks import networks_ready
from .progress import ByteMeter, reporter
from .service import VMService

LINKED_OVERHEAD = 1 << 20
# How often a running copy's block jobs are asked how far they are: a copy of data in the page cache
# moves a GiB a second, so once a second showed a 1.6 GiB copy as 0 then done.
JOB_POLL_S = 0.25
JOB_STALL_S = 300.0        # a copy whose jobs move no byte for this long has stalled: it is given up
FREEZE_TIMEOUT_S = 30.0
JOB_CANCEL_S = 60.0       # a cancelled block job ends at its next request: seconds, whatever its size


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
    allocated: tuple[int, ...]   # bytes a full copy of each of the source's disks takes
    host: str                    # where the copies go: the source's host, or one sharing the datastore

    async def ensure_room(self, copies: int, disks: list[int], linked: bool) -> None:
        """The datastore has room for the disks still to write (indexes of the source's disks)."""
        need = LINKED_OVERHEAD * len(disks) if linked else sum(self.allocated[j] for j in disks) + (1 << 20)
        if disks:
            await self.h.ensure_space(self.ds, need, f"{copies} cop{'y' if copies == 1 else 'ies'} of {self.src.name}")


@register
class CloneVM(MakesVMs):
    """VM -> VM, VM -> template, template -> template, template -> VM (deploy, full or linked, N at once)."""
    name = "vm.clone"

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

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"clone:{params['src']}:{','.join(params['names'])}"

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None, *,
                    space: bool = True) -> _Plan:
        """What the clone will do, once the source may be copied now, the names are free (or reserved
        by `own`, the task asking) and the datastore has room; Refused otherwise."""
        names: list[str] = p["names"]
        linked = bool(p.get("linked"))
        row, src, h = await svc.checked("vm_deploy" if p.get("deploy") else "vm_clone", p["src"], own=own,
                                        copies=len(names), linked=linked)
        running = await h.pid(src) is not None
        await names_clash(svc, names, own, "choose other names (ferry vm list shows the names in use)")
        target = p.get("host") or src.host
        if target == src.host:
            ds = h.datastore(p.get("datastore") or (src.disks[0].datastore if src.disks else None))
        else:
            ds = _shared_datastore(svc, src, target, p.get("datastore"), linked)
        th = svc.host(target)
        overrides = p.get("overrides") or {}
        nics = [NicSpec(overrides["network"])] if overrides.get("network") else list(src.nics)
        if overrides.get("network") or target != src.host:
            th.check_nics(nics)
        await networks_ready(th, nics)
        grow = parse_size(overrides["disk_size"], "disk size") if overrides.get("disk_size") else None
        if grow is not None and src.disks and grow < src.disks[0].size:
            raise Refused(f"disk size {overrides['disk_size']} is smaller than {src.name}'s first disk "
                          f"({src.disks[0].size >> 20} MiB)", "disks only grow; give a larger size")
        allocated, sizes = await _sizes(h, src)
        plan = _Plan(row, src, h, ds, running, grow, sizes, allocated, target)
        if space:
            await plan.ensure_room(len(names), list(range(len(src.disks))) * len(names), linked)
        return plan

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        svc = VMService.of(ctx.engine)
        names: list[str] = p["names"]
        maker = Maker(ctx)
        linked = bool(p.get("linked"))
        if maker.committed:       # made by an earlier run, which died before it said so
            return {"src": p["src"], "made": await maker.commit(), "linked": linked, "from_running": False}
        plan = await self.check(svc, p, ctx.id, space=False)
        src, h, grow, running = plan.src, plan.h, plan.grow, plan.running
        maker.h = h
        as_template = bool(p.get("as_template"))
        overrides = p.get("overrides") or {}
        # Every byte of every disk of every copy, counted as its copy goes (zero regions too, as
        # qemu-img and the block jobs count them); a linked clone copies nothing. What earlier runs
        # put in place counts as done, not as work done now.
        meter = None if linked else ByteMeter(reporter(ctx), sum(plan.sizes) * len(names))
        units = len(names) * len(src.disks)

        async with working_on(ctx, plan.row):
            if running and ctx.resumed:
                # Jobs an earlier run started in the source's QEMU still write; a guest it froze stays frozen.
                await stop_jobs(ctx, svc, src)
                await thaw_if_frozen(ctx, svc, src)
            # A stopped source is copied disk by disk. While the clone was interrupted its source was free
            # to start and change: then no disk copied before counts, or the copy would mix two moments.
            changed = False
            if not running and not linked:
                marks = await _marks(h, src)
                changed = maker.sources is not None and maker.sources != marks
                if changed:
                    ctx.log(f"the disks of {src.name} changed while the clone was interrupted: every disk of "
                            "an unfinished copy is copied again", "warning")
                maker.sources = marks
            vms = await maker.reserve([_copy_spec(src, n, plan.ds, as_template=as_template, linked=linked,
                                                  overrides=overrides, grow=grow).with_(host=plan.host)
                                       for n in names])
            todos = [await maker.todo(vm, together=(running and not linked) or changed) for vm in vms]
            await plan.ensure_room(len(vms), [j for todo in todos for j in _indexes(src, todo)], linked)
            done_units = units - sum(len(todo) for todo in todos)
            if meter is not None:
                meter.advance(sum(plan.sizes[j] for todo in todos
                                  for j in range(len(src.disks)) if j not in _indexes(src, todo)),
                              "already copied", measured=False)
            else:
                ctx.progress(measured=False, units_done=done_units, units_total=units)
            for vm, todo in zip(vms, todos):
                label = f"{vm.name} ({names.index(vm.name) + 1}/{len(names)})" if len(names) > 1 else vm.name
                if todo:
                    if linked:
                        for d, part in todo:
                            sd = src.disks[_index(src, d)]
                            ctx.progress(item=f"{label}: linking {d.name}", units_done=done_units, units_total=units)
                            await h.qemu_img("create", "-q", "-f", "qcow2", "-b", sd.path, "-F", "qcow2",
                                             part, str(d.size))
                            done_units += 1
                            ctx.progress(units_done=done_units, units_total=units)
                    elif running:
                        await _backup_running(ctx, svc, src, vm, todo, label, plan.sizes, meter)
                    else:
                        await _convert(h, src, todo, label, plan.sizes, meter)
                    if grow is not None and not linked:
                        for d, part in todo:
                            if _index(src, d) == 0:
                                await h.qemu_img("resize", "-q", part, str(grow))
                await maker.place(vm, todo)
            made = await maker.commit()
        kind = "template" if as_template else "VM"
        ctx.log(f"made {len(made)} {kind}{'s' if len(made) > 1 else ''} from {src.name}"
                + (" while it ran" if running else "") + (" (linked)" if linked else ""))
        return {"src": src.name, "made": made, "linked": linked, "from_running": running}

    async def interrupted(self, ctx: TaskContext) -> None:
        """A clone of a running VM killed in the instant its guest was frozen leaves it frozen, its
        writes hanging: thawed as soon as a Ferry process finds the clone interrupted."""
        svc = VMService.of(ctx.engine)
        try:
            src = VMSpec.from_dict((await svc.find(ctx.params["src"]))["spec"])
        except Refused:
            return
        if await svc.host(src.host).pid(src) is not None:
            await thaw_if_frozen(ctx, svc, src)

    async def rollback(self, ctx: TaskContext) -> None:
        """Stop this task's block jobs in the source and thaw its guest (when it runs), then delete the
        copies (unless all were made); the engine removes their files."""
        svc = VMService.of(ctx.engine)
        try:
            src = VMSpec.from_dict((await svc.find(ctx.params["src"]))["spec"])
        except Refused:
            src = None      # gone: no QEMU of it holds a job of this task
        if src is not None and ctx.checkpoint is not None and await svc.host(src.host).pid(src) is not None:
            await stop_jobs(ctx, svc, src)
            await thaw_if_frozen(ctx, svc, src)
        await super().rollback(ctx)


def _shared_datastore(svc: VMService, src: VMSpec, target: str, name: str | None, linked: bool):
    """The datastore a copy on another host than its source's goes to: one both hosts share (the
    source's host writes it, the other runs it), and for a linked clone the source's disks must be
    there too (the copy reads them). Refused otherwise, naming both hosts and the datastore."""
    if target not in svc.site.hosts:
        raise Refused(f"unknown host {target!r}", f"hosts in this site: {', '.join(sorted(svc.site.hosts))}")
    both = [d for d in svc.site.datastores_of(src.host) if target in d.hosts]
    names = ", ".join(d.name for d in both)
    hint = (f"choose a datastore both hosts share ({names})" if both else
            f"list both hosts in a datastore's hosts in config.toml, or clone on {src.host} and migrate")
    if name is None:
        if not both:
            raise Refused(f"{src.name} is on host {src.host}, and no datastore is shared by {src.host} and "
                          f"{target}: a copy on {target} needs one", hint)
        ds = both[0]
    else:
        ds = next((d for d in svc.site.datastores.values() if d.name == name), None)
        if ds is None or ds not in both:
            raise Refused(f"datastore {name!r} is not shared by host {src.host} (of {src.name}) and host "
                          f"{target}: a copy on {target} cannot be made there", hint)
    if linked:
        away = {d.datastore for d in src.disks
                if d.datastore not in svc.site.datastores or target not in svc.site.datastores[d.datastore].hosts}
        if away:
            raise Refused(f"a linked clone on host {target} reads {src.name}'s disks, and "
                          f"{', '.join(sorted(away))} is not attached to {target}",
                          f"make full copies (--full), or deploy on {src.host}")
    return ds


async def _marks(h: HostOps, vm: VMSpec) -> list[list[int]]:
    """[size, mtime] of each disk image of the VM: a write to it changes them."""
    out = []
    for d in vm.disks:
        st = await h.t.stat(d.path)
        out.append([st.size, st.mtime_ns] if st else [0, 0])
    return out


def _index(src: VMSpec, d: DiskSpec) -> int:
    """Which disk of the source a disk of the copy is a copy of (same name)."""
    return next(j for j, sd in enumerate(src.disks) if sd.name == d.name)


def _indexes(src: VMSpec, todo: list[tuple[DiskSpec, str]]) -> list[int]:
    return [_index(src, d) for d, _ in todo]


def _copy_spec(src: VMSpec, name: str, ds, *, as_template: bool, linked: bool, overrides: dict,
               grow: int | None) -> VMSpec:
    disks = []
    for j, d in enumerate(src.disks):
        size = grow if (grow is not None and j == 0) else d.size
        disks.append(DiskSpec(d.name, ds.name, disk_path(ds, name, d.name), size, d.bus, ds.shared,
                              backing=d.path if linked else None))
    nics = tuple(NicSpec(n.network) for n in src.nics)     # a copy gets MACs of its own (Maker.reserve)
    if overrides.get("network"):
        nics = tuple(NicSpec(overrides["network"]) for _ in (src.nics or (None,)))
    cpus = int(overrides.get("cpus", src.cpus))
    return src.with_(id=new_id(), name=name, disks=tuple(disks), nics=nics, cpus=cpus,
                     max_cpus=max(cpus, src.max_cpus), memory_mb=int(overrides.get("memory_mb", src.memory_mb)),
                     kind=VMKind.TEMPLATE if as_template else VMKind.VM, origin=src.name, hibernate_file="")


async def _sizes(h: HostOps, vm: VMSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bytes a full copy of each of the VM's disks will take (allocated clusters along its backing
    chain), and the virtual size of each disk (what a copy goes through)."""
    allocated, sizes = [], []
    for d in vm.disks:
        info = await h.image_info(d.path)
        sizes.append(int(info.get("virtual-size", d.size)))
        n = int(info.get("actual-size", 0))
        if info.get("backing-filename"):
            n += int((await h.image_info(info.get("full-backing-filename") or info["backing-filename"]))
                     .get("actual-size", 0))
        allocated.append(n)
    return tuple(allocated), tuple(sizes)


async def _convert(h: HostOps, src: VMSpec, todo: list[tuple[DiskSpec, str]], label: str,
                   sizes: tuple[int, ...], meter: ByteMeter) -> None:
    for d, part in todo:
        j = _index(src, d)
        item, size = f"{label}: copying {d.name}", sizes[j]
        await h.qemu_img_progress(["convert", "-O", "qcow2", src.disks[j].path, part],
                                  lambda f, item=item, size=size: meter.show(int(size * f), item))
        meter.advance(size, item)


def job_prefix(task_id: int) -> str:
    """Block jobs a clone task starts in the source's QEMU are named after it: they outlive Ferry."""
    return f"clone-t{task_id}-"


async def stop_jobs(ctx: TaskContext, svc: VMService, src: VMSpec) -> None:
    """Cancel the block jobs of this task still running in the source's QEMU (an earlier run died and
    left them writing to its temporary files), and wait until they are gone."""
    prefix = job_prefix(ctx.id)
    async with await svc.qmp(src) as q:
        jobs = [j["device"] for j in await q.execute("query-block-jobs") if str(j.get("device", "")).startswith(prefix)]
        for job in jobs:
            with contextlib.suppress(FerryError):
                await q.execute("block-job-cancel", {"device": job, "force": True})
        deadline = time.monotonic() + JOB_CANCEL_S
        while jobs:
            await asyncio.sleep(0.05)
            left = [j["device"] for j in await q.execute("query-block-jobs") if j.get("device") in jobs]
            if not left:
                break
            if time.monotonic() > deadline:
                raise TransientError(f"block job(s) {', '.join(left)} in {src.name}'s QEMU did not stop "
                                     f"within {JOB_CANCEL_S:g} s of being cancelled",
                                     "look at them with query-block-jobs; then resume or cancel the task again")
    if jobs:
        ctx.log(f"cancelled {len(jobs)} copy job(s) an earlier run left in the QEMU of {src.name}", "warning")


async def thaw_if_frozen(ctx: TaskContext, svc: VMService, src: VMSpec) -> None:
    """A run that died while the guest's filesystems were frozen left them so: thaw them."""
    try:
        ga = await svc.agent(src, timeout=2.0)
    except FerryError:
        return
    try:
        left_frozen = await ga.fsfreeze_status() == "frozen"
    except FerryError:
        left_frozen = False
    if left_frozen:
        ctx.log(f"the filesystems of {src.name} were left frozen by an earlier run", "warning")
        await _thaw(ctx, ga, src)      # closes the agent
    else:
        await ga.close()


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


async def _backup_running(ctx: TaskContext, svc: VMService, src: VMSpec, vm: VMSpec,
                          todo: list[tuple[DiskSpec, str]], label: str, sizes: tuple[int, ...],
                          meter: ByteMeter) -> None:
    """A point-in-time copy of every disk of a running VM into the temporary files: one QMP transaction
    of drive-backup jobs, with the guest's filesystems frozen for the instant the jobs start (when its
    agent answers). The jobs are named after the task, so a resume or a rollback finds them."""
    jobs = {f"{job_prefix(ctx.id)}{vm.short_id}-{_index(src, d)}": (d, part) for d, part in todo}
    async with await svc.qmp(src) as q:
        with q.subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") as sub:
            async with frozen(ctx, svc, src):
                actions = [{"type": "drive-backup",
                            "data": {"device": f"drive{_index(src, d)}", "job-id": job,
                                     "target": part, "format": "qcow2", "sync": "full",
                                     "mode": "absolute-paths"}}
                           for job, (d, part) in jobs.items()]
                if actions:
                    await q.execute("transaction", {"actions": actions})
            ctx.log(f"point-in-time copy of {src.name} started ({len(actions)} disk{'' if len(actions) == 1 else 's'})")
            await _follow_jobs(q, sub, src, {job: sizes[_index(src, d)] for job, (d, _) in jobs.items()},
                               lambda done: meter.show(done, f"{label}: copying while it runs"))
            meter.advance(sum(sizes[_index(src, d)] for d, _ in todo), f"{label}: copied")


async def _follow_jobs(q: QMPClient, sub: EventSubscription, vm: VMSpec, jobs: dict[str, int], report) -> None:
    """Waits for the block jobs to end, reporting the bytes they have copied. A copy takes as long as
    its data needs, so there is no deadline on the whole; a copy that moves no byte for JOB_STALL_S is
    given up. The jobs are cancelled when this ends any other way than by their completion."""
    pending = dict(jobs)
    # How far each job was last seen: a job that ended before its event was read is no longer listed,
    # and must not count as nothing copied.
    copied = dict.fromkeys(jobs, 0)
    moved, last = -1, time.monotonic()
    # Polls keep their pace whatever events come between them (an event does not put the next one off).
    next_poll = time.monotonic() + JOB_POLL_S
    try:
        while pending:
            try:
                ev = await sub.get(timeout=max(0.0, next_poll - time.monotonic()))
            except QMPTimeout:
                ev = None
            if ev is not None and ev.data.get("device") in pending:
                if ev.name == "BLOCK_JOB_CANCELLED" or ev.data.get("error"):
                    raise PermanentError(f"copying {vm.name} failed: {ev.data.get('error', 'the copy was cancelled')}",
                                         "check the free space of the datastore")
                job = ev.data["device"]
                copied[job] = pending.pop(job)
                continue
            next_poll = time.monotonic() + JOB_POLL_S
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
