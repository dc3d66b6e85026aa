"""Task data: states, progress and the read-only view of a task."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"        # for an operator's confirmation
    INTERRUPTED = "interrupted"  # its Ferry process died mid-task: resumes (or rolls back) when told
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def symbol(self) -> str:
        return STATE_SYMBOLS[self]


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
ACTIVE_STATES = frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING})
STATE_SYMBOLS = {
    TaskState.QUEUED: "…", TaskState.RUNNING: "▶", TaskState.PAUSED: "⏸", TaskState.WAITING: "?",
    TaskState.SUCCEEDED: "✔", TaskState.FAILED: "✖", TaskState.CANCELLED: "■", TaskState.INTERRUPTED: "↯",
}


# Which task states each operator action applies to: the one rule, asked by the engine before it
# acts and by the front ends to dim a key (pausing a paused task, or resuming a running one, is
# accepted by the engine and does nothing).
TASK_ACTIONS: dict[str, frozenset[TaskState]] = {
    "pause": frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING}),
    "resume": frozenset({TaskState.PAUSED, TaskState.FAILED, TaskState.INTERRUPTED}),
    "cancel": frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING, TaskState.PAUSED,
                         TaskState.INTERRUPTED, TaskState.FAILED}),
}


def task_action_refusal(action: str, state: TaskState) -> tuple[str, str] | None:
    """Why `action` cannot apply to a task in `state` ((message, hint)), or None when it can."""
    if action in TASK_ACTIONS and state.final and state not in TASK_ACTIONS[action]:
        return (f"the task is already {state}",
                "only unfinished (or failed: to retry, or to cancel and roll back) tasks can be controlled")
    return None


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
