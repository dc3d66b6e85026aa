"""Task data: states, progress and the read-only view of a task."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .taskstate import ACTIVE_STATES, FINAL_STATES, STATE_SYMBOLS, TASK_ACTIONS, TaskState, task_action_refusal

# The states live in taskstate.py (no dataclasses: a command line chooses tasks by them); they are
# this module's too, as they always were.
__all__ = ["ACTIVE_STATES", "FINAL_STATES", "STATE_SYMBOLS", "TASK_ACTIONS", "TaskState", "task_action_refusal",
           "Progress", "TaskInfo"]


@dataclass(frozen=True)
class Progress:
    units_done: int = 0
    units_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    rate: float | None = None       # bytes per second while running; None when no bytes move, or at rest
    eta: float | None = None        # seconds left, from the bytes left and the rate
    item: str = ""                  # what is being worked on now
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        if self.units_total:
            return min(1.0, self.units_done / self.units_total)
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Progress":
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class TaskInfo:
    id: int
    kind: str
    title: str
    state: TaskState
    params: dict[str, Any]
    hosts: list[str]
    progress: Progress
    result: dict[str, Any] | None
    error: str | None
    hint: str | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    updated: float
    owner: str | None
    waiting: dict[str, Any] | None
    created_by: str | None
    has_checkpoint: bool = False

    @classmethod
    def from_row(cls, r: dict) -> "TaskInfo":
        return cls(
            id=r["id"], kind=r["kind"], title=r["title"], state=TaskState(r["state"]),
            params=r["params"] or {}, hosts=r["hosts"] or [], progress=Progress.from_dict(r["progress"]),
            result=r["result"], error=r["error"], hint=r["hint"], attempts=r["attempts"],
            created=r["created"], started=r["started"], finished=r["finished"], updated=r["updated"],
            owner=r["owner"], waiting=r["waiting"], created_by=r["created_by"],
            has_checkpoint=r["checkpoint"] is not None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d
