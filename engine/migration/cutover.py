"""`migration.cutover` (ferry migration cutover NAME --confirm NAME): the runbook of the source notes (E8).

Steps, in order; each is checkpointed when done, checked, and idempotent, so a killed engine resumes at
the step it was in (`ferry task resume ID`, or the engine's own resume at start):

  final_sync      final incremental sync while the source runs
  arm             the go-live timer armed on the source (commit confirmed): unless Ferry confirms go-live
                  within the plan's cutover.confirm_within, the source puts its address back and starts
                  its services by itself (a lost connection or a dead engine never strands it offline)
  stop_services   the plan's services stopped on the source (those that were active)
  offline_sync    final offline sync: downtime starts with the services' stop
  park            the source off its service address, at the plan's park address (Ferry's control path)
  switch_boot     in the receiver: fstab by UUID, the final address, the pull key out; disks unmounted;
                  the receiver stopped and the target started from its own disk
  start_target    the target answers SSH at the final address and is the target (its MAC)
  remove_tools    the old hypervisor's tool packages purged (V2V)
  guest_agent     qemu-guest-agent installed (from the target's package sources when missing), started,
                  and it answers the host
  final_address   the final address (and gateway) on the target's NIC, announced (gratuitous ARP)
  check_service   the plan's services active and the check ports open at the final address
  go_live         the timer disarmed on the source (go-live confirmed); measured downtime recorded

A failing step (or a cancel) rolls back: the target stopped, the source's restore script run at once
(address back, park address gone, services started, timer disarmed); the migration `rolled_back`. Nothing
on the source is ever deleted. After go_live there is no rollback: `ferry migration finalize`.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .. import api, fmt
from ..errors import FerryError, PermanentError, Refused
from ..platform.liveboot import stop as stop_process
from ..tasks import TaskContext, register
from ..vm import nics
from ..vm.lifecycle import _launched
from ..vm.model import VMSpec, VMState
from ..vm.service import VMService
from . import blocksync
from . import source as src_ops
from . import sync as sync_ops
from . import target as tgt
from .model import Method, Migration, MigrationState
from .netcheck import NetCheck
from .prepare import receiver_transport
from .service import MigrationKind, ensure_idle, load, source_transport

BOOT_TIMEOUT = 300.0        # the target's first boot under TCG, with its services
CHECK_TIMEOUT = 120.0
# The switch: the source parked (a command, and Ferry's SSH to it again at the park address) and the
# receiver stopped, QEMU started from the target's disk; bench/migration.py measured 7.0 s in the lab.
SWITCH_GUESS_S = 7.0
BOOT_GUESS_S = 60.0         # without a test launch to measure it
TOOLS_GUESS_S = 30.0
AGENT_GUESS_S = 10.0
CHECKS_GUESS_S = 10.0


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    rollback: str


STEPS: tuple[Step, ...] = (
    Step("final_sync", "final incremental sync while the source runs", "nothing to undo: the source still runs"),
    Step("arm", "arm the go-live timer on the source", "the timer disarmed"),
    Step("stop_services", "stop the source's services", "the services started again"),
    Step("offline_sync", "final offline sync", "nothing to undo on the source"),
    Step("park", "take the source off the network", "the source's address back, the park address removed"),
    Step("switch_boot", "switch the target to boot from its disk", "the target stopped"),
    Step("start_target", "start the target and check it", "the target stopped"),
    Step("remove_tools", "remove the old hypervisor's tools", "the target stopped"),
    Step("guest_agent", "install and enable the guest agent", "the target stopped"),
    Step("final_address", "give the target its final address", "the target stopped"),
    Step("check_service", "check the service", "the target stopped"),
    Step("go_live", "go live", "none: after go-live, finalize"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def predicted_downtime(mig: Migration) -> dict[str, Any]:
    """The downtime the cutover should cost, in parts: the final offline sync (what changes while the
    online final sync runs, at the measured throughput, plus a round's fixed walk), the switch (the
    source parked, the receiver stopped: a guess, calibrated by bench/migration.py), the target's boot,
    the old hypervisor's tools removed, the guest agent enabled and the checks (each as the last test
    launch measured it in its copy, else a guess, said so)."""
    offline = sync_ops.predicted_final_sync_s(mig, offline=True)
    tested = mig.test or {}

    def measured(key: str, guess: float) -> float:
        v = tested.get(key)
        return float(v) if v is not None else guess

    parts = {"final_sync_s": offline, "switch_s": SWITCH_GUESS_S,
             "boot_s": measured("boot_s", BOOT_GUESS_S),
             "tools_s": measured("tools_s", TOOLS_GUESS_S if tgt.tool_packages(mig) else 0.0),
             "agent_s": measured("agent_s", AGENT_GUESS_S),
             "checks_s": measured("checks_s", CHECKS_GUESS_S)}
    total = sum(v for v in parts.values() if v is not None)
    return {"total_s": round(total, 1), "parts": {k: (round(v, 1) if v is not None else None) for k, v in parts.items()},
            "boot_measured": tested.get("boot_s") is not None}


def summary(mig: Migration) -> dict[str, Any]:
    """What the confirmation screen shows before the first step (and the CLI prints before --confirm)."""
    now = time.time()
    nc = (mig.assessment or {}).get("netcheck")
    return {
        "migration": mig.name, "state": str(mig.state), "round": mig.round,
        "last_sync_age_s": round(now - mig.last_sync, 1) if mig.last_sync else None,
        "bytes_changed_since": sync_ops.changed_bytes(mig),
        "predicted_downtime": predicted_downtime(mig),
        "test": mig.test,
        "network": api.convert(nc, NetCheck).line if nc else None,
        "blockers": [api.to_builtins(b) for b in mig.blockers],
        "warnings": [api.to_builtins(w) for w in mig.warnings],
        "steps": [{"name": s.name, "title": s.title, "rollback": s.rollback} for s in STEPS],
    }


def dhcp_warning(name: str, address: str, lease_s: int) -> str:
    """What an operator must know when the address the target takes is a DHCP lease of the source: the
    park's guard keeps it off the parked source (source._GUARD), but the DHCP server still counts it the
    source's lease and may hand it to another machine once it expires, while the target holds it."""
    return (f"the source's address {address} is a DHCP lease ({fmt.duration(lease_s)} left): the DHCP server may "
            f"give it to another machine once the lease expires, while the target holds it: reserve it for the "
            f"target's MAC on the DHCP server, and finalize soon after go-live (ferry migration finalize {name} "
            "shuts the source down)")


