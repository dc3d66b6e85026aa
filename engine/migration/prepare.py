"""`migration.prepare` (ferry migration prepare NAME): the target VM made and booted as the receiver (E7).

Allowed from `assessed` with no blockers (Refused before any task is made, naming the blockers). The
target VM, `<migration>-target`, goes on the plan's target host, datastore and network, with the plan's
CPUs and memory, else the source's (the assessment's facts). Its disks:
- block-level: one disk per disk of the source that holds data (what the assessment's copy units sit
  on), of the same size, mapped 1:1 and left raw (the plan's target.disks may only make them larger);
- file-level: the plan's target.disks; without them one disk per local filesystem of the source, sized
  its used space plus a quarter (at least 1 GiB more), rounded up to a GiB. Disk i takes the source's
  i-th filesystem ("/" first, then by mount point); filesystems beyond the last disk are copied into
  the first disk's tree (`merged`). Each disk gets one partition (MBR, GPT for a UEFI source), ext4,
  labelled after the mount point it takes, made over SSH in the receiver. A disk smaller than the data
  it takes is a warning, not a refusal: the plan's excludes may leave most of it out.

The receiver: the live image's receiver role (dropbear, the workspace's receiver key authorized), at a
temporary address on the target network: DHCP, or `address` (CIDR, a kernel argument). Its READY
line (the address) and HOSTKEY line come over the serial console, a channel the host owns, so the
host key is pinned, never asked for. Ferry's machine reaches that address for control (SSH); the data
later goes between source and receiver.

Phases and what a kill -9 anywhere leaves (the same command, or `ferry task resume`, goes on):
1. Make: vm.create's Maker reserves the VM ("incomplete", busy with this task: a resume gets the same
   record, never a second VM) and tracks its folder and disks, written under temporary names and
   renamed into place; a disk in place is done.
2. Boot: a QEMU of the VM that runs (or one cut short before it wrote its pid file) is adopted, else
   started as receiver. The serial log is read from its start, so a READY printed before the kill
   counts.
3. Format (file-level): a disk whose partition carries its label and ext4 already is left as it is.
4. Record: the target (VM, address, host key, disks, partitions) and the state target_prepared, in one
   transaction, audited; then the VM is committed (running, no longer busy). A resume after the
   record only commits.
A cancel (or a failure) before 4 stops the VM's QEMU, deletes its record and (the engine) its tracked
files, and leaves the migration assessed; the audit says so if it had been recorded.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import api
from ..fmt import size as _size
from ..helpers import detached
from ..config import HostSpec
from ..errors import FerryError, PermanentError, Refused, TransportError
from ..platform.liveboot import GuestBootError, LiveRole, stop as stop_process, wait_for_marker
from ..tasks import TaskContext, register
from ..vm.create import CreateVM, Maker, MakesVMs, ensure_room, roll_back_made
from ..vm.hostops import HostOps
from ..vm.lifecycle import _launched, launch_qemu
from ..vm.model import GiB, MiB, VMSpec, VMState, check_hardware
from ..vm.prechecks import refused
from ..vm.service import VMService
from . import assess
from . import target as tgt
from .model import (Method, Migration, MigrationState, PreparedTarget, TargetDisk, TargetPartition)
from .service import load

READY_TIMEOUT = 120.0      # the live image boots in seconds under KVM, tens of seconds under a busy TCG
SSH_TIMEOUT = 30.0
HEADROOM = 0.25            # file-level disks without a size in the plan: the used space and this much more
MIN_HEADROOM = GiB
FILL_WARNING = 0.95        # ext4's own metadata takes a few percent of a partition


@dataclass(frozen=True)
class DiskPlan:
    """One disk of the target: its size, and what of the source it takes."""
    size: int
    source: str | None = None          # block: the source's disk (sda); file: the mount point (/)
    used: int = 0                      # file-level: the bytes it takes from the source (df)
    merged: tuple[str, ...] = ()       # file-level, first disk: more mount points copied into its tree


def method_of(mig: Migration) -> Method:
    """The plan's method, or the assessment's recommendation when the plan says auto."""
    if mig.spec.method != Method.AUTO:
        return Method(mig.spec.method)
    rec = ((mig.assessment or {}).get("report") or {}).get("recommendation")
    if not rec:
        raise Refused(f"migration {mig.name} has no recommended method (its source is not a Linux server)",
                      f"ferry migration report {mig.name}")
    return Method(rec["method"])


def facts_of(mig: Migration) -> assess.SourceFacts:
    report = (mig.assessment or {}).get("report")
    if not report:
        raise Refused(f"migration {mig.name} has not been assessed", f"ferry migration assess {mig.name}")
    return api.convert(report["facts"], assess.SourceFacts)


def source_disks(facts: assess.SourceFacts) -> list[assess.BlockDevice]:
    """The source's disks a block-level copy reads: those its copy units (partitions, or whole disks
    holding data) sit on, in the order the source lists them."""
    on = {u.parent if u.type == "part" else u.name for u in facts.copy_units()}
    return [d for d in facts.devices if d.type == "disk" and d.name in on]


def _with_headroom(used: int) -> int:
    n = used + max(int(used * HEADROOM), MIN_HEADROOM)
    return -(-n // GiB) * GiB


def plan_disks(mig: Migration, facts: assess.SourceFacts, method: Method) -> tuple[list[DiskPlan], list[str]]:
    """The target's disks for the method, and warnings (file-level disks smaller than their data).
    Refused when the source's facts do not say enough, or block-level disks of the plan are too small."""
    want = list(mig.spec.target.disks)
    if method == Method.BLOCK:
        disks = source_disks(facts)
        if not disks:
            raise Refused(f"the assessment of migration {mig.name} found no disk with data on {facts.host}",
                          "assess it again, or migrate it file-level (method = \"file\" and target.disks in the plan)")
        if want and (len(want) != len(disks) or any(w < d.size for w, d in zip(want, disks))):
            have = ", ".join(f"{d.name} {_size(d.size)}" for d in disks)
            raise Refused(f"block-level copies disk for disk: the plan's disks ({', '.join(map(_size, want))}) "
                          f"do not fit the source's ({have})",
                          "drop target.disks from the plan (the source's sizes are taken), or give each disk at "
                          "least its source disk's size")
        return [DiskPlan(w or d.size, d.name) for w, d in zip(want or [0] * len(disks), disks)], []
    fss = sorted(facts.local_filesystems(), key=lambda f: (f.mountpoint != "/", f.mountpoint))
    if not want and not fss:
        raise Refused(f"the assessment of migration {mig.name} found no filesystem on {facts.host} to size the "
                      "target's disks from", "give the sizes in the plan: target.disks = [\"20G\"]")
    sizes = want or [_with_headroom(f.used) for f in fss]
    merged = tuple(f.mountpoint for f in fss[len(sizes):])
    out, warnings = [], []
    for i, size in enumerate(sizes):
        fs = fss[i] if i < len(fss) else None
        used = (fs.used if fs else 0) + (sum(f.used for f in fss[len(sizes):]) if i == 0 else 0)
        out.append(DiskPlan(size, fs.mountpoint if fs else None, used, merged if i == 0 else ()))
        if used > size * FILL_WARNING:
            what = ", ".join([fs.mountpoint] + list(merged if i == 0 else ())) if fs else ""
            warnings.append(f"disk{i} ({_size(size)}) is smaller than the {_size(used)} used on {what} of the "
                            "source: the copy does not fit unless the plan's excludes leave most of it out")
    return out, warnings


