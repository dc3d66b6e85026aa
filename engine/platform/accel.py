"""Choosing QEMU acceleration per host: `auto` proves KVM by booting a guest, else falls back to TCG."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from ..errors import FerryError, PermanentError, TransientError
from ..transport.base import Transport
from .liveboot import LivePaths, LiveRole, launch, live_boot_argv, stop, wait_for_marker
from .liveimage import LiveImage


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel          # kvm or tcg, never auto
    reason: str           # one line for the operator
    cached: bool = False  # True when this verdict came from an earlier check
    checked_at: float = 0.0


async def _fingerprint(transport: Transport, qemu: str) -> str:
    """What must stay the same for an earlier verdict to hold: kernel, QEMU, CPU, /dev/kvm."""
    uname = await transport.run(["uname", "-r"], timeout=10)
    version = await transport.run([qemu, "--version"], timeout=10)
    kvm = await transport.stat("/dev/kvm")
    try:
        cpuinfo = (await transport.read_file("/proc/cpuinfo")).decode("utf-8", "replace")
        model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    except FerryError:
        model = "?"
    return "|".join([uname.text().strip(), version.text().splitlines()[0] if version.ok else "?",
                     model, "kvm" if kvm else "no-kvm"])


def _read_cache(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


async def detect_acceleration(transport: Transport, image: LiveImage, *, runtime_dir: str, cache_file: Path,
                              requested: Accel | str = Accel.AUTO, timeout: float = 10.0, force: bool = False,
                              qemu: str = "qemu-system-x86_64") -> AccelChoice:
    """The acceleration to use on a host; for auto, a short KVM boot check whose verdict is cached.

    The cache (cache_file, one per host) is reused while the host's kernel, QEMU, CPU and /dev/kvm
    are unchanged; force=True checks again.
    """
    requested = Accel(requested)
    if requested is not Accel.AUTO:
        return AccelChoice(requested, f"{requested} is configured for {transport.host}", checked_at=time.time())
    fingerprint = await _fingerprint(transport, qemu)
    cached = None if force else await asyncio.to_thread(_read_cache, Path(cache_file))
    if cached and cached.get("fingerprint") == fingerprint and cached.get("accel") in ("kvm", "tcg"):
        return AccelChoice(Accel(cached["accel"]), cached["reason"], cached=True,
                           checked_at=cached.get("checked_at", 0.0))
    choice = await _check_kvm(transport, image, runtime_dir, timeout, qemu)
    await asyncio.to_thread(_write_cache, Path(cache_file), {**asdict(choice), "fingerprint": fingerprint})
    return choice


async def _check_kvm(transport: Transport, image: LiveImage, runtime_dir: str, timeout: float,
                     qemu: str) -> AccelChoice:
    now = time.time()
    usable = await transport.run(["sh", "-c", "test -r /dev/kvm && test -w /dev/kvm"], timeout=10)
    if not usable.ok:
        return AccelChoice(Accel.TCG, f"no usable /dev/kvm on {transport.host}: using TCG (software emulation)",
                           checked_at=now)
    # /dev/kvm opening is not enough: under nested virtualisation guests can hang before their
    # first line, so only a guest that reaches its agent counts.
    paths = LivePaths(runtime_dir, f"accel-check-{os.getpid()}")
    argv = live_boot_argv(image, paths=paths, role=LiveRole.IDLE, accel="kvm", memory_mb=128, qemu=qemu)
    started = time.monotonic()
    try:
        await launch(transport, argv, paths)
        await wait_for_marker(transport, paths, "FERRY-READY", timeout=timeout)
    except TransientError:
        return AccelChoice(Accel.TCG, f"KVM unusable on {transport.host}: a test guest under KVM did not reach "
                           f"its agent within {timeout:g} s (nested virtualisation?); using TCG (software emulation)",
                           checked_at=now)
    except FerryError as e:
        return AccelChoice(Accel.TCG, f"KVM unusable on {transport.host}: {e.message}; using TCG "
                           "(software emulation)", checked_at=now)
    finally:
        try:
            await stop(transport, paths.pidfile)
        finally:
            for leftover in (paths.qmp, paths.qga, paths.serial, paths.serial_socket, paths.pidfile):
                try:
                    await transport.remove(leftover)
                except PermanentError:
                    pass
    took = time.monotonic() - started
    return AccelChoice(Accel.KVM, f"KVM works on {transport.host}: a test guest booted to its agent in {took:.1f} s",
                       checked_at=now)
