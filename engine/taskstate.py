"""Task states and the rules on them: what `ferry tasks --json` needs to choose tasks, without the
records of taskmodel.py (dataclasses and inspect cost a command line ~5 ms to import)."""

from __future__ import annotations

import enum


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