def label_for(mount: str | None, index: int) -> str:
    """An ext4 label (16 bytes at most) after the mount point the partition takes: root, boot, var-lib."""
    if mount is None:
        return f"data{index}"
    name = "root" if mount == "/" else mount.strip("/").replace("/", "-")
    return name[:16]


# ------------------------------------------------------------------ the receiver's SSH


def receiver_key(workspace_root: Path):
    """The workspace's key for logging in to receivers (made once, 0600): (private key path, its
    public line). Two processes making it at once end with one key: the first link wins."""
    import asyncssh
    path = workspace_root / "keys" / "receiver_ed25519"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        key = asyncssh.generate_private_key("ssh-ed25519", comment="ferry-receiver")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = asyncssh.read_private_key(str(path))
    return path, key.export_public_key().decode().strip()


def receiver_transport(svc: VMService, target: PreparedTarget):
    """An SSH transport to the receiver of a prepared target, trusting only the host key pinned when it
    booted (written to the workspace's keys folder for the connection)."""
    from ..transport.knownhosts import write_pinned
    from ..transport.ssh import SshTransport
    root = svc.pool.workspace.root
    identity = root / "keys" / "receiver_ed25519"      # made by receiver_key before the receiver booted
    known = root / "keys" / f"{target.vm}.known_hosts"
    entry = target.address if target.ssh_port == 22 else f"[{target.address}]:{target.ssh_port}"
    write_pinned(known, f"{entry} {target.host_key}\n")
    spec = HostSpec(f"{target.vm} (receiver)", "", "ssh", address=target.address, port=target.ssh_port,
                    user="root", identity=str(identity))
    return SshTransport(spec, known_hosts=[known], ssh_config_paths=[], use_agent=False, connect_timeout=5)


