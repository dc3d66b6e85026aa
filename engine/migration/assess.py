"""The assessment of a migration source (REQUIREMENTS E2, E9, E10): what the server is, what would stop
or slow its migration, which method fits and how long the copy takes.

- collect(t): one read-only POSIX sh script over the source's Transport, one round trip, nothing
  installed or written. Each section tolerates a missing tool (busybox, no LVM, no ss, no lsblk) and
  then says "unknown" with why (SourceFacts.unknown) instead of failing the whole. The I/O figures are
  two /proc/diskstats samples `sample_s` apart, so a collection takes about that long.
- A Windows source (no POSIX sh answers, or uname says MINGW/MSYS/CYGWIN/Windows) is one line,
  SourceFacts.windows: out of reach here.
- findings(facts, thresholds): named blockers, warnings and notes, pure over the facts.
- recommend(facts, resize=): file-level when the used space is below FILE_LEVEL_RATIO of what a
  block-level copy moves (or resizing is wanted), block-level otherwise; the reason names the figures.
- estimate(facts, method, bandwidth_bps): bytes to move and seconds at the measured bandwidth.
- METHODS (E9) and PHASES (E10) as data; report_markdown(assessment). Every record is a frozen
  dataclass the engine's codec (api.dumps) encodes as the JSON form.

Decisions, stated once here and in the findings' messages:
- Filesystems: ext2/3/4, xfs and vfat are recreated as they are by a file-level copy. btrfs, zfs, jfs,
  reiserfs and f2fs are a warning: file-level recreates their content on ext4 (subvolumes, datasets and
  snapshots are not carried), block-level copies them as they are. Anything else (ntfs, exfat, an
  unknown type) cannot be recreated file by file: a blocker for file-level, and recommend() says block.
  Network filesystems (nfs, cifs, ...) are a warning: their data stays where it is, the target mounts it.
- UEFI is a warning: the lab's target boots BIOS with direct kernel boot of the migrated root; the EFI
  system partition is copied but not used, and the source's EFI boot entries do not carry over.
- Hypervisor tools present are a note (info): the V2V step of the cutover removes them.
- Licence binding: software bound to a MAC address or a host id cannot be recognised from outside; what
  is looked for is the known dongle vendors on USB and the known licence daemons running or installed
  (LICENCE_DAEMONS, DONGLE_VENDORS), and the report says so.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CommandError, FerryError
from ..ship import Program
from ..transport.base import Transport
from .model import Method

# ---------------------------------------------------------------- what the script looks for

# Hypervisor guest tools: the process or program name, the hypervisor, the packages that ship it.
HYPERVISOR_TOOLS: dict[str, str] = {
    "vmtoolsd": "VMware", "vmware-toolbox-cmd": "VMware",
    "VBoxService": "VirtualBox", "VBoxClient": "VirtualBox",
    "xe-daemon": "Xen", "xenstore-read": "Xen",
    "hv_kvp_daemon": "Hyper-V", "hv_vss_daemon": "Hyper-V", "hv_fcopy_daemon": "Hyper-V",
}
HYPERVISOR_PACKAGES: dict[str, str] = {
    "open-vm-tools": "VMware", "open-vm-tools-desktop": "VMware",
    "virtualbox-guest-utils": "VirtualBox", "virtualbox-guest-x11": "VirtualBox",
    "xe-guest-utilities": "Xen", "hyperv-daemons": "Hyper-V", "hypervkvpd": "Hyper-V",
}
HYPERVISOR_DIRS: dict[str, str] = {"/etc/vmware-tools": "VMware", "/opt/VBoxGuestAdditions-*": "VirtualBox"}

# Licence managers and dongle daemons, by process/program name; and their packages.
LICENCE_DAEMONS: dict[str, str] = {
    "hasplmd": "Sentinel HASP/LDK licence manager",
    "aksusbd": "Sentinel/HASP USB dongle daemon",
    "lmgrd": "FlexNet (FlexLM) licence server",
    "CodeMeterLin": "WIBU CodeMeter runtime",
    "rlm": "Reprise licence manager",
}
LICENCE_PACKAGES: dict[str, str] = {"aksusbd": "Sentinel/HASP USB dongle daemon", "codemeter": "WIBU CodeMeter runtime"}

# USB vendor ids of licence dongles (lowercase hex, as /sys/bus/usb/devices/*/idVendor says).
DONGLE_VENDORS: dict[str, str] = {
    "0529": "SafeNet/Aladdin HASP", "04b9": "SafeNet Sentinel (Rainbow)", "064f": "WIBU CodeMeter",
    "096e": "Feitian ROCKEY", "0a89": "Aktiv Rutoken", "1bc0": "SenseLock",
}
# PCI display vendors whose cards are compute/graphics hardware a VM does not get (the BMC's and the
# hypervisors' virtual adapters are left out); class 0x0302 (3D controller) always counts.
GPU_VENDORS: dict[str, str] = {"10de": "NVIDIA", "1002": "AMD/ATI"}
DISPLAY_VENDORS: dict[str, str] = {
    **GPU_VENDORS, "8086": "Intel", "102b": "Matrox", "1a03": "ASPEED", "1234": "QEMU", "1af4": "virtio",
    "15ad": "VMware", "80ee": "VirtualBox", "1013": "Cirrus", "1414": "Microsoft Hyper-V",
}

_TOOL_NAMES = " ".join([*HYPERVISOR_TOOLS, *LICENCE_DAEMONS])
_PACKAGES = " ".join([*HYPERVISOR_PACKAGES, *LICENCE_PACKAGES])
_DIRS = " ".join(HYPERVISOR_DIRS)

# One POSIX sh script: one round trip, read-only. Sections start with "@@name"; a section that cannot
# be read says "@@unknown WHY" in its place. $1 is the I/O sample in seconds. The sbin folders are
# appended (never prepended) to PATH: an SSH session's PATH often lacks them (vgs, hv_kvp_daemon), and
# the PATH the session has keeps its order.
COLLECT = Program("ferry-assess", lang="sh", source=r"""
export LC_ALL=C
PATH=${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/sbin:/sbin
sample=${1:-1}
echo @@uname
s=$(uname -s 2>/dev/null) || s=
if [ -z "$s" ]; then
  v=; read -r v 2>/dev/null </proc/version
  case $v in "Linux version"*) s=Linux; echo nouname ;; esac
fi
printf 'system %s\n' "${s:-none}"
case $s in
  Linux) ;;
  *) echo @@end; exit 0 ;;
esac
printf 'release %s\n' "$(uname -r 2>/dev/null || { read -r a b c d </proc/version; echo "$c"; })"
printf 'machine %s\n' "$(uname -m 2>/dev/null)"
echo @@os-release
cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null || echo '@@unknown /etc/os-release is missing'
echo @@boot
if [ -d /sys/firmware/efi ]; then echo uefi
elif [ -d /sys/class ]; then echo bios
else echo '@@unknown /sys is not mounted'; fi
echo @@sysblock
for d in /sys/block/*; do
  [ -r "$d/size" ] || continue
  n=${d##*/}; z=0; read -r z <"$d/size"; h=-; [ -e "$d/device" ] && h=dev
  echo "disk $n $z $h"
  for p in "$d/$n"*; do
    [ -r "$p/partition" ] || continue
    z=0; read -r z <"$p/size"; echo "part ${p##*/} $z $n"
  done
