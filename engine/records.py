"""The records of the API that belong to no engine module of their own (api.py hands them out, as
it does the others: `api.HostKey`). Apart from api.py so that a command line printing the engine's
--json text loads no dataclasses (with inspect, ~5 ms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskLogEntry:
    ts: float
    level: str          # debug | info | warning | error
    message: str


@dataclass(frozen=True)
class TrackedFile:
    """A file or folder a task made on a host, while the task holds it."""
    task_id: int
    host: str
    path: str
    role: str           # temp (removed when the task ends) | made (kept when it succeeds)
    created: float


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    params: dict[str, Any]
    result: str


@dataclass(frozen=True)
class Submitted:
    """A task started by a call, or the unfinished task of the same job it attached to."""
    task_id: int
    attached: bool = False


@dataclass(frozen=True)
class HostKey:
    """The SSH host key a host presents, and how it compares with what is recorded."""
    host: str
    endpoint: str
    key_type: str
    fingerprint: str
    status: str                       # trusted | unknown | changed
    old_fingerprints: tuple[str, ...] = ()
    jump: str | None = None


@dataclass(frozen=True)
class EngineStatus:
    version: str
    protocol: int
    pid: int
    workspace: str
    site: str
    state: str                        # running | stopping | stopped
    started: float
    clients: int
    tasks_active: int                 # queued, running or waiting
    log: str                          # the engine's log file
    hold: bool = False                # interrupted tasks wait to be resumed by hand