def _precheck(mig: Migration) -> None:
    if mig.state not in (MigrationState.READY, MigrationState.CUTTING_OVER):
        hint = (f"ferry migration test {mig.name} (a passing test launch makes it ready)"
                if mig.state == MigrationState.SYNCING else f"ferry migration show {mig.name}")
        raise Refused(f"migration {mig.name} is {mig.state}: a cutover starts once it is ready", hint)
    if mig.blockers:
        raise Refused(f"migration {mig.name} has blockers: {', '.join(b.name for b in mig.blockers)}",
                      f"ferry migration report {mig.name}")
    if mig.target is None:
        raise Refused(f"migration {mig.name} has no prepared target", f"ferry migration prepare {mig.name}")
    tgt.root_device(mig)        # (block-level: refused when the source's / is not on a plain partition)
    final_ip = tgt.final_interface(mig, None).split("/")[0]
    if final_ip == mig.spec.source.address and not mig.spec.cutover.park_address:
        raise Refused(f"migration {mig.name}: the target takes over {final_ip}, the address Ferry reaches the "
                      "source at, and the plan gives the source no park address",
                      f"add [migrations.{mig.name}.cutover] park_address = \"ADDRESS/PREFIX\" (a free address on "
                      "the source's network: Ferry's way to the source until go-live)")