done
echo @@lsblk
lsblk -J -b -o NAME,TYPE,SIZE,FSTYPE,MOUNTPOINT,UUID,PKNAME 2>/dev/null || echo '@@unknown lsblk is missing or has no JSON output'
echo @@vgs
if command -v vgs >/dev/null 2>&1; then
  o=$(vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,pv_count,lv_count 2>/dev/null) &&
    printf '%s\n' "$o" || echo '@@unknown vgs failed (LVM tools need root)'
  echo @@lvs
  o=$(lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_path 2>/dev/null) &&
    printf '%s\n' "$o" || echo '@@unknown lvs failed (LVM tools need root)'
else echo '@@unknown vgs is not installed (no LVM tools)'; fi
echo @@df
df -B1 -T -P 2>/dev/null || { echo @@df-k; df -k -T -P 2>/dev/null; } || echo '@@unknown df failed'
echo @@cpu
nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo '@@unknown neither nproc nor getconf'
grep -m 1 '^model name' /proc/cpuinfo 2>/dev/null
grep -q '^flags.* hypervisor' /proc/cpuinfo 2>/dev/null && echo 'flag hypervisor'
echo @@meminfo
grep -E '^(MemTotal|MemAvailable|SwapTotal|SwapFree):' /proc/meminfo 2>/dev/null || echo '@@unknown /proc/meminfo is unreadable'
echo @@loadavg
cat /proc/loadavg 2>/dev/null || echo '@@unknown /proc/loadavg is unreadable'
echo @@pressure
for r in cpu io memory; do l=; read -r l 2>/dev/null </proc/pressure/$r && echo "$r $l"; done
echo @@diskstats
read -r u1 x 2>/dev/null </proc/uptime; echo "uptime $u1"; cat /proc/diskstats 2>/dev/null
sleep "$sample" 2>/dev/null || sleep 1
echo @@diskstats2
read -r u2 x 2>/dev/null </proc/uptime; echo "uptime $u2"; cat /proc/diskstats 2>/dev/null
echo @@listen
if command -v ss >/dev/null 2>&1; then ss -ltnp 2>/dev/null
else echo @@proc-net-tcp; cat /proc/net/tcp /proc/net/tcp6 2>/dev/null || echo '@@unknown neither ss nor /proc/net/tcp'; fi
echo @@virt
v=$(systemd-detect-virt 2>/dev/null) || v=${v:-none}
command -v systemd-detect-virt >/dev/null 2>&1 && echo "detect $v"
for f in sys_vendor product_name; do l=; read -r l 2>/dev/null </sys/class/dmi/id/$f && echo "$f $l"; done
l=; read -r l 2>/dev/null </sys/hypervisor/type && echo "hypervisor_type $l"
echo @@tools
names=" TOOLNAMES "
for f in /proc/[0-9]*/comm; do
  c=; read -r c 2>/dev/null <"$f" || continue
  case $names in *" $c "*) echo "run $c" ;; esac
done
for n in $names; do p=$(command -v "$n" 2>/dev/null) && echo "path $n $p"; done
for d in DIRS; do [ -e "$d" ] && echo "dir $d"; done
if command -v dpkg-query >/dev/null 2>&1; then
  dpkg-query -W -f='pkg ${Package} ${db:Status-Abbrev}\n' PACKAGES 2>/dev/null
elif command -v rpm >/dev/null 2>&1; then
  rpm -q --qf 'pkg %{NAME} ii\n' PACKAGES 2>/dev/null | grep '^pkg '
else echo 'nopkg neither dpkg nor rpm'; fi
echo @@usb
if [ -d /sys/bus/usb/devices ]; then
  for d in /sys/bus/usb/devices/*; do
    [ -r "$d/idVendor" ] || continue
    v=; p=; c=; m=; n=
    read -r v <"$d/idVendor"; read -r p <"$d/idProduct"; read -r c 2>/dev/null <"$d/bDeviceClass"
    read -r m 2>/dev/null <"$d/manufacturer"; read -r n 2>/dev/null <"$d/product"
    printf 'usb\t%s\t%s\t%s\t%s\t%s\t%s\n' "${d##*/}" "$v" "$p" "$c" "$m" "$n"
  done
fi
echo @@fc
for h in /sys/class/fc_host/*; do
  [ -d "$h" ] || continue
  w=; s=; read -r w 2>/dev/null <"$h/port_name"; read -r s 2>/dev/null <"$h/port_state"
  echo "fc ${h##*/} $w $s"
done
echo @@pci
for d in /sys/bus/pci/devices/*; do
  c=; read -r c 2>/dev/null <"$d/class" || continue
  case $c in 0x03*) v=; p=; read -r v <"$d/vendor"; read -r p <"$d/device"; echo "display ${d##*/} $c $v $p" ;; esac
