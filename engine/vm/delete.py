"""Deleting VMs and templates: normal, secure (overwritten and verified), delayed (recycle bin)."""

from __future__ import annotations

import contextlib
import time
from pathlib import PurePosixPath
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..tasks import TaskContext, register
from .hostcmd import Tail, last_line, watch
from .hostops import RECYCLE_DIR, HostOps, recycle_path
from .lifecycle import VMTask, working_on
from .model import VMSpec, VMState
from .service import VMService

MODES = ("normal", "secure", "delayed")
DEFAULT_KEEP_DAYS = 7

# Runs on the host (python3, stdlib only): overwrites every allocated extent of each file with
# zeros, fsyncs, reads it all back to verify, and reports progress as "P done total" lines.
WIPE_SCRIPT = r"""
import os, sys
BS = 1 << 20
def extents(fd, size):
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end
files = sys.argv[1:]
plan = []
for f in files:
    fd = os.open(f, os.O_RDWR)
    plan.append((f, fd, list(extents(fd, os.fstat(fd).st_size))))
total = 2 * sum(e - s for _, _, ex in plan for s, e in ex)
done = 0
zero = bytes(BS)
for f, fd, ex in plan:
    for s, e in ex:
        pos = s
        while pos < e:
            n = min(BS, e - pos)
            os.pwrite(fd, zero[:n], pos)
            pos += n; done += n
            print("P", done, total, flush=True)
    os.fsync(fd)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
for f, fd, ex in plan:
    for s, e in ex:
        pos = s
        while pos < e:
            n = min(BS, e - pos)
            if os.pread(fd, n, pos).count(0) != n:
                print("BAD", f, pos, flush=True)
                sys.exit(3)
            pos += n; done += n
            print("P", done, total, flush=True)
    os.close(fd)
print("OK", flush=True)
"""


@register
class DeleteVM(VMTask):
    name = "vm.delete"
    verb = "delete"

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if params.get("mode", "normal") not in MODES:
            raise PermanentError(f"delete mode {params.get('mode')!r} is unknown", f"use one of {', '.join(MODES)}")
        if params.get("confirm") != params["vm"]:
            raise PermanentError(f"deleting {params['vm']} needs its name typed to confirm",
                                 f"type the name when asked, or pass --confirm {params['vm']}")
        days = params.get("keep_days")
        if days is not None and not 0 <= float(days) <= 3650:
            raise PermanentError(f"keep days must be between 0 and 3650, got {days}", "for example --keep-days 7")

    def title(self, params: dict[str, Any]) -> str:
        mode = params.get("mode", "normal")
        return f"delete {params['vm']}" + ("" if mode == "normal" else f" ({mode})")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        mode = ctx.params.get("mode", "normal")
        svc, row, vm, h = await self.target(ctx)
        async with working_on(ctx, row):
            if mode == "delayed":
                days = float(ctx.params.get("keep_days", DEFAULT_KEEP_DAYS))
                await _to_recycle_bin(ctx, svc, h, vm, days)
                return {"vm": vm.name, "mode": mode, "purge_at": time.time() + days * 86400}
            if mode == "secure":
                await secure_wipe(ctx, h, vm)
            await remove_files(h, vm)
        await svc._db(svc.store.vm_delete, vm.id)
        ctx.log(f"{vm.name} deleted ({mode})")
        return {"vm": vm.name, "mode": mode}


def _files(vm: VMSpec) -> list[str]:
    """The files that make up a VM on its host: its disks and a hibernated state."""
    return [d.path for d in vm.disks] + ([vm.hibernate_file] if vm.hibernate_file else [])


