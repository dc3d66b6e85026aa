"""The target's side of a cutover (E8): making the copied system boot from its own disks, starting it,
and checking it.

Boot (say which is used): the target VM boots the live image's kernel and initramfs, which find the
root filesystem on a virtio disk (ferry.root=: file-level /dev/vda1, the root partition prepare made;
block-level the partition the source's / is on, mapped to its target disk: root_device) and switch into
the migrated system's own init ("direct kernel boot of the migrated root"). Before that, in the
receiver, with the final sync done:
- /etc/fstab, file-level: each mount point a target partition takes is mounted by that partition's UUID
  (ext4, the source's options when the source's filesystem was ext4 too, else "defaults"); mount points
  merged into the root tree and swap lines are commented out. Block-level: the disks are the source's,
  UUIDs and all, so UUID= lines stay; lines naming a source device (/dev/sda1: another name on virtio)
  get its UUID instead. The source's file is kept beside it (fstab.ferry-source); running it again
  starts from that copy, so it is idempotent.
- the final address: written before the first boot (the source is parked off it by then), so the
  target never shows at another address: systemd-networkd (a .network matching the target NIC's MAC)
  or ifupdown (a .link naming the NIC ferry0 and an interfaces.d stanza); any other network setup is
  reported and left alone (the check at the final address then fails and the cutover rolls back).
- the sync's pull key (the `ferry-migration:<name>` line) is taken out of the copied authorized_keys.
- the target filesystems are unmounted and flushed before the receiver's QEMU stops.
After boot, over SSH at the final address (the target has the source's host keys, so the key pinned for
the source is the one accepted), each step checks what it did: the machine answering is the target (its
NIC's MAC), the old hypervisor's tool packages are gone, the guest agent runs and answers, the plan's
services are active, the check ports accept connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

from .. import api
from ..config import HostSpec
from ..errors import FerryError, PermanentError, Refused
from ..platform.liveboot import LiveRole, stop as stop_process
from ..vm.lifecycle import _launched, _wait_agent, launch_qemu
from ..vm.model import VMSpec, VMState
from ..vm.service import VMService
from .assess import HYPERVISOR_PACKAGES, BlockDevice
from .model import Method, Migration

# In the receiver: $1 root partition, $2 target MAC, $3 address/prefix, $4 gateway ("-": none),
# $5 DNS servers (comma separated, "-": none), $6 migration name, $7 the method (file, block); then fstab
# words: MOUNT=UUID (taken by a partition), -MOUNT (merged into the root tree), @DEVICE=UUID (block-level:
# a source device's UUID). Prints "@@net KIND" (networkd, ifupdown, none).
BOOTPREP = r"""
set -e
root=$1 mac=$2 addr=$3 gw=$4 dns=$5 name=$6 method=$7; shift 7
R=$(awk -v d="$root" '$1 == d { print $2; exit }' /proc/mounts)
# (block-level: the source's own filesystem, whatever its type the live kernel knows)
if [ -z "$R" ]; then
  R=/mnt/ferry-boot; mkdir -p "$R"
  if [ "$method" = block ] && [ ! -b "$root" ]; then
    # the rounds wrote the source's partition table after the receiver booted on a blank disk: the
    # kernel reads it again (busybox blockdev/partprobe), devtmpfs then makes the partition's node
    disk=$(echo "$root" | sed 's/p*[0-9]*$//')
    blockdev --rereadpt "$disk" 2>/dev/null || partprobe "$disk" 2>/dev/null || true
    i=0; while [ ! -b "$root" ] && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
  fi
  if [ "$method" = block ]; then mount "$root" "$R"; else mount -t ext4 "$root" "$R"; fi
fi
F="$R/etc/fstab"
ours=no; head -n1 "$F" 2>/dev/null | grep -q '^# ferry: rewritten' && ours=yes
if [ $ours = yes ] && [ ! -f "$F.ferry-source" ]; then
  : # rewritten for these partitions already (the copy of the source's file went with a sync round)