done
echo @@end
""".replace("TOOLNAMES", _TOOL_NAMES).replace("PACKAGES", _PACKAGES).replace("DIRS", _DIRS))

# Filesystems a file-level copy recreates as they are; those it recreates as ext4 (a warning); those
# whose data lives elsewhere (a warning); and mounts that hold no data of their own (left out).
FILE_LEVEL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat", "msdos"})
CONVERTED_FS = frozenset({"btrfs", "zfs", "jfs", "reiserfs", "f2fs"})
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "fuse.sshfs",
                        "fuse.glusterfs", "9p", "virtiofs", "lustre"})
PSEUDO_FS = frozenset({"tmpfs", "devtmpfs", "devpts", "proc", "sysfs", "cgroup", "cgroup2", "securityfs",
                       "pstore", "bpf", "debugfs", "tracefs", "configfs", "fusectl", "mqueue", "hugetlbfs",
                       "autofs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs", "ramfs", "squashfs",
                       "overlay", "aufs", "iso9660", "udf", "none", "rootfs"})
# Block devices that are not disks of the server (loop files, RAM disks, compressed swap, optical).
_NOT_DISKS = re.compile(r"^(loop|ram|zram|sr|fd|nbd)\d")
X86 = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686"})
_WINDOWS = re.compile(r"^(MINGW|MSYS|CYGWIN|Windows|UWIN)", re.I)

FILE_LEVEL_RATIO = 0.5   # recommend file-level when used space < 50% of what a block-level copy moves


class Severity(enum.StrEnum):
    BLOCKER = "blocker"     # the migration cannot go ahead as it stands
    WARNING = "warning"     # it can, with a risk or a manual step named in the hint
    INFO = "info"           # worth knowing; Ferry deals with it


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class BlockDevice:
    """A disk, partition or volume as lsblk (or /sys/block) shows it; size in bytes."""
    name: str
    type: str                        # disk, part, lvm, crypt, raid1, ...
    size: int
    fstype: str | None = None
    mountpoint: str | None = None
    uuid: str | None = None
    parent: str | None = None        # the device it sits on (PKNAME)


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int
    pvs: int
    lvs: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    size: int
    path: str | None = None


@dataclass(frozen=True)
class Filesystem:
    """A mounted filesystem (df): bytes."""
    source: str
    type: str
    size: int
    used: int
    available: int
    mountpoint: str

    @property
    def network(self) -> bool:
        return self.type in NETWORK_FS


@dataclass(frozen=True)
class Workload:
    """CPU, memory and I/O at the time of collection."""
    cpus: int | None = None
    cpu_model: str | None = None
    mem_total: int | None = None          # bytes
    mem_available: int | None = None
    swap_total: int | None = None
    swap_free: int | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    io_busy: float | None = None          # the busiest disk's busy share of the sample, 0..1
    io_busiest: str | None = None
    io_sample_s: float | None = None
    read_bytes_per_s: float | None = None     # all disks, over the sample
    write_bytes_per_s: float | None = None
    pressure_cpu: float | None = None     # /proc/pressure "some avg60": % of time some task stalled
    pressure_io: float | None = None
    pressure_memory: float | None = None


@dataclass(frozen=True)
class ListeningService:
    address: str
    port: int
    process: str | None = None            # None: not known (ss without root, or /proc/net/tcp)


@dataclass(frozen=True)
class ToolFound:
    """A hypervisor tool or licence daemon, and how it was found."""
    name: str
    what: str                             # the hypervisor ("VMware") or the licence software
    how: str                              # "running, at /usr/bin/vmtoolsd, package installed", ...


@dataclass(frozen=True)
class Hypervisor:
    detected: str | None = None           # systemd-detect-virt: none, kvm, vmware, microsoft, xen, oracle, ...
    vendor: str | None = None             # /sys/class/dmi/id/sys_vendor
    product: str | None = None            # /sys/class/dmi/id/product_name
    cpu_flag: bool = False                # /proc/cpuinfo has the hypervisor flag: a VM, whatever the DMI says
    tools: list[ToolFound] = field(default_factory=list)


@dataclass(frozen=True)
class UsbDevice:
    port: str                             # 1-1.2
    vendor_id: str
    product_id: str
    manufacturer: str | None = None
    product: str | None = None
    dongle: str | None = None             # the licence dongle vendor, when the vendor id is one


@dataclass(frozen=True)
class PciDisplay:
    slot: str
    vendor_id: str
    device_id: str
    vendor: str | None = None
    compute: bool = False                 # a GPU a VM does not get (NVIDIA, AMD, any 3D controller)


@dataclass(frozen=True)
class FcHost:
    name: str
    wwpn: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class SourceFacts:
    host: str
    windows: str | None = None            # one line when the source is Windows: out of reach here
    system: str | None = None             # uname -s: Linux (anything else is not a migration source)
    os_id: str | None = None              # /etc/os-release ID, VERSION_ID, PRETTY_NAME
    os_version: str | None = None
    os_name: str | None = None
    kernel: str | None = None
    arch: str | None = None
    boot: str | None = None               # "uefi" | "bios"; None: unknown
    devices: list[BlockDevice] = field(default_factory=list)
    volume_groups: list[VolumeGroup] = field(default_factory=list)
    logical_volumes: list[LogicalVolume] = field(default_factory=list)
    filesystems: list[Filesystem] = field(default_factory=list)
    workload: Workload = field(default_factory=Workload)
    services: list[ListeningService] = field(default_factory=list)
    hypervisor: Hypervisor = field(default_factory=Hypervisor)
    usb: list[UsbDevice] = field(default_factory=list)
    displays: list[PciDisplay] = field(default_factory=list)
    fc_hosts: list[FcHost] = field(default_factory=list)
    licences: list[ToolFound] = field(default_factory=list)
    licence_looked_for: str = ""          # what the licence check looked for (it cannot see MAC binding)
    unknown: dict[str, str] = field(default_factory=dict)   # section -> why it is not known
    collected_at: float = 0.0
    elapsed_s: float = 0.0

    def partitions(self) -> list[BlockDevice]:
        return [d for d in self.devices if d.type == "part"]

    def copy_units(self) -> list[BlockDevice]:
        """What a block-level copy moves: each disk's partitions, or the whole disk where it holds a
        filesystem, a volume or anything else directly (no partition table); empty disks are left out."""
        kids: dict[str, list[BlockDevice]] = {}
        for d in self.devices:
            if d.parent:
                kids.setdefault(d.parent, []).append(d)
        out = []
        for d in self.devices:
            if d.type != "disk" or d.size <= 0 or _NOT_DISKS.match(d.name):
                continue
            parts = [k for k in kids.get(d.name, []) if k.type == "part"]
            if parts:
                out += parts
            elif kids.get(d.name) or d.fstype or d.mountpoint:
                out.append(d)
        return out

    def local_filesystems(self) -> list[Filesystem]:
        """Filesystems with data of their own on this server (network ones left out), once per device."""
        seen, out = set(), []
        for f in self.filesystems:
            if f.network or f.source in seen:
                continue
            seen.add(f.source)
            out.append(f)
        return out

    def used_bytes(self) -> int:
        return sum(f.used for f in self.local_filesystems())

    def block_bytes(self) -> int:
        return sum(d.size for d in self.copy_units())


# ---------------------------------------------------------------- collection


async def collect(t: Transport, *, sample_s: float = 1.0, timeout: float = 60.0) -> SourceFacts:
    """The facts of the server behind `t`, in one round trip, read-only. Raises FerryError only when
    the host cannot be reached or the script gave no answer at all; a Windows source is not an error
    (SourceFacts.windows says it in one line)."""
    t0 = time.monotonic()
    collected = time.time()
    try:
        r = await COLLECT.run(t, f"{sample_s:g}", timeout=timeout)
    except CommandError as e:
        if e.exit_status == 127:   # no sh at all: this transport found none on the host
            return SourceFacts(t.host, windows=_windows_line(t.host, "no POSIX sh answers"),
                               collected_at=collected, elapsed_s=time.monotonic() - t0)
        raise
    out, err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    if "@@uname" not in out:
        said = " ".join((err or out).split())[:120]
        if r.exit_status in (1, 9009, 127) and re.search(r"not recognized|CommandNotFound|is not recognised", err + out):
            # cmd.exe / PowerShell as the login shell: `sh` is not a command there
            return SourceFacts(t.host, windows=_windows_line(t.host, f"its shell says: {said}"),
                               collected_at=collected, elapsed_s=time.monotonic() - t0)
        if r.exit_status == 127:
            return SourceFacts(t.host, windows=_windows_line(t.host, "no POSIX sh answers"),
                               collected_at=collected, elapsed_s=time.monotonic() - t0)
        raise FerryError(f"the assessment script on {t.host} gave no answer (exit {r.exit_status}): {said or 'no output'}",
                         "the source needs a POSIX sh and /proc: is it a Linux server?")
    facts = parse(t.host, out)
    return SourceFacts(**{**facts, "collected_at": collected, "elapsed_s": time.monotonic() - t0})


def _windows_line(host: str, why: str) -> str:
    return f"{host} is a Windows server ({why}): Windows sources are out of reach here, Ferry migrates Linux servers"


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if line.startswith("@@") and not line.startswith("@@unknown"):
            current = line[2:].strip()
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    return sections


def _why_unknown(lines: list[str]) -> str | None:
    for line in lines:
        if line.startswith("@@unknown"):
            return line[len("@@unknown"):].strip() or "not known"
    return None


def _int(s: Any) -> int | None:
    try:
        return int(str(s).strip())
    except (TypeError, ValueError):
        return None


def _float(s: Any) -> float | None:
    try:
        return float(str(s).strip())
    except (TypeError, ValueError):
        return None


def parse(host: str, text: str) -> dict:
    """The fields of SourceFacts found in the script's output (collected_at/elapsed_s aside)."""
    sec = _sections(text)
    unknown: dict[str, str] = {}
    facts: dict[str, Any] = {"host": host}
    for line in sec.get("uname", []):
        key, _, value = line.partition(" ")
        if key == "nouname":
            continue
        facts[{"system": "system", "release": "kernel", "machine": "arch"}.get(key, "_")] = value.strip() or None
    facts.pop("_", None)
    system = facts.get("system")
    if system in (None, "none") or _WINDOWS.match(system or ""):
        why = f"uname says {system}" if system not in (None, "none") else "uname is missing and /proc/version does not say Linux"
        return {"host": host, "system": None if system == "none" else system, "windows": _windows_line(host, why)}
    if system != "Linux":
        return {"host": host, "system": system, "unknown": {"all": f"{system} is not Linux: nothing more collected"}}
    if "nouname" in sec.get("uname", []):
        unknown["uname"] = "uname is missing: the kernel release is read from /proc/version"

    osr = sec.get("os-release", [])
    if (why := _why_unknown(osr)):
        unknown["os"] = why
    values = _os_release(osr)
    facts["os_id"], facts["os_version"] = values.get("ID"), values.get("VERSION_ID")
    facts["os_name"] = values.get("PRETTY_NAME") or values.get("NAME")

    boot = sec.get("boot", [])
    if (why := _why_unknown(boot)):
        unknown["boot"] = why
    elif boot and boot[0].strip() in ("uefi", "bios"):
        facts["boot"] = boot[0].strip()

    devices, why = _devices(sec.get("lsblk", []), sec.get("sysblock", []))
    facts["devices"] = devices
    if why:
        unknown["disks"] = why

    if "vgs" in sec:
        lines = sec["vgs"]
        if (why := _why_unknown(lines)):
            unknown["lvm"] = why
        else:
            facts["volume_groups"] = [VolumeGroup(str(v.get("vg_name")), _int(v.get("vg_size")) or 0,
                                                  _int(v.get("vg_free")) or 0, _int(v.get("pv_count")) or 0,
                                                  _int(v.get("lv_count")) or 0) for v in _lvm_report(lines, "vg")]
        lines = sec.get("lvs", [])
        if not _why_unknown(lines):
            facts["logical_volumes"] = [LogicalVolume(str(v.get("lv_name")), str(v.get("vg_name")),
                                                      _int(v.get("lv_size")) or 0, v.get("lv_path") or None)
                                        for v in _lvm_report(lines, "lv")]

    fs, why = _filesystems(sec.get("df", []), sec.get("df-k"))
    facts["filesystems"] = fs
    if why:
        unknown["filesystems"] = why

    wl, whys = _workload(sec, _sysblock_names(sec.get("sysblock", [])) or {d.name for d in devices if d.type == "disk"})
    facts["workload"] = wl
    unknown.update(whys)

    if "proc-net-tcp" in sec:
        lines = sec["proc-net-tcp"]
        if (why := _why_unknown(lines)):
            unknown["services"] = why
        else:
            facts["services"] = _proc_net_tcp(lines)
            unknown["services.process"] = "ss is not installed: /proc/net/tcp names no processes"
    else:
        facts["services"] = _ss(sec.get("listen", []))

    hv, licences, whys = _tools(sec.get("virt", []), sec.get("tools", []), sec.get("cpu", []))
    facts["hypervisor"], facts["licences"] = hv, licences
    unknown.update(whys)
    facts["licence_looked_for"] = (
        "licence daemons running or installed (" + ", ".join(LICENCE_DAEMONS) + "; packages "
        + ", ".join(LICENCE_PACKAGES) + ") and USB dongles by vendor (" + ", ".join(DONGLE_VENDORS.values())
        + "); a licence bound to a MAC address or host id cannot be seen from outside: ask the owner")
    facts["usb"] = _usb(sec.get("usb", []))
    facts["fc_hosts"] = [FcHost(p[1], p[2] if len(p) > 2 else None, " ".join(p[3:]) or None)
                         for p in (line.split() for line in sec.get("fc", [])) if len(p) >= 2 and p[0] == "fc"]
    facts["displays"] = _displays(sec.get("pci", []))
    if "end" not in sec:
        unknown["end"] = "the script's output ended early"
    facts["unknown"] = unknown
    return facts


