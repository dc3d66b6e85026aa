"""Task kinds that make a new VM or template: create (blank disks) and import (from a package). The
clone kinds (copies.py) make theirs the same way, through Maker.

Crash safety: the task may die at any instant (kill -9, power loss) and be resumed or rolled back.
1. Reserve: before any file exists, every VM the task makes is recorded "incomplete", busy with the
   task (Store.vm_reserve, one transaction); their ids are the task's checkpoint. A resume gets the
   same records back (same ids, same disk paths), and goes on with the disks not yet in place.
2. Track: every file or folder is recorded with the task before it exists (the VM's folder and each
   disk's final path as "made", each disk's temporary name as "temp"), so a rollback or `ferry gc`
   finds it.
3. Write under a temporary name (DISK.ferry-task<ID>.part), flush it (sync), then rename it into
   place (mv -n): a final path that exists is complete. A temporary file is never trusted: a resume
   removes it and writes it again.
4. Commit: once every disk of every VM the task makes is in place, the checkpoint says so, and one
   update per VM makes it stopped (or template) and no longer busy: from then on the VMs are their
   own. Before that, a rollback (cancel, failure) deletes every VM of the task, so that a deploy of
   N cancelled half-way leaves none; after it, a rollback finishes them instead (a resume too).
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import Any, Iterable

from ..errors import PermanentError, Refused
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, disk_path
from .model import (DiskSpec, NicSpec, Passthrough, VMKind, VMSpec, VMState, check_boot, check_bus,
                    check_hardware, check_name, default_max_cpus, new_id, parse_size)
from .nics import unique_macs
from .prechecks import networks_ready, refused
from .progress import reporter
from .service import VMService

INCOMPLETE = str(VMState.INCOMPLETE)


def part_path(final: str, task_id: int) -> str:
    """Where a disk is written before it is complete: next to its final path, named after the task."""
    return f"{final}.ferry-task{task_id}.part"


async def names_clash(svc: VMService, names: list[str], own: int | None, hint: str) -> None:
    """Refused when one of the names is taken by a VM or template, or reserved by another task
    that is making it; names reserved by `own` (the task asking) are its own."""
    rows = {r["name"]: r for r in await svc.rows()}
    for n in names:
        r = rows.get(n)
        if r is None or (own is not None and r["busy"] == own):
            continue
        if r["state"] == INCOMPLETE and r["busy"]:
            raise Refused(f"the name {n!r} is reserved by task {r['busy']}, which is making it",
                          f"let it finish (ferry task resume {r['busy']}) or roll it back "
                          f"(ferry task cancel {r['busy']}); or choose another name")
        raise Refused(f"a VM or template named {n!r} already exists", hint)


class Maker:
    """The VMs one task makes, from reservation to commit (see the module docstring). The task's
    checkpoint holds {"vms": {name: id reserved}, "committed": once every disk of every VM is in place}."""

    def __init__(self, ctx: TaskContext, h: HostOps | None = None) -> None:
        self.ctx = ctx
        self.svc = VMService.of(ctx.engine)
        self.h = h
        ck = ctx.checkpoint or {}
        self.ids: dict[str, str] = dict(ck.get("vms") or {})
        self.committed = bool(ck.get("committed"))
        # The source's disks as they were when the copy began ([size, mtime] each), for a kind that
        # copies a stopped VM's disks one by one: changed by the time of a resume, none is kept.
        self.sources: list | None = ck.get("sources")

    async def reserve(self, specs: list[VMSpec]) -> list[VMSpec]:
        """Reserve the names (records 'incomplete', busy with the task) before any file exists. A
        resume gets the records of its first run back, and their ids and disk paths are used. NICs
        without a MAC get one unique in the site."""
        taken = await self.svc.macs_in_use()
        filled = []
        for s in specs:
            macs = unique_macs(s.id, len(s.nics), taken)
            taken.update(macs)
            filled.append(s.with_(nics=tuple(NicSpec(n.network, n.mac or m) for n, m in zip(s.nics, macs))))
        specs = filled
        rows = await self.svc.store.call(self.svc.store.vm_reserve, self.ctx.id, [
            {"id": s.id, "name": s.name, "kind": str(s.kind), "host": s.host, "spec": s.to_dict()} for s in specs])
        vms = [VMSpec.from_dict(r["spec"]) for r in rows]
        self.ids = {vm.name: vm.id for vm in vms}
        await self._save()
        # A disk already at a final path the task never tracked belongs to something else: refused
        # before anything is written (and the reservation is rolled back).
        mine = {f["path"] for f in await self.ctx.tracked()}
        for vm in vms:
            h = self._host(vm)
            for d in vm.disks:
                if d.path not in mine and await h.exists(d.path):
                    raise PermanentError(f"{d.path} already exists on {h.name}",
                                         "a leftover of an earlier VM? move it away or choose another name")
        return vms

    async def todo(self, vm: VMSpec, *, together: bool = False) -> list[tuple[DiskSpec, str]]:
        """The disks of the VM still to write, each with its temporary path: its folder made (and
        tracked) if need be, the stale temporary file of an earlier run removed, both paths tracked.
        A disk whose final path exists is done. `together`: the disks are one point-in-time copy, so
        they are all written again unless all are done."""
        h, ctx = self._host(vm), self.ctx
        for folder in dict.fromkeys(str(PurePosixPath(d.path).parent) for d in vm.disks):
            if not await h.exists(folder):
                await ctx.track(h.name, folder, role="made")
                await h.t.mkdir(folder)
        done = [d for d in vm.disks if await h.exists(d.path)]
        if together and done and len(done) < len(vm.disks):
            for d in done:
                await h.run(["rm", "-f", "--", d.path], what="rm")
            done = []
        out = []
        for d in vm.disks:
            if d in done:
                continue
            part = part_path(d.path, ctx.id)
            await ctx.track(h.name, d.path, role="made")
            await ctx.track(h.name, part, role="temp")
            await h.run(["rm", "-f", "--", part], what="rm")
            out.append((d, part))
        return out

    async def place(self, vm: VMSpec, todo: list[tuple[DiskSpec, str]]) -> None:
        """Flush each written disk and rename it into place; then flush the folders, so that a final
        path, once the record says the VM is made, survives a power cut."""
        h = self._host(vm)
        for d, part in todo:
            await h.run(["sync", "--", part], timeout=None, what="sync")
            await h.run(["mv", "-n", "-T", "--", part, d.path], what="mv")
            if await h.exists(part) or not await h.exists(d.path):
                raise PermanentError(f"{d.path} appeared on {h.name} while {vm.name} was being made",
                                     "something else writes there; move it away, then run the command again")
            await self.ctx.untrack(h.name, part)
        for folder in dict.fromkeys(str(PurePosixPath(d.path).parent) for d, _ in todo):
            await h.run(["sync", "--", folder], what="sync")

    async def commit(self) -> list[dict]:
        """Every disk of every VM is in place: the task is done with them, whatever happens next (a
        rollback from here on finishes them too). One update per VM makes it usable (its state, not
        busy); its files are its own; what else the task held is released. Returns what the result
        says of each VM, in the order reserved."""
        if not self.committed:
            self.committed = True
            await self._save()
        made = []
        for vm_id in self.ids.values():
            row = await self.svc.store.call(self.svc.store.vm_row, vm_id)
            if row is None:         # deleted since an earlier run finished it
                continue
            vm = VMSpec.from_dict(row["spec"])
            if row["state"] == INCOMPLETE and row["busy"] == self.ctx.id:
                await self.svc.update(vm.id, state=VMState.TEMPLATE if vm.is_template else VMState.STOPPED,
                                      busy=None)
            for path in {d.path for d in vm.disks} | {str(PurePosixPath(d.path).parent) for d in vm.disks}:
                await self.ctx.untrack(vm.host, path)
            made.append({"vm": vm.name, "id": vm.id, "host": vm.host, "disks": [d.path for d in vm.disks]})
        # Any other VM it held (a clone's source) is done with too: also when a run that died after
        # the commit is resumed, and never goes back to it.
        for row in await self.svc.store.call(self.svc.store.vm_rows_of_task, self.ctx.id):
            if row["state"] != INCOMPLETE:
                await self.svc.update(row["id"], busy=None)
        return made

    async def _save(self) -> None:
        await self.ctx.save_checkpoint({"vms": self.ids, "committed": self.committed, "sources": self.sources})

    def _host(self, vm: VMSpec) -> HostOps:
        return self.h if self.h is not None and self.h.name == vm.host else self.svc.host(vm.host)


async def roll_back_made(ctx: TaskContext) -> None:
    """Undo the records of what the task made (the engine then removes its tracked files): the VMs
    it reserved are deleted, unless it had made them all (committed: they are finished instead, and
    kept); any other VM it held (a clone's source) is released. Idempotent."""
    svc = VMService.of(ctx.engine)
    maker = Maker(ctx)
    if maker.committed:
        made = await maker.commit()
        ctx.log(f"it had made {', '.join(m['vm'] for m in made)} before it was stopped: kept", "warning")
    for row in await svc.store.call(svc.store.vm_rows_of_task, ctx.id):
        if row["state"] == INCOMPLETE:
            await svc.store.call(svc.store.vm_delete, row["id"])
        else:
            await svc.update(row["id"], busy=None)


class MakesVMs(TaskKind):
    """A kind of task that makes VMs through Maker: what it had not finished is of no use, so it is
    rolled back when the task fails, as when it is cancelled."""
    max_retries = 0
    rollback_on_failure = True

    async def rollback(self, ctx: TaskContext) -> None:
        await roll_back_made(ctx)


async def ensure_room(h: HostOps, disks: Iterable[DiskSpec], what: str) -> None:
    """Each datastore has room for the disks (still to be written) that go to it."""
    need: dict[str, int] = {}
    for d in disks:
        need[d.datastore] = need.get(d.datastore, 0) + d.size
    for ds_name, size in need.items():
        if size > 0:
            await h.ensure_space(h.datastore(ds_name), size, what)


@register
class CreateVM(MakesVMs):
    name = "vm.create"

    def validate(self, params: dict[str, Any]) -> None:
        check_name(params.get("name", ""))
        check_hardware(cpus=int(params.get("cpus", 1)), memory_mb=int(params.get("memory_mb", 256)),
                       max_cpus=int(params.get("max_cpus", default_max_cpus(int(params.get("cpus", 1))))))
        check_boot(tuple(params.get("boot", ("disk", "live"))))
        for d in params.get("disks", []):
            check_bus(d.get("bus", "virtio"))
            if parse_size(d.get("size", "1G"), "disk size") < 1 << 20:
                raise PermanentError(f"disk size {d.get('size')} is below 1 MiB", "for example --disk 1G")
        for p in params.get("passthrough", []):
            if p.get("kind") not in ("usb", "gpu", "disk") or not p.get("address"):
                raise PermanentError(f"passthrough {p} is not valid",
                                     "write usb:VENDOR:PRODUCT, gpu:PCI-ADDRESS or disk:/dev/PATH")
        if not params.get("host"):
            raise PermanentError("vm create needs a host", "--host lab1")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]]

    def title(self, params: dict[str, Any]) -> str:
        return f"create {params['name']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"vm:{params['name']}"

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None, *,
                    space: bool = True) -> tuple[HostOps, VMSpec]:
        """The host and the spec of the new VM, once its name is free (or reserved by `own`), its
        networks on the host and its datastores have room; Refused otherwise."""
        h = svc.host(p["host"])
        await names_clash(svc, [p["name"]], own, "choose another name (ferry vm list shows the names in use)")
        nics = tuple(NicSpec(n.get("network", "default"), n.get("mac", ""))
                     for n in p.get("nics", [{"network": "default"}]))
        h.check_nics(nics)
        await networks_ready(h, nics)
        cpus = int(p.get("cpus", 1))
        vm = VMSpec(id=new_id(), name=p["name"], host=h.name, cpus=cpus,
                    max_cpus=int(p.get("max_cpus", default_max_cpus(cpus))),
                    memory_mb=int(p.get("memory_mb", 256)), nics=nics,
                    boot=tuple(p.get("boot", ("disk", "live"))),
                    passthrough=tuple(Passthrough(x["kind"], x["address"]) for x in p.get("passthrough", [])))
        disks = []
        for i, d in enumerate(p.get("disks", [])):
            ds = h.datastore(d.get("datastore"))
            size = parse_size(d.get("size", "1G"), "disk size")
            disks.append(DiskSpec(f"disk{i}", ds.name, disk_path(ds, vm.name, f"disk{i}"), size,
                                  d.get("bus", "virtio"), ds.shared))
        vm = vm.with_(disks=tuple(disks))
        if space:
            await ensure_room(h, vm.disks, f"{vm.name} (its disks)")
        return h, vm

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        maker = Maker(ctx)
        if maker.committed:         # made by an earlier run, which died before it said so
            return next(iter(await maker.commit()), {})
        h, planned = await self.check(svc, ctx.params, ctx.id, space=False)
        maker.h = h
        [vm] = await maker.reserve([planned])
        todo = await maker.todo(vm)
        await ensure_room(h, (d for d, _ in todo), f"{vm.name} (its disks)")
        n = len(vm.disks)
        ctx.progress(measured=False, units_done=n - len(todo), units_total=n)
        for i, (d, part) in enumerate(todo):
            ctx.progress(units_done=n - len(todo) + i, units_total=n, item=f"creating {d.name} ({d.size >> 20} MiB)")
            await h.qemu_img("create", "-q", "-f", "qcow2", part, str(d.size))
        await maker.place(vm, todo)
        [made] = await maker.commit()
        ctx.log(f"{vm.kind} {vm.name} created on {h.name} with {n} disk(s)")
        return made