@register
class Cutover(MigrationKind):
    name = "migration.cutover"
    max_retries = 0
    verb = "cut over"
    usage = "ferry migration cutover NAME --confirm NAME"
    rollback_on_failure = True      # a step that fails brings the source back

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if params.get("confirm") != params["migration"]:
            raise PermanentError(f"a cutover of {params['migration']} is confirmed by typing its name",
                                 f"ferry migration cutover {params['migration']} --confirm {params['migration']}")
        for step in params.get("pause_before") or ():
            if step not in STEP_NAMES[1:]:
                raise PermanentError(f"--pause-before {step}: no such step of a cutover after the first",
                                     f"one of {', '.join(STEP_NAMES[1:])}")

    def title(self, params: dict[str, Any]) -> str:
        return f"cut {params['migration']} over"

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        _precheck(await load(svc.store, params["migration"]))
        await ensure_idle(svc.store, params["migration"], self.name)

    # -------------------------------------------------------------- the run

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        name = ctx.params["migration"]
        mig = await load(svc.store, name)
        _precheck(mig)
        await ensure_idle(svc.store, name, self.name, ctx.id)
        cp: dict[str, Any] = dict(ctx.checkpoint or {"done": []})
        if mig.state == MigrationState.READY:
            await self._record(svc, mig, cp, to=MigrationState.CUTTING_OVER)
        run = _Run(ctx, svc, mig, cp)
        try:
            for i, step in enumerate(STEPS):
                if step.name in cp["done"]:
                    continue
                if step.name in (ctx.params.get("pause_before") or ()) and step.name not in cp.get("paused", []):
                    await self._pause(ctx, mig, cp, i, step)
                if "arm" in cp["done"] and step.name != "go_live":
                    await run.timer_holds()
                ctx.progress(measured=False, item=step.title, units_done=i, units_total=len(STEPS))
                cp.setdefault("started", {})[step.name] = time.time()
                await ctx.save_checkpoint(cp)       # a rollback knows the step began (arm: undo it)
                await self._record(svc, mig, cp)
                detail = await getattr(run, step.name)()
                cp["done"].append(step.name)
                cp.setdefault("ended", {})[step.name] = time.time()
                if detail:
                    cp.setdefault("detail", {})[step.name] = detail
                    ctx.log(f"{step.title}: {detail}")
                await ctx.save_checkpoint(cp)
                await self._record(svc, mig, cp)
        finally:
            await run.close()
        downtime = cp["ended"]["check_service"] - cp["downtime_from"]
        cp["measured_downtime_s"] = round(downtime, 1)
        await self._record(svc, mig, cp, to=MigrationState.CUT_OVER)
        ctx.progress(item="live", units_done=len(STEPS), units_total=len(STEPS))
        return {"migration": name, "measured_downtime_s": cp["measured_downtime_s"],
                "predicted_downtime": cp.get("predicted"), "address": run.final_ip}

    async def _pause(self, ctx: TaskContext, mig: Migration, cp: dict[str, Any], i: int, step: Step) -> None:
        """The operator asked to stop before this step (--pause-before): the task waits until the
        migration's name is typed again (`ferry task confirm ID NAME`, or the console); a rollback
        cancels it instead. The source's go-live timer runs on meanwhile."""
        ctx.progress(measured=False, item=f"paused before step {i + 1}: {step.title}", units_done=i,
                     units_total=len(STEPS))
        timer = (f"; the source's go-live timer brings it back {fmt.duration(mig.spec.cutover.confirm_within_s)} "
                 "after it was last armed" if "arm" in cp["done"] else "")
        await ctx.confirm(f"the cutover of {mig.name} stopped before step {i + 1} ({step.title}){timer}: type "
                          f"{mig.name} to go on, or roll back", mig.name)
        cp.setdefault("paused", []).append(step.name)
        await ctx.save_checkpoint(cp)

    async def _record(self, svc: VMService, mig: Migration, cp: dict[str, Any], *, to: MigrationState | None = None
                      ) -> None:
        """The cutover's state as the console and `show --json` see it (and a state change, audited)."""
        now = time.time()
        steps = []
        for s in STEPS:
            started, ended = cp.get("started", {}).get(s.name), cp.get("ended", {}).get(s.name)
            state = "done" if s.name in cp["done"] else "running" if started else "pending"
            steps.append({"name": s.name, "title": s.title, "state": state, "started": started, "ended": ended,
                          "detail": cp.get("detail", {}).get(s.name)})
        cp.setdefault("predicted", predicted_downtime(mig))
        record = {"steps": steps, "step": next((i for i, s in enumerate(steps) if s["state"] != "done"), len(steps)),
                  "predicted_downtime": cp["predicted"], "downtime_from": cp.get("downtime_from"),
                  "measured_downtime_s": cp.get("measured_downtime_s"), "updated": now}
        await svc.store.call(svc.store.migration_cutover, mig.name, record, to=str(to) if to else None,
                             allowed_from=(MigrationState.READY.value, MigrationState.CUTTING_OVER.value))

    async def rollback(self, ctx: TaskContext) -> None:
        """Before go-live: the target stopped (its QEMU killed: it may hold the source's address), then the
        source restored (at its park address or its own) and the migration rolled_back."""
        svc = VMService.of(ctx.engine)
        mig = await load(svc.store, ctx.params["migration"])
        cp = dict(ctx.checkpoint or {"done": []})
        if "go_live" in cp["done"] or mig.state != MigrationState.CUTTING_OVER:
            return
        await stop_target(ctx, svc, mig)
        if "arm" in cp.get("started", {}):          # before it, nothing on the source changed
            await restore_source(ctx, svc, mig)
        await svc.store.call(svc.store.migration_cutover, mig.name,
                             {**(mig.cutover or {}), "rolled_back": time.time()}, to=MigrationState.ROLLED_BACK.value,
                             allowed_from=(MigrationState.CUTTING_OVER.value,))
        ctx.log(f"{mig.name} rolled back: the source runs its services at {mig.spec.source.address} again")


