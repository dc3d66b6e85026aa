"""Export and import of VMs and templates as OVF (+ VHD disks + SHA256 manifest) or one OVA."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from ..errors import PermanentError
from ..tasks import TaskContext, TaskKind, register
from .hostops import HostOps, disk_path
from .lifecycle import VMTask, make_vm, working_on
from .model import DiskSpec, NicSpec, VMKind, VMSpec, VMState, check_name, default_max_cpus, new_id
from .service import VMService


def to_ovf(vm: VMSpec):
    from .ovf import OvfDisk, OvfSpec
    return OvfSpec(name=vm.name, cpus=vm.cpus, memory_mb=vm.memory_mb,
                   disks=tuple(OvfDisk(d.name, f"{vm.name}-{d.name}.vhd", d.size, d.bus) for d in vm.disks),
                   nics=tuple(n.network for n in vm.nics), is_template=vm.is_template)


def _progress(ctx: TaskContext):
    def report(done: int, total: int, item: str) -> None:
        ctx.progress(bytes_done=done, bytes_total=total or None, item=item)
    return report


@register
class ExportVM(VMTask):
    name = "vm.export"
    verb = "export"

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if not params.get("out") or not PurePosixPath(params["out"]).is_absolute():
            raise PermanentError("export needs an absolute output path on the VM's host",
                                 "--out /var/tmp/web01.ova (or a folder for OVF)")

    def title(self, params: dict[str, Any]) -> str:
        return f"export {params['vm']} -> {params['out']}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc, row, vm, h = await self.target(ctx)
        if await h.pid(vm) is not None or vm.hibernate_file:
            raise PermanentError(f"{vm.name} must be stopped to be exported (its disks change while it runs)",
                                 f"shut it down first (ferry vm stop {vm.name}), or export a clone of it")
        from .ovf import export_package
        out = ctx.params["out"]
        ova = bool(ctx.params.get("ova", out.endswith(".ova")))
        async with working_on(ctx, row):
            result = await export_package(h.t, to_ovf(vm), {d.name: d.path for d in vm.disks}, out, ova=ova,
                                          progress=_progress(ctx))
        ctx.log(f"{vm.name} exported to {out} on {h.name} ({'OVA' if ova else 'OVF'})")
        return {"vm": vm.name, "host": h.name, **result}


@register
class ImportVM(TaskKind):
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

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from .ovf import import_package, read_package
        p = ctx.params
        svc = VMService.of(ctx.engine)
        h = svc.host(p["host"])
        spec, _ = await read_package(h.t, p["path"])
        name = check_name(p.get("name") or spec.name)
        if name in await svc.names_in_use():
            raise PermanentError(f"a VM or template named {name!r} already exists",
                                 "import it under another name: --name NEW-NAME")
        ds = h.datastore(p.get("datastore"))
        await h.ensure_space(ds, sum(d.capacity for d in spec.disks) // 4, f"importing {name}")
        nets = [n if n in h.spec.networks else h.spec.networks[0] for n in spec.nics]
        as_template = bool(p.get("as_template", spec.is_template))
        vm = VMSpec(id=new_id(), name=name, host=h.name, cpus=spec.cpus, max_cpus=default_max_cpus(spec.cpus),
                    memory_mb=spec.memory_mb,
                    disks=tuple(DiskSpec(d.name, ds.name, disk_path(ds, name, d.name), d.capacity, d.bus, ds.shared)
                                for d in spec.disks),
                    nics=tuple(NicSpec(n) for n in nets), kind=VMKind.TEMPLATE if as_template else VMKind.VM,
                    origin=PurePosixPath(p["path"]).name)

        async def fill(ctx: TaskContext, h: HostOps, vm: VMSpec) -> None:
            folder = str(PurePosixPath(vm.disks[0].path).parent) if vm.disks else ""
            _, made = await import_package(h.t, p["path"], folder, name=name, progress=_progress(ctx))
            for d in vm.disks:
                if made.get(d.name) != d.path:
                    raise PermanentError(f"import of {name} put {d.name} at {made.get(d.name)}, not {d.path}",
                                         "internal: report this")

        state = VMState.TEMPLATE if as_template else VMState.STOPPED
        return await make_vm(ctx, h, vm, fill, state=state)
