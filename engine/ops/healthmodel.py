"""The records of health checks, as front ends receive them (`ferry health list|history`)."""

from __future__ import annotations

from dataclasses import dataclass

from .nagios import CheckState

SITE = ""      # the host of the site's own checks (tasks, alarms, advisories): shown as "(site)"


@dataclass(frozen=True)
class HealthCheck:
    """A check's current state. A problem is SOFT (hard=False) while it is re-checked, up to
    max_attempts, then HARD: only a hard problem raises its alarm."""
    host: str
    check: str
    state: CheckState
    hard: bool
    attempt: int
    max_attempts: int
    summary: str
    details: str
    perfdata: str                # 'label'=value[UOM];warn;crit;min;max ...
    last_checked: float
    last_change: float           # when the state last changed (soft or hard)
    last_hard_change: float
    alarm: str | None = None     # "TYPE on OBJECT" while a hard problem has it raised

    @property
    def state_type(self) -> str:
        return "HARD" if self.hard else "SOFT"

    @property
    def where(self) -> str:
        return self.host or "(site)"


@dataclass(frozen=True)
class HealthResult:
    """One result of a check (its history)."""
    id: int
    ts: float
    host: str
    check: str
    state: CheckState
    hard: bool
    attempt: int
    summary: str
    details: str
    perfdata: str

    @property
    def state_type(self) -> str:
        return "HARD" if self.hard else "SOFT"