async def stop_target(ctx: TaskContext, svc: VMService, mig: Migration) -> None:
    if mig.target is None:
        return
    row = await svc.store.call(svc.store.vm_row, mig.target.vm_id)
    if row is None:
        return
    vm = VMSpec.from_dict(row["spec"])
    h = svc.host(vm.host)
    if await _launched(h, vm) is not None:
        await stop_process(h.t, h.paths(vm).pidfile)
        ctx.log(f"the target {vm.name} stopped")
    await svc.update(vm.id, state=VMState.STOPPED)


async def restore_source(ctx: TaskContext, svc: VMService, mig: Migration) -> None:
    """The source's restore script run now, reached at its park address when parked, else its own."""
    errors = []
    async with _source_paths(svc, mig) as paths:
        for t in paths:
            try:
                await src_ops.restore_now(t, mig.name)      # closes t
                ctx.log(f"the source's restore script runs (reached at {t.spec.address})")
                break
            except FerryError as e:
                errors.append(f"{t.spec.address}: {e.message}")
        else:
            raise PermanentError(f"the source of {mig.name} could not be restored: {'; '.join(errors)}",
                                 "its go-live timer restores it by itself when it runs out; or restore it on its "
                                 f"console: sh /var/lib/ferry-migration/{mig.name}/restore.sh")
    t = source_transport(svc.pool, mig)
    try:
        done = await src_ops.wait_restored(t, mig.name)
    finally:
        await t.close()
    if done.failures:
        ctx.log(f"the source's restore script had {done.failures} failing step(s): {done.log}", "warning")


@asynccontextmanager
async def _source_paths(svc: VMService, mig: Migration) -> AsyncIterator[list]:
    """Transports to the source: at its park address (when the plan has one), then at its own; all
    closed on leaving."""
    out = []
    try:
        if mig.spec.cutover.park_address:
            out.append(await src_ops.park_transport(source_transport(svc.pool, mig), mig.name,
                                                    mig.spec.cutover.park_address))
        out.append(source_transport(svc.pool, mig))
        yield out
    finally:
        for t in out:
            await t.close()


