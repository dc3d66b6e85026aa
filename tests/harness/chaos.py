"""Killing Ferry (`kill -9` of its own process) at a chosen point of a task, as a power cut or an
OOM killer would, and looking at what it left.

A point is chosen by what another process can see: the task's progress in state.db (written every
FERRY_PROGRESS_PERSIST_S, set low here so short windows are hit), its log, or anything on disk.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cli import ferry_process

PERSIST_S = "0.02"      # progress reaches state.db this often in the processes killed here


@dataclass
class Kill:
    """What happened: the task (None if none was seen), the progress it had reached when killed
    (None when the command finished first), and the command's exit status and output."""
    task_id: int | None
    progress: dict | None
    code: int
    out: str
    err: str

    @property
    def killed(self) -> bool:
        return self.progress is not None


def task_rows(workspace: Path, after: int = 0) -> list[dict]:
    """Tasks of the workspace with an id above `after`, read as another process reads them."""
    db = workspace / "state.db"
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            rows = con.execute("SELECT * FROM tasks WHERE id > ? ORDER BY id", (after,)).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []
    out = []
    for r in rows:
        d = dict(r)
        for k in ("params", "progress", "result", "checkpoint"):
            d[k] = json.loads(d[k]) if d.get(k) else None
        out.append(d)
    return out


def last_task_id(workspace: Path) -> int:
    rows = task_rows(workspace)
    return rows[-1]["id"] if rows else 0


def fraction(progress: dict | None) -> float:
    p = progress or {}
    if p.get("bytes_total"):
        return p.get("bytes_done", 0) / p["bytes_total"]
    if p.get("units_total"):
        return p.get("units_done", 0) / p["units_total"]
    return 0.0


def at_fraction(f: float) -> Callable[[dict], bool]:
    """A point: the task's progress has reached fraction f of its work."""
    return lambda task: task["state"] == "running" and fraction(task["progress"]) >= f


def kill_at(workspace: Path, *args: str, when: Callable[[dict], bool], delay: float = 0.0,
            timeout: float = 600.0, env: dict | None = None) -> Kill:
    """Run `ferry ARGS` as a child process; when `when(task row)` holds for the first task it makes
    (or resumes), wait `delay` seconds and kill it with SIGKILL. The deadline is generous: work
    that scales with data is followed by its progress, and a command that stops moving is an error."""
    before = last_task_id(workspace)
    proc = ferry_process(workspace, *args, env={"FERRY_PROGRESS_PERSIST_S": PERSIST_S, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        seen: dict | None = None
        while proc.poll() is None:
            rows = task_rows(workspace, before) or [r for r in task_rows(workspace) if r["owner"] and
                                                    r["owner"].split(":")[1] == str(proc.pid)]
            if rows:
                seen = rows[0]
                if when(seen):
                    if delay:
                        time.sleep(delay)
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        out, err = proc.communicate()
                        now = task_rows(workspace, seen["id"] - 1)
                        return Kill(seen["id"], (now[0] if now else seen)["progress"] or {}, proc.returncode,
                                    out, err)
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"ferry {' '.join(args)} did not reach the kill point within {timeout:g} s "
                                     f"(task: {seen and seen['state']}, progress {seen and seen['progress']})")
            time.sleep(0.005)
        out, err = proc.communicate()
        return Kill(seen["id"] if seen else None, None, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def random_points(n: int, rng: random.Random, *, lo: float = 0.02, hi: float = 0.98) -> list[float]:
    """n fractions of the work, spread over it (one in each of n equal slices, at random within it)."""
    width = (hi - lo) / n
    return [lo + width * (i + rng.random()) for i in range(n)]


def helpers_of(workspace_id: str, task_id: int) -> list[int]:
    """Pids of the processes on this machine that carry the task's tag (its helpers)."""
    tag = f"\0FERRY_TASK={workspace_id}.{task_id}\0".encode()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            env = b"\0" + Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if tag in env:
            out.append(int(p))
    return out


def workspace_id(workspace: Path) -> str:
    con = sqlite3.connect(f"file:{workspace / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        r = con.execute("SELECT value FROM settings WHERE key='workspace_id'").fetchone()
    finally:
        con.close()
    return json.loads(r[0]) if r else ""


def hidden_leftovers(*folders: Path) -> list[Path]:
    """Files and folders whose names say a task made them for a while (Ferry's temporary names), in
    the folders and one level below."""
    out = []
    for top in folders:
        if not top.exists():
            continue
        for p in [top, *[c for c in top.iterdir() if c.is_dir()]]:
            for c in p.iterdir():
                if ".ferry-task" in c.name or ".ferry-tmp" in c.name or ".ferry-import" in c.name:
                    out.append(c)
    return sorted(out)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)
