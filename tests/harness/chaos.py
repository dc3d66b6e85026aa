"""Killing Ferry (`kill -9` of its own process) at a chosen point of a task, as a power cut or an
OOM killer would, and looking at what it left.

A point is chosen by what another process can see: the task's progress in state.db (written every
FERRY_PROGRESS_PERSIST_S, set low here so short windows are hit), its log, or anything on disk.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cli import Result, engine_pid, ferry_process
from .qemu import sha256 as sha256_file
from .waiting import until_sync

PERSIST_S = "0.02"      # progress reaches state.db this often in the processes killed here


@dataclass
class Kill:
    """What happened: the task (None if none was seen), the progress it had reached when killed
    (None when the command finished first), the command's exit status and output, and how long the
    task had been running (seen running by another process) when it was killed or ended."""
    task_id: int | None
    progress: dict | None
    code: int
    out: str
    err: str
    elapsed: float = 0.0

    @property
    def killed(self) -> bool:
        return self.progress is not None


def task_rows(workspace: Path, after: int = 0, con: sqlite3.Connection | None = None) -> list[dict]:
    """Tasks of the workspace with an id above `after`, read as another process reads them (through
    `con` when given: one connection kept open by a caller that looks many times a second)."""
    db = workspace / "state.db"
    if con is None and not db.exists():
        return []
    try:
        own = con is None
        if own:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT * FROM tasks WHERE id > ? ORDER BY id", (after,)).fetchall()
            names = [c[0] for c in con.execute("SELECT * FROM tasks LIMIT 0").description]
        finally:
            if own:
                con.close()
    except sqlite3.OperationalError:
        return []
    out = []
    for r in rows:
        d = dict(zip(names, r))
        for k in ("params", "progress", "result", "checkpoint"):
            d[k] = json.loads(d[k]) if d.get(k) else None
        out.append(d)
    return out


def _reader(workspace: Path) -> sqlite3.Connection | None:
    db = workspace / "state.db"
    try:
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) if db.exists() else None
    except sqlite3.OperationalError:
        return None


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
    # The task runs in the workspace's engine service, not in the command: that is what is killed.
    # An engine already running is stopped first, so the one this command starts persists
    # progress often enough to kill it at a point of the work.
    stop_engine(workspace)
    proc = ferry_process(workspace, *args, env={"FERRY_PROGRESS_PERSIST_S": PERSIST_S, **(env or {})})
    began: float | None = None
    con = _reader(workspace)
    try:
        deadline = time.monotonic() + timeout
        seen: dict | None = None
        while proc.poll() is None:
            con = con or _reader(workspace)
            engine = engine_pid(workspace)
            rows = con and (task_rows(workspace, before, con) or
                            [r for r in task_rows(workspace, 0, con) if r["owner"] and engine and
                             r["owner"].split(":")[1] == str(engine)])
            if rows:
                seen = rows[0]
                if began is None and seen["state"] == "running":
                    began = time.monotonic()
                if when(seen):
                    if delay:
                        time.sleep(delay)    # a point in time: what is measured here is where it lands
                    owner = (task_rows(workspace, seen["id"] - 1, con) or [seen])[0]["owner"]
                    victim = int(owner.split(":")[1]) if owner else None
                    if proc.poll() is None and victim:
                        os.kill(victim, signal.SIGKILL)
                        killed_at = time.monotonic()
                        os.kill(proc.pid, signal.SIGKILL)    # the command that followed it, at once too
                        out, err = proc.communicate()
                        now = task_rows(workspace, seen["id"] - 1)
                        return Kill(seen["id"], (now[0] if now else seen)["progress"] or {}, proc.returncode,
                                    out, err, killed_at - (began or killed_at))
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"ferry {' '.join(args)} did not reach the kill point within {timeout:g} s "
                                     f"(task: {seen and seen['state']}, progress {seen and seen['progress']})")
            time.sleep(0.005)
        out, err = proc.communicate()
        ended = time.monotonic()
        return Kill(seen["id"] if seen else None, None, proc.returncode, out, err, ended - (began or ended))
    finally:
        if con is not None:
            con.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_engine(workspace: Path) -> None:
    """Stop the workspace's engine service, if one runs (its tasks stop at once, resumable)."""
    pid = engine_pid(workspace)
    if pid:
        r = subprocess.run([sys.executable, "-m", "ferry.console.cli", "--workspace", str(workspace), "engine", "stop",
                            "--now"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


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


# ----------------------------------------------------------------------------------------------
# Trials: one kind of task killed at one point, then followed up (the same command again, `ferry
# task resume ID` or `ferry task cancel ID`), and everything a user would notice checked.
# bench/chaos.py runs many of them per kind; tests/test_chaos.py a few.

MiB = 1 << 20
UNFINISHED = ("queued", "running", "waiting", "paused", "interrupted")
FINAL = ("succeeded", "failed", "cancelled")


def why(r: Result) -> str:
    """The last line of what a command said, for a report."""
    lines = (r.err.strip() or r.out.strip()).splitlines()
    return lines[-1][:200] if lines else f"exit {r.code}"


def run_ferry(workspace: Path, *args: str, env: dict | None = None, stall: float = 300.0) -> Result:
    """`ferry ARGS` as a child process, to its end. No deadline on the whole (it may move a lot of
    data); an error once no unfinished task of the workspace has moved for `stall` seconds."""
    proc = ferry_process(workspace, *args, env=env)
    last, moved = None, time.monotonic()
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                return Result(proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                pass
            now = [(r["id"], r["state"], json.dumps(r["progress"], sort_keys=True))
                   for r in task_rows(workspace) if r["state"] in UNFINISHED]
            if now != last:
                last, moved = now, time.monotonic()
            elif time.monotonic() - moved > stall:
                raise AssertionError(f"ferry {' '.join(args)} made no progress for {stall:g} s: {now}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under root: its type, mode, size, mtime and (files) content hash."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        s = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISREG(s.st_mode):
            out[rel] = ("f", stat.S_IMODE(s.st_mode), s.st_size, s.st_mtime_ns, sha256_file(p))
        elif stat.S_ISLNK(s.st_mode):
            out[rel] = ("l", os.readlink(p))
        else:
            out[rel] = ("d", stat.S_IMODE(s.st_mode))
    return out


def disk_image(path: Path, size: int, data: int) -> Path:
    """A raw image of `size` bytes with `data` bytes of random data in 16 runs spread over it (holes
    between them), as a used disk looks; built once (a marker beside it says it is complete)."""
    marker = path.with_name(path.name + ".complete")
    if marker.exists() and path.exists():
        return path
    runs = 16
    region = size // runs
    per = min(region, max(MiB, data // runs // MiB * MiB))
    with open(path, "wb") as f:
        f.truncate(size)
        for r in range(runs):
            f.seek(r * region)
            left = per
            while left:
                n = min(left, 4 * MiB)
                f.write(os.urandom(n))
                left -= n
    marker.touch()
    return path


def file_tree(root: Path, files: int, total: int) -> Path:
    """`files` files of random content and mixed sizes (`total` bytes in all) in nested folders; built once."""
    marker = root.with_name(root.name + ".complete")
    if marker.exists() and root.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(10)
    weights = [rng.expovariate(1.0) for _ in range(files)]
    scale = total / sum(weights)
    for i, w in enumerate(weights):
        d = root / f"d{i % 10}" / f"s{(i // 10) % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(os.urandom(int(w * scale)))
    marker.touch()
    return root


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def image_problems(copy: str, original: str, what: str) -> list[str]:
    """The copy's guest-visible contents equal the original's (`qemu-img compare`) and the copy's
    qcow2 is sound (`qemu-img check`: no corruption, no leaked cluster)."""
    out = []
    if not Path(copy).is_file():
        return [f"{what}: {copy} is missing"]
    c = qemu_img("compare", "-U", original, copy)
    if c.returncode != 0:
        out.append(f"{what}: content differs from the source ({(c.stdout + c.stderr).strip()[:120]})")
    c = qemu_img("check", "-U", copy)
    if c.returncode != 0:
        out.append(f"{what}: qemu-img check: {(c.stdout + c.stderr).strip().splitlines()[-1][:120]}")
    return out


def backing_of(image: str) -> str | None:
    c = qemu_img("info", "-U", "--output=json", image)
    return json.loads(c.stdout).get("full-backing-filename") if c.returncode == 0 else None


@dataclass
class Point:
    """Where a trial kills Ferry: once `when(task row)` holds, after `delay` seconds."""
    label: str
    when: Callable[[dict], bool]
    delay: float = 0.0

    def earlier(self) -> "Point | None":
        """The same kind of point, earlier in the work (for a point the work ran past before the kill)."""
        return None


@dataclass
class AtFraction(Point):
    fraction: float = 0.0

    def earlier(self) -> "Point | None":
        return at(self.fraction / 2) if self.fraction > 0.01 else None


@dataclass
class AfterDelay(Point):
    def earlier(self) -> "Point | None":
        return after(self.delay / 2) if self.delay > 0.01 else None


def at(f: float) -> AtFraction:
    """A point triggered by progress: the task has done fraction f of its work (bytes, or units)."""
    return AtFraction(f"at {f:.0%}", at_fraction(f), 0.0, f)


def after(seconds: float) -> AfterDelay:
    """A point in time: `seconds` after the task is seen running."""
    return AfterDelay(f"{seconds:.2f} s in", lambda task: task["state"] == "running", seconds)


def while_temporary(*folders: Path, grown: int = 0) -> Point:
    """A point seen on disk: the task has a temporary file or folder (named after it) in one of the
    folders or one level below, holding at least `grown` bytes: a disk being copied, a package being
    extracted or staged."""
    def when(task: dict) -> bool:
        if task["state"] != "running":
            return False
        mark = f".ferry-task{task['id']}"
        return any(_bytes_in(e) >= grown for e in _entries(folders) if mark in e.name)
    return Point("while its temporary file exists" + (f" and holds {grown >> 20} MiB" if grown else ""), when)


def _entries(folders: tuple[Path, ...]):
    """The entries of the folders and of their folders (os.DirEntry)."""
    for top in folders:
        try:
            with os.scandir(top) as it:
                for e in it:
                    yield e
                    if e.is_dir(follow_symlinks=False):
                        try:
                            with os.scandir(e.path) as inner:
                                yield from inner
                        except OSError:
                            pass
        except OSError:
            pass


def _bytes_in(e: os.DirEntry) -> int:
    """Bytes allocated to a file, or to the files of a folder (what has been written so far)."""
    try:
        if not e.is_dir(follow_symlinks=False):
            return e.stat(follow_symlinks=False).st_blocks * 512
        with os.scandir(e.path) as it:
            return sum(c.stat(follow_symlinks=False).st_blocks * 512 for c in it if c.is_file(follow_symlinks=False))
    except OSError:
        return 0


@dataclass
class Trial:
    kind: str
    point: str
    follow: str                   # rerun | resume | cancel
    task: int | None = None
    killed: bool = False          # False: the command ended before the kill point (not a trial)
    progress: float = 0.0         # how far the task was when killed
    outcome: str = ""             # finished | rolled back | missed | wrong
    left: list[str] = field(default_factory=list)    # what is wrong or left behind

    @property
    def good(self) -> bool:
        return self.outcome in ("finished", "rolled back") and not self.left

    def line(self) -> str:
        where = (f"task {self.task} killed {self.point} ({self.progress:.0%} done)" if self.killed else
                 f"task {self.task} not killed ({self.point})")
        text = f"{self.kind}: {where}, {self.follow}: {self.outcome}"
        return text + ("" if not self.left else "; " + "; ".join(self.left))


class Lab:
    """A lab workspace driven through the `ferry` command line, and what a user can see of it."""

    def __init__(self, workspace: Path, data: Path, env: dict | None = None, stall: float = 300.0) -> None:
        self.ws = workspace
        self.data = data              # inputs (raw images, trees): kept across runs when the caller wants
        self.out = workspace / "out"  # where exports go, and replicas
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = env or {}
        self.stall = stall
        self.tidy = True              # delete what each trial made once checked (False: keep it, faster)
        self._wsid = ""

    def run(self, *args: str) -> Result:
        return run_ferry(self.ws, *args, env=self.env, stall=self.stall)

    def ok(self, *args: str):
        r = self.run(*args, "--json")
        if r.code != 0:
            raise AssertionError(f"ferry {' '.join(args)}: exit {r.code}: {r.err.strip() or r.out.strip()}")
        return r.json

    @property
    def wsid(self) -> str:
        if not self._wsid:
            self._wsid = workspace_id(self.ws)
        return self._wsid

    def datastores(self) -> list[Path]:
        lab = self.ws / "lab"
        return sorted([p for p in lab.glob("*/datastore")] + [lab / "shared"])

    def vm_rows(self) -> list[dict]:
        """The VM records as they are stored (recycled ones too)."""
        if not (self.ws / "state.db").exists():
            return []
        con = sqlite3.connect(f"file:{self.ws / 'state.db'}?mode=ro", uri=True, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in con.execute("SELECT * FROM vms")]
        finally:
            con.close()
        for r in rows:
            r["spec"] = json.loads(r["spec"])
        return rows

    def vm(self, name: str) -> dict | None:
        return next((r for r in self.vm_rows() if r["name"] == name and r["recycled"] is None), None)

    def disk(self, name: str, i: int = 0) -> str:
        row = self.vm(name)
        assert row, f"no VM {name}"
        return row["spec"]["disks"][i]["path"]

    def task(self, task_id: int) -> dict:
        return task_rows(self.ws, task_id - 1)[0]

    def vm_with_data(self, name: str, host: str, size: int, raw: Path, memory: str = "192M") -> str:
        """A stopped VM whose one disk holds the raw image's contents; its disk's path."""
        made = self.ok("vm", "create", name, "--host", host, "--disk", f"{size // MiB}M", "--memory", memory)
        disk = made["disks"][0]
        c = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), disk)
        assert c.returncode == 0, c.stderr
        return disk

    def delete(self, name: str) -> None:
        """Delete a VM if it is there (teardown; what cannot be deleted stays, and is reported)."""
        row = self.vm(name)
        if row is None or not self.tidy:
            return
        if row["state"] == "running":
            self.run("vm", "stop", name, "--force")
        self.run("vm", "delete", name, "--confirm", name)

    def problems(self, extra: tuple[Path, ...] = ()) -> set[str]:
        """Everything wrong that a user could find: VM records that are half made or half deleted,
        without their disks, or busy; files in datastores no record owns; temporary files; what
        `ferry gc` would remove; QEMU processes without a record, records running without a QEMU;
        unfinished tasks."""
        out: set[str] = set()
        owned: set[str] = set()
        recycled_ids: set[str] = set()
        tasks = {t["id"]: t for t in task_rows(self.ws)}

        def task(tid: int) -> str:
            t = tasks.get(tid)
            return f"task {tid}" + (f" ({t['kind']}, {t['state']})" if t else " (gone)")
        for r in self.vm_rows():
            spec = r["spec"]
            if r["recycled"] is not None:
                recycled_ids.add(r["id"])
                continue
            if r["state"] in ("incomplete", "deleting"):
                out.add(f"VM {r['name']} left {r['state']}")
            if r["busy"] is not None:
                out.add(f"VM {r['name']} left busy with {task(r['busy'])}")
            for d in spec.get("disks", []):
                owned.add(d["path"])
                if not Path(d["path"]).is_file() and r["state"] != "deleting":
                    out.add(f"VM {r['name']} without its disk {d['name']}")
            if spec.get("hibernate_file"):
                owned.add(spec["hibernate_file"])
        for ds in self.datastores():
            if not ds.exists():
                continue
            for top in ds.iterdir():
                if top.name == ".recycle":
                    stray = [p for p in top.iterdir() if p.name not in recycled_ids]
                    out.update(f"recycle bin folder without a record: {p}" for p in stray)
                    continue
                files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
                mine = [p for p in files if str(p) in owned]
                for p in files:
                    if str(p) not in owned and ".ferry-task" not in p.name:
                        out.add(f"disk without a VM: {p} ({p.stat().st_size >> 20} MiB)")
                if top.is_dir() and not files and not mine:
                    out.add(f"empty folder without a VM: {top}")
        for p in hidden_leftovers(*self.datastores(), self.out, *extra):
            out.add(f"temporary file left: {p} ({_size(p) >> 20} MiB)")
        for t in tasks.values():
            if t["state"] in UNFINISHED:
                out.add(f"task {t['id']} ({t['kind']}) left {t['state']}")
        # What Ferry itself would call leftovers of tasks that are gone.
        gc = self.run("gc", "--dry-run", "--json")
        if gc.code == 0:
            out.update(f"ferry gc finds {i['what']}: {i['path'] or '(record)'}" for i in gc.json if not i["kept"])
        else:
            out.add(f"ferry gc --dry-run failed: {why(gc)}")
        # QEMU processes against the records (as `ferry vm reconcile` compares them, read here from /proc).
        running = self.qemus()
        for r in self.vm_rows():
            if r["recycled"] is not None:
                continue
            pids = running.pop(r["id"][:8], [])
            if len(pids) > 1:
                out.add(f"VM {r['name']} has {len(pids)} QEMU processes")
            if r["state"] in ("running", "paused") and not pids:
                out.add(f"VM {r['name']} recorded {r['state']}, its QEMU gone")
            if r["state"] not in ("running", "paused") and pids:
                out.add(f"VM {r['name']} recorded {r['state']} while its QEMU runs")
        out.update(f"QEMU without a record: vm-{short} (pid {pids[0]})" for short, pids in running.items())
        return out

    def qemus(self) -> dict[str, list[int]]:
        """The QEMU processes of this workspace's VMs: the first 8 hex digits of the VM's id -> pids."""
        out: dict[str, list[int]] = {}
        mark = str(self.ws).encode()
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" not in cmd.split(b"\0")[0] or mark not in cmd:
                continue
            m = re.search(rb"vm-([0-9a-f]{8})", cmd)
            if m:
                out.setdefault(m.group(1).decode(), []).append(int(p))
        return out

    def qemu_count(self, name: str) -> int:
        """QEMU processes running for the VM."""
        row = self.vm(name)
        return len(self.qemus().get(row["id"][:8], [])) if row else 0


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(c.stat().st_size for c in p.rglob("*") if c.is_file())


class Scenario:
    """One kind of task, as the issue lists them: how to make its sources, the command a trial
    kills, what a correct result is, what a clean rollback is, and how to clear a trial away."""
    name = ""
    follows: tuple[str, ...] = ("rerun", "cancel", "resume", "rerun")    # in turn, trial by trial

    def __init__(self, lab: Lab, *, disk: int, data: int, files: int = 0, tree: int = 0) -> None:
        self.lab, self.disk, self.data, self.files, self.tree = lab, disk, data, files, tree

    def raw(self) -> Path:
        return disk_image(self.lab.data / f"disk-{self.disk >> 20}M-{self.data >> 20}M.raw", self.disk, self.data)

    def prepare(self) -> None:
        """Once: the sources every trial uses."""

    def setup(self, i: int) -> None:
        """Before trial i."""

    def command(self, i: int) -> list[str]:
        raise NotImplementedError

    def sources(self) -> dict[str, object]:
        """What must not change (path -> digest)."""
        return {}

    def folders(self) -> tuple[Path, ...]:
        """Where else temporary files could be left."""
        return ()

    def stages(self) -> list[Point]:
        """Points seen on disk, for work too quick for its progress in state.db to tell its steps
        apart (a small copy, a linked deploy): none by default."""
        return []

    def meanwhile(self, i: int) -> list[str]:
        """Problems with what `ferry vm list` shows while the killed task waits to be resumed or
        cancelled (a half-made VM shown as a normal one, say): none by default."""
        return []

    def result(self, i: int) -> list[str]:
        """Problems with the result of trial i (none: it is correct)."""
        raise NotImplementedError

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        """After a cancel: ("rolled back", problems), or ("finished", problems) for a kind whose
        cancel leaves the work to be finished (a delete that had begun)."""
        raise NotImplementedError

    def teardown(self, i: int) -> None:
        """Clear the trial's result away, so the next trial starts from the same place."""


def _digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else repr(sorted(tree_digest(path).items()))


class _Making(Scenario):
    """A kind that makes VMs from a source: each one made is stopped, its disk's contents are the
    source's (linked: through the source as its backing file); rolled back, none is recorded."""
    linked = False

    def names(self, i: int) -> list[str]:
        raise NotImplementedError

    def stages(self) -> list[Point]:
        return [while_temporary(*self.lab.datastores(), self.lab.out, *self.folders(), grown=self.data // 2)]

    def sources(self) -> dict[str, object]:
        return {self.src: sha256_file(Path(self.src))}

    def result(self, i: int) -> list[str]:
        out = []
        for n in self.names(i):
            row = self.lab.vm(n)
            if row is None:
                out.append(f"no VM {n}")
                continue
            if row["state"] != "stopped":
                out.append(f"{n} is {row['state']}")
            disk = row["spec"]["disks"][0]["path"]
            out += image_problems(disk, self.src, n)
            if self.linked and Path(disk).is_file() and backing_of(disk) != self.src:
                out.append(f"{n} is not linked to the template ({backing_of(disk)})")
        return out

    def meanwhile(self, i: int) -> list[str]:
        """A VM the killed task was making is shown incomplete, or it is complete."""
        shown = {v["name"]: v for v in self.lab.ok("vm", "list")}
        out = []
        for n in self.names(i):
            v = shown.get(n)
            if v and v["state"] != "incomplete" and (wrong := image_problems(v["disks"][0]["path"], self.src, n)):
                out.append(f"while interrupted, {n} shown {v['state']}: {wrong[0]}")
        return out

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        return "rolled back", [f"{n} still recorded ({r['state']})" for n in self.names(i) if (r := self.lab.vm(n))]

    def teardown(self, i: int) -> None:
        for n in self.names(i):
            self.lab.delete(n)


class CloneScenario(_Making):
    name = "vm clone"

    def prepare(self) -> None:
        self.src = self.lab.vm_with_data("csrc", "lab1", self.disk, self.raw())

    def names(self, i: int) -> list[str]:
        return [f"c{i}"]

    def command(self, i: int) -> list[str]:
        return ["vm", "clone", "csrc", f"c{i}"]


class DeployScenario(_Making):
    name = "template deploy x3 (linked)"
    linked = True

    def prepare(self) -> None:
        self.src = self.lab.vm_with_data("tpl", "lab1", self.disk, self.raw())
        self.lab.ok("template", "convert", "tpl")

    def names(self, i: int) -> list[str]:
        return [f"d{i}-{n}" for n in range(1, 4)]

    def stages(self) -> list[Point]:
        """Once its first, once its second VM's disk is in place."""
        ds = self.lab.ws / "lab" / "lab1" / "datastore"
        return [Point(f"once VM {k} of 3 has its disk", lambda task, k=k: task["state"] == "running" and
                      (ds / task["params"]["names"][k - 1] / "disk0.qcow2").exists()) for k in (1, 2)]

    def command(self, i: int) -> list[str]:
        return ["template", "deploy", "tpl", f"d{i}-#", "--count", "3"]


class ImportScenario(_Making):
    name = "vm import of an OVA"

    def prepare(self) -> None:
        self.src = self.lab.vm_with_data("isrc", "lab1", self.disk, self.raw())
        self.pkg = self.lab.ws / "pkg"
        self.pkg.mkdir(exist_ok=True)
        self.ova = self.pkg / "isrc.ova"
        self.lab.ok("vm", "export", "isrc", "--out", str(self.ova))

    def names(self, i: int) -> list[str]:
        return [f"i{i}"]

    def command(self, i: int) -> list[str]:
        return ["vm", "import", str(self.ova), "--host", "lab1", "--name", f"i{i}"]

    def sources(self) -> dict[str, object]:
        return {str(self.ova): sha256_file(self.ova)}

    def folders(self) -> tuple[Path, ...]:
        return (self.pkg,)


class ExportScenario(Scenario):
    name = "vm export"

    def prepare(self) -> None:
        self.src = self.lab.vm_with_data("esrc", "lab1", self.disk, self.raw())

    def ova(self, i: int) -> Path:
        return self.lab.out / f"e{i}.ova"

    def stages(self) -> list[Point]:
        return [while_temporary(self.lab.out, grown=self.data // 2)]

    def command(self, i: int) -> list[str]:
        return ["vm", "export", "esrc", "--out", str(self.ova(i))]

    def sources(self) -> dict[str, object]:
        return {self.src: sha256_file(Path(self.src))}

    def result(self, i: int) -> list[str]:
        """The OVA is there, and imported back it gives the same disk."""
        if not self.ova(i).is_file():
            return [f"no {self.ova(i).name}"]
        r = self.lab.run("vm", "import", str(self.ova(i)), "--host", "lab2", "--name", f"back{i}")
        if r.code != 0:
            return [f"{self.ova(i).name} does not import: {why(r)}"]
        try:
            return image_problems(self.lab.disk(f"back{i}"), self.src, f"{self.ova(i).name} imported back")
        finally:
            self.lab.delete(f"back{i}")

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        return "rolled back", [f"{self.ova(i).name} left"] if self.ova(i).exists() else []

    def teardown(self, i: int) -> None:
        self.lab.delete(f"back{i}")
        if self.ova(i).is_file():
            self.ova(i).unlink()


class SecureDeleteScenario(Scenario):
    name = "vm delete --secure"

    def setup(self, i: int) -> None:
        self.disk_of = self.lab.vm_with_data(f"x{i}", "lab1", self.disk, self.raw())
        self.before = sha256_file(Path(self.disk_of))

    def command(self, i: int) -> list[str]:
        return ["vm", "delete", f"x{i}", "--secure", "--confirm", f"x{i}"]

    def meanwhile(self, i: int) -> list[str]:
        """Shown "deleting", or as it was: stopped over its disk unchanged."""
        v = {v["name"]: v for v in self.lab.ok("vm", "list")}.get(f"x{i}")
        if v is None or v["state"] == "deleting":
            return []
        if v["state"] == "stopped" and Path(self.disk_of).is_file() and sha256_file(Path(self.disk_of)) == self.before:
            return []
        return [f"while interrupted, x{i} shown {v['state']} over a disk that was changed or removed"]

    def result(self, i: int) -> list[str]:
        out = [f"x{i} still recorded ({self.lab.vm(f'x{i}')['state']})"] if self.lab.vm(f"x{i}") else []
        return out + ([f"x{i}'s disk left"] if Path(self.disk_of).exists() else [])

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        """Cancelled before a byte was overwritten: the VM is back as it was. Once the wipe had begun
        it stays "deleting" (a user sees it), and the same command finishes it."""
        row = self.lab.vm(f"x{i}")
        if row is None:
            return "rolled back", [f"x{i}'s record is gone but its disk is left"] if Path(self.disk_of).exists() else []
        if row["state"] == "deleting":
            r = self.lab.run(*self.command(i))
            out = [] if r.code == 0 else [f"the delete after the cancel failed: {why(r)}"]
            return "finished", out + self.result(i)
        if row["state"] != "stopped":
            return "rolled back", [f"x{i} is {row['state']} after the cancel"]
        if not Path(self.disk_of).is_file() or sha256_file(Path(self.disk_of)) != self.before:
            return "rolled back", [f"x{i} shown stopped, but its disk was changed"]
        return "rolled back", []

    def teardown(self, i: int) -> None:
        self.lab.delete(f"x{i}")


class StartScenario(Scenario):
    name = "vm start"

    def prepare(self) -> None:
        self.lab.ok("vm", "create", "s", "--host", "lab1", "--disk", "16M", "--memory", "192M")

    def setup(self, i: int) -> None:
        row = self.lab.vm("s")
        if row and row["state"] != "stopped" or self.lab.qemu_count("s"):
            self.lab.run("vm", "stop", "s", "--force")

    def command(self, i: int) -> list[str]:
        return ["vm", "start", "s"]

    def result(self, i: int) -> list[str]:
        row = self.lab.vm("s")
        out = [] if row and row["state"] == "running" else [f"s is {row and row['state']}"]
        n = self.lab.qemu_count("s")
        if n != 1:
            out.append(f"{n} QEMU processes for s")
        a = self.lab.run("vm", "agent", "info", "s", "--json")
        if a.code != 0 or a.json.get("agent") != "running":
            out.append(f"s's guest agent does not answer ({why(a)})")
        return out

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        """A cancelled start leaves the VM as a user can trust it: stopped with no QEMU, or (the start
        had done its work) running with one."""
        row = self.lab.vm("s")
        n = self.lab.qemu_count("s")
        if row and row["state"] == "stopped" and n == 0:
            return "rolled back", []
        if row and row["state"] == "running" and n == 1:
            return "rolled back", []
        return "rolled back", [f"s is {row and row['state']} with {n} QEMU process(es)"]

    def teardown(self, i: int) -> None:
        if self.lab.qemu_count("s") or (self.lab.vm("s") or {}).get("state") != "stopped":
            self.lab.run("vm", "stop", "s", "--force")


class _Replication(Scenario):
    """`ferry replicate LEVEL local:SRC local:TARGET`. Cancelled, a round leaves the target as far as it
    got (the user's copy, a sync), without the partly written files it kept for a resume."""
    level = ""

    def target(self, i: int) -> Path:
        return self.lab.out / f"{self.level[0]}{i}"

    def command(self, i: int) -> list[str]:
        # lab.bwlimit: a small copy slowed down so that its progress is seen at several points
        limit = ["--bwlimit", self.lab.bwlimit] if getattr(self.lab, "bwlimit", None) else []
        return ["replicate", self.level, f"local:{self.src}", f"local:{self.target(i)}", *limit]

    def sources(self) -> dict[str, object]:
        return {str(self.src): _digest(self.src)}

    def rolled_back(self, i: int) -> tuple[str, list[str]]:
        t = self.target(i)
        parts = list(t.rglob(".ferry-part.*")) if t.is_dir() else []
        return "rolled back", [f"{len(parts)} partly written file(s) left in the replica"] if parts else []

    def teardown(self, i: int) -> None:
        t = self.target(i)
        if t.is_dir():
            shutil.rmtree(t, ignore_errors=True)
        elif t.exists():
            t.unlink()


class BlocksScenario(_Replication):
    name = "replicate blocks"
    level = "blocks"

    def prepare(self) -> None:
        self.src = self.raw()

    def result(self, i: int) -> list[str]:
        t = self.target(i)
        if not t.is_file():
            return [f"no {t.name}"]
        same = subprocess.run(["cmp", "-s", str(self.src), str(t)]).returncode == 0
        return [] if same else [f"{t.name} differs from the source"]


class FilesScenario(_Replication):
    name = "replicate files"
    level = "files"

    def prepare(self) -> None:
        self.src = file_tree(self.lab.data / f"tree-{self.files}-{self.tree >> 20}M", self.files, self.tree)
        self.want = tree_digest(self.src)

    def result(self, i: int) -> list[str]:
        t = self.target(i)
        if not t.is_dir():
            return [f"no {t.name}"]
        got = tree_digest(t)
        parts = [k for k in got if ".ferry-part." in k]
        out = [f"{len(parts)} partial file(s) left in the replica"] if parts else []
        got = {k: v for k, v in got.items() if k not in parts}
        if got != self.want:
            diff = sorted(set(got.items()) ^ set(self.want.items()))
            out.append(f"the replica differs from the source in {len(diff)} entries (e.g. {diff[0][0]})")
        return out


SCENARIOS: dict[str, type[Scenario]] = {
    "blocks": BlocksScenario, "files": FilesScenario, "clone": CloneScenario, "import": ImportScenario,
    "deploy": DeployScenario, "export": ExportScenario, "delete": SecureDeleteScenario, "start": StartScenario,
}


def run_trial(sc: Scenario, i: int, point: Point, follow: str) -> Trial:
    """Kill `ferry COMMAND` at the point, follow up, and look: the result (finished) or nothing
    (rolled back), nothing new left behind, no task unfinished, no helper of its task alive, the
    sources unchanged."""
    lab = sc.lab
    sc.setup(i)
    sums = sc.sources()
    before = lab.problems(sc.folders())
    kill = kill_at(lab.ws, *sc.command(i), when=point.when, delay=point.delay, env=lab.env)
    tid = kill.task_id
    trial = Trial(sc.name, point.label, follow, tid)
    left: list[str] = []
    row = lab.task(tid) if tid else None
    if not kill.killed or (row and row["state"] in FINAL):
        # The command ended before the point: no kill to speak of; the run is still checked.
        trial.outcome = "missed"
        if (row is None or row["state"] != "succeeded") and kill.code != 0:
            left.append(f"the command failed: {why(Result(kill.code, kill.out, kill.err))}")
        left += sc.result(i)
    else:
        trial.killed, trial.progress = True, fraction(kill.progress)
        # What `ferry tasks` shows before any other Ferry process has started.
        shown = {t["id"]: t["state"] for t in lab.ok("tasks", "--all")}
        if shown.get(tid) == "running":
            left.append("the killed task shown running")
        left += sc.meanwhile(i)
        if follow == "cancel":
            r = lab.run("task", "cancel", str(tid))
            if r.code != 0:
                left.append(f"ferry task cancel: {why(r)}")
            try:
                until_sync(lambda: lab.task(tid)["state"] in FINAL, timeout=120, what=f"task {tid} to end")
            except AssertionError:
                left.append(f"the cancelled task is still {lab.task(tid)['state']}")
            trial.outcome, more = sc.rolled_back(i)
            if more and trial.outcome == "rolled back" and not sc.result(i):
                # The kill came after the work was done, before the task said so: it stays, complete.
                trial.outcome, more = "finished", []
            if lab.task(tid)["state"] != "cancelled":
                left.append(f"the task is {lab.task(tid)['state']}, not cancelled"
                            + (f": {lab.task(tid)['error']}" if lab.task(tid)["error"] else ""))
            left += more
        else:
            r = lab.run(*sc.command(i)) if follow == "rerun" else lab.run("task", "resume", str(tid))
            if r.code != 0:
                left.append(f"{follow} failed: {why(r)}")
            if lab.task(tid)["state"] != "succeeded":    # the rerun goes on with the killed task
                left.append(f"the killed task ended {lab.task(tid)['state']}")
            trial.outcome = "finished"
            left += sc.result(i)
    ids = [t["id"] for t in task_rows(lab.ws, (tid or 1) - 1)]
    for t in ids:
        alive = helpers_of(lab.wsid, t)
        if alive:
            left.append(f"{len(alive)} helper process(es) of task {t} still running")
    after = lab.problems(sc.folders())
    left += sorted(after - before)
    for path, digest in sums.items():
        if _digest(Path(path)) != digest:
            left.append(f"the source {Path(path).name} changed")
    trial.left = left
    if left and trial.outcome != "missed":
        trial.outcome = "wrong"
    # Whatever went wrong stays reported; clear it so the next trial starts clean.
    for t in task_rows(lab.ws, (tid or 1) - 1):
        if t["state"] in UNFINISHED or t["state"] == "failed":
            lab.run("task", "cancel", str(t["id"]))
    sc.teardown(i)
    return trial