class _Run:
    """The steps of one run of the cutover task (each returns a one-line detail for the log)."""

    def __init__(self, ctx: TaskContext, svc: VMService, mig: Migration, cp: dict[str, Any]) -> None:
        self.ctx, self.svc, self.mig, self.cp = ctx, svc, mig, cp
        self._src = None
        self._tgt = None
        self.final_ip = tgt.final_interface(mig, cp.get("prefix")).split("/")[0]

    async def close(self) -> None:
        for t in (self._src, self._tgt):
            if t is not None:
                await t.close()

    async def _vm(self) -> VMSpec:
        row = await self.svc.store.call(self.svc.store.vm_row, self.mig.target.vm_id)
        if row is None:
            raise PermanentError(f"the target VM {self.mig.target.vm} of {self.mig.name} is gone",
                                 "roll the migration back and prepare it again")
        return VMSpec.from_dict(row["spec"])

    async def source(self):
        """The source over SSH: at its own address until it is parked, then at the park address."""
        if self._src is None:
            self._src = source_transport(self.svc.pool, self.mig)
            if "park" in self.cp["done"]:
                self._src = await src_ops.park_transport(self._src, self.mig.name, self.mig.spec.cutover.park_address)
        return self._src

    async def timer_holds(self) -> None:
        """Between steps, once armed: the go-live timer has not run out (else the source restored itself
        and the cutover cannot go on: it rolls back), and it is armed again for its full time, so it only
        runs out when Ferry stops coming back."""
        try:
            t = await self.source()
            left = await src_ops.armed(t, self.mig.name)
        except FerryError as e:     # (a connection that failed comes wrapped: "reading the go-live timer: ...")
            if "park" not in self.cp["done"]:
                raise
            await self._back_by_itself(e)
            raise
        if left is None:
            raise PermanentError(f"the go-live timer of {self.mig.name} ran out: the source restored itself",
                                 "the cutover rolls back; run it again, with a longer cutover.confirm_within if "
                                 "its steps take longer")
        await src_ops.arm(t, self.mig.name, self.mig.spec.cutover.confirm_within_s)

    async def _back_by_itself(self, e: FerryError) -> None:
        """Parked, the source does not answer at its park address: when it answers at its own again, its
        go-live timer ran out (it restored itself): the cutover cannot go on, it rolls back."""
        own = source_transport(self.svc.pool, self.mig)
        try:
            await own.run(["true"], timeout=30, check=True)
        except FerryError:
            return
        finally:
            await own.close()
        raise PermanentError(f"the go-live timer of {self.mig.name} ran out: the source restored itself (it answers "
                             f"at {self.mig.spec.source.address} again, not at its park address: {e.message})",
                             "the cutover rolls back; run it again, with a longer cutover.confirm_within if its "
                             "steps take longer") from None

    def target(self):
        if self._tgt is None:
            self._tgt = tgt.target_transport(self.svc, self.mig, self.final_ip)
        return self._tgt

    async def final_sync(self) -> str:
        r = await sync_ops.run_round(self.ctx, self.svc, self.mig, label="final online sync")
        return sync_ops.describe(r)

    async def arm(self) -> str:
        t = await self.source()
        net = await src_ops.network_facts(t, self.mig.name, self.mig.spec.source.address)
        self.cp["net"] = api.to_builtins(net)
        self.cp["prefix"] = net.prefix
        gw = next((r.gateway for r in net.routes if r.dst == "default"), None)
        self.cp["gateway"] = gw
        self.final_ip = tgt.final_interface(self.mig, net.prefix).split("/")[0]
        if net.lease_s is not None and self.final_ip == net.address:
            self.ctx.log(dhcp_warning(self.mig.name, net.address, net.lease_s), "warning")
        await src_ops.arm(t, self.mig.name, self.mig.spec.cutover.confirm_within_s)
        return f"the source restores itself in {self.mig.spec.cutover.confirm_within_s} s unless go-live is confirmed"

    async def stop_services(self) -> str:
        self.cp.setdefault("downtime_from", time.time())
        await self.ctx.save_checkpoint(self.cp)
        done = await src_ops.stop_services(await self.source(), self.mig.name, self.mig.spec.services)
        return f"stopped: {', '.join(done.active) or 'none (none was active)'}"

    async def offline_sync(self) -> str:
        r = await sync_ops.run_round(self.ctx, self.svc, self.mig, label="final offline sync")
        return sync_ops.describe(r)

    async def park(self) -> str:
        t = await self.source()
        self._src = None
        _, self._src = await src_ops.park(t, self.mig.name, self.mig.spec.source.address,
                                          self.mig.spec.cutover.park_address)
        return f"the source left {self.mig.spec.source.address}; Ferry reaches it at {self.mig.spec.cutover.park_address}"

    async def switch_boot(self) -> str:
        vm = await self._vm()
        h = self.svc.host(vm.host)
        mac = h.nics(vm)[0].mac
        role = await tgt.qemu_role(h, vm)
        kind = self.cp.get("net_kind")
        if role == "receiver":
            address = tgt.final_interface(self.mig, self.cp.get("prefix"))
            gateway = self.mig.spec.final.gateway or self.cp.get("gateway")
            if self.mig.target.method == Method.BLOCK:
                # before the target's disk is written outside a round (a round after a rollback compares
                # the source with the target's own chunks)
                await blocksync.forget_lists(await self.source(), self.mig)
            rt = receiver_transport(self.svc, self.mig.target)
            try:
                kind = await tgt.prepare_boot(rt, self.mig, mac, address, gateway)
            finally:
                await rt.close()
            self.cp["net_kind"] = kind
            await self.ctx.save_checkpoint(self.cp)
        if kind == "none":
            self.ctx.log("the source's network setup is neither systemd-networkd nor ifupdown: its final address "
                         "was not written; the check at the final address will fail", "warning")
        self.cp["boot_from"] = time.time()
        root = tgt.root_device(self.mig)
        await tgt.boot_from_disk(self.ctx, self.svc, vm, root if root != "/dev/vda1" else None)
        return (f"fstab by UUID, final address via {kind}; {vm.name} boots its root from {root} with the live "
                "image's kernel and initramfs (direct kernel boot)")

    async def start_target(self) -> str:
        vm = await self._vm()
        mac = self.svc.host(vm.host).nics(vm)[0].mac
        await tgt.wait_target(self.target(), mac, self.final_ip, timeout=BOOT_TIMEOUT,
                              progress=lambda last: self.ctx.progress(item=f"waiting for the target: {last}"),
                              between=lambda: self._announce(vm))
        took = time.time() - self.cp.get("boot_from", time.time())
        return f"the target answers SSH at {self.final_ip} ({took:.0f} s after its start)"

    async def remove_tools(self) -> str:
        gone = await tgt.remove_tools(self.target(), tgt.tool_packages(self.mig))
        return f"purged {', '.join(gone)}" if gone else "no hypervisor tools installed"

    async def guest_agent(self) -> str:
        present = await tgt.enable_agent(self.target())
        vm = await self._vm()
        if not present:
            self.ctx.log("qemu-guest-agent is not installed on the target and could not be installed from its "
                         "package sources: install it later", "warning")
            return "not installed (no package source)"
        if not await tgt.agent_answers(self.svc, vm, timeout=60):
            raise PermanentError(f"the guest agent of {vm.name} does not answer", "see the target's journal")
        return "qemu-guest-agent runs and answers"

    async def final_address(self) -> str:
        r = await self.target().run(["ip", "-o", "-4", "addr", "show"], timeout=30, check=True)
        if f" {self.final_ip}/" not in r.text():
            raise PermanentError(f"the target does not have {self.final_ip}", r.text().strip())
        # The neighbours (a router above all) still map the address to the source's MAC: the target's
        # NIC announces itself (gratuitous ARP from the guest's own kernel), as after a live migration.
        failed = await self._announce(await self._vm())
        if failed:
            self.ctx.log(f"the target's NIC could not announce {self.final_ip} ({failed}): neighbours learn its "
                         "MAC when their ARP entries expire", "warning")
            return f"{self.final_ip} on the target (not announced)"
        return f"{self.final_ip} on the target, announced to its neighbours"

    async def _announce(self, vm) -> str | None:
        """The target's NICs announced (nics.announce): None, or why not. While the target boots, the
        guest has no address yet and only the switches learn (harmless, cheap)."""
        try:
            async with await self.svc.qmp(vm) as q:
                await nics.announce(q)
        except (FerryError, OSError, TimeoutError) as e:
            return getattr(e, "message", None) or str(e) or type(e).__name__
        return None

    async def check_service(self) -> str:
        res = await tgt.check_service(self.target(), self.mig, self.final_ip, timeout=CHECK_TIMEOUT,
                                      progress=lambda what: self.ctx.progress(item=f"check: {what}"))
        if not res["ok"]:
            bad = [f"{s} {v}" for s, v in res["services"].items() if v != "active"] + \
                  [f"port {p} closed" for p, o in res["ports"].items() if not o]
            raise PermanentError(f"the service check of {self.mig.name} failed: {', '.join(bad)}",
                                 "the cutover rolls back; see the target's journal")
        return ", ".join([f"{s} active" for s in res["services"]] + [f"port {p} open" for p in res["ports"]]) or "ok"

    async def go_live(self) -> str:
        await src_ops.disarm(await self.source(), self.mig.name)
        return "go-live confirmed: the source's timer disarmed; the source stays parked with its services stopped"