async def secure_wipe(ctx: TaskContext, h: HostOps, vm: VMSpec) -> None:
    """Overwrites the disks' allocated blocks with zeros and reads them back before anything is removed."""
    files = [f for f in _files(vm) if await h.exists(f)]
    if not files:
        return
    total = 0

    def on_total(value: float) -> None:
        nonlocal total
        total = int(value)

    def on_done(value: float) -> None:
        ctx.progress(bytes_done=int(value), bytes_total=total or None,
                     item="overwriting" if value <= total // 2 else "verifying")

    tails = (Tail(r"P \d+ (\d+)\n", on_total), Tail(r"P (\d+) \d+\n", on_done))
    r = await watch(h.t, ["python3", "-c", WIPE_SCRIPT, *files], on_out=lambda text: [t(text) for t in tails])
    out = r.stdout.decode("utf-8", "replace").split("\n")
    verdict = next((line.strip() for line in reversed(out) if line.strip() and not line.startswith("P ")), "")
    if not r.ok or verdict != "OK":
        raise PermanentError(f"secure delete of {vm.name} on {h.name} failed: {verdict or last_line(r)}",
                             "the disks were kept; check the datastore and retry")
    ctx.log(f"{len(files)} file(s) of {vm.name} overwritten with zeros and verified")


async def _move_all(h: HostOps, moves: list[tuple[str, str]]) -> None:
    """Moves each (src, dst); when one fails, the ones already moved go back."""
    done: list[tuple[str, str]] = []
    try:
        for src, dst in moves:
            await h.move(src, dst)
            done.append((src, dst))
    except BaseException:
        for src, dst in reversed(done):
            with contextlib.suppress(Exception):
                await h.move(dst, src)
        raise


async def _drop_empty_dirs(h: HostOps, vm: VMSpec) -> None:
    """The VM's folders on its datastores, once nothing is left in them."""
    for folder in {str(PurePosixPath(d.path).parent) for d in vm.disks}:
        with contextlib.suppress(FerryError):
            if not await h.t.listdir(folder):
                await h.run(["rmdir", "--", folder], what="rmdir")


async def remove_files(h: HostOps, vm: VMSpec) -> None:
    for path in _files(vm):
        with contextlib.suppress(FerryError):
            await h.t.remove(path)
    await _drop_empty_dirs(h, vm)


async def _to_recycle_bin(ctx: TaskContext, svc: VMService, h: HostOps, vm: VMSpec, days: float) -> None:
    moves = []
    for path in _files(vm):
        ds = h.datastore_of_path(path)
        if ds is not None and await h.exists(path):
            moves.append((path, recycle_path(ds, vm.id, path)))
    await _move_all(h, moves)
    await _drop_empty_dirs(h, vm)
    now = time.time()
    await svc.update(vm.id, recycled=now, purge_at=now + days * 86400, state=VMState.RECYCLED)
    ctx.log(f"{vm.name} moved to the recycle bin for {days:g} day(s)")


@register
class RestoreVM(VMTask):
    """Brings a VM back from the recycle bin, under its old name."""
    name = "vm.restore"
    verb = "restore"
    recycled = True

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None
                    ) -> tuple[dict, VMSpec, HostOps, list[tuple[str, str]]]:
        """As VMTask.check, plus the moves out of the recycle bin, once none would overwrite anything."""
        row, vm, h = await super().check(svc, params, own)
        if vm.name in await svc.names_in_use():
            raise Refused(f"another VM is now named {vm.name}, so this one cannot come back under that name",
                          "rename or delete the other one first")
        moves = []
        for path in _files(vm):
            ds = h.datastore_of_path(path)
            src = recycle_path(ds, vm.id, path) if ds else ""
            if not src or not await h.exists(src):
                raise Refused(f"{path} of {vm.name} is no longer in the recycle bin on {h.name}",
                              "it may have been purged by hand; the VM cannot be restored")
            if await h.exists(path):
                raise Refused(f"{path} exists again on {h.name}; restoring would overwrite it",
                              "move that file away first")
            moves.append((src, path))
        return row, vm, h, moves

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        row, vm, h, moves = await self.check(svc, ctx.params, ctx.id)
        await _move_all(h, moves)
        state = VMState.TEMPLATE if vm.is_template else (VMState.HIBERNATED if vm.hibernate_file else VMState.STOPPED)
        await svc.update(vm.id, recycled=None, purge_at=None, state=state)
        await _drop_recycle_dirs(h, vm)
        ctx.log(f"{vm.name} restored from the recycle bin")
        return {"vm": vm.name}


@register
class PurgeVM(VMTask):
    """Removes a VM from the recycle bin for good (or every expired one, vm='*expired*')."""
    name = "vm.purge"
    verb = "purge"
    recycled = True

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if params["vm"] != "*expired*" and params.get("confirm") != params["vm"]:
            raise PermanentError(f"purging {params['vm']} needs its name typed to confirm",
                                 f"pass --confirm {params['vm']}")

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None) -> Any:
        if params["vm"] != "*expired*":
            return await super().check(svc, params, own)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        rows = await svc.expired() if ctx.params["vm"] == "*expired*" else \
            [await svc.find(ctx.params["vm"], recycled=True)]
        purged = []
        for row in rows:
            vm = VMSpec.from_dict(row["spec"])
            h = svc.host(vm.host)
            await _drop_recycle_dirs(h, vm)
            await svc._db(svc.store.vm_delete, vm.id)
            purged.append(vm.name)
            ctx.log(f"{vm.name} purged from the recycle bin")
        return {"purged": purged}


async def _drop_recycle_dirs(h: HostOps, vm: VMSpec) -> None:
    """The VM's folder in the recycle bin of each datastore it used, with whatever is still in it."""
    for ds in {h.datastore_of_path(path) for path in _files(vm)} - {None}:
        with contextlib.suppress(FerryError):
            await h.remove_tree(str(PurePosixPath(ds.path) / RECYCLE_DIR / vm.id))
