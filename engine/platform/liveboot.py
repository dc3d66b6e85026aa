"""Booting the live image: the QEMU command line, starting it as a daemon, its serial markers, stopping it."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Mapping, Sequence

from ..errors import FerryError, PermanentError, TransientError
from ..helpers import detached
from ..transport.base import Transport
from .liveimage import LiveImage

QEMU = "qemu-system-x86_64"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Only what the guest's /init understands (liveimage_recipe/rootfs/init).
_PARAMS = frozenset({"ip", "gw", "iface", "authkey", "dirty_mb_s", "dirty_mb", "root", "root_wait",
                     "rootfstype", "rootflags", "init", "hostname"})


class LiveRole(StrEnum):
    IDLE = "idle"              # guest agent only
    RECEIVER = "receiver"      # network + dropbear, ready to take a transfer onto its disks
    WORKLOAD = "workload"      # dirties memory at ferry.dirty_mb_s, for live-migration tests
    BOOT_DISK = "boot-disk"    # mounts ferry.root and switches into it


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SCSI = "scsi"
    IDE = "ide"


@dataclass(frozen=True)
class LiveDisk:
    path: str
    format: str = "qcow2"
    bus: DiskBus = DiskBus.VIRTIO
    readonly: bool = False


@dataclass(frozen=True)
class LiveNic:
    """User-mode networking, restricted: the guest reaches nothing; the host reaches it by hostfwd."""

    hostfwd: tuple[tuple[int, int], ...] = ()    # (port on 127.0.0.1, port in the guest), TCP
    mac: str | None = None
    tap: str | None = None      # a tap device QEMU makes (joined to a bridge after it starts), not user mode


@dataclass(frozen=True)
class LivePaths:
    """Where one booted guest keeps its sockets, serial log and pid file on its host."""

    runtime_dir: str
    name: str

    def _p(self, suffix: str) -> str:
        return str(PurePosixPath(self.runtime_dir) / f"{self.name}.{suffix}")

    @property
    def qmp(self) -> str:
        return self._p("qmp")

    @property
    def qga(self) -> str:
        return self._p("qga")

    @property
    def serial(self) -> str:
        """The serial console's log: everything the guest printed on ttyS0 (the boot markers too)."""
        return self._p("serial")

    @property
    def serial_socket(self) -> str:
        """The serial console itself (ttyS0), a socket one client at a time reads and types into."""
        return self._p("ttyS0")

    @property
    def pidfile(self) -> str:
        return self._p("pid")


def _opt(value: str) -> str:
    """A value inside a QEMU -option list, where a comma must be doubled."""
    return str(value).replace(",", ",,")


def live_append(role: LiveRole | str = LiveRole.IDLE, params: Mapping[str, object] | None = None,
                extra: str = "") -> str:
    """The kernel command line for a role; params become ferry.<key>=<value>."""
    role = LiveRole(role)
    # quiet: every kernel line on an emulated UART costs boot time; /init's markers still show.
    words = ["console=ttyS0", "quiet", "panic=-1", f"ferry.role={role}"]
    for key, value in (params or {}).items():
        if key not in _PARAMS:
            raise PermanentError(f"unknown live image parameter {key!r}",
                                 f"use one of {', '.join(sorted(_PARAMS))}")
        text = str(value)
        if not text or re.search(r"\s", text):
            raise PermanentError(f"live image parameter {key}={text!r} is empty or has spaces",
                                 "kernel arguments are split at spaces; pass a single word")
        words.append(f"ferry.{key}={text}")
    if extra:
        words.append(extra)
    line = " ".join(words)
    if len(line) > 2000:
        raise PermanentError(f"the kernel command line is {len(line)} bytes, over the kernel's 2048",
                             "pass long values (SSH keys) through the guest agent instead")
    return line


def live_boot_argv(image: LiveImage, *, paths: LivePaths, role: LiveRole | str = LiveRole.IDLE,
                   accel: str = "tcg", memory_mb: int = 256, cpus: int = 1,
                   params: Mapping[str, object] | None = None, disks: Sequence[LiveDisk] = (),
                   nics: Sequence[LiveNic] = (), extra_append: str = "", machine: str = "pc",
                   cpu: str | None = None, daemonize: bool = True, qemu: str = QEMU,
                   maxcpus: int | None = None, incoming: str | None = None) -> list[str]:
    """The QEMU argv that boots the live image as a daemon with QMP, guest agent and serial console on
    sockets (the serial console also logged to a file)."""
    for sock in (paths.qmp, paths.qga, paths.serial_socket):
        if len(sock.encode()) > _MAX_SOCKET_PATH:
            raise PermanentError(f"socket path {sock} is longer than a UNIX socket allows (107 bytes)",
                                 "use a shorter runtime folder for this host")
    argv = [qemu, "-name", _opt(paths.name), "-machine", f"{_opt(machine)},accel={accel}",
            # No default NIC, VGA, floppy or monitor: the guest gets exactly what is listed here.
            "-nodefaults", "-no-user-config", "-display", "none",
            "-m", str(memory_mb), "-smp", f"{cpus},maxcpus={maxcpus}" if maxcpus else str(cpus)]
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-kernel", str(image.kernel), "-initrd", str(image.initrd),
             "-append", live_append(role, params, extra_append),
             # ttyS0 on a socket, for a console to attach to; QEMU logs all the guest prints there
             # to the serial file, whether a client is attached or not (the boot markers are read there).
             "-chardev", f"socket,id=serial0,path={_opt(paths.serial_socket)},server=on,wait=off,"
                         f"logfile={_opt(paths.serial)}",
             "-serial", "chardev:serial0",
             "-chardev", f"socket,id=qmp0,path={_opt(paths.qmp)},server=on,wait=off",
             "-mon", "chardev=qmp0,mode=control",
             "-chardev", f"socket,id=qga0,path={_opt(paths.qga)},server=on,wait=off",
             "-device", "virtio-serial-pci,id=vser0",
             "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}"]
    scsi = False
    for i, disk in enumerate(disks):
        drive = f"file={_opt(disk.path)},format={disk.format},if=none,id=drive{i}"
        argv += ["-drive", drive + (",readonly=on" if disk.readonly else "")]
        bus = DiskBus(disk.bus)
        if bus is DiskBus.VIRTIO:
            argv += ["-device", f"virtio-blk-pci,drive=drive{i},id=disk{i}"]
        elif bus is DiskBus.SCSI:
            if not scsi:
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            argv += ["-device", f"scsi-hd,drive=drive{i},bus=scsi0.0,id=disk{i}"]
        else:
            argv += ["-device", f"ide-hd,drive=drive{i},id=disk{i}"]
    for i, nic in enumerate(nics):
        netdev = f"user,id=net{i},restrict=on"
        if nic.tap:
            netdev = f"tap,id=net{i},ifname={_opt(nic.tap)},script=no,downscript=no"
        for host_port, guest_port in nic.hostfwd if not nic.tap else ():
            netdev += f",hostfwd=tcp:127.0.0.1:{int(host_port)}-:{int(guest_port)}"
        argv += ["-netdev", netdev,
                 "-device", f"virtio-net-pci,netdev=net{i}" + (f",mac={nic.mac}" if nic.mac else "")]
    if incoming:
        argv += ["-incoming", incoming]
    if daemonize:
        argv += ["-daemonize", "-pidfile", paths.pidfile]
    return argv