# ------------------------------------------------------------------ rollback and finalize on their own

@register
class Rollback(MigrationKind):
    """`ferry migration rollback NAME` when no cutover task runs (a running one is cancelled instead, and
    its own rollback runs): a migration cutting over gets the cutover's rollback; one before its
    cutover (prepared, syncing, ready) is given up: Ferry's pull key and folder leave the source, the
    target is stopped. Nothing on the source is deleted."""
    name = "migration.rollback"
    max_retries = 0
    verb = "roll back"
    usage = "ferry migration rollback NAME"
    FROM = (MigrationState.TARGET_PREPARED, MigrationState.INITIAL_SYNC, MigrationState.SYNCING,
            MigrationState.READY, MigrationState.CUTTING_OVER)

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        mig = await load(svc.store, params["migration"])
        await ensure_idle(svc.store, mig.name, self.name, params.get("_task"))
        if mig.state not in self.FROM:
            raise Refused(f"migration {mig.name} is {mig.state}: there is nothing to roll back"
                          if mig.state != MigrationState.CUT_OVER else
                          f"migration {mig.name} went live: it is not rolled back, it is finalized",
                          f"ferry migration show {mig.name}" if mig.state != MigrationState.CUT_OVER
                          else f"ferry migration finalize {mig.name}")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        mig = await load(svc.store, ctx.params["migration"])
        await self.check(svc, {**ctx.params, "_task": ctx.id})
        await stop_target(ctx, svc, mig)
        if mig.state == MigrationState.CUTTING_OVER:
            await restore_source(ctx, svc, mig)
        t = source_transport(svc.pool, mig)
        try:
            await sync_ops.remove_pull_key(t, mig.name)
            await src_ops.cleanup(t, mig.name)
        finally:
            await t.close()
        await svc.store.call(svc.store.migration_cutover, mig.name, {**(mig.cutover or {}), "rolled_back": time.time()},
                             to=MigrationState.ROLLED_BACK.value, allowed_from=tuple(s.value for s in self.FROM))
        return {"migration": mig.name, "from": str(mig.state), "source": mig.spec.source.address}