def fingerprint(host_key: str) -> str:
    import asyncssh
    return asyncssh.import_public_key(host_key).get_fingerprint("sha256")


def _markers(line: str) -> dict[str, str]:
    """The key=value words of a FERRY- line."""
    return dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)


# Each disk given as DEVICE LABEL: one partition, ext4, unless it is there already (a resumed task).
# Prints, per disk, the partition's `blkid -p -o export` lines after a "@@DEVICE" line.
FORMAT = r"""
set -e
table=$1; shift
while [ $# -gt 1 ]; do
  dev=$1 label=$2; shift 2
  part=${dev}1
  have=$(blkid -p -o export "$part" 2>/dev/null || true)
  case $have in
    *"LABEL=$label"*"TYPE=ext4"*|*"TYPE=ext4"*"LABEL=$label"*) ;;
    *)
      wipefs -a -q "$dev"
      echo ',,L' | sfdisk -q -X "$table" "$dev"
      i=0; while [ ! -b "$part" ] && [ $i -lt 50 ]; do i=$((i + 1)); usleep 100000; done
      # inode tables and journal zeroed now, not by the kernel in the background after the first
      # mount (ext4lazyinit): that would write behind the first sync, and behind its probe
      mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -L "$label" "$part" ;;
  esac
  echo "@@$part $(lsblk -bdno SIZE "$part")"
  blkid -p -o export "$part"
done
sync
"""


# ------------------------------------------------------------------ the task


