"""Task kinds that make a new VM or template: create (blank disks) and import (from a package).
The clone kinds (copies.py) make theirs with make_vm too."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import PurePosixPath
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, disk_path
from .model import (DiskSpec, NicSpec, Passthrough, VMKind, VMSpec, VMState, check_boot, check_bus,
                    check_hardware, check_name, default_max_cpus, new_id, parse_size)
from .prechecks import refused
from .progress import reporter
from .service import VMService

@register
class CreateVM(TaskKind):
    name = "vm.create"
    max_retries = 0

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

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None) -> tuple[HostOps, VMSpec]:
        """The host and the spec of the new VM, once its name is free, its networks on the host and its
        datastores have room; Refused otherwise."""
        h = svc.host(p["host"])
        if p["name"] in await svc.names_in_use():
            raise Refused(f"a VM or template named {p['name']!r} already exists",
                          "choose another name (ferry vm list shows the names in use)")
        nics = tuple(NicSpec(n.get("network", "default"), n.get("mac", ""))
                     for n in p.get("nics", [{"network": "default"}]))
        for n in nics:
            h.check_network(n.network)
        cpus = int(p.get("cpus", 1))
        vm = VMSpec(id=new_id(), name=p["name"], host=h.name, cpus=cpus,
                    max_cpus=int(p.get("max_cpus", default_max_cpus(cpus))),
                    memory_mb=int(p.get("memory_mb", 256)), nics=nics,
                    boot=tuple(p.get("boot", ("disk", "live"))),
                    passthrough=tuple(Passthrough(x["kind"], x["address"]) for x in p.get("passthrough", [])))
        disks = []
        need: dict[str, int] = {}
        for i, d in enumerate(p.get("disks", [])):
            ds = h.datastore(d.get("datastore"))
            size = parse_size(d.get("size", "1G"), "disk size")
            need[ds.name] = need.get(ds.name, 0) + size
            disks.append(DiskSpec(f"disk{i}", ds.name, disk_path(ds, vm.name, f"disk{i}"), size,
                                  d.get("bus", "virtio"), ds.shared))
        for ds_name, size in need.items():
            await h.ensure_space(h.datastore(ds_name), size, f"{vm.name} ({size >> 20} MiB of disks)")
        return h, vm.with_(disks=tuple(disks))

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        h, vm = await self.check(VMService.of(ctx.engine), ctx.params, ctx.id)
        return await make_vm(ctx, h, vm, self._create_disks)

    @staticmethod
    async def _create_disks(ctx: TaskContext, h: HostOps, vm: VMSpec) -> None:
        for i, d in enumerate(vm.disks):
            ctx.progress(units_done=i, units_total=len(vm.disks), item=f"creating {d.name} ({d.size >> 20} MiB)")
            await h.qemu_img("create", "-q", "-f", "qcow2", d.path, str(d.size))


async def make_vm(ctx: TaskContext, h: HostOps, vm: VMSpec, fill, *, state: VMState = VMState.STOPPED
                  ) -> dict[str, Any]:
    """Records the VM (claiming its name), lets fill() make its files, and removes both on failure."""
    svc = VMService.of(ctx.engine)
    for d in vm.disks:
        if await h.exists(str(d.path)):
            raise PermanentError(f"{d.path} already exists on {h.name}",
                                 "a leftover of an earlier VM? move it away or choose another name")
    await svc._db(svc.store.vm_insert, id=vm.id, name=vm.name, kind=str(vm.kind), host=vm.host,
                  state=str(state), spec=vm.to_dict(), busy=ctx.id)
    made_dirs = []
    try:
        for d in {str(PurePosixPath(x.path).parent) for x in vm.disks}:
            if not await h.exists(d):
                made_dirs.append(d)
            await h.t.mkdir(d)
        await fill(ctx, h, vm)
    except BaseException as e:
        ctx.log(f"{vm.name} was not made ({getattr(e, 'message', None) or type(e).__name__}); "
                "removing what was created", "warning")
        with contextlib.suppress(Exception):
            await asyncio.shield(_undo(svc, h, vm, made_dirs))
        raise
    await svc.update(vm.id, busy=None)
    ctx.log(f"{vm.kind} {vm.name} created on {h.name} with {len(vm.disks)} disk(s)")
    return {"vm": vm.name, "id": vm.id, "host": h.name, "disks": [d.path for d in vm.disks]}


async def _undo(svc: VMService, h: HostOps, vm: VMSpec, made_dirs: list[str]) -> None:
    for d in vm.disks:
        with contextlib.suppress(FerryError):
            await h.t.remove(d.path)
    for d in made_dirs:
        with contextlib.suppress(FerryError):
            await h.remove_tree(d)
    await svc._db(svc.store.vm_delete, vm.id)



@register
class ImportVM(TaskKind):
    """A package becomes a VM (or a template). Paused or interrupted, it starts over when resumed: the
    package is verified against its manifest again, as it may have changed meanwhile."""
    name = "vm.import"
    max_retries = 0

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("path") or not params.get("host"):
            raise PermanentError("import needs a package path and a host", "ferry vm import PATH --host lab1")
        if params.get("name"):
            check_name(params["name"])

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]]

    def title(self, params: dict[str, Any]) -> str:
        return f"import {params['path']}"

    async def check(self, svc: VMService, p: dict[str, Any], own: int | None = None) -> tuple[HostOps, VMSpec]:
        """The host and the spec of the VM the package becomes, once the package reads as one, its name
        is free and the datastore has room for what the import writes; Refused otherwise."""
        from .ovf import import_needs
        h = svc.host(p["host"])
        try:
            spec, need = await import_needs(h.t, p["path"])
            name = check_name(p.get("name") or spec.name)
        except PermanentError as e:
            raise refused(e) from None
        if name in await svc.names_in_use():
            raise Refused(f"a VM or template named {name!r} already exists",
                          "import it under another name: --name NEW-NAME")
        ds = h.datastore(p.get("datastore"))
        await h.ensure_space(ds, need, f"importing {name} from {PurePosixPath(p['path']).name}")
        nets = [n if n in h.spec.networks else h.spec.networks[0] for n in spec.nics]
        as_template = bool(p.get("as_template", spec.is_template))
        return h, VMSpec(id=new_id(), name=name, host=h.name, cpus=spec.cpus, max_cpus=default_max_cpus(spec.cpus),
                         memory_mb=spec.memory_mb,
                         disks=tuple(DiskSpec(d.name, ds.name, disk_path(ds, name, d.name), d.capacity, d.bus, ds.shared)
                                     for d in spec.disks),
                         nics=tuple(NicSpec(n) for n in nets), kind=VMKind.TEMPLATE if as_template else VMKind.VM,
                         origin=PurePosixPath(p["path"]).name)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from .ovf import import_package
        p = ctx.params
        h, vm = await self.check(VMService.of(ctx.engine), p, ctx.id)

        async def fill(ctx: TaskContext, h: HostOps, vm: VMSpec) -> None:
            folder = str(PurePosixPath(vm.disks[0].path).parent) if vm.disks else ""
            _, made = await import_package(h.t, p["path"], folder, name=vm.name, progress=reporter(ctx))
            for d in vm.disks:
                if made.get(d.name) != d.path:
                    raise PermanentError(f"import of {vm.name} put {d.name} at {made.get(d.name)}, not {d.path}",
                                         "internal: report this")

        state = VMState.TEMPLATE if vm.is_template else VMState.STOPPED
        return await make_vm(ctx, h, vm, fill, state=state)
