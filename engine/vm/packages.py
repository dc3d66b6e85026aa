"""Export and import of VMs and templates as OVF (+ VHD disks + SHA256 manifest) or one OVA."""

from __future__ import annotations

import posixpath
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
    from .ovfxml import OvfDisk, OvfSpec
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

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"export:{params['vm']}:{params['out']}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from .ovf import export_package
        if ctx.checkpoint:
            done = await self._finished(ctx)
            if done is not None:
                return done
        svc, row, vm, h = await self.target(ctx)
        out = ctx.params["out"]
        ova = self._ova(ctx.params)
        if ctx.checkpoint:
            ctx.log(f"going on with the export of {vm.name} from where it stopped, if its disks did not change")
        stage = _stage_name(out, ctx.id)
        async with working_on(ctx, row):
            # Before it exists: a cancel (of a paused or interrupted export too) or `ferry gc` removes it,
            # and a resume goes on in it (the task's id names it).
            await ctx.track(h.name, posixpath.join(posixpath.dirname(posixpath.normpath(out)), stage), role="temp")
            result = await export_package(h.t, to_ovf(vm), {d.name: d.path for d in vm.disks}, out, ova=ova,
                                          progress=reporter(ctx), stage=stage,
                                          state=ctx.checkpoint, save=ctx.save_checkpoint,
                                          keep=lambda: not cancelled_for_good(ctx))
        ctx.log(f"{vm.name} exported to {out} on {h.name} ({'OVA' if ova else 'OVF'})")
        return {"vm": vm.name, "host": h.name, **result}

    async def _finished(self, ctx: TaskContext) -> dict[str, Any] | None:
        """The result, when an interrupted run had moved its package into place (the last step): the
        package at the output path holds the manifest of the disks this task hashed (an OVA is also read
        through to its end). None otherwise."""
        from .ovfxml import parse_manifest
        cp = ctx.checkpoint or {}
        out, digests, stage = cp.get("out"), cp.get("digests") or {}, cp.get("stage")
        if not out or not digests or not stage:
            return None
        svc = VMService.of(ctx.engine)
        vm = VMSpec.from_dict((await svc.find(ctx.params["vm"]))["spec"])
        h = svc.host(vm.host)
        if len(digests) != len(vm.disks) or await h.t.stat(out) is None:
            return None
        mf = f"{vm.name}.mf"
        if cp.get("ova"):
            base = posixpath.basename(out)
            if await h.t.stat(posixpath.join(stage, f".{base}.part")) is not None:
                return None      # not moved: what is at `out` is not this task's
            listed = await h.t.run(["tar", "-tf", out], timeout=None)      # read through: complete
            text = await h.t.run(["tar", "-xOf", out, "--", mf], timeout=None)
            if not listed.ok or not text.ok:
                return None
            manifest = text.stdout.decode("utf-8", "replace")
        else:
            if await h.t.stat(stage) is not None:
                return None      # the staging folder is what becomes `out`: not moved yet
            try:
                manifest = (await h.t.read_file(posixpath.join(out, mf))).decode("utf-8", "replace")
            except FerryError:
                return None
        try:
            files = dict(parse_manifest(manifest, file=mf))
        except FerryError:
            return None
        if any(files.get(f, "").lower() != d.lower() for f, d in digests.items()):
            return None
        if cp.get("ova"):
            size = (await h.t.stat(out)).size
        else:
            size = sum(st.size for f in files if (st := await h.t.stat(posixpath.join(out, f))) is not None)
        ctx.log(f"{vm.name} was exported to {out} before this task was interrupted (its manifest checked)")
        return {"vm": vm.name, "host": h.name, "path": out, "files": files, "bytes": size}


def _stage_name(out: str, task_id: int) -> str:
    """The staging folder of an export task, next to its output: the task's id in it says whose it is."""
    return f".{PurePosixPath(out).name}.ferry-task{task_id}"
