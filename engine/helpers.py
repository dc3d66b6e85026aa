"""Helper processes belong to their task.

Every command a task runs on a host (qemu-img, tar, dd, a script) is started with the task's tag in
its environment (FERRY_TASK=<workspace>.<task id>) and, through setpriv, with a parent-death signal:
it dies when what started it dies (this Ferry process for a local host, the SSH session for a remote
one). What survives all the same (a shell between them, a session that lingers) is found by its tag
and stopped before the task is resumed or rolled back, so nothing a helper writes after its task died
is ever counted: the task redoes or verifies that step.

A process that must outlive its task (a VM's QEMU) is started `detached()`.
"""

from __future__ import annotations

import contextlib
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Sequence

ENV = "FERRY_TASK"
TASK_TAG: ContextVar[str | None] = ContextVar("ferry_task_tag", default=None)
TAG_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def task_tag(workspace_id: str, task_id: int) -> str:
    return f"{workspace_id}.{task_id}"


def tagged(argv: Sequence) -> list:
    """argv as the current task starts it: tagged, and dying with what started it. Unchanged
    outside a task, or under detached()."""
    tag = TASK_TAG.get()
    if not tag:
        return list(argv)
    return ["setpriv", "--pdeathsig", "KILL", "--", "env", f"{ENV}={tag}", *argv]


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Commands started inside are not the task's helpers: they may outlive it (a VM's QEMU)."""
    token = TASK_TAG.set(None)
    try:
        yield
    finally:
        TASK_TAG.reset(token)


# Runs on the host (python3, stdlib only): kills every process whose environment carries the tag,
# waits until they are gone (at most 10 s), prints "<killed> <still there>".
KILL_SCRIPT = r"""
import os, signal, sys, time
tag = b"\0" + ("%s=" + sys.argv[1]).encode() + b"\0"
me = {os.getpid(), os.getppid()}
def found():
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in me:
            continue
        try:
            with open("/proc/%%s/environ" %% p, "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if tag in env:
            out.append(int(p))
    return out
killed = found()
for pid in killed:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
deadline = time.time() + 10
left = found()
while left and time.time() < deadline:
    time.sleep(0.1)
    left = found()
print(len(killed), len(left))
""" % ENV


async def stop_helpers(transport, tag: str) -> tuple[int, int]:
    """Kill the processes of a task's tag on one host: (how many were killed, how many remain)."""
    if not TAG_RE.match(tag):
        raise ValueError(f"bad task tag {tag!r}")
    from .ship import Program   # not at the top: ship reaches hosts through transport, which imports this module
    with detached():
        r = await Program("ferry-kill", KILL_SCRIPT).run(transport, tag, timeout=30)
    try:
        killed, left = (int(x) for x in r.stdout.split()[:2])
    except ValueError:
        return 0, 0
    return killed, left


def pid_running(pid: int) -> bool:
    """Whether process `pid` of this machine runs: not gone, and not a zombie (ended, not yet reaped
    by its parent, which may be an init that never reaps); another user's process counts."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
