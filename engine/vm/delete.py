"""Deleting VMs and templates: normal, secure (overwritten and verified), delayed (recycle bin).

A delete is two-phase and visible, and goes on after its Ferry process was killed at any instant:
1. Before any byte is touched, the record becomes "deleting", busy with the task (the state it had is
   in the checkpoint). Nothing else may act on it from then on; a cancel now puts the state back.
2. The checkpoint says destruction has begun, then: secure: the files are overwritten and verified
   (checkpointed once verified: a resume does not wipe again; a kill mid-wipe wipes again, which is
   idempotent), then removed; normal: removed (a missing file is removed already); delayed: each file
   moved to the recycle bin (a file already there and gone from its place is moved already).
   A cancel from here on leaves the record "deleting" (not busy) for a delete to finish; a delayed
   delete is moved back instead.
3. The record is deleted (delayed: recycled). A resume that finds it so is done.
Restore and purge are idempotent the same way: each move or removal looks whether it is done already.
A purge marks the VM "deleting" (still in the bin) before its files go, and a restore cancelled
half-way moves what it had moved back into the bin.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import PurePosixPath
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..ship import Program
from ..tasks import TaskContext, register
from .hostcmd import Tail, last_line
from .hostops import RECYCLE_DIR, HostOps, recycle_path
from .lifecycle import VMTask, working_on
from .model import VMSpec, VMState
from .service import VMService

MODES = ("normal", "secure", "delayed")
DEFAULT_KEEP_DAYS = 7

# Runs on the host (python3, stdlib only): overwrites every allocated extent of each file with
# zeros, fsyncs, reads it all back to verify, and reports progress as "P done total" lines.
WIPE = Program("ferry-wipe", r"""
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
""")


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
        svc = VMService.of(ctx.engine)
        cp = dict(ctx.checkpoint or {})
        if cp.get("vm_id"):
            row = await svc.store.call(svc.store.vm_row, cp["vm_id"])
            if row is None or row["recycled"]:
                ctx.log(f"{cp['name']} was deleted before this task was interrupted")
                return {"vm": cp["name"], "mode": mode,
                        **({"purge_at": row["purge_at"]} if row and row["recycled"] else {})}
        svc, row, vm, h = await self.target(ctx)
        async with working_on(ctx, row):
            if not cp.get("vm_id"):
                cp = {"vm_id": vm.id, "name": vm.name, "was": row["state"], "begun": False}
                await ctx.save_checkpoint(cp)
            if row["state"] != VMState.DELETING:
                await svc.update(vm.id, state=VMState.DELETING)
            if not cp["begun"]:
                cp["begun"] = True
                await ctx.save_checkpoint(cp)
            if mode == "delayed":
                days = float(ctx.params.get("keep_days", DEFAULT_KEEP_DAYS))
                await _to_recycle_bin(ctx, svc, h, vm, days)
                return {"vm": vm.name, "mode": mode, "purge_at": time.time() + days * 86400}
            if mode == "secure" and not cp.get("wiped"):
                await secure_wipe(ctx, h, vm)
                cp["wiped"] = True
                await ctx.save_checkpoint(cp)
            await remove_files(h, vm)
            await svc.store.call(svc.store.vm_delete, vm.id)
        ctx.log(f"{vm.name} deleted ({mode})")
        return {"vm": vm.name, "mode": mode}

    async def rollback(self, ctx: TaskContext) -> None:
        """Before destruction began: the record as it was. After: a delayed delete moved back; any other
        stays "deleting" (no longer busy), for a delete to finish."""
        cp = ctx.checkpoint or {}
        if not cp.get("vm_id"):
            return
        svc = VMService.of(ctx.engine)
        row = await svc.store.call(svc.store.vm_row, cp["vm_id"])
        name = cp["name"]
        if row is None:
            raise PermanentError(f"the delete of {name} had finished; nothing is left to put back")
        if row["recycled"]:
            raise PermanentError(f"the delete of {name} had finished: it is in the recycle bin; "
                                 f"`ferry vm restore {name}` brings it back")
        if row["busy"] not in (None, ctx.id):
            return      # another task has it now
        if cp.get("begun") and ctx.params.get("mode") == "delayed":
            vm = VMSpec.from_dict(row["spec"])
            h = svc.host(vm.host)
            await _move_all(h, await _bin_moves(h, vm, back=True))
            await _drop_recycle_dirs(h, vm)
        elif cp.get("begun"):
            await svc.update(row["id"], busy=None)
            raise PermanentError(f"the delete of {name} had begun, so it stays 'deleting'; "
                                 f"`ferry vm delete {name} --confirm {name}` finishes it")
        state = cp["was"] if row["state"] == VMState.DELETING else row["state"]
        await svc.update(row["id"], state=state, busy=None)
        ctx.log(f"{name} is back as it was ({state}): the delete was rolled back")


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
    r = await WIPE.run(h.t, *files, timeout=None, on_out=lambda text: [t(text) for t in tails])
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


async def _bin_moves(h: HostOps, vm: VMSpec, *, back: bool = False) -> list[tuple[str, str]]:
    """The moves of the VM's files into the recycle bin (back=True: out of it) still to do: a file that
    is where it goes, and no longer where it was, is moved already."""
    moves = []
    for path in _files(vm):
        ds = h.datastore_of_path(path)
        if ds is None:
            continue
        src, dst = path, recycle_path(ds, vm.id, path)
        if back:
            src, dst = dst, src
        if await h.exists(src):
            moves.append((src, dst))
    return moves


async def _to_recycle_bin(ctx: TaskContext, svc: VMService, h: HostOps, vm: VMSpec, days: float) -> None:
    await _move_all(h, await _bin_moves(h, vm))
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

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None, *,
                    resumed: bool = False) -> tuple[dict, VMSpec, HostOps, list[tuple[str, str]]]:
        """As VMTask.check, plus the moves out of the recycle bin, once none would overwrite anything
        (resumed: a file back in its place and gone from the bin was moved by this task)."""
        row, vm, h = await super().check(svc, params, own)
        if vm.name in await svc.names_in_use():
            raise Refused(f"another VM is now named {vm.name}, so this one cannot come back under that name",
                          "rename or delete the other one first")
        moves = []
        for path in _files(vm):
            ds = h.datastore_of_path(path)
            src = recycle_path(ds, vm.id, path) if ds else ""
            there = await h.exists(path)
            if src and resumed and there and not await h.exists(src):
                continue
            if not src or not await h.exists(src):
                raise Refused(f"{path} of {vm.name} is no longer in the recycle bin on {h.name}",
                              "it may have been purged by hand; the VM cannot be restored")
            if there:
                raise Refused(f"{path} exists again on {h.name}; restoring would overwrite it",
                              "move that file away first")
            moves.append((src, path))
        return row, vm, h, moves

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        cp = ctx.checkpoint or {}
        if cp.get("vm_id"):
            row = await svc.store.call(svc.store.vm_row, cp["vm_id"])
            if row is not None and not row["recycled"]:      # restored before this task was interrupted
                vm = VMSpec.from_dict(row["spec"])
                await _drop_recycle_dirs(svc.host(vm.host), vm)
                return {"vm": vm.name}
        row, vm, h, moves = await self.check(svc, ctx.params, ctx.id, resumed=bool(cp))
        async with working_on(ctx, row):
            await ctx.save_checkpoint({"vm_id": vm.id})
            await _move_all(h, moves)
            state = VMState.TEMPLATE if vm.is_template else (VMState.HIBERNATED if vm.hibernate_file else VMState.STOPPED)
            await svc.update(vm.id, recycled=None, purge_at=None, state=state)
            await _drop_recycle_dirs(h, vm)
        ctx.log(f"{vm.name} restored from the recycle bin")
        return {"vm": vm.name}

    async def rollback(self, ctx: TaskContext) -> None:
        """A restore cancelled half-way: the files it had moved out go back into the recycle bin, so the
        VM is whole there again (and may be restored or purged)."""
        cp = ctx.checkpoint or {}
        if not cp.get("vm_id"):
            return
        svc = VMService.of(ctx.engine)
        row = await svc.store.call(svc.store.vm_row, cp["vm_id"])
        if row is None or row["busy"] not in (None, ctx.id):
            return
        vm = VMSpec.from_dict(row["spec"])
        if not row["recycled"]:
            raise PermanentError(f"the restore of {vm.name} had finished; it is out of the recycle bin",
                                 f"delete it again if it should not be: ferry vm delete {vm.name} --delayed")
        h = svc.host(vm.host)
        # Only a file back in its place and gone from the bin is one this task moved out.
        moves = [(src, dst) for src, dst in await _bin_moves(h, vm) if not await h.exists(dst)]
        await _move_all(h, moves)
        await _drop_empty_dirs(h, vm)
        await svc.update(vm.id, busy=None)
        if moves:
            ctx.log(f"{vm.name} is whole in the recycle bin again: {len(moves)} file(s) moved back into it")


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
        if ctx.checkpoint is None:
            rows = await svc.expired() if ctx.params["vm"] == "*expired*" else \
                [await svc.find(ctx.params["vm"], recycled=True)]
            # Which ones: a resumed run purges the rest of them, not what expired since.
            await ctx.save_checkpoint({"vms": {r["id"]: r["name"] for r in rows}})
        names = ctx.checkpoint["vms"]
        purged = []
        for vm_id, name in names.items():
            row = await svc.store.call(svc.store.vm_row, vm_id)
            if row is not None and row["recycled"]:      # not purged yet, nor restored meanwhile
                vm = VMSpec.from_dict(row["spec"])
                async with working_on(ctx, row):
                    # Shown while its files go, as a delete is (a rerun or resume finishes it): a record
                    # half purged never looks restorable.
                    if row["state"] != VMState.DELETING:
                        await svc.update(vm.id, state=VMState.DELETING)
                    ctx.progress(item=f"purging {name}")
                    await _drop_recycle_dirs(svc.host(vm.host), vm, strict=True)
                    await svc.store.call(svc.store.vm_delete, vm.id)
                ctx.log(f"{name} purged from the recycle bin")
            purged.append(name)
        return {"purged": purged}

    async def rollback(self, ctx: TaskContext) -> None:
        """What a purge removed cannot come back: a VM it had begun to purge stays "deleting" (no longer
        held by the task), for a purge to finish; one it had not begun is left as it was."""
        svc = VMService.of(ctx.engine)
        begun = []
        for vm_id, name in ((ctx.checkpoint or {}).get("vms") or {}).items():
            row = await svc.store.call(svc.store.vm_row, vm_id)
            if row is not None and row["busy"] == ctx.id:
                await svc.update(vm_id, busy=None)
                if row["state"] == VMState.DELETING:
                    begun.append(name)
        if begun:
            raise PermanentError(f"the purge of {', '.join(begun)} had begun, so it stays 'deleting' in the recycle "
                                 f"bin; `ferry vm purge {begun[0]} --confirm {begun[0]}` finishes it")


async def _drop_recycle_dirs(h: HostOps, vm: VMSpec, *, strict: bool = False) -> None:
    """The VM's folder in the recycle bin of each datastore it used, with whatever is still in it.
    `strict` (a purge): a folder that could not be removed raises, the VM's record stays; else (the
    tidying after a delete or restore) it is left."""
    for ds in {h.datastore_of_path(path) for path in _files(vm)} - {None}:
        folder = str(PurePosixPath(ds.path) / RECYCLE_DIR / vm.id)
        try:
            await h.remove_tree(folder)
        except FerryError as e:
            if strict:
                raise PermanentError(f"the purge of {vm.name} could not remove {folder} on {h.name}: {e.message}",
                                     f"see what holds it (a mount, a read-only filesystem), then `ferry vm purge "
                                     f"{vm.name} --confirm {vm.name}` finishes it") from None