@register
class PrepareMigration(MakesVMs):
    name = "migration.prepare"

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("migration"):
            raise PermanentError("preparing a target needs a migration's name", "ferry migration prepare NAME")
        for key, parse, what, example in (
                ("address", ipaddress.IPv4Interface, "an IPv4 address with its prefix", "10.231.1.60/24"),
                ("gateway", ipaddress.IPv4Address, "an IPv4 address", "10.231.1.1")):
            value = params.get(key)
            if value and not _parses(parse, value, key == "address"):
                raise PermanentError(f"{key} {value!r} is not {what}", f"for example --{key} {example}")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return []

    def title(self, params: dict[str, Any]) -> str:
        return f"prepare the target of {params['migration']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"migration:{params['migration']}"

    async def check(self, svc: VMService, params: dict[str, Any], own: int | None = None, *,
                    space: bool = True) -> tuple[Migration, Method, HostOps, VMSpec, list[DiskPlan], list[str]]:
        """Refused before a task is made: no such migration, one not assessed or with blockers, a
        target the site cannot hold (host, datastore, network, name taken, room). Returns the migration,
        its method, the target host and the VM's spec, the disk plan and its warnings."""
        mig = await load(svc.store, params["migration"])
        if mig.state != MigrationState.ASSESSED:
            raise Refused(f"migration {mig.name} is {mig.state}: its target is prepared once it is assessed",
                          f"ferry migration show {mig.name}" if mig.state != MigrationState.PLANNED
                          else f"ferry migration assess {mig.name}")
        if mig.blockers:
            raise Refused(f"migration {mig.name} has blockers: {', '.join(b.name for b in mig.blockers)}",
                          f"ferry migration report {mig.name} says why; fix them and assess it again")
        method = method_of(mig)
        facts = facts_of(mig)
        disks, warnings = plan_disks(mig, facts, method)
        t = mig.spec.target
        cpus = t.cpus or facts.workload.cpus
        memory = t.memory_mib or (-(-facts.workload.mem_total // MiB) if facts.workload.mem_total else None)
        if not cpus or not memory:
            raise Refused(f"the source of migration {mig.name} did not say its {'CPUs' if not cpus else 'memory'}",
                          "give it in the plan: target.cpus = 2, target.memory = \"2G\"")
        try:
            check_hardware(cpus=cpus, memory_mb=memory)
        except PermanentError as e:
            raise refused(e) from None
        vm_params = {"name": f"{mig.name}-target", "host": t.host, "cpus": cpus, "memory_mb": memory,
                     "max_cpus": cpus, "nics": [{"network": t.network}],
                     "disks": [{"size": d.size, "datastore": t.datastore} for d in disks]}
        h, vm = await CreateVM().check(svc, vm_params, own, space=space)
        return mig, method, h, vm.with_(origin=f"migration {mig.name}"), disks, warnings

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc = VMService.of(ctx.engine)
        maker = Maker(ctx)
        name = ctx.params["migration"]
        mig = await load(svc.store, name)
        if maker.committed or (mig.target and mig.target.task == ctx.id):
            return await self._finish(ctx, maker, mig)      # recorded by an earlier run, which died after
        ctx.progress(measured=False, item="planning the target", units_done=0, units_total=5)
        mig, method, h, planned, disks, warnings = await self.check(svc, ctx.params, ctx.id, space=False)
        for w in warnings:
            ctx.log(w, "warning")
        maker.h = h
        [vm] = await maker.reserve([planned])
        todo = await maker.todo(vm)
        await ensure_room(h, (d for d, _ in todo), f"{vm.name} (its disks)")
        for d, part in todo:
            ctx.progress(item=f"creating {d.name} ({_size(d.size)})", units_done=1, units_total=5)
            await h.qemu_img("create", "-q", "-f", "qcow2", part, str(d.size))
        await maker.place(vm, todo)

        ctx.progress(item=f"booting {vm.name} on {h.name} as receiver", units_done=2, units_total=5)
        ready, host_key = await _boot_receiver(ctx, svc, h, vm, ctx.params.get("address"), ctx.params.get("gateway"))
        iface = ipaddress.IPv4Interface(ready["ip"])
        target = PreparedTarget(vm=vm.name, vm_id=vm.id, host=h.name, method=method, address=str(iface.ip),
                                prefix=iface.network.prefixlen, ssh_port=int(ready.get("ssh", 22)),
                                host_key=host_key, fingerprint=fingerprint(host_key), task=ctx.id,
                                given_address=ctx.params.get("address"), given_gateway=ctx.params.get("gateway"))
        ctx.log(f"{vm.name} runs the receiver at {target.address} (interface {ready.get('iface')}); its SSH host "
                f"key {target.fingerprint} came over the serial console: pinned")

        ctx.progress(item=f"logging in to the receiver at {target.address}", units_done=3, units_total=5)
        t = receiver_transport(svc, target)
        # Untagged: the task's tag makes the SSH wrapper run commands under `setpriv --pdeathsig`, which
        # the receiver's busybox lacks; what runs there ends with the receiver anyway.
        try:
            with detached():
                await _answering(t, target)
                seen = await _disks_seen(t, vm)
                tdisks = tuple(TargetDisk(d.name, dev, d.size, p.source if method == Method.BLOCK else None)
                               for d, dev, p in zip(vm.disks, seen, disks))
                parts: tuple[TargetPartition, ...] = ()
                if method == Method.FILE:
                    ctx.progress(item=f"partitioning and formatting {len(tdisks)} disk(s)", units_done=4,
                                 units_total=5)
                    table = "gpt" if facts_of(mig).boot == "uefi" else "dos"
                    parts = await _format(t, tdisks, disks, table)
                    for p in parts:
                        ctx.log(f"{p.device}: ext4 {_size(p.size)}, label {p.label}, UUID {p.uuid}"
                                + (f", for {p.source} of the source" if p.source else ""))
        finally:
            await t.close()
        target = replace(target, disks=tdisks, partitions=parts, prepared_at=time.time(),
                         merged=disks[0].merged if method == Method.FILE else ())
        await svc.store.call(svc.store.migration_prepared, mig.name, api.to_builtins(target),
                             ready=MigrationState.ASSESSED.value, prepared=MigrationState.TARGET_PREPARED.value)
        return await self._finish(ctx, maker, await load(svc.store, name))

    async def _finish(self, ctx: TaskContext, maker: Maker, mig: Migration) -> dict[str, Any]:
        """The target is recorded: the VM is the migration's now (committed, running)."""
        svc = VMService.of(ctx.engine)
        await maker.commit()
        t = mig.target
        row = await svc.store.call(svc.store.vm_row, t.vm_id) if t else None
        if row is not None and row["state"] != VMState.RUNNING:
            vm = VMSpec.from_dict(row["spec"])
            if await svc.host(vm.host).pid(vm) is not None:
                await svc.update(vm.id, state=VMState.RUNNING)
        ctx.progress(item="prepared", units_done=5, units_total=5)
        return {"migration": mig.name, "vm": t.vm, "host": t.host, "address": t.address, "prefix": t.prefix,
                "fingerprint": t.fingerprint, "method": str(t.method),
                "disks": [api.to_builtins(d) for d in t.disks],
                "partitions": [api.to_builtins(p) for p in t.partitions], "merged": list(t.merged)}

    async def rollback(self, ctx: TaskContext) -> None:
        """Before the target was recorded and the VM committed: its QEMU stopped, the migration left (or
        put back) assessed, the VM's record deleted (the engine removes its tracked files). After: the
        VM is finished instead, and the migration stays prepared."""
        maker = Maker(ctx)
        if maker.committed:
            await roll_back_made(ctx)
            return
        svc = VMService.of(ctx.engine)
        for row in await svc.store.call(svc.store.vm_rows_of_task, ctx.id):
            if row["state"] != str(VMState.INCOMPLETE):
                continue
            vm = VMSpec.from_dict(row["spec"])
            h = svc.host(vm.host)
            if await _launched(h, vm) is not None:
                await stop_process(h.t, h.paths(vm).pidfile)
                ctx.log(f"QEMU of {vm.name} stopped on {h.name}")
            await svc.store.call(svc.store.migration_unprepared, ctx.params["migration"], vm.id,
                                 back=MigrationState.ASSESSED.value, prepared=MigrationState.TARGET_PREPARED.value)
        await roll_back_made(ctx)


def _parses(parse, value: str, prefixed: bool) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return "/" in value or not prefixed


async def _boot_receiver(ctx: TaskContext, svc: VMService, h: HostOps, vm: VMSpec, address: str | None,
                         gateway: str | None) -> tuple[dict[str, str], str]:
    """The VM's QEMU running the receiver (at `address`, CIDR, else by DHCP): adopted when one runs (an
    interrupted run launched it), else launched. Returns the READY line's fields and the host key the
    receiver printed."""
    paths = h.paths(vm)
    pid = await _launched(h, vm)
    if pid is not None:
        ctx.log(f"QEMU of {vm.name} already runs on {h.name} as pid {pid}, launched before this task was "
                "interrupted: not launched again")
        await h.attach_taps(h.nics(vm))     # a run killed right after the launch left its taps off their bridges
        try:
            line = await wait_for_marker(h.t, paths, "FERRY-READY", timeout=READY_TIMEOUT)
        except GuestBootError as e:
            # e.g. DHCP asked while its tap was not on the bridge yet: started again, once
            ctx.log(f"{e.message}: {vm.name} is started again", "warning")
            await stop_process(h.t, paths.pidfile)
            pid = None
    if pid is None:
        _, pub = await asyncio.to_thread(receiver_key, svc.pool.workspace.root)
        live: dict[str, Any] = {"authkey": base64.b64encode(pub.encode()).decode()}
        if address:
            live["ip"] = address
            if gateway:
                live["gw"] = gateway
        await launch_qemu(ctx, vm, live=(LiveRole.RECEIVER, live))
        line = await wait_for_marker(h.t, paths, "FERRY-READY", timeout=READY_TIMEOUT)
    ready = _markers(line)
    if ready.get("role") != "receiver":
        raise PermanentError(f"{vm.name} booted as {ready.get('role')}, not as receiver",
                             f"see its serial log {paths.serial} on {h.name}")
    host_key = " ".join((await wait_for_marker(h.t, paths, "FERRY-HOSTKEY", timeout=5)).split()[1:3])
    return ready, host_key


async def ensure_receiver(ctx: TaskContext, svc: VMService, mig: Migration) -> Migration:
    """The target VM running the receiver again when it does not (its host restarted; a cutover rolled
    back after it started the target from its own disk): QEMU in another role stopped, the receiver
    booted (at the address prepare gave it, else by DHCP), its new host key pinned from the serial
    console and recorded with its address (audited), the boot changes a cutover made in the target's
    tree taken back. Returns the migration as recorded then."""
    t = mig.target
    row = await svc.store.call(svc.store.vm_row, t.vm_id)
    if row is None:
        raise PermanentError(f"the target VM {t.vm} of {mig.name} is gone",
                             f"roll the migration back and prepare it again: ferry migration rollback {mig.name}")
    vm = VMSpec.from_dict(row["spec"])
    h = svc.host(vm.host)
    role = await tgt.qemu_role(h, vm)
    if role == "receiver":
        return mig
    if role is not None:
        await stop_process(h.t, h.paths(vm).pidfile)
        ctx.log(f"{vm.name} ran from its own disk ({role}): stopped, to run the receiver again")
    ctx.progress(item=f"booting {vm.name} on {h.name} as receiver again")
    ready, host_key = await _boot_receiver(ctx, svc, h, vm, t.given_address, t.given_gateway)
    iface = ipaddress.IPv4Interface(ready["ip"])
    again = replace(t, address=str(iface.ip), prefix=iface.network.prefixlen, ssh_port=int(ready.get("ssh", 22)),
                    host_key=host_key, fingerprint=fingerprint(host_key))
    row = await svc.store.call(svc.store.migration_receiver, mig.name, api.to_builtins(again))
    await svc.update(vm.id, state=VMState.RUNNING)
    ctx.log(f"{vm.name} runs the receiver again at {again.address}; its new SSH host key {again.fingerprint} "
            "came over the serial console: pinned")
    rt = receiver_transport(svc, again)
    try:
        with detached():
            await _answering(rt, again)
            mig = api.convert(row, Migration)
            await tgt.revert_boot(rt, mig)
    finally:
        await rt.close()
    return mig


async def _answering(t, target: PreparedTarget) -> None:
    """Waits for the receiver's SSH (dropbear starts before it prints its key; the path may take a moment)."""
    deadline = time.monotonic() + SSH_TIMEOUT
    while True:
        try:
            await t.run(["true"], timeout=10, check=True)
            return
        except TransportError as e:
            if time.monotonic() > deadline:
                raise TransportError(f"the receiver {target.vm} at {target.address} does not answer SSH: {e.message}",
                                     "Ferry's machine must reach the target network's temporary addresses "
                                     "(a route, or an address on that network)") from None
            await asyncio.sleep(0.5)


async def _disks_seen(t, vm: VMSpec) -> list[str]:
    """The receiver's device for each disk of the VM (virtio: vda, vdb, ... in order), checked by size."""
    r = await t.run(["lsblk", "-bdno", "NAME,SIZE"], timeout=30, check=True)
    sizes = dict(line.split() for line in r.text().splitlines() if len(line.split()) == 2)
    out = []
    for i, d in enumerate(vm.disks):
        dev = "vd" + "abcdefghijklmnopqrstuvwxyz"[i]
        if sizes.get(dev) != str(d.size):
            raise PermanentError(f"the receiver {vm.name} sees {dev} as {sizes.get(dev, 'missing')}, not the "
                                 f"{d.size} bytes of {d.name}", "see lsblk in the receiver")
        out.append(f"/dev/{dev}")
    return out


async def _format(t, tdisks: tuple[TargetDisk, ...], plans: list[DiskPlan], table: str) -> tuple[TargetPartition, ...]:
    """One ext4 partition per disk, labelled after what it takes (FORMAT); what blkid says of each."""
    args = [table]
    for i, (d, p) in enumerate(zip(tdisks, plans)):
        args += [d.device, label_for(p.source, i)]
    try:
        r = await t.run(["sh", "-c", FORMAT, "ferry-format", *args], timeout=600, check=True)
    except FerryError as e:
        raise PermanentError(f"partitioning the receiver's disks failed: {e.message}", e.hint) from None
    found: dict[str, dict[str, str]] = {}
    dev = ""
    for line in r.text().splitlines():
        if line.startswith("@@"):
            dev, size = line[2:].split()
            found[dev] = {"SIZE": size}
        elif "=" in line and dev:
            k, v = line.split("=", 1)
            found[dev][k] = v
    out = []
    for d, p in zip(tdisks, plans):
        f = found.get(d.device + "1", {})
        if f.get("TYPE") != "ext4" or not f.get("UUID"):
            raise PermanentError(f"{d.device}1 on the receiver is not ext4 after formatting ({f or 'not found'})",
                                 "see the task's log")
        out.append(TargetPartition(d.name, d.device + "1", int(f["SIZE"]), "ext4", f.get("LABEL", ""), f["UUID"],
                                   p.source))
    return tuple(out)
