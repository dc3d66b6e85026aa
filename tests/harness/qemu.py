"""Test helpers around QEMU: the shared live-image cache, last-resort cleanup, disk contents."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path

MiB = 1 << 20


def image_cache() -> Path:
    """Persistent across runs, so the live image (and its ~36 MB of packages) is built once per machine."""
    env = os.environ.get("FERRY_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ferry-tests"


def kill_pidfile(pidfile: str | Path) -> None:
    """Synchronous last-resort cleanup of the QEMU that wrote pidfile (works without an event loop)."""
    try:
        pid = int(Path(pidfile).read_text().strip())
        if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            os.kill(pid, signal.SIGCONT)    # a stopped process must wake to die
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def kill_all(root: Path) -> None:
    """Every QEMU with a pid file anywhere under root."""
    for pidfile in root.rglob("*.pid"):
        kill_pidfile(pidfile)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def raw_bytes(image: str | Path) -> bytes:
    """A disk image's guest-visible contents."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), f"{d}/raw"], capture_output=True,
                       check=True)
        return Path(f"{d}/raw").read_bytes()


def raw_sha256(image: str | Path) -> str:
    """SHA-256 of a disk image's guest-visible contents."""
    return hashlib.sha256(raw_bytes(image)).hexdigest()