@register
class Finalize(MigrationKind):
    """`ferry migration finalize NAME` after go-live: Ferry's pull key and folder (snapshots, restore
    script, timer) leave the source, which is then shut down (parked, services stopped: it waits,
    intact, as the fallback of last resort) unless --keep-source-running. The migration is finalized."""
    name = "migration.finalize"
    max_retries = 0
    verb = "finalize"
    usage = "ferry migration finalize NAME"

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        mig = await load(svc.store, params["migration"])
        await ensure_idle(svc.store, mig.name, self.name, params.get("_task"))
        if mig.state != MigrationState.CUT_OVER:
            raise Refused(f"migration {mig.name} is {mig.state}: it is finalized once it has gone live",
                          f"ferry migration show {mig.name}")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        mig = await load(svc.store, ctx.params["migration"])
        await self.check(svc, {**ctx.params, "_task": ctx.id})
        async with _source_paths(svc, mig) as paths:
            t = paths[0]
            await sync_ops.remove_pull_key(t, mig.name)
            await src_ops.cleanup(t, mig.name)
            stopped = not ctx.params.get("keep_source_running")
            if stopped:
                # The connection goes with the source: no answer is expected.
                await t.run(["sh", "-c", "(sleep 1; systemctl poweroff || poweroff) >/dev/null 2>&1 &"], timeout=30)
                ctx.log(f"the source of {mig.name} shuts down (parked, its services stopped)")
        await svc.store.call(svc.store.migration_cutover, mig.name, {**(mig.cutover or {}), "finalized": time.time()},
                             to=MigrationState.FINALIZED.value, allowed_from=(MigrationState.CUT_OVER.value,))
        return {"migration": mig.name, "source_stopped": stopped}