elif [ -f "$F" ]; then
  [ $ours = yes ] || cp -p "$F" "$F.ferry-source"
  awk -v words="$*" -v method="$method" '
    BEGIN { n = split(words, w, " "); for (i = 1; i <= n; i++) {
              if (substr(w[i], 1, 1) == "-") merged[substr(w[i], 2)] = 1
              else if (substr(w[i], 1, 1) == "@") { split(substr(w[i], 2), kv, "="); dev[kv[1]] = kv[2] }
              else { split(w[i], kv, "="); uuid[kv[1]] = kv[2] } }
            print "# ferry: rewritten for the target; the source'"'"'s file is fstab.ferry-source" }
    /^[ \t]*#/ || NF < 3 { print; next }
    ($1 in dev) { $1 = "UUID=" dev[$1]; print; next }
    (method == "block") { print; next }
    ($2 in uuid) { opts = ($3 == "ext4") ? $4 : "defaults"
                   printf "UUID=%s %s ext4 %s %s %s\n", uuid[$2], $2, opts, ($5 == "" ? 0 : $5), ($6 == "" ? 0 : $6); next }
    ($3 == "swap") { print "# ferry: no swap partition on the target: " $0; next }
    ($2 in merged) { print "# ferry: merged into the root filesystem: " $0; next }
    { print }' "$F.ferry-source" > "$F.ferry-new"
  mv "$F.ferry-new" "$F"
fi
for k in "$R"/root/.ssh/authorized_keys "$R"/home/*/.ssh/authorized_keys; do
  [ -f "$k" ] && grep -q " ferry-migration:$name\$" "$k" && sed -i "/ ferry-migration:$name\$/d" "$k"
done
kind=none
# (the enablement links are absolute: dangling here, so tested with -L, never followed)
wants=
for f in "$R"/etc/systemd/system/*.wants/systemd-networkd.service; do
  if [ -L "$f" ] || [ -e "$f" ]; then wants=yes; fi
done
if [ -n "$wants" ] && [ -d "$R/etc/systemd/network" ]; then
  kind=networkd
  f="$R/etc/systemd/network/05-ferry-final.network"
  { echo "# ferry: the migrated server's final address on the target's NIC"
    echo "[Match]"; echo "MACAddress=$mac"
    echo "[Network]"; echo "Address=$addr"
    [ "$gw" != - ] && echo "Gateway=$gw"
    [ "$dns" != - ] && echo "$dns" | tr ',' '\n' | sed 's/^/DNS=/'
  } > "$f.new"
  mv "$f.new" "$f"
elif [ -f "$R/etc/network/interfaces" ]; then
  kind=ifupdown
  mkdir -p "$R/etc/systemd/network" "$R/etc/network/interfaces.d"
  printf '[Match]\nMACAddress=%s\n[Link]\nName=ferry0\n' "$mac" > "$R/etc/systemd/network/05-ferry-final.link"
  { echo "auto ferry0"; echo "iface ferry0 inet static"; echo "    address $addr"
    [ "$gw" != - ] && echo "    gateway $gw"
    [ "$dns" != - ] && echo "    dns-nameservers $(echo "$dns" | tr ',' ' ')"
  } > "$R/etc/network/interfaces.d/ferry-final"
  grep -q '^source.*/etc/network/interfaces.d' "$R/etc/network/interfaces" \
    || echo 'source /etc/network/interfaces.d/*' >> "$R/etc/network/interfaces"
fi
echo "@@net $kind"
sync
# Every target filesystem unmounted (deepest first), so the disks are clean when QEMU stops.
for m in $(awk '$1 ~ "^/dev/vd" { print $2 }' /proc/mounts | sort -r); do umount "$m"; done
sync
"""


# In the receiver ($1 root partition): what BOOTPREP wrote taken back (the source's fstab in place, the
# final address's files gone), so the synced tree is the source's again; the filesystems unmounted.
REVERT = r"""
set -e
root=$1
R=$(awk -v d="$root" '$1 == d { print $2; exit }' /proc/mounts)
if [ -z "$R" ]; then R=/mnt/ferry-boot; mkdir -p "$R"; mount -t ext4 "$root" "$R"; fi
F="$R/etc/fstab"
[ -f "$F.ferry-source" ] && mv "$F.ferry-source" "$F"
rm -f "$R/etc/systemd/network/05-ferry-final.network" "$R/etc/systemd/network/05-ferry-final.link" \
      "$R/etc/network/interfaces.d/ferry-final"
sync
for m in $(awk '$1 ~ "^/dev/vd" { print $2 }' /proc/mounts | sort -r); do umount "$m"; done
sync
"""


async def revert_boot(rt, mig: Migration) -> None:
    """Undo prepare_boot in the receiver (after a test launch copied the disks, or a cutover rolled
    back): the next sync rounds see the source's files, not Ferry's. Idempotent. Block-level: nothing
    here (the next round's base is the target's own chunks: it puts back every chunk that differs)."""
    root = next((p.device for p in mig.target.partitions if p.source == "/"), None)
    if root is None or mig.target.method == Method.BLOCK:
        return
    try:
        await rt.run(["sh", "-c", REVERT, "ferry-revert", root], timeout=300, check=True)
    except FerryError as e:
        raise PermanentError(f"taking the boot changes back in the receiver of {mig.name} failed: "
                             f"{e.message}", e.hint) from None


def final_interface(mig: Migration, prefix: int | None) -> str:
    """The target's final address with its prefix: the plan's, else the source's address (the prefix
    its interface has)."""
    if mig.spec.final.address:
        return mig.spec.final.address
    return f"{mig.spec.source.address}/{prefix or 24}"


def fstab_words(mig: Migration) -> list[str]:
    t = mig.target
    if t.method == Method.BLOCK:
        return [f"@/dev/{d.name}={d.uuid}" for d in _source_devices(mig) if d.type == "part" and d.uuid]
    words = [f"{p.source}={p.uuid}" for p in t.partitions if p.source]
    return words + [f"-{m}" for m in t.merged]


def _source_devices(mig: Migration) -> list[BlockDevice]:
    facts = (((mig.assessment or {}).get("report") or {}).get("facts") or {})
    return [api.convert(d, BlockDevice) for d in facts.get("devices", [])]


def root_device(mig: Migration) -> str:
    """The target's root filesystem as the receiver and the target's kernel see it: file-level the
    partition taking /; block-level the source's partition (or whole disk) mounted at /, on the target
    disk that mirrors its disk (vda1 for the source's sda1 or nvme0n1p1 on the first disk). Refused when
    / is on LVM, RAID or an encrypted volume (the live kernel's direct boot mounts a plain device)."""
    t = mig.target
    if t.method != Method.BLOCK:
        root = next((p.device for p in t.partitions if p.source == "/"), None)
        if root is None:
            raise PermanentError(f"the target of {mig.name} has no partition taking the source's /",
                                 "file-level targets take / on their first disk; prepare it again")
        return root
    devices = _source_devices(mig)
    dev = next((d for d in devices if d.mountpoint == "/"), None)
    if dev is None:
        raise Refused(f"the assessment of {mig.name} does not say which device holds the source's /",
                      f"assess it again: ferry migration assess {mig.name}")
    on = {d.source: d.device for d in t.disks if d.source}
    if dev.type == "disk" and dev.name in on:
        return on[dev.name]
    if dev.type != "part" or dev.parent not in on:
        raise Refused(f"the source's / of {mig.name} is on {dev.name} ({dev.type}): a block-level target boots "
                      "a root on a plain partition or disk here", "migrate it file-level (method = \"file\")")
    number = dev.name[len(dev.parent):].lstrip("p")
    return f"{on[dev.parent]}{number}"


async def prepare_boot(rt, mig: Migration, mac: str, address: str, gateway: str | None) -> str:
    """In the receiver (`rt`, its transport): fstab, the final address and the pull key, then every
    target filesystem unmounted. Returns how the address was written (networkd, ifupdown, none)."""
    root = root_device(mig)
    dns = ",".join(mig.spec.final.dns) or "-"
    from .prepare import _answering
    await _answering(rt, mig.target)         # a busy receiver may take a moment to take the connection
    try:
        r = await rt.run(["sh", "-c", BOOTPREP, "ferry-bootprep", root, mac, address, gateway or "-", dns, mig.name,
                          str(mig.target.method), *fstab_words(mig)], timeout=300, check=True)
    except FerryError as e:
        raise PermanentError(f"making the target of {mig.name} bootable failed in the receiver: {e.message}",
                             e.hint) from None
    kind = next((ln.split()[1] for ln in r.text().splitlines() if ln.startswith("@@net ")), "none")
    return kind


async def qemu_role(h, vm: VMSpec) -> str | None:
    """What the VM's QEMU runs: "receiver", "boot-disk", another live role, or None when none runs."""
    pid = await _launched(h, vm)
    if pid is None:
        return None
    r = await h.t.run(["cat", f"/proc/{pid}/cmdline"], timeout=30)
    args = r.stdout.decode(errors="replace").split("\0") if r.ok else []
    append = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-append"), "")
    role = next((w.split("=", 1)[1] for w in append.split() if w.startswith("ferry.role=")), None)
    return role or "boot-disk"


async def boot_from_disk(ctx, svc: VMService, vm: VMSpec, root: str | None = None) -> None:
    """The receiver's QEMU stopped (its filesystems are unmounted already) and the VM started from its
    own disk (its root at `root`, else the first disk's first partition), its record running.
    Idempotent: a VM already booted from its disk is left running."""
    h = svc.host(vm.host)
    role = await qemu_role(h, vm)
    if role == "boot-disk":
        return
    if role is not None:
        await stop_process(h.t, h.paths(vm).pidfile)
        ctx.log(f"the receiver of {vm.name} stopped")
    await launch_qemu(ctx, vm, live=(LiveRole.BOOT_DISK, {"root": root, "root_wait": 3}) if root else None)
    await svc.update(vm.id, state=VMState.RUNNING)


def target_transport(svc: VMService, mig: Migration, address: str):
    """SSH to the migrated system at `address`, trusting only the host keys pinned for the source (the
    target is its copy, with its host keys)."""
    from ..transport.knownhosts import endpoint_name, write_pinned
    from ..transport.ssh import SshTransport
    from .sync import pinned_source_keys
    s = mig.spec.source
    known = svc.pool.workspace.root / "keys" / f"{mig.name}.target.known_hosts"
    write_pinned(known, "".join(f"{endpoint_name(address, s.port)} {k}\n" for k in pinned_source_keys(svc, mig)))
    spec = HostSpec(f"{mig.name} (target at {address})", "", "ssh", address=address, port=s.port, user=s.user,
                    identity=s.identity)
    return SshTransport(spec, known_hosts=[known], ssh_config_paths=svc.pool.ssh_config_paths,
                        use_agent=svc.pool.use_agent, connect_timeout=5)


async def wait_target(t, mac: str, address: str, *, timeout: float, progress=None, between=None) -> None:
    """Until the machine answering SSH at `address` is the target: one of its NICs has the target's MAC
    (the source, parked, has another). `between`: awaited after each attempt that failed (the cutover
    has the target announce itself: until it does, this machine and the routers between may still send
    to the source's MAC). Raises after `timeout` with what was last seen."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            r = await t.run(["sh", "-c", "cat /sys/class/net/*/address"], timeout=15, check=True)
            macs = r.text().split()
            if mac.lower() in macs:
                return
            last = f"a machine whose NICs are {', '.join(macs)} (not the target's {mac})"
        except FerryError as e:
            last = e.message
        if time.monotonic() > deadline:
            raise PermanentError(f"the target did not answer SSH at {address} within {timeout:g} s: {last}",
                                 "see the target VM's serial log (ferry vm log)")
        if progress:
            progress(last)
        if between:
            await between()
        await asyncio.sleep(1.0)


PURGE = r"""
set -e
have=""
for p in "$@"; do
  if command -v dpkg-query >/dev/null 2>&1; then
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' && have="$have $p"
  elif command -v rpm >/dev/null 2>&1; then
    rpm -q "$p" >/dev/null 2>&1 && have="$have $p"
  fi
done
[ -z "$have" ] && { echo "@@removed"; exit 0; }
if command -v apt-get >/dev/null 2>&1; then DEBIAN_FRONTEND=noninteractive apt-get purge -y -q $have >&2
elif command -v dnf >/dev/null 2>&1; then dnf remove -y $have >&2
elif command -v yum >/dev/null 2>&1; then yum remove -y $have >&2
elif command -v zypper >/dev/null 2>&1; then zypper -n rm $have >&2
else echo "no package manager" >&2; exit 3; fi
echo "@@removed$have"
"""


def tool_packages(mig: Migration) -> list[str]:
    """The old hypervisor's tool packages the assessment found installed on the source."""
    tools = (((mig.assessment or {}).get("report") or {}).get("facts") or {}).get("hypervisor", {}).get("tools", [])
    return [t["name"] for t in tools if t.get("name") in HYPERVISOR_PACKAGES]


async def remove_tools(t, packages: list[str]) -> list[str]:
    """Purges the packages that are installed; returns those removed."""
    if not packages:
        return []
    r = await t.run(["sh", "-c", PURGE, "ferry-purge", *packages], timeout=600, check=True)
    return purged(r.text())


def purged(text: str) -> list[str]:
    """The packages PURGE's output says it removed."""
    line = next((ln for ln in text.splitlines() if ln.startswith("@@removed")), "@@removed")
    return line.split()[1:]


AGENT = r"""
if ! command -v qemu-ga >/dev/null 2>&1 && [ ! -x /usr/sbin/qemu-ga ] && [ ! -x /usr/bin/qemu-ga ]; then
  if command -v apt-get >/dev/null 2>&1; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-guest-agent >&2
  elif command -v dnf >/dev/null 2>&1; then dnf install -y qemu-guest-agent >&2
  elif command -v yum >/dev/null 2>&1; then yum install -y qemu-guest-agent >&2
  fi || { echo "@@agent missing"; exit 0; }
fi
if command -v systemctl >/dev/null 2>&1; then
  systemctl enable qemu-guest-agent >/dev/null 2>&1 || true
  systemctl start qemu-guest-agent >&2 || true
fi
echo "@@agent present"
"""


async def enable_agent(t) -> bool:
    """The guest agent installed (from the target's own package sources when missing) and started;
    False when it could not be installed."""
    r = await t.run(["sh", "-c", AGENT], timeout=600, check=True)
    return agent_present(r.text())


def agent_present(text: str) -> bool:
    """Whether AGENT's output says the guest agent is there (installed now or before)."""
    return "@@agent present" in text


async def agent_answers(svc: VMService, vm: VMSpec, *, timeout: float) -> bool:
    """Whether the VM's guest agent answers within `timeout` (PermanentError when its QEMU exits)."""
    return await _wait_agent(svc, vm, timeout)


def check_ports(mig: Migration) -> list[int]:
    """The TCP ports the service check tries: the plan's, else what the source listened on for others
    (not on loopback only)."""
    if mig.spec.cutover.check_ports is not None:
        return list(mig.spec.cutover.check_ports)
    services = (((mig.assessment or {}).get("report") or {}).get("facts") or {}).get("services", [])
    ports = set()
    for s in services:
        try:
            if ipaddress.ip_address(s["address"].strip("[]").split("%")[0]).is_loopback:
                continue
        except ValueError:
            pass
        ports.add(int(s["port"]))
    return sorted(ports)


async def services_active(t, services: tuple[str, ...]) -> dict[str, str]:
    """systemctl is-active of each service on the target."""
    if not services:
        return {}
    r = await t.run(["systemctl", "is-active", *services], timeout=60)
    states = r.text().split()
    return dict(zip(services, states + ["unknown"] * (len(services) - len(states))))


async def port_open(address: str, port: int, timeout: float = 3.0) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    return True


async def check_service(t, mig: Migration, address: str, *, timeout: float, progress=None) -> dict[str, Any]:
    """Until the plan's services are active on the target and every check port accepts a connection at
    `address` (from the engine's machine), or `timeout`: the last result either way."""
    ports = check_ports(mig)
    deadline = time.monotonic() + timeout
    while True:
        active = await services_active(t, mig.spec.services)
        opened = {p: await port_open(address, p) for p in ports}
        ok = all(v == "active" for v in active.values()) and all(opened.values())
        result = {"ok": ok, "services": active, "ports": opened}
        if ok or time.monotonic() > deadline:
            return result
        if progress:
            waiting = [s for s, v in active.items() if v != "active"] + [str(p) for p, o in opened.items() if not o]
            progress(f"waiting for {', '.join(waiting)}")
        await asyncio.sleep(1.0)
