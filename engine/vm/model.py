"""VM and template records: what Ferry knows about a virtual machine, independent of its process."""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any, Iterable, Iterator

from ..errors import PermanentError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
BOOT_DEVICES = ("disk", "cdrom", "live")
BUSES = ("virtio", "scsi", "ide")
PASSTHROUGH_KINDS = ("usb", "gpu", "disk")
MiB = 1 << 20
GiB = 1 << 30


class VMKind(StrEnum):
    VM = "vm"
    TEMPLATE = "template"


class VMState(StrEnum):
    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"
    HIBERNATED = "hibernated"     # memory saved to a state file; resume restores it
    TEMPLATE = "template"         # a template never runs
    RECYCLED = "recycled"         # delayed delete: in the recycle bin until restored or purged
    MISSING = "missing"           # recorded as running, but its QEMU process is gone
    INCOMPLETE = "incomplete"     # being made by its task (busy): not a usable VM until that task is done
    DELETING = "deleting"         # being deleted by its task (busy): a rerun or resume finishes it

    @property
    def symbol(self) -> str:
        return {"stopped": "■", "running": "▶", "paused": "⏸", "hibernated": "☾", "template": "◇",
                "recycled": "♻", "missing": "✖", "incomplete": "◌", "deleting": "⌫"}[self.value]


# A record its task has not finished making or deleting: busy with that task, and not a usable VM.
UNFINISHED_STATES = frozenset({VMState.INCOMPLETE, VMState.DELETING})
# A QEMU process runs for it.
RUNNING_STATES = frozenset({VMState.RUNNING, VMState.PAUSED})


@dataclass(frozen=True)
class DiskSpec:
    name: str                     # disk0, disk1, ...
    datastore: str
    path: str                     # the qcow2 image on the host
    size: int                     # virtual size in bytes
    bus: str = "virtio"
    shared: bool = False          # on a shared datastore and attachable by several VMs
    backing: str | None = None    # linked clone: the template's image this one is based on


@dataclass(frozen=True)
class NicSpec:
    network: str = "default"
    mac: str = ""


@dataclass(frozen=True)
class Passthrough:
    """A host device given to the VM (recorded; attached only on hosts that have it)."""
    kind: str                     # usb | gpu | disk
    address: str                  # usb vendor:product, PCI address, or a block device path


@dataclass(frozen=True)
class VMSpec:
    id: str
    name: str
    host: str
    cpus: int = 1
    max_cpus: int = 4             # hot-add up to this many
    memory_mb: int = 256
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    boot: tuple[str, ...] = ("disk", "live")
    passthrough: tuple[Passthrough, ...] = ()
    kind: VMKind = VMKind.VM
    origin: str = ""              # the template or VM it was made from, for the operator
    hibernate_file: str = ""      # set while hibernated

    @property
    def is_template(self) -> bool:
        return self.kind is VMKind.TEMPLATE

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def process_name(self) -> str:
        """The name of its QEMU on the host (pid file, sockets): see process_name()."""
        return process_name(self.id)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VMSpec":
        return cls(
            id=d["id"], name=d["name"], host=d["host"], cpus=int(d.get("cpus", 1)),
            max_cpus=int(d.get("max_cpus", default_max_cpus(int(d.get("cpus", 1))))),
            memory_mb=int(d.get("memory_mb", 256)),
            disks=tuple(DiskSpec(**x) for x in d.get("disks", ())),
            nics=tuple(NicSpec(**x) for x in d.get("nics", ())),
            boot=tuple(d.get("boot", ("disk", "live"))),
            passthrough=tuple(Passthrough(**x) for x in d.get("passthrough", ())),
            kind=VMKind(d.get("kind", "vm")), origin=d.get("origin", ""),
            hibernate_file=d.get("hibernate_file", ""),
        )

    def with_(self, **kw: Any) -> "VMSpec":
        return replace(self, **kw)


def new_id() -> str:
    return uuid.uuid4().hex


def based_on(template: VMSpec, specs: Iterable[VMSpec]) -> Iterator[VMSpec]:
    """Those of the VM specs whose disks are linked clones of the template's disks (their qcow2
    backing file is one of them)."""
    paths = {d.path for d in template.disks}
    for s in specs:
        if s.id != template.id and any(d.backing in paths for d in s.disks if d.backing):
            yield s


