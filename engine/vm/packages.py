"""Export and import of VMs and templates as OVF (+ VHD disks + SHA256 manifest) or one OVA."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..tasks import TaskContext, register
from .hostops import HostOps
from .lifecycle import VMTask, cancelled_for_good, disks_present, working_on
from .model import VMSpec
from .progress import reporter
from .service import VMService


def to_ovf(vm: VMSpec):
    from .ovf import OvfDisk, OvfSpec
    return OvfSpec(name=vm.name, cpus=vm.cpus, memory_mb=vm.memory_mb,
                   disks=tuple(OvfDisk(d.name, f"{vm.name}-{d.name}.vhd", d.size, d.bus) for d in vm.disks),
                   nics=tuple(n.network for n in vm.nics), is_template=vm.is_template)


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

    @staticmethod
    def _ova(params: dict[str, Any]) -> bool:
        return bool(params.get("ova", params["out"].endswith(".ova")))

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps]:
        """As VMTask.check, once nothing at the output path would be overwritten (a resumed export finds
        its package still unwritten there)."""
        from .ovf import VHD_MAX, check_out
        row, vm, h = await super().check(svc, params, own)
        await disks_present(h, vm)
        for d in vm.disks:
            size = int((await h.image_info(d.path)).get("virtual-size", d.size))
            if size > VHD_MAX:
                raise Refused(f"disk {d.name} of {vm.name} ({size >> 30} GiB) is larger than a VHD can hold "
                              "(2040 GiB)", "move this VM with block replication instead of a package")
        await check_out(h.t, vm.name, params["out"], ova=self._ova(params))
        return row, vm, h

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from .ovf import export_package
        svc, row, vm, h = await self.target(ctx)
        out = ctx.params["out"]
        ova = self._ova(ctx.params)
        if ctx.checkpoint:
            ctx.log(f"going on with the export of {vm.name} from where it stopped, if its disks did not change")
        await _sweep_stages(ctx, h, out)
        async with working_on(ctx, row):
            result = await export_package(h.t, to_ovf(vm), {d.name: d.path for d in vm.disks}, out, ova=ova,
                                          progress=reporter(ctx), stage=_stage_name(out, ctx.id),
                                          state=ctx.checkpoint, save=ctx.save_checkpoint,
                                          keep=lambda: not cancelled_for_good(ctx))
        ctx.log(f"{vm.name} exported to {out} on {h.name} ({'OVA' if ova else 'OVF'})")
        return {"vm": vm.name, "host": h.name, **result}


def _stage_name(out: str, task_id: int) -> str:
    """The staging folder of an export task, next to its output: the task's id in it says whose it is."""
    return f".{PurePosixPath(out).name}.ferry-task{task_id}"


async def _sweep_stages(ctx: TaskContext, h: HostOps, out: str) -> None:
    """Removes the staging folders that earlier exports to the same path kept for a resume that will not
    come (their task was cancelled while paused, or is gone)."""
    folder = str(PurePosixPath(out).parent)
    pattern = re.compile(re.escape(f".{PurePosixPath(out).name}.ferry-task") + r"(\d+)")
    try:
        names = await h.t.listdir(folder)
    except FerryError:
        return
    for n in names:
        m = pattern.fullmatch(n)
        if not m or int(m.group(1)) == ctx.id:
            continue
        try:
            gone = (await ctx.engine.get(int(m.group(1)))).state.final
        except PermanentError:
            gone = True
        if gone:
            await h.remove_tree(f"{folder}/{n}")
            ctx.log(f"removed {folder}/{n}, kept by task {m.group(1)} for a resume that will not come")