@register
class ImportVM(MakesVMs):
    """A package becomes a VM (or a template). The package is verified against its manifest on every
    run (it may have changed meanwhile); a resume converts only the disks not yet in place, and keeps
    the files an earlier run extracted from an OVA only when they match the manifest."""
    name = "vm.import"

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("path") or not params.get("host"):
            raise PermanentError("import needs a package path and a host", "ferry vm import PATH --host lab1")
        if params.get("name"):
            check_name(params["name"])

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]]

    def title(self, params: dict[str, Any]) -> str:
        return f"import {params['path']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"import:{params['host']}:{params['path']}:{params.get('name') or ''}"

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None, *,
                    space: bool = True) -> tuple[HostOps, VMSpec]:
        """The host and the spec of the VM the package becomes, once the package reads as one, its name
        is free (or reserved by `own`) and the datastore has room for what the import writes; Refused
        otherwise."""
        from .ovf import import_needs
        h = svc.host(p["host"])
        try:
            spec, need = await import_needs(h.t, p["path"])
            name = check_name(p.get("name") or spec.name)
        except PermanentError as e:
            raise refused(e) from None
        await names_clash(svc, [name], own, "import it under another name: --name NEW-NAME")
        ds = h.datastore(p.get("datastore"))
        if space:
            await h.ensure_space(ds, need, f"importing {name} from {PurePosixPath(p['path']).name}")
        here = h.site.networks_of(h.name)
        nets = [n if n in here else here[0] for n in spec.nics]
        await networks_ready(h, [NicSpec(n) for n in nets])
        as_template = bool(p.get("as_template", spec.is_template))
        return h, VMSpec(id=new_id(), name=name, host=h.name, cpus=spec.cpus, max_cpus=default_max_cpus(spec.cpus),
                         memory_mb=spec.memory_mb,
                         disks=tuple(DiskSpec(d.name, ds.name, disk_path(ds, name, d.name), d.capacity, d.bus, ds.shared)
                                     for d in spec.disks),
                         nics=tuple(NicSpec(n) for n in nets), kind=VMKind.TEMPLATE if as_template else VMKind.VM,
                         origin=PurePosixPath(p["path"]).name)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from .ovf import import_disks, import_needs
        p = ctx.params
        svc = VMService.of(ctx.engine)
        maker = Maker(ctx)
        if maker.committed:         # made by an earlier run, which died before it said so
            return next(iter(await maker.commit()), {})
        h, planned = await self.check(svc, p, ctx.id, space=False)
        maker.h = h
        [vm] = await maker.reserve([planned])
        todo = await maker.todo(vm)
        folder = str(PurePosixPath(vm.disks[0].path).parent) if vm.disks else ""
        stage = posixpath.join(folder, f".{vm.name}.ferry-task{ctx.id}")
        if todo:
            _, need = await import_needs(h.t, p["path"], disks={d.name for d, _ in todo}, stage=stage)
            await h.ensure_space(h.datastore(vm.disks[0].datastore), need,
                                 f"importing {vm.name} from {PurePosixPath(p['path']).name}")
            await ctx.track(h.name, stage, role="temp")
            await import_disks(h.t, p["path"], {d.name: part for d, part in todo}, stage=stage,
                               progress=reporter(ctx))
        await maker.place(vm, todo)
        [made] = await maker.commit()
        ctx.log(f"{vm.kind} {vm.name} imported on {h.name} with {len(vm.disks)} disk(s)")
        return made

