"""A real terminal for the console: a tmux session driven with send-keys and read with capture-pane."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

from .cli import ROOT
from .waiting import until_sync


class Terminal:
    def __init__(self, argv: list[str], *, width: int = 120, height: int = 32, env: dict | None = None) -> None:
        self.name = f"ferry-test-{uuid.uuid4().hex[:8]}"
        env_args = [f"{k}={v}" for k, v in {"TERM": "xterm-256color", "PYTHONPATH": str(ROOT), **(env or {})}.items()]
        cmd = "env " + " ".join(shlex.quote(a) for a in env_args + argv)
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), cmd],
                       check=True, cwd=ROOT)

    def pid(self) -> int:
        out = subprocess.run(["tmux", "list-panes", "-t", self.name, "-F", "#{pane_pid}"], capture_output=True,
                             text=True, check=True).stdout
        return int(out.split()[0])

    def screen(self) -> str:
        r = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        until_sync(lambda: text in self.screen(), timeout=timeout,
                   what=f"{text!r} on the screen; it shows:\n{self.screen()}")
        return self.screen()

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def console(workspace: Path, **kw) -> Terminal:
    """`ferry --workspace W` (the console) in a fresh terminal."""
    return Terminal([sys.executable, "-m", "ferry.console.cli", "--workspace", str(workspace)], **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
