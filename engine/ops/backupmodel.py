"""The records of management-data backups, as front ends receive them (engine/ops/backup.py makes them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackupInfo:
    """One backup archive, here (`where` = "local") or on a remote server ("remote NAME").
    `verified`: its SHA-256 matched its .sha256 file when listed (computed on the server for a remote
    one); False with `problem` saying what did not match; None when it could not be checked."""
    id: str                         # 20261203-020000-daily: its time (UTC) and kind; what restore takes
    kind: str                       # hourly, daily, weekly, monthly, manual, before-restore
    created: float                  # epoch seconds, from the id
    where: str                      # "local" or "remote NAME"
    path: str                       # the archive (on the server, for a remote one)
    size: int
    sha256: str = ""                # as its .sha256 file says
    verified: bool | None = None
    problem: str = ""
    site: str = ""
    ferry_version: str = ""
    schema_version: int | None = None

    @property
    def check_text(self) -> str:
        return {True: "✔ verified", False: "✖ " + (self.problem or "mismatch"), None: "? " + (self.problem or
                                                                                            "unchecked")}[self.verified]


@dataclass(frozen=True)
class BackupResult:
    """`ferry backup now`: the archive made here, its uploads (each verified on the server), and what
    retention pruned after it."""
    backup: BackupInfo
    uploaded: tuple[BackupInfo, ...] = ()
    pruned: tuple[BackupInfo, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class BackupList:
    """`ferry backup list` (every backup, newest first) or `ferry backup prune` (what went, or would go,
    oldest first), with the remotes that could not be reached and why."""
    backups: tuple[BackupInfo, ...] = ()
    problems: tuple[str, ...] = ()