# ------------------------------------------------------------------ running it

class GuestBootError(PermanentError):
    """The guest reported a failure on its serial console, or QEMU exited."""


async def launch(transport: Transport, argv: Sequence[str], paths: LivePaths, *, timeout: float = 30.0) -> int:
    """Starts QEMU as a daemon on the host (it outlives Ferry) and returns its pid."""
    await transport.mkdir(paths.runtime_dir)
    for stale in (paths.serial, paths.pidfile):
        await transport.remove(stale)
    with detached():      # the VM outlives the task that starts it
        result = await transport.run(list(argv), timeout=timeout)
    if not result.ok:
        lines = [l for l in result.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
        raise PermanentError(f"QEMU did not start {paths.name} on {transport.host}: "
                             f"{lines[-1].strip() if lines else f'exit status {result.exit_status}'}",
                             "QEMU's message says why; the command line was: " + shlex.join(argv)[:300])
    pid = await read_pid(transport, paths.pidfile)
    if pid is None:
        raise PermanentError(f"QEMU started {paths.name} but wrote no pid file {paths.pidfile}",
                             "check that the runtime folder is writable")
    return pid


async def read_pid(transport: Transport, pidfile: str) -> int | None:
    try:
        text = (await transport.read_file(pidfile)).decode().strip()
    except FerryError:
        return None
    return int(text) if text.isdigit() else None


async def is_running(transport: Transport, pid: int, pidfile: str) -> bool:
    """True while pid is the QEMU that wrote pidfile (a reused pid or a zombie does not count)."""
    try:
        cmdline = await transport.read_file(f"/proc/{pid}/cmdline")
    except FerryError:
        return False
    return pidfile.encode() in cmdline.split(b"\0")


async def stop(transport: Transport, pidfile: str, *, timeout: float = 10.0) -> bool:
    """Kills the QEMU of a pid file (TERM, then KILL); True if one was running."""
    pid = await read_pid(transport, pidfile)
    if pid is None or not await is_running(transport, pid, pidfile):
        return False
    await transport.run(["kill", "-TERM", str(pid)], timeout=10)
    deadline = time.monotonic() + timeout
    while await is_running(transport, pid, pidfile):
        if time.monotonic() > deadline:
            await transport.run(["kill", "-KILL", str(pid)], timeout=10)
            deadline = time.monotonic() + timeout
        await asyncio.sleep(0.05)
    return True


async def wait_for_marker(transport: Transport, paths: LivePaths, marker: str, *, timeout: float = 60.0,
                          interval: float = 0.1, fail_on_error: bool = True) -> str:
    """Waits for a serial-console line starting with marker (e.g. "FERRY-READY"); returns that line.

    Fails fast on a FERRY-ERROR line (unless fail_on_error is False) or when QEMU has exited.
    """
    deadline = time.monotonic() + timeout
    pid = None
    text = ""
    while True:
        try:
            text = (await transport.read_file(paths.serial)).decode("utf-8", "replace")
        except FerryError:
            text = ""
        for line in text.splitlines():
            # A marker begins its line, unless the console's login prompt (no newline) came first.
            line = line.strip("\r\x00 ")
            at = line.find(marker)
            if at >= 0:
                return line[at:]
            at = line.find("FERRY-ERROR")
            if fail_on_error and at >= 0:
                raise GuestBootError(f"{paths.name}: the live image reported {line[at:]}",
                                     "see the serial log " + paths.serial)
        pid = pid or await read_pid(transport, paths.pidfile)
        if pid is not None and not await is_running(transport, pid, paths.pidfile):
            raise GuestBootError(f"{paths.name}: QEMU exited before the guest printed {marker}",
                                 f"see the serial log {paths.serial}")
        if time.monotonic() > deadline:
            tail = " | ".join(l.strip() for l in text.splitlines()[-3:]) or "nothing on the serial console"
            raise TransientError(f"{paths.name}: no {marker} from the guest within {timeout:g} s (last: {tail})",
                                 "the host may be slow or the guest hung; see " + paths.serial)
        await asyncio.sleep(interval)
