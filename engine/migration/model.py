"""The records of a server migration: the spec a plan file gives (MigrationSpec), the migration as
stored (Migration: spec, state, sync round, assessment, ...), its states and the transitions
between them. Frozen dataclasses, carried by the one codec of engine/api.py."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..config import ConfigProblem
from ..errors import Refused
from ..fmt import size as _size
from .netcheck import NetThresholds

# Ferry's folder on a migration's source: per migration, the sync rounds' tar snapshot files and the
# go-live timer's restore script. Never copied to the target; removed by finalize.
SOURCE_DIR = "/var/lib/ferry-migration"


class Method(StrEnum):
    FILE = "file"        # tar/rsync-like: only the data, target partitions may be resized (E4)
    BLOCK = "block"      # dd-like: the same layout, disk for disk (E5)
    AUTO = "auto"        # the assessment recommends one


class MigrationState(StrEnum):
    PLANNED = "planned"                  # applied from a plan; nothing asked of the source yet
    ASSESSED = "assessed"                # facts, findings and a recommendation recorded
    TARGET_PREPARED = "target_prepared"  # the target VM made, booted on the live image as receiver
    INITIAL_SYNC = "initial_sync"        # the first full round runs
    SYNCING = "syncing"                  # incremental rounds, on demand or every interval
    READY = "ready"                      # ready for cutover
    CUTTING_OVER = "cutting_over"        # the runbook runs, step by step
    CUT_OVER = "cut_over"                # the target is live
    FINALIZED = "finalized"              # nothing left to roll back to
    ROLLED_BACK = "rolled_back"          # back to the source as it was

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {
    MigrationState.PLANNED: "○", MigrationState.ASSESSED: "◐", MigrationState.TARGET_PREPARED: "◑",
    MigrationState.INITIAL_SYNC: "⇉", MigrationState.SYNCING: "⟳", MigrationState.READY: "●",
    MigrationState.CUTTING_OVER: "▶", MigrationState.CUT_OVER: "✔", MigrationState.FINALIZED: "■",
    MigrationState.ROLLED_BACK: "↩",
}

S = MigrationState
# The states each state may go to. A rollback brings the source back as it was, from any state before
# the target went live (the runbook's own rollback, or giving up on a migration prepared or syncing);
# a rolled-back migration may be assessed again and go round once more.
TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    S.PLANNED: frozenset({S.ASSESSED, S.ROLLED_BACK}),
    S.ASSESSED: frozenset({S.ASSESSED, S.PLANNED, S.TARGET_PREPARED, S.ROLLED_BACK}),
    S.TARGET_PREPARED: frozenset({S.INITIAL_SYNC, S.ROLLED_BACK}),
    S.INITIAL_SYNC: frozenset({S.SYNCING, S.TARGET_PREPARED, S.ROLLED_BACK}),   # back: a first round cancelled
    S.SYNCING: frozenset({S.SYNCING, S.READY, S.ROLLED_BACK}),
    S.READY: frozenset({S.SYNCING, S.CUTTING_OVER, S.ROLLED_BACK}),
    S.CUTTING_OVER: frozenset({S.CUT_OVER, S.ROLLED_BACK}),
    S.CUT_OVER: frozenset({S.FINALIZED}),
    S.FINALIZED: frozenset(),
    S.ROLLED_BACK: frozenset({S.PLANNED, S.ASSESSED, S.SYNCING}),    # syncing: a full round again
}

# What a plan applied again does to a migration whose spec it changes, by the migration's state: the
# state it is left in (an assessment of another spec is stale). Any other state refuses the change.
SPEC_CHANGE: dict[MigrationState, MigrationState] = {S.PLANNED: S.PLANNED, S.ASSESSED: S.PLANNED}
del S


def sources_of(state: MigrationState) -> tuple[MigrationState, ...]:
    """The states a migration may come to `state` from."""
    return tuple(s for s, to in TRANSITIONS.items() if state in to)


def check_transition(name: str, now: MigrationState, to: MigrationState) -> None:
    """Raises Refused when a migration in state `now` may not go to `to`."""
    if to not in TRANSITIONS[now]:
        allowed = ", ".join(sources_of(to)) or "none"
        raise Refused(f"migration {name} is {now}: it cannot become {to}",
                      f"it can become {to} from: {allowed} (ferry migration show {name})")


@dataclass(frozen=True)
class SourceSpec:
    """The server to migrate, reached over SSH (never a password: a key file, ssh-agent or ~/.ssh/config)."""
    address: str
    port: int = 22
    user: str = "root"
    identity: str | None = None    # a private key file on the engine's machine

    @property
    def target(self) -> str:
        """user@address, with :port when not 22."""
        s = f"{self.user}@{self.address}"
        return s if self.port == 22 else f"{s}:{self.port}"


@dataclass(frozen=True)
class TargetSpec:
    """The VM the source becomes: on a host and datastore of the site, on one of its networks."""
    host: str
    datastore: str
    network: str
    cpus: int | None = None             # None: the source's
    memory_mib: int | None = None       # None: the source's
    disks: tuple[int, ...] = ()         # bytes each; empty: the source's (file-level may resize)


@dataclass(frozen=True)
class FinalNetwork:
    """The target's network once live; address None: it takes over the source's."""
    address: str | None = None          # with its prefix, 10.231.1.50/24
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class CutoverSpec:
    """How the cutover treats the source and checks the target."""
    park_address: str | None = None    # CIDR the source moves to off its service address (control path)
    confirm_within_s: int = 1800        # the go-live timer: the source comes back unless go-live is confirmed
    check_ports: tuple[int, ...] | None = None   # TCP ports tried on the target; None: the source's listening ones


@dataclass(frozen=True)
class MigrationSpec:
    """One migration as its plan says it (the wave's [defaults] merged in)."""
    source: SourceSpec
    target: TargetSpec
    method: Method = Method.AUTO
    excludes: tuple[str, ...] = ()
    services: tuple[str, ...] = ()      # stopped on the source at cutover, in this order
    sync_interval_s: int = 0            # 0: on demand only
    relay: bool = False                 # Ferry carries the data (source and target cannot reach each other)
    final: FinalNetwork = FinalNetwork()
    cutover: CutoverSpec = CutoverSpec()
    thresholds: NetThresholds = NetThresholds()     # the network check's bars


@dataclass(frozen=True)
class Finding:
    """A named blocker or warning of an assessment or network check."""
    name: str                           # e.g. non_x86, high_load
    message: str
    hint: str = ""


@dataclass(frozen=True)
class TargetDisk:
    """A disk of the target VM, as the receiver sees it."""
    name: str                           # disk0, as the VM's record names it
    device: str                         # /dev/vda in the receiver
    size: int                           # bytes
    source: str | None = None           # block-level: the source's disk it mirrors (sda)


@dataclass(frozen=True)
class TargetPartition:
    """File-level: the one partition of a target disk, made and formatted on the receiver."""
    disk: str                           # disk0
    device: str                         # /dev/vda1 in the receiver
    size: int
    fstype: str
    label: str
    uuid: str
    source: str | None = None           # the source's mount point whose files it takes (None: none)


@dataclass(frozen=True)
class PreparedTarget:
    """The target VM of a migration, made and running the live image as receiver (E7): where it is,
    the temporary address it answers SSH on, and its host key, pinned (it came over the serial console,
    a channel its host owns)."""
    vm: str
    vm_id: str
    host: str
    method: Method                      # file or block: what the disks were prepared for
    address: str                        # the receiver's temporary address
    prefix: int | None
    ssh_port: int
    host_key: str                       # "ssh-ed25519 AAAA..."
    fingerprint: str                    # SHA256:...
    disks: tuple[TargetDisk, ...] = ()
    partitions: tuple[TargetPartition, ...] = ()
    merged: tuple[str, ...] = ()        # file-level: source mount points copied into the first partition's tree
    task: int | None = None
    prepared_at: float = 0.0
    given_address: str | None = None    # the receiver's address as `prepare --address` gave it (None: DHCP)
    given_gateway: str | None = None


@dataclass(frozen=True)
class SyncRound:
    """One sync round of a migration: what went from the source to the target, and how long it took."""
    round: int                          # 1: the initial full round
    label: str                          # initial, incremental (the cutover's: final online/offline sync)
    started: float
    ended: float
    duration_s: float
    bytes: int                          # what crossed from the source (the tar stream; block-level: chunks)
    items: int                          # files, links and devices sent (block-level: chunks)
    deleted: int = 0                    # files deleted on the target (gone from the source since the round before)
    task: int | None = None
    predicted_s: float | None = None    # a first round's duration as predicted at its start (a probe of the path)
    chunks: int | None = None           # block-level: the chunks of the source's disks (items: those sent); None: file-level

    @property
    def moved(self) -> str:
        """What the round moved, for people: "40.0 MiB, 500 file(s), 3 deleted"; block-level "48.0 MiB,
        12 of 512 chunk(s) sent"."""
        if self.chunks is not None:
            return f"{_size(self.bytes)}, {self.items} of {self.chunks} chunk(s) sent"
        return f"{_size(self.bytes)}, {self.items} file(s)" + (f", {self.deleted} deleted" if self.deleted else "")


@dataclass(frozen=True)
class Change:
    """What changed on the source since its last sync round, as a dry run there measured it at `at`."""
    bytes: int
    items: int                          # files (block-level: chunks)
    at: float
    chunks: int | None = None           # block-level: the chunks of the source's disks; None: file-level

    @property
    def said(self) -> str:
        """For people: "5.0 MiB in 12 file(s)"; block-level "48.0 MiB in 12 of 512 chunk(s)"."""
        what = f"{self.items} of {self.chunks} chunk(s)" if self.chunks is not None else f"{self.items} file(s)"
        return f"{_size(self.bytes)} in {what}"


@dataclass(frozen=True)
class Migration:
    """A migration as stored: its spec and where it stands."""
    name: str
    wave: str
    spec: MigrationSpec
    state: MigrationState
    created: float
    updated: float
    round: int = 0                      # sync rounds done (the initial one is round 1)
    last_sync: float | None = None      # when the last round ended
    assessment: dict[str, Any] | None = None
    override: str | None = None         # the operator's reason to go on despite a failed network check
    blockers: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()
    target: PreparedTarget | None = None    # set once the target is prepared
    cutover: dict[str, Any] | None = None   # the cutover's steps, predicted and measured downtime
    test: dict[str, Any] | None = None      # the last test launch: passed, boot_s, checks_s, what was checked
    rounds: tuple[SyncRound, ...] = ()      # the last sync rounds, oldest first (every one is in the audit log)
    changed: Change | None = None           # the last measure of what changed since the last round
    # Figures of the above, filled when read (sync.with_figures): the last measure's bytes, and the final
    # sync's predicted duration (sync.predicted_final_sync_s says how)
    bytes_changed_since: int | None = None
    predicted_final_sync_s: float | None = None
    # ... and the cutover's downtime: predicted (a syncing or ready migration: now; one cutting over or
    # after: what was predicted when it began), with its parts, and measured once cut over
    predicted_downtime_s: float | None = None
    predicted_downtime_parts: dict[str, float | None] | None = None
    measured_downtime_s: float | None = None


@dataclass(frozen=True)
class PlanCheck:
    """A plan file checked: every problem (one line each), else the wave and its migrations."""
    file: str
    wave: str | None
    migrations: tuple[str, ...]
    problems: tuple[ConfigProblem, ...] = ()    # each one line: FILE:LINE: key: problem (hint: ...)


@dataclass(frozen=True)
class PlanApplied:
    """What applying a plan did (dry_run: would do) to the store's migrations."""
    file: str
    wave: str
    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()       # spec changed (an assessed one went back to planned)
    unchanged: tuple[str, ...] = ()
    dry_run: bool = False