def process_name(vm_id: str) -> str:
    """vm-<first 8 hex digits of the id>: short, since QMP/agent socket paths must fit in 107 bytes."""
    return f"vm-{vm_id[:8]}"


def resumed_text(vm: str, host: str, was: str) -> str:
    """What a resume did, by the run state QEMU had the guest in (QMP query-status): the engine's log
    and the CLI say the same."""
    if was == "running":
        return f"{vm} was running on {host} already; nothing to continue"
    why = {"paused": "", "io-error": " (QEMU had stopped it on an I/O error; it retries the failed writes)"}.get(
        was, f" (QMP status was {was})")
    return f"{vm} runs again on {host}{why}"


def default_max_cpus(cpus: int) -> int:
    """How many vCPUs a VM may grow to by hot-add when nobody says: 4, or its count if higher."""
    return max(4, cpus)


def check_name(name: str, what: str = "VM") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PermanentError(f"{what} name {name!r} is not valid",
                             "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_hardware(*, cpus: int, memory_mb: int, max_cpus: int | None = None) -> None:
    if not 1 <= cpus <= 64:
        raise PermanentError(f"cpus must be between 1 and 64, got {cpus}", "for example --cpus 1")
    if max_cpus is not None and not cpus <= max_cpus <= 64:
        raise PermanentError(f"max cpus must be between cpus ({cpus}) and 64, got {max_cpus}",
                             "for example --max-cpus 4")
    if not 64 <= memory_mb <= 1 << 20:
        raise PermanentError(f"memory must be between 64 and 1048576 MiB, got {memory_mb}",
                             "for example --memory 256")


def check_boot(boot: tuple[str, ...]) -> tuple[str, ...]:
    if not boot or any(b not in BOOT_DEVICES for b in boot) or len(set(boot)) != len(boot):
        raise PermanentError(f"boot order {','.join(boot) or '(empty)'} is not valid",
                             f"list some of {', '.join(BOOT_DEVICES)} once each, e.g. --boot disk,live")
    return tuple(boot)


def check_bus(bus: str) -> str:
    if bus not in BUSES:
        raise PermanentError(f"disk bus {bus!r} is not supported", f"use one of {', '.join(BUSES)}")
    return bus


def parse_size(text: str | int, what: str = "size") -> int:
    """'10G', '512M', '1073741824' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise PermanentError(f"{what} {text!r} is not a size", "write e.g. 512M, 10G or a number of bytes")
    n = float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2).upper() or " ")))
    return int(n)


def parse_memory_mib(text: str | int) -> int:
    """Memory as MiB: '512' (MiB), '512M', '2G', '1.5G'."""
    if isinstance(text, int) or str(text).strip().isdigit():
        return int(text)
    n = parse_size(text, "memory")
    if n % (1 << 20):
        raise PermanentError(f"memory {text!r} is not a whole number of MiB", "write e.g. 512, 512M or 2G")
    return n >> 20


def expand_pattern(pattern: str, count: int, start: int = 1) -> list[str]:
    """Names for a batch: 'web-{n:02}' or 'web-##' -> web-01, web-02, ...; a plain name gets -N appended."""
    if count < 1 or count > 100:
        raise PermanentError(f"a batch must have 1 to 100 VMs, got {count}", "for example --count 3")
    names = []
    for i in range(start, start + count):
        if "{n" in pattern:
            try:
                name = pattern.format(n=i)
            except (ValueError, KeyError, IndexError):
                raise PermanentError(f"naming pattern {pattern!r} is not valid",
                                     "use {n} or {n:02} for the number, or ## for a zero-padded one") from None
        elif "#" in pattern:
            m = re.search(r"#+", pattern)
            name = pattern[:m.start()] + str(i).zfill(m.end() - m.start()) + pattern[m.end():]
        else:
            name = pattern if count == 1 else f"{pattern}-{i}"
        names.append(check_name(name))
    if len(set(names)) != len(names):
        raise PermanentError(f"naming pattern {pattern!r} gives the same name twice", "put {n} or ## in it")
    return names


class AgentState(StrEnum):
    RUNNING = "running"
    NOT_RUNNING = "not running"
    UNKNOWN = "unknown"           # it could not be asked (the engine did not answer for it)


@dataclass(frozen=True)
class GuestFilesystem:
    mount: str
    used: int | None = None       # bytes
    total: int | None = None


@dataclass(frozen=True)
class AgentReport:
    """What a VM's guest agent reports, or why it cannot (`reason`)."""
    vm: str
    agent: AgentState
    checked_at: float
    reason: str | None = None
    version: str | None = None
    os: str | None = None
    kernel: str | None = None
    ips: tuple[str, ...] = ()     # with their prefix: 10.0.2.15/24
    cpu_percent: float | None = None
    mem_total: int | None = None  # bytes
    mem_used: int | None = None
    disks: tuple[GuestFilesystem, ...] = ()

    @property
    def running(self) -> bool:
        return self.agent is AgentState.RUNNING


@functools.cache
def _spec_fields() -> tuple[str, ...]:
    """VMSpec's field names (dataclasses.fields walks the class on every call: 10,000 VMs a list)."""
    return tuple(f.name for f in fields(VMSpec))


@dataclass(frozen=True)
class VMView:
    """A VM or template as every front end sees it (`ferry vm list --json` prints these): the fields of
    its VMSpec, flat, its state as its host reports it now, and where it stands."""
    id: str
    name: str
    host: str
    state: VMState
    kind: VMKind = VMKind.VM
    cpus: int = 1
    max_cpus: int = 4
    memory_mb: int = 256
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    boot: tuple[str, ...] = ("disk", "live")
    passthrough: tuple[Passthrough, ...] = ()
    origin: str = ""
    hibernate_file: str = ""
    recycled: float | None = None      # when it went to the recycle bin (None: it is not in it)
    purge_at: float | None = None      # when the recycle bin forgets it
    pid: int | None = None             # its QEMU's, while one runs
    busy: int | None = None            # the task working on it
    # Where a front end asked its guest agent (vm show, vm list --agents): what the agent said, or, for a
    # VM that does not run, a report of state "not running" saying why. None: not asked (vm list).
    agent: AgentReport | None = None

    @classmethod
    def of(cls, spec: VMSpec, state: VMState, **kw: Any) -> "VMView":
        return cls(**{name: getattr(spec, name) for name in _spec_fields()}, state=state, **kw)

    @property
    def is_template(self) -> bool:
        return self.kind is VMKind.TEMPLATE

    @property
    def in_bin(self) -> bool:
        return self.recycled is not None

    @property
    def running(self) -> bool:
        """A QEMU runs for it (running or paused)."""
        return self.state in RUNNING_STATES

    @property
    def unfinished(self) -> bool:
        """Its task has not finished making or deleting it: not a usable VM until that task is done."""
        return self.state in UNFINISHED_STATES

    @property
    def disk_bytes(self) -> int:
        """The virtual size of all its disks."""
        return sum(d.size for d in self.disks)

    def with_(self, **kw: Any) -> "VMView":
        return replace(self, **kw)


@dataclass(frozen=True)
class OrphanProcess:
    """A QEMU running from a host's runtime folder that no record names."""
    host: str
    process: str
    pid: int


@dataclass(frozen=True)
class MissingVM:
    """A VM recorded as running whose QEMU is gone."""
    host: str
    vm: str


@dataclass(frozen=True)
class UnreachableHost:
    host: str
    error: str


@dataclass(frozen=True)
class ReconcileReport:
    """What the hosts run, compared with the records (`ferry vm reconcile`)."""
    running: int = 0
    orphans: tuple[OrphanProcess, ...] = ()
    missing: tuple[MissingVM, ...] = ()
    unreachable: tuple[UnreachableHost, ...] = ()


@dataclass(frozen=True)
class TimeSync:
    """The guest clock set from the host's (`ferry vm agent timesync`): seconds off before and after."""
    vm: str
    offset_before_s: float | None = None
    offset_after_s: float | None = None


@dataclass(frozen=True)
class CPUHotAdd:
    """vCPUs added to a running VM (`ferry vm agent cpus`)."""
    vm: str
    cpus: int
    online_in_guest: int | None = None
