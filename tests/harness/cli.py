"""Run the `ferry` command line as a user would: in this process, or as a child process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


# sys.stdout and sys.stderr are the process's: commands run in this process from several threads at
# once (asyncio.to_thread) take turns, or each would print into the other's output.
_IN_PROCESS = threading.Lock()


def ferry(workspace: Path, *args: str) -> Result:
    """`ferry --workspace W ARGS...` in this process (the command runs its own event loop)."""
    from ferry.console.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _IN_PROCESS, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--workspace", str(workspace), *args])
        except SystemExit as e:   # argparse refusing an argument: usage line, exit status 2
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def ferry_process(workspace: Path, *args: str, env: dict | None = None, prefix: list[str] | None = None,
                  **kw) -> subprocess.Popen:
    """`ferry --workspace W ARGS...` as a child process (to kill it, or to run it with fewer privileges)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env or {})}
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "ferry.console.cli", "--workspace", str(workspace),
                             *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)




def isolate_ssh(monkeypatch, home: Path) -> None:
    """Make ~ a throw-away folder and forget any ssh-agent, so tests never read the machine's keys."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def relay_over_asyncssh(monkeypatch) -> None:
    """Make Ferry carry bulk data over asyncssh, as on a machine without the OpenSSH client (for
    this process, and the engine services its commands start from now on)."""
    monkeypatch.setenv("FERRY_SSH_CLIENT", "asyncssh")


async def replicate_watched(workspace, level: str, params: dict) -> tuple:
    """Run (or resume) a replication in this process through the engine's client, as the console
    does: (its final TaskInfo, [(monotonic time, Progress), ...] of every progress event)."""
    import time

    from ferry.engine.client import EngineClient
    from ferry.engine.taskmodel import FINAL_STATES

    client = EngineClient.open(workspace, adopt=False)
    await client.start()
    seen: list = []
    try:
        sub = client.subscribe()
        tid, _ = await client.replicate(level, params)
        while (info := await client.get_task(tid)).state not in FINAL_STATES:
            for ev in await sub.wait(timeout=1.0):
                if ev.type == "progress" and ev.task_id == tid:
                    seen.append((time.monotonic(), ev.data))
        sub.close()
    finally:
        await client.close()
    return info, seen


def engines_under(root: Path) -> list[int]:
    """Pids of engine services (`python -m ferry.engine.service`) whose workspace lies under `root`."""
    root_s = str(root.resolve())
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ferry.engine.service" not in args:
            continue
        try:
            ws = args[args.index(b"--workspace") + 1].decode()
        except (ValueError, IndexError):
            continue
        if ws == root_s or ws.startswith(root_s + "/"):
            out.append(int(p))
    return out


def kill_engines(root: Path) -> list[int]:
    """SIGKILL the engine services of workspaces under `root` (a test's leftovers), and reap them."""
    import signal
    import time
    pids = engines_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    def alive(pid: int) -> bool:
        try:            # it may be reaped between any two reads: gone is gone
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p)]
        time.sleep(0.01)
    return pids


def engine_pid(workspace: Path) -> int | None:
    """The pid of the workspace's engine service, from its pid file, when one runs."""
    try:
        pid = int((workspace / "engine.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


@contextlib.contextmanager
def engine_held_off(workspace: Path):
    """While inside, no engine can start for the workspace: its lock is held here (a running engine
    holds it too: kill that one first)."""
    import fcntl
    fd = os.open(Path(workspace) / "engine.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def kill9(workspace: Path, proc: subprocess.Popen) -> None:
    """kill -9 of Ferry mid-task: the workspace's engine service (which runs the task) and the
    command following it, at once; the command is reaped."""
    import signal
    pid = engine_pid(workspace)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if pid:
        from ferry.engine.helpers import pid_running
        from .waiting import until_sync
        until_sync(lambda: not pid_running(pid), timeout=30, what=f"engine {pid} to be gone")