def _os_release(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, eq, value = line.partition("=")
        if not eq or not key.isidentifier():
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value.strip("'\"")]
        out[key] = " ".join(words)
    return out


def _devices(lsblk: list[str], sysblock: list[str]) -> tuple[list[BlockDevice], str | None]:
    why = _why_unknown(lsblk)
    if not why:
        try:
            doc = json.loads("\n".join(lsblk))
        except ValueError:
            doc, why = None, "lsblk gave no JSON"
        if isinstance(doc, dict):
            out: list[BlockDevice] = []

            def walk(items: Any, parent: str | None) -> None:
                for d in items or []:
                    if not isinstance(d, dict):
                        continue
                    name = str(d.get("name"))
                    if parent is None and _NOT_DISKS.match(name):
                        continue   # a loop file, a RAM disk, compressed swap, a CD: not the server's disks
                    out.append(BlockDevice(name, str(d.get("type") or "?"), _int(d.get("size")) or 0,
                                           d.get("fstype") or None, d.get("mountpoint") or None,
                                           d.get("uuid") or None, d.get("pkname") or parent))
                    walk(d.get("children"), name)

            walk(doc.get("blockdevices"), None)
            # a device with two parents (an LV on a mirror, a RAID member) shows once under each: once is enough
            seen, unique = set(), []
            for d in out:
                if (d.name, d.parent) not in seen:
                    seen.add((d.name, d.parent))
                    unique.append(d)
            return unique, None
    # /sys/block: disks and partitions with their sizes (512-byte sectors), nothing about filesystems
    devs = []
    for line in sysblock:
        p = line.split()
        if len(p) >= 4 and p[0] in ("disk", "part") and p[2].isdigit() and not _NOT_DISKS.match(p[1]):
            devs.append(BlockDevice(p[1], p[0], int(p[2]) * 512, parent=p[3] if p[0] == "part" else None))
    if devs:
        return devs, f"{why}: disks and partitions from /sys/block, without filesystem types"
    return [], f"{why}, and /sys/block lists nothing"


def _sysblock_names(lines: list[str]) -> set[str]:
    """The disks with a device behind them (device-mapper and md volumes have none: their I/O is
    their members', counted once)."""
    return {p[1] for p in (line.split() for line in lines) if len(p) >= 4 and p[0] == "disk" and p[3] == "dev"}


def _lvm_report(lines: list[str], kind: str) -> list[dict]:
    try:
        doc = json.loads("\n".join(lines))
        return [x for x in doc["report"][0][kind] if isinstance(x, dict)]
    except (ValueError, KeyError, IndexError, TypeError):
        return []


_DF_RE = re.compile(r"^(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(?:\d+%|-)\s+(.+)$")


def _filesystems(lines: list[str], kib_lines: list[str] | None) -> tuple[list[Filesystem], str | None]:
    scale = 1
    if kib_lines is not None and not any(_DF_RE.match(x) for x in lines):
        lines, scale = kib_lines, 1024
    if (why := _why_unknown(lines)):
        return [], why
    out = []
    for line in lines:
        m = _DF_RE.match(line)
        if not m:
            continue
        source, fstype, size, used, avail, mnt = m.groups()
        if fstype in PSEUDO_FS or fstype.startswith("fuse.") and fstype not in NETWORK_FS:
            continue
        if int(size) == 0:
            continue
        out.append(Filesystem(source, fstype, int(size) * scale, int(used) * scale, int(avail) * scale, mnt))
    return out, (None if out else "df listed no filesystem with data")


