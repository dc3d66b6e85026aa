"""`migration.test` (ferry migration test NAME): the test launch, before the window and as often as wanted.

A throw-away copy of the target boots from its own disk on an isolated network, its checks run, and the
result is recorded; the syncs go on untouched (the copy is made from the target's disks between rounds:
the task holds the migration's lock, so no round runs while the copy is taken), and the copy is removed
afterwards, however the task ends (its files are tracked as temporary).

1. In the receiver: the target made bootable as the cutover makes it (target.prepare_boot: fstab by UUID,
   the final address for the target's MAC) and its filesystems unmounted and flushed: the disks are clean.
   Block-level: first the source's committed chunk lists are dropped (blocksync.forget_lists), so the
   next round compares the source with the target's own chunks and puts back what this step changed.
2. Each target disk copied (`qemu-img convert -U`: a full, independent copy, never a backing chain on a
   disk the receiver keeps writing); then step 1 taken back (target.revert_boot), so the sync rounds go
   on over the source's own files.
3. The copy boots the live image's kernel into its root (as the target will) with the target's MAC on a
   restricted user-mode NIC: it has the final address, but nothing outside its own QEMU can reach it or
   be reached from it. No address conflict, no write to anything real.
4. Checks through the guest agent (no network needed): the agent answers (the boot's duration is
   measured to it), the plan's services are active, and the check ports listen.
5. The copy stopped and removed; the result recorded: passed makes a syncing migration ready for cutover;
   the boot and check durations feed the cutover's predicted downtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..platform.liveboot import LiveDisk, LiveNic, LiveRole, launch, live_boot_argv, stop as stop_process
from ..tasks import TaskContext, register
from ..vm.model import VMSpec
from ..vm.service import VMService
from . import blocksync
from . import target as tgt
from .model import Method, Migration, MigrationState
from .prepare import receiver_transport
from .service import MigrationKind, ensure_idle, load, source_transport

BOOT_TIMEOUT = 300.0
CHECK_TIMEOUT = 120.0
TESTABLE = (MigrationState.SYNCING, MigrationState.READY)


def _precheck(mig: Migration) -> None:
    if mig.state not in TESTABLE:
        raise Refused(f"migration {mig.name} is {mig.state}: a test launch needs a synced target",
                      f"ferry migration sync {mig.name}" if mig.state == MigrationState.TARGET_PREPARED
                      else f"ferry migration show {mig.name}")
    if mig.target is None:
        raise Refused(f"migration {mig.name} has no prepared target", f"ferry migration prepare {mig.name}")
    tgt.root_device(mig)        # (block-level: refused when the source's / is not on a plain partition)


@register
class TestLaunch(MigrationKind):
    name = "migration.test"
    max_retries = 0
    verb = "test-launch"
    usage = "ferry migration test NAME"

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        _precheck(await load(svc.store, params["migration"]))
        await ensure_idle(svc.store, params["migration"], self.name)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        mig = await load(svc.store, ctx.params["migration"])
        _precheck(mig)
        await ensure_idle(svc.store, mig.name, self.name, ctx.id)
        row = await svc.store.call(svc.store.vm_row, mig.target.vm_id)
        if row is None:
            raise PermanentError(f"the target VM {mig.target.vm} of {mig.name} is gone",
                                 "roll the migration back and prepare it again")
        vm = VMSpec.from_dict(row["spec"])
        h = svc.host(vm.host)
        mac = h.nics(vm)[0].mac
        # An id of its own (its QEMU's name, pid file and sockets come from the id's first 8 digits).
        copy = replace(vm, id=hashlib.sha256(f"{vm.id}-test".encode()).hexdigest()[:32], name=f"{vm.name}-test")
        await _remove_copy(ctx, h, copy)            # a run killed before left one behind

        ctx.progress(measured=False, item="making the target bootable in the receiver", units_done=0, units_total=4)
        if mig.target.method == Method.BLOCK:
            # Before the target's disk is written outside a round: the next round's base becomes the target's
            # own chunks (it puts back every chunk this launch changed).
            src = source_transport(svc.pool, mig)
            try:
                await blocksync.forget_lists(src, mig)
            finally:
                await src.close()
        rt = receiver_transport(svc, mig.target)
        try:
            address = tgt.final_interface(mig, mig.target.prefix)
            await tgt.prepare_boot(rt, mig, mac, address, mig.spec.final.gateway)
        finally:
            await rt.close()

        disks = []
        try:
            for i, d in enumerate(vm.disks):
                path = str(PurePosixPath(d.path).with_name(f".{PurePosixPath(d.path).stem}.test-copy.qcow2"))
                ctx.progress(item=f"copying {d.name}", units_done=1)
                await ctx.track(h.name, path)
                await h.qemu_img("convert", "-U", "-O", "qcow2", d.path, path, timeout=3600)
                disks.append(LiveDisk(path, "qcow2", d.bus))
        finally:
            rt = receiver_transport(svc, mig.target)
            try:
                await tgt.revert_boot(rt, mig)      # the target's tree is the source's again for the syncs
            finally:
                await rt.close()

        ctx.progress(item=f"booting the copy {copy.name} (isolated)", units_done=2)
        image = await h.live_image(await svc.image())
        accel, _ = await svc.accel(h, image)
        argv = live_boot_argv(image, paths=h.paths(copy), role=LiveRole.BOOT_DISK, accel=accel,
                              memory_mb=vm.memory_mb, cpus=vm.cpus, disks=disks, nics=[LiveNic(mac=mac)],
                              params={"hostname": copy.name, "root": tgt.root_device(mig), "root_wait": 3},
                              cpu=h.spec.cpu_model)
        started = time.monotonic()
        await launch(h.t, argv, h.paths(copy))
        try:
            if not await tgt.agent_answers(svc, copy, timeout=BOOT_TIMEOUT):
                raise PermanentError(f"the test copy of {mig.name} booted, but its guest agent did not answer within "
                                     f"{BOOT_TIMEOUT:g} s", f"see its serial log {h.paths(copy).serial}")
            # booted as the cutover counts it: until its sshd listens (the cutover waits for SSH)
            await _until_listening(svc, copy, 22, started + BOOT_TIMEOUT)
            boot_s = time.monotonic() - started
            ctx.progress(item="checking the copy", units_done=3)
            checked = time.monotonic()
            result = await _checks(svc, copy, mig)
            checks_s = time.monotonic() - checked
            ctx.progress(item="rehearsing the cutover's steps in the copy: hypervisor tools, guest agent")
            rehearsed = await _rehearse(svc, copy, mig)
        finally:
            await _remove_copy(ctx, h, copy, [d.path for d in disks])
        passed = result["ok"] and rehearsed["ok"]
        test = {"at": time.time(), "passed": passed, "boot_s": round(boot_s, 1), "checks_s": round(checks_s, 1),
                "tools_s": rehearsed["tools_s"], "agent_s": rehearsed["agent_s"], "tools": rehearsed["tools"],
                "agent": rehearsed["agent"], "services": result["services"], "ports": result["ports"], "task": ctx.id}
        to = MigrationState.READY if passed else MigrationState.SYNCING
        await svc.store.call(svc.store.migration_tested, mig.name, test, to=to.value,
                             allowed_from=tuple(s.value for s in TESTABLE))
        ctx.log(f"test launch {'passed' if passed else 'FAILED'}: booted in {boot_s:.0f} s; "
                + ", ".join([f"{s} {v}" for s, v in result["services"].items()]
                            + [f"port {p} {'listens' if o else 'closed'}" for p, o in result["ports"].items()]
                            + [f"hypervisor tools: {rehearsed['tools']} ({rehearsed['tools_s']:.0f} s)",
                               f"guest agent: {rehearsed['agent']} ({rehearsed['agent_s']:.0f} s)"]),
                "info" if passed else "warning")
        ctx.progress(item="passed" if passed else "failed", units_done=4)
        return {"migration": mig.name, **test}


async def _checks(svc: VMService, copy: VMSpec, mig: Migration) -> dict[str, Any]:
    """The plan's services active and the check ports listening in the copy (through its agent), waiting
    for them up to CHECK_TIMEOUT."""
    ports = tgt.check_ports(mig)
    deadline = time.monotonic() + CHECK_TIMEOUT
    while True:
        try:
            async with await svc.agent(copy, timeout=5.0) as ga:
                active: dict[str, str] = {}
                if mig.spec.services:
                    r = await ga.exec("/bin/systemctl", ["is-active", *mig.spec.services], timeout=30)
                    states = r.stdout.decode(errors="replace").split()
                    active = dict(zip(mig.spec.services, states + ["unknown"] * len(mig.spec.services)))
        except FerryError:
            active = {s: "unknown" for s in mig.spec.services}
        listening = await _listening_now(svc, copy)
        opened = {p: p in listening for p in ports}
        ok = all(v == "active" for v in active.values()) and all(opened.values())
        if ok or time.monotonic() > deadline:
            return {"ok": ok, "services": active, "ports": opened}
        await asyncio.sleep(2.0)


async def _listening_now(svc: VMService, copy: VMSpec) -> set[int]:
    try:
        async with await svc.agent(copy, timeout=5.0) as ga:
            r = await ga.exec("/bin/sh", ["-c", "ss -Hltn 2>/dev/null || cat /proc/net/tcp /proc/net/tcp6"], timeout=30)
            return _listening(r.stdout.decode(errors="replace"))
    except FerryError:
        return set()


async def _until_listening(svc: VMService, copy: VMSpec, port: int, deadline: float) -> None:
    """Until `port` listens in the copy (or the deadline: the checks then say what is missing)."""
    while port not in await _listening_now(svc, copy) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


async def _rehearse(svc: VMService, copy: VMSpec, mig: Migration) -> dict[str, Any]:
    """The cutover's steps on the target's own system, done in the copy to see them work and measure them:
    the old hypervisor's tools purged (target.PURGE) and the guest agent installed and enabled
    (target.AGENT), through the copy's agent (its network is isolated: no package source, as in many
    windows). What they did, and how long each took."""
    out: dict[str, Any] = {"ok": True}
    for key, script, args in (("tools", tgt.PURGE, tgt.tool_packages(mig)), ("agent", tgt.AGENT, [])):
        began = time.monotonic()
        try:
            async with await svc.agent(copy, timeout=10.0) as ga:
                r = await ga.exec("/bin/sh", ["-c", script, f"ferry-{key}", *args], timeout=600)
            text = r.stdout.decode(errors="replace")
            if r.exitcode != 0:
                err = r.stderr.decode(errors="replace").strip().splitlines()
                out[key], out["ok"] = f"failed: {err[-1] if err else f'exit status {r.exitcode}'}", False
            elif key == "tools":
                gone = tgt.purged(text)
                out[key] = f"purged {', '.join(gone)}" if gone else "none installed"
            else:
                out[key] = "present" if tgt.agent_present(text) else "missing (no package source)"
            if key == "agent" and not await tgt.agent_answers(svc, copy, timeout=60):
                out[key], out["ok"] = "does not answer after its restart", False
        except FerryError as e:
            out[key], out["ok"] = f"failed: {e.message}", False
        out[f"{key}_s"] = round(time.monotonic() - began, 1)
    return out


def _listening(text: str) -> set[int]:
    """Ports in `ss -Hltn` output (Local Address:Port is the 4th column), or /proc/net/tcp's (state 0A)."""
    ports = set()
    for line in text.splitlines():
        w = line.split()
        if len(w) >= 4 and w[0] == "LISTEN":
            ports.add(int(w[3].rsplit(":", 1)[1]))
        elif len(w) >= 4 and w[3] == "0A" and ":" in w[1]:
            ports.add(int(w[1].rsplit(":", 1)[1], 16))
    return ports


async def _remove_copy(ctx: TaskContext, h, copy: VMSpec, paths: list[str] | None = None) -> None:
    """The copy's QEMU stopped and its disk copies removed (those given, and any the task tracked)."""
    if await h.pid(copy) is not None:
        await stop_process(h.t, h.paths(copy).pidfile)
    tracked = [f["path"] for f in await ctx.tracked() if f["host"] == h.name]
    for p in dict.fromkeys([*(paths or []), *tracked]):
        await h.run(["rm", "-f", p], what="rm")
        await ctx.untrack(h.name, p)
