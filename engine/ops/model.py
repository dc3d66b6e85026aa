"""The records of operations: alarms, silences, events and schedules, as front ends receive them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"

    @property
    def symbol(self) -> str:
        """Colour never stands alone (STYLE.md): the mark and the short word a table shows."""
        return _SEV_SYMBOLS[self]

    @property
    def rank(self) -> int:
        """0 for critical .. 3 for warning: sort by it."""
        return list(Severity).index(self)


_SEV_SYMBOLS = {Severity.CRITICAL: "✖ CRIT", Severity.MAJOR: "▲ MAJ", Severity.MINOR: "● MIN",
                Severity.WARNING: "◆ WARN"}
NOTIFIED = (Severity.CRITICAL, Severity.MAJOR)


class AlarmState(StrEnum):
    ACTIVE = "active"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"         # history


@dataclass(frozen=True)
class AlarmInfo:
    """An alarm: the state of (type, object). `silenced_by` and `suppressed_by` are read-time facts:
    a silenced or suppressed alarm is recorded and listed all the same, marked."""
    id: int
    type: str                   # e.g. host.down, datastore.full, schedule.failed
    object: str                 # kind:name, e.g. host:cna01, vm:web1, schedule:nightly
    severity: Severity
    state: AlarmState
    summary: str
    count: int
    first_seen: float
    last_seen: float
    details: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    acked_by: str | None = None
    acked_at: float | None = None
    ack_comment: str | None = None
    cleared_at: float | None = None
    cleared_by: str | None = None
    clear_reason: str | None = None
    silenced_by: int | None = None          # the id of a silence that matches it now
    suppressed_by: str | None = None        # "host.down on cna01": inhibited by that alarm

    @property
    def note(self) -> str:
        """What a table says beside it: silenced or suppressed, and why."""
        if self.suppressed_by:
            return f"suppressed by {self.suppressed_by}"
        if self.silenced_by is not None:
            return f"silenced by {self.silenced_by}"
        return ""


@dataclass(frozen=True)
class SilenceInfo:
    """Alarms matching every matcher (type, object, severity: exact or glob) are silenced until expires."""
    id: int
    matchers: dict[str, str]
    created: float
    expires: float
    created_by: str
    reason: str
    active: bool
    removed: float | None = None
    removed_by: str | None = None


@dataclass(frozen=True)
class EventInfo:
    """One thing that happened to an alarm or a silence (raise, severity, ack, clear, silence.add, ...)."""
    id: int
    ts: float
    kind: str
    actor: str
    text: str
    alarm_id: int | None = None
    type: str | None = None
    object: str | None = None
    severity: str | None = None


@dataclass(frozen=True)
class ScheduleRun:
    """One run of a schedule (or a slot it skipped or missed)."""
    id: int
    schedule: str
    slot: float                 # the time it was due
    started: float | None
    ended: float | None
    result: str | None          # ok ... | failed: ... | skipped: ... | missed: ... | interrupted ...; None while it runs
    caught_up: bool = False     # run at the engine's start for a slot missed while it was down


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    at: str                     # as config.toml says it
    cron: str                   # the cron expression it means
    run: str
    catch_up: bool
    timezone: str
    next_run: float | None
    running: bool = False
    last: ScheduleRun | None = None