def _workload(sec: dict[str, list[str]], disks: set[str]) -> tuple[Workload, dict[str, str]]:
    unknown: dict[str, str] = {}
    w: dict[str, Any] = {}
    cpu = sec.get("cpu", [])
    if (why := _why_unknown(cpu)):
        unknown["cpus"] = why
    for line in cpu:
        if line.strip().isdigit():
            w["cpus"] = int(line)
        elif line.startswith("model name"):
            w["cpu_model"] = line.partition(":")[2].strip() or None
    mem = sec.get("meminfo", [])
    if (why := _why_unknown(mem)):
        unknown["memory"] = why
    names = {"MemTotal": "mem_total", "MemAvailable": "mem_available", "SwapTotal": "swap_total", "SwapFree": "swap_free"}
    for line in mem:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in names and parts and parts[0].isdigit():
            w[names[key]] = int(parts[0]) * 1024
    load = sec.get("loadavg", [])
    if (why := _why_unknown(load)):
        unknown["load"] = why
    elif load:
        vals = [_float(x) for x in load[0].split()[:3]]
        w["load1"], w["load5"], w["load15"] = (vals + [None] * 3)[:3]
    for line in sec.get("pressure", []):
        kind, _, rest = line.partition(" ")
        m = re.search(r"some avg10=\S+ avg60=([\d.]+)", rest)
        if m and kind in ("cpu", "io", "memory"):
            w[f"pressure_{kind}"] = float(m.group(1))
    io = _diskstats(sec.get("diskstats", []), sec.get("diskstats2", []), disks)
    if io is None:
        unknown["io"] = "/proc/diskstats gave no two samples"
    else:
        w.update(io)
    return Workload(**w), unknown


def _diskstats(a: list[str], b: list[str], disks: set[str]) -> dict | None:
    def sample(lines: list[str]) -> tuple[float | None, dict[str, tuple[int, int, int]]]:
        up, stats = None, {}
        for line in lines:
            p = line.split()
            if p[:1] == ["uptime"]:
                up = _float(p[1]) if len(p) > 1 else None
            elif len(p) >= 14 and p[2] in disks and not _NOT_DISKS.match(p[2]):
                # fields: reads completed 3, sectors read 5, writes 7, sectors written 9, io_ticks ms 12
                stats[p[2]] = (int(p[5]), int(p[9]), int(p[12]))
        return up, stats

    (u1, s1), (u2, s2) = sample(a), sample(b)
    if u1 is None or u2 is None or u2 <= u1 or not s2:
        return None
    dt = u2 - u1
    busy = {n: (s2[n][2] - s1[n][2]) / (dt * 1000) for n in s2 if n in s1}
    busiest = max(busy, key=busy.get) if busy else None
    return {"io_sample_s": round(dt, 2), "io_busiest": busiest,
            "io_busy": round(min(1.0, max(0.0, busy[busiest])), 3) if busiest else None,
            "read_bytes_per_s": sum((s2[n][0] - s1[n][0]) * 512 for n in s2 if n in s1) / dt,
            "write_bytes_per_s": sum((s2[n][1] - s1[n][1]) * 512 for n in s2 if n in s1) / dt}


def _split_addr(text: str) -> tuple[str, int] | None:
    addr, _, port = text.rpartition(":")
    return (addr.strip("[]") or "*", int(port)) if port.isdigit() else None


def _ss(lines: list[str]) -> list[ListeningService]:
    out, seen = [], set()
    for line in lines:
        p = line.split()
        if not p or p[0] in ("State", "Netid") or len(p) < 4:
            continue
        where = _split_addr(p[3])
        if where is None:
            continue
        m = re.search(r'users:\(\("([^"]+)"', line)
        svc = ListeningService(where[0], where[1], m.group(1) if m else None)
        if svc not in seen:
            seen.add(svc)
            out.append(svc)
    return sorted(out, key=lambda s: (s.port, s.address))


def _proc_net_tcp(lines: list[str]) -> list[ListeningService]:
    out = set()
    for line in lines:
        p = line.split()
        if len(p) < 4 or p[3] != "0A" or ":" not in p[1]:   # 0A: TCP_LISTEN
            continue
        hexaddr, hexport = p[1].split(":")
        try:
            if len(hexaddr) == 8:
                addr = ".".join(str(b) for b in reversed(bytes.fromhex(hexaddr)))
            else:
                words = [bytes.fromhex(hexaddr[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
                addr = str(ipaddress.IPv6Address(bytes.fromhex("".join(words))))
            out.add(ListeningService(addr, int(hexport, 16)))
        except ValueError:
            continue
    return sorted(out, key=lambda s: (s.port, s.address))


def _tools(virt: list[str], tools: list[str], cpu: list[str]) -> tuple[Hypervisor, list[ToolFound], dict[str, str]]:
    unknown: dict[str, str] = {}
    hv: dict[str, Any] = {"cpu_flag": "flag hypervisor" in cpu}
    for line in virt:
        key, _, value = line.partition(" ")
        value = value.strip() or None
        if key == "detect":
            hv["detected"] = value
        elif key == "sys_vendor":
            hv["vendor"] = value
        elif key == "product_name":
            hv["product"] = value
        elif key == "hypervisor_type" and not hv.get("detected"):
            hv["detected"] = value
    if "detected" not in hv:
        unknown["hypervisor"] = "systemd-detect-virt is not installed: the hypervisor is told from DMI and CPU flags only"
    # name -> (what, [how...]): one record per tool however many ways it was found
    found: dict[str, tuple[str, list[str]]] = {}
    licences: dict[str, tuple[str, list[str]]] = {}
    for line in tools:
        p = line.split()
        if not p:
            continue
        if p[0] == "run" and len(p) >= 2:
            name, how = p[1], "running"
        elif p[0] == "path" and len(p) >= 3:
            name, how = p[1], f"at {p[2]}"
        elif p[0] == "dir" and len(p) >= 2:
            name = next((d for d in HYPERVISOR_DIRS if fnmatch.fnmatch(p[1], d)), p[1])
            how = f"{p[1]} present"
        elif p[0] == "pkg" and len(p) >= 3:
            if not p[2].startswith(("ii", "hi")):
                continue
            name, how = p[1], "package installed"
        elif p[0] == "nopkg":
            unknown["packages"] = "neither dpkg nor rpm: installed packages were not looked at"
            continue
        else:
            continue
        if name in HYPERVISOR_TOOLS or name in HYPERVISOR_PACKAGES or name in HYPERVISOR_DIRS:
            what = HYPERVISOR_TOOLS.get(name) or HYPERVISOR_PACKAGES.get(name) or HYPERVISOR_DIRS.get(name, "?")
            found.setdefault(name, (what, []))[1].append(how)
        if name in LICENCE_DAEMONS or (p[0] == "pkg" and name in LICENCE_PACKAGES):
            what = LICENCE_DAEMONS.get(name) or LICENCE_PACKAGES[name]
            licences.setdefault(name, (what, []))[1].append(how)

    def records(by_name: dict[str, tuple[str, list[str]]]) -> list[ToolFound]:
        return [ToolFound(n, what, ", ".join(dict.fromkeys(hows))) for n, (what, hows) in by_name.items()]

    return Hypervisor(**hv, tools=records(found)), records(licences), unknown


def _usb(lines: list[str]) -> list[UsbDevice]:
    out = []
    for line in lines:
        p = line.split("\t")
        if len(p) < 4 or p[0] != "usb":
            continue
        port, vid, pid, cls = p[1], p[2].lower(), p[3].lower(), (p[4] if len(p) > 4 else "")
        if cls == "09" or vid == "1d6b":   # hubs, and the root hubs of the host controllers
            continue
        out.append(UsbDevice(port, vid, pid, (p[5] if len(p) > 5 else "") or None,
                             (p[6] if len(p) > 6 else "") or None, DONGLE_VENDORS.get(vid)))
    return out


def _displays(lines: list[str]) -> list[PciDisplay]:
    out = []
    for line in lines:
        p = line.split()
        if len(p) < 5 or p[0] != "display":
            continue
        cls, vid, did = p[2].lower(), p[3].lower().removeprefix("0x"), p[4].lower().removeprefix("0x")
        out.append(PciDisplay(p[1], vid, did, DISPLAY_VENDORS.get(vid),
                              vid in GPU_VENDORS or cls.startswith("0x0302")))
    return out


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class Thresholds:
    """When utilisation counts as very high (a warning: the target needs at least as much, and the
    copy competes with the workload). Defaults: 5-minute load per CPU 0.9, memory in use 90%, the
    busiest disk busy 80% of the I/O sample, some task stalled on I/O 25% of the last minute (PSI)."""
    load_per_cpu: float = 0.9
    memory_used: float = 0.9
    io_busy: float = 0.8
    io_pressure: float = 25.0


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Finding:
    name: str                 # snake_case, stable: scripts and the cutover's blockers refer to it
    severity: Severity
    message: str              # one line
    hint: str = ""


def findings(facts: SourceFacts, thresholds: Thresholds = DEFAULT_THRESHOLDS, *,
             method: Method | str | None = None) -> list[Finding]:
    """What would stop or burden the migration of `facts`' server, blockers first. `method` (file or
    block), when chosen, makes a filesystem a file-level copy cannot recreate a blocker; before that
    it is a warning saying only block-level fits."""
    out: list[Finding] = []
    add = out.append
    if facts.windows:
        return [Finding("windows", Severity.BLOCKER, facts.windows,
                        "migrate it with a Windows tool (block-level with VSS); Ferry takes Linux sources")]
    if facts.system != "Linux":
        return [Finding("unsupported_os", Severity.BLOCKER,
                        f"{facts.host} runs {facts.system or 'an unknown system'}, not Linux",
                        "Ferry migrates Linux servers (x86) only")]
    if facts.arch is None:
        add(Finding("arch_unknown", Severity.WARNING, f"the architecture of {facts.host} is not known",
                    "check `uname -m` on the source: only x86 servers can be migrated"))
    elif facts.arch not in X86:
        add(Finding("non_x86", Severity.BLOCKER, f"{facts.host} is {facts.arch}, not x86: it cannot run as a VM here",
                    "the platform runs x86 guests only; rebuild the service on an x86 server"))
    method = Method(method) if method else None
    for f in facts.local_filesystems():
        if f.type in FILE_LEVEL_FS:
            continue
        if f.type in CONVERTED_FS:
            add(Finding("filesystem_converted", Severity.WARNING,
                        f"{f.type} on {f.mountpoint}: a file-level copy recreates it as ext4 "
                        f"({'subvolumes and snapshots' if f.type == 'btrfs' else 'datasets, pools and snapshots'} are not carried)",
                        "use block-level to keep it as it is, or plan its layout on ext4"))
        elif method != Method.BLOCK:
            add(Finding("filesystem_unsupported", Severity.BLOCKER if method == Method.FILE else Severity.WARNING,
                        f"{f.type} on {f.mountpoint} cannot be recreated file by file"
                        + ("" if method == Method.FILE else ": only block-level fits"),
                        "migrate block-level (method = \"block\"), which copies its partition as it is"))
    for f in facts.filesystems:
        if f.network:
            add(Finding("network_filesystem", Severity.WARNING,
                        f"{f.type} {f.source} on {f.mountpoint}: its data stays on its server and is not copied",
                        "the target mounts it as the source did: check the target may reach that server"))
    if facts.filesystems and not any(f.mountpoint == "/" for f in facts.filesystems):
        add(Finding("root_unknown", Severity.WARNING, f"no root filesystem among those df listed on {facts.host}",
                    "a container or an overlay root is not a server to migrate: check the source"))
    if "filesystems" in facts.unknown:
        add(Finding("filesystems_unknown", Severity.WARNING,
                    f"the filesystems of {facts.host} are not known: {facts.unknown['filesystems']}",
                    "without df's figures the data size and the method are guesses"))
    if facts.boot == "uefi":
        add(Finding("uefi", Severity.WARNING,
                    f"{facts.host} boots UEFI; the target boots BIOS by direct kernel boot of the migrated root",
                    "the EFI system partition is copied but not used; the source's EFI boot entries do not carry over"))
    for u in facts.usb:
        if u.dongle:
            add(Finding("licence_dongle", Severity.WARNING,
                        f"USB licence dongle {u.dongle} ({u.vendor_id}:{u.product_id}) on port {u.port}",
                        "a VM gets no USB dongle here: move the licence to a network licence server or the dongle to a USB-over-IP hub"))
        else:
            add(Finding("usb_device", Severity.WARNING,
                        f"USB device {u.vendor_id}:{u.product_id} {u.manufacturer or ''} {u.product or ''}".rstrip()
                        + f" on port {u.port}",
                        "a VM gets no USB device here: check whether the service needs it"))
    for fc in facts.fc_hosts:
        add(Finding("fc_hba", Severity.WARNING, f"fibre channel HBA {fc.name} (WWPN {fc.wwpn or '?'}, {fc.state or '?'})",
                    "LUNs reached over FC are not on the local disks: migrate their data too, or present them to the target"))
    for d in facts.displays:
        if d.compute:
            add(Finding("gpu", Severity.WARNING, f"GPU {d.vendor or d.vendor_id} {d.vendor_id}:{d.device_id} at {d.slot}",
                        "a VM here gets no GPU: check whether the service computes or draws on it"))
    for lic in facts.licences:
        add(Finding("licence_binding", Severity.WARNING, f"{lic.what} ({lic.name}, {lic.how})",
                    "licences bound to a dongle, a MAC address or a host id may not move: ask the vendor before the window"))
    w = facts.workload
    if w.cpus and w.load5 is not None and w.load5 / w.cpus >= thresholds.load_per_cpu:
        add(Finding("high_cpu", Severity.WARNING,
                    f"load {w.load5:.2f} on {w.cpus} CPUs ({w.load5 / w.cpus:.2f} per CPU, threshold {thresholds.load_per_cpu:g})",
                    "give the target at least as many CPUs, and sync outside the busy hours"))
    if w.mem_total and w.mem_available is not None:
        used = 1 - w.mem_available / w.mem_total
        if used >= thresholds.memory_used:
            add(Finding("high_memory", Severity.WARNING,
                        f"memory {used:.0%} in use of {_size(w.mem_total)} (threshold {thresholds.memory_used:.0%})",
                        "give the target at least as much memory"))
    if w.io_busy is not None and w.io_busy >= thresholds.io_busy:
        add(Finding("high_io", Severity.WARNING,
                    f"disk {w.io_busiest} busy {w.io_busy:.0%} of a {w.io_sample_s:g} s sample (threshold {thresholds.io_busy:.0%})",
                    "the copy competes with the workload for the disk: sync outside the busy hours"))
    elif w.pressure_io is not None and w.pressure_io >= thresholds.io_pressure:
        add(Finding("high_io", Severity.WARNING,
                    f"tasks stalled on I/O {w.pressure_io:g}% of the last minute (threshold {thresholds.io_pressure:g}%)",
                    "the copy competes with the workload for the disk: sync outside the busy hours"))
    tools = sorted({t.what for t in facts.hypervisor.tools})
    if tools:
        names = ", ".join(sorted({t.name for t in facts.hypervisor.tools}))
        add(Finding("hypervisor_tools", Severity.INFO, f"{' and '.join(tools)} guest tools present ({names})",
                    "the V2V step of the cutover removes them from the target; the source keeps them"))
    if facts.volume_groups:
        vgs = ", ".join(f"{v.name} ({v.lvs} LV)" for v in facts.volume_groups)
        add(Finding("lvm", Severity.INFO, f"LVM volume groups {vgs}",
                    "block-level copies the physical volumes as they are; file-level recreates the filesystems"))
    order = {Severity.BLOCKER: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(out, key=lambda f: order[f.severity])


def _size(n: float | None) -> str:
    from ..fmt import size
    return size(n)


# ---------------------------------------------------------------- recommendation and estimate


@dataclass(frozen=True)
class Recommendation:
    method: Method
    reason: str               # one line naming the figures


def recommend(facts: SourceFacts, *, resize: bool = False, ratio: float = FILE_LEVEL_RATIO) -> Recommendation:
    """File-level when resizing is wanted or the used space is below `ratio` of what a block-level copy
    moves; block-level otherwise, and always when a filesystem cannot be recreated file by file."""
    odd = sorted({f"{f.type} on {f.mountpoint}" for f in facts.local_filesystems()
                  if f.type not in FILE_LEVEL_FS and f.type not in CONVERTED_FS})
    if odd:
        return Recommendation(Method.BLOCK, f"block-level: {', '.join(odd)} cannot be recreated file by file")
    used, block = facts.used_bytes(), facts.block_bytes()
    if resize:
        return Recommendation(Method.FILE, f"file-level: resizing is wanted ({_size(used)} used on "
                                           f"{_size(block)} of partitions)")
    if not facts.filesystems or block <= 0:
        missing = "the used space" if not facts.filesystems else "the partition sizes"
        return Recommendation(Method.BLOCK, f"block-level: {missing} of {facts.host} are not known, "
                                            "so the partitions are copied as they are")
    share = used / block
    if share < ratio:
        return Recommendation(Method.FILE, f"file-level: {_size(used)} used is {share:.0%} of {_size(block)} of "
                                           f"partitions (below {ratio:.0%}): only the data is copied")
    return Recommendation(Method.BLOCK, f"block-level: {_size(used)} used is {share:.0%} of {_size(block)} of "
                                        f"partitions (at least {ratio:.0%}): copying them whole costs little more")


@dataclass(frozen=True)
class Estimate:
    method: Method
    bytes: int                # what crosses the network
    bandwidth_bps: float      # bits per second, as the network check measures
    seconds: float
    assumptions: list[str] = field(default_factory=list)


def estimate(facts: SourceFacts, method: Method | str, bandwidth_bps: float) -> Estimate:
    """How long the initial copy takes: the used bytes (file-level) or the partitions' sizes
    (block-level) at `bandwidth_bps` bits per second."""
    method = Method(method)
    if method == Method.AUTO:
        raise FerryError("estimate a file or block migration, not auto", "take recommend()'s method")
    if bandwidth_bps <= 0:
        raise FerryError(f"a bandwidth must be positive, got {bandwidth_bps:g} bit/s",
                         "run the network check first: it measures the bandwidth")
    if method == Method.FILE:
        n = facts.used_bytes()
        what = f"the used bytes of the local filesystems ({_size(n)}, df); files are not compressed"
        extra = "many small files copy slower than their size says (per-file overhead not counted)"
    else:
        n = facts.block_bytes()
        what = f"the partitions' whole sizes ({_size(n)}), free space included, not compressed"
        extra = "the source's disks read at least as fast as the network carries"
    assumptions = [what, f"the link carries the measured {bandwidth_bps / 1e6:.0f} Mbit/s for the whole copy", extra,
                   "SSH's ciphers and tar on both ends keep up with the link (a lower bound where they do not: the "
                   "first sync round probes the real data path and predicts itself from that)"]
    if facts.workload.io_busy is not None and facts.workload.io_busy >= DEFAULT_THRESHOLDS.io_busy:
        assumptions.append(f"the source's disk is busy ({facts.workload.io_busy:.0%}): the copy may take longer")
    return Estimate(method, n, bandwidth_bps, n * 8 / bandwidth_bps, assumptions)


# ---------------------------------------------------------------- decision support (E9, E10)


@dataclass(frozen=True)
class MigrationLayer:
    """One row of the migration methods table (source notes, 数据迁移手段)."""
    layer: str
    modes: str                # online, offline
    downtime: str
    resources: str
    heterogeneous: bool       # source and target platforms may differ
    difficulty: str
    ferry: str = ""           # where Ferry stands in this row


METHODS: list[MigrationLayer] = [
    MigrationLayer("database", "online, offline", "2-3 h, depending on the size of the log files",
                   "high network bandwidth", True, "medium", "not Ferry's: the database's own replication"),
    MigrationLayer("filesystem", "online, offline", "full restore 3-4 h, incremental 1-2 h",
                   "host and backup resources", False, "medium",
                   "Ferry's file-level migration (with incremental syncs the downtime is the last sync)"),
    MigrationLayer("logical volume", "online", "about 1 h", "host and storage resources", False, "medium",
                   "close to Ferry's block-level migration (partitions and volumes copied as they are)"),
    MigrationLayer("fibre channel", "online, offline", "about 15 min", "host and storage resources", True, "low",
                   "not Ferry's: LUNs presented to the new host"),
    MigrationLayer("storage", "online", "about 20 min", "storage resources", False, "needs a replication licence",
                   "not Ferry's: array replication"),
]


@dataclass(frozen=True)
class Phase:
    name: str
    items: list[str]


PHASES: list[Phase] = [
    Phase("survey", ["business systems, how they are deployed, what they do",
                     "how the systems depend on each other"]),
    Phase("assessment", ["source and target platform versions", "OS type and kernel version",
                         "disk types and layout, boot mode", "business type and workload",
                         "suitability for virtualisation (architecture, special hardware, USB, utilisation, OS, licences)",
                         "feasibility with the tool, and the risks (complexity, downtime, cost)"]),
    Phase("planning", ["method per server (file or block), target sizes and network",
                       "waves, sync interval and the maintenance window"]),
    Phase("test migration", ["rehearse the contingency plan (rollback)", "test the migration tool",
                             "performance test", "stress test", "function test", "connectivity test"]),
    Phase("implementation", ["back up the data", "prepare the target (live image, nothing installed on the source)",
                             "migrate the system", "verify the system", "sync the data", "verify the data",
                             "back up the source"]),
    Phase("acceptance", ["connectivity", "function", "performance"]),
]


@dataclass(frozen=True)
class Assessment:
    facts: SourceFacts
    findings: list[Finding]
    recommendation: Recommendation | None     # None for a source out of reach (Windows, not Linux)
    estimate: Estimate | None = None          # None until a bandwidth is known
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    methods: list[MigrationLayer] = field(default_factory=lambda: list(METHODS))
    phases: list[Phase] = field(default_factory=lambda: list(PHASES))

    @property
    def blockers(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.BLOCKER]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.WARNING]


def assess(facts: SourceFacts, *, thresholds: Thresholds = DEFAULT_THRESHOLDS, resize: bool = False,
           method: Method | str | None = None, bandwidth_bps: float | None = None) -> Assessment:
    """The assessment of collected facts: findings, the recommended method (or `method` when the plan
    fixes one) and, with a measured bandwidth, the estimate."""
    if facts.windows or facts.system != "Linux":
        return Assessment(facts, findings(facts, thresholds), None, None, thresholds)
    rec = recommend(facts, resize=resize)
    chosen = Method(method) if method else rec.method
    est = estimate(facts, chosen, bandwidth_bps) if bandwidth_bps else None
    return Assessment(facts, findings(facts, thresholds, method=method), rec, est, thresholds)


# ---------------------------------------------------------------- Markdown


def _cell(value: Any) -> str:
    from ..textsafe import line
    return "-" if value is None or value == "" else line(value).replace("|", "\\|")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def report_markdown(a: Assessment) -> str:
    """The assessment as a Markdown document: verdict, findings, the facts, the methods table and the
    phases checklist."""
    from ..fmt import duration, stamp
    f = a.facts
    out = [f"# Assessment of {_cell(f.host)}", ""]
    if f.collected_at:
        out += [f"Collected {stamp(f.collected_at)} in {f.elapsed_s:.1f} s, read-only, nothing installed.", ""]
    if f.windows:
        return "\n".join(out + [_cell(f.windows), ""])
    blockers, warnings = a.blockers, a.warnings
    out += ["## Verdict", "",
            f"- {len(blockers)} blocker(s), {len(warnings)} warning(s)"
            + (": " + ", ".join(b.name for b in blockers) if blockers else "")]
    if a.recommendation:
        out.append(f"- Recommended: {_cell(a.recommendation.reason)}")
    if a.estimate:
        e = a.estimate
        out.append(f"- Estimated initial copy ({e.method}-level): {_size(e.bytes)} at {e.bandwidth_bps / 1e6:.0f} Mbit/s"
                   f" = {duration(e.seconds)}; assuming " + "; ".join(e.assumptions))
    else:
        out.append("- Estimated duration: not yet (the network check measures the bandwidth)")
    out += ["", "## Findings", ""]
    out += (_table(["severity", "name", "finding", "hint"], [[x.severity, x.name, x.message, x.hint] for x in a.findings])
            if a.findings else ["None."])
    out += ["", "## System", ""]
    out += _table(["", ""], [["system", f.system], ["distribution", f.os_name], ["ID / version", f"{f.os_id or '?'} {f.os_version or ''}"],
                             ["kernel", f.kernel], ["architecture", f.arch], ["boot mode", f.boot or "unknown"],
                             ["hypervisor", f.hypervisor.detected or ("a VM (CPU flag)" if f.hypervisor.cpu_flag else None)],
                             ["DMI vendor / product", f"{f.hypervisor.vendor or '?'} / {f.hypervisor.product or '?'}"]])
    out += ["", "## Disks and partitions", ""]
    out += _table(["device", "type", "size", "filesystem", "mount point", "UUID", "on"],
                  [[d.name, d.type, _size(d.size), d.fstype, d.mountpoint, d.uuid, d.parent] for d in f.devices])
    if f.volume_groups or f.logical_volumes:
        out += ["", "## LVM", ""]
        out += _table(["volume group", "size", "free", "PVs", "LVs"],
                      [[v.name, _size(v.size), _size(v.free), v.pvs, v.lvs] for v in f.volume_groups])
        out += [""] + _table(["logical volume", "group", "size", "path"],
                             [[v.name, v.vg, _size(v.size), v.path] for v in f.logical_volumes])
    out += ["", "## Filesystems", ""]
    out += _table(["mount point", "type", "device", "size", "used", "use"],
                  [[x.mountpoint, x.type, x.source, _size(x.size), _size(x.used),
                    f"{x.used / x.size:.0%}" if x.size else None] for x in f.filesystems])
    out += ["", f"Used {_size(f.used_bytes())} of {_size(f.block_bytes())} of partitions a block-level copy moves.",
            "", "## Workload", ""]
    w = f.workload
    mem = (f"{_size(w.mem_total - w.mem_available)} of {_size(w.mem_total)} in use"
           if w.mem_total and w.mem_available is not None else None)
    out += _table(["", ""], [
        ["CPUs", f"{w.cpus or '?'} {w.cpu_model or ''}".strip()],
        ["load 1/5/15 min", " / ".join("?" if x is None else f"{x:.2f}" for x in (w.load1, w.load5, w.load15))],
        ["memory", mem], ["swap", f"{_size(w.swap_total)} ({_size(w.swap_free)} free)" if w.swap_total else "none"],
        ["busiest disk", f"{w.io_busiest} busy {w.io_busy:.0%} of {w.io_sample_s:g} s" if w.io_busy is not None else None],
        ["disk read / write", f"{_size(w.read_bytes_per_s)}/s / {_size(w.write_bytes_per_s)}/s"
         if w.read_bytes_per_s is not None else None],
        ["stalled (PSI some, 60 s) cpu / io / memory",
         " / ".join("?" if x is None else f"{x:g}%" for x in (w.pressure_cpu, w.pressure_io, w.pressure_memory))]])
    out += ["", "## Listening services", ""]
    out += _table(["address", "port", "process"], [[s.address, s.port, s.process] for s in f.services]) if f.services else ["None found."]
    out += ["", "## Hypervisor tools", ""]
    out += (_table(["tool", "hypervisor", "found"], [[t.name, t.what, t.how] for t in f.hypervisor.tools])
            if f.hypervisor.tools else ["None found (VMware, VirtualBox, Xen and Hyper-V tools were looked for)."])
    out += ["", "## Special hardware and licences", ""]
    hw = ([["USB", f"{u.vendor_id}:{u.product_id} {u.manufacturer or ''} {u.product or ''}".strip(), u.dongle or ""] for u in f.usb]
          + [["FC HBA", f"{x.name} WWPN {x.wwpn or '?'} {x.state or ''}".strip(), ""] for x in f.fc_hosts]
          + [["display", f"{d.vendor or d.vendor_id} {d.vendor_id}:{d.device_id} at {d.slot}", "GPU" if d.compute else ""]
             for d in f.displays]
          + [["licence", f"{lic.what} ({lic.name})", lic.how] for lic in f.licences])
    out += _table(["kind", "what", "note"], hw) if hw else ["None found."]
    out += ["", f"Looked for: {_cell(f.licence_looked_for)}."]
    if f.unknown:
        out += ["", "## Not known", ""] + [f"- {k}: {_cell(v)}" for k, v in sorted(f.unknown.items())]
    out += ["", "## Migration methods (E9)", ""]
    out += _table(["layer", "modes", "downtime", "resources", "heterogeneous", "difficulty", "Ferry"],
                  [[m.layer, m.modes, m.downtime, m.resources, "yes" if m.heterogeneous else "no", m.difficulty, m.ferry]
                   for m in a.methods])
    out += ["", "## Project phases (E10)", ""]
    for p in a.phases:
        out += [f"### {p.name}", ""] + [f"- [ ] {item}" for item in p.items] + [""]
    return "\n".join(out)
