"""A running VM's serial console (ttyS0): what the guest prints, and what an operator types into it.

QEMU serves the port on a UNIX socket in the host's runtime folder, next to the VM's QMP socket
(`LivePaths.serial_socket`), and logs everything the guest prints to the serial file. The socket is
reached as QMP is: directly on a local host, through SSH stream-local forwarding on another
(Transport.open_unix). QEMU takes one client on it at a time, so this engine lets one console open
a VM's serial at a time and refuses a second. A console that opens it first gets the last lines of
the serial log, so it sees the prompt the guest printed before anyone was attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from ..errors import FerryError, PermanentError, Refused
from ..transport.base import ByteReader, ByteWriter
from .model import VMSpec

RELEASE_WAIT_S = 2
HISTORY_BYTES = 4096       # of the serial log, sent first: the prompt the guest printed before we came
_ATTACHED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()   # VMService -> VM ids


class SerialConsole:
    """One open serial console: `read()` (b"" once it ended, `reason` says why), `write(data)`, `close()`."""

    def __init__(self, name: str, reader: ByteReader, writer: ByteWriter, history: bytes = b"",
                 on_close: Any = None) -> None:
        self.name = name
        self.reason = ""
        self._reader, self._writer = reader, writer
        self._history = history
        self._ended = False
        self._closed = False
        self._on_close = on_close

    async def read(self) -> bytes:
        """What the guest printed next; b"" once the console ended (the VM stopped, or it was closed)."""
        if self._history:
            data, self._history = self._history, b""
            return data
        if self._ended:
            return b""
        try:
            data = await self._reader.read(65536)
        except (FerryError, OSError, EOFError) as e:
            data = b""
            self.reason = self.reason or f"the connection to {self.name}'s serial port broke: {e}"
        if not data:
            self._ended = True
            self.reason = self.reason or f"{self.name} stopped"
            self._released()
        return data

    async def write(self, data: bytes) -> None:
        """Types `data` into the guest's serial port; waits while the port has no room for it."""
        if self._ended:
            raise PermanentError(f"the serial console of {self.name} is closed ({self.reason})",
                                 "open it again once the VM runs")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (FerryError, OSError) as e:
            raise PermanentError(f"cannot type into the serial console of {self.name}: {e}",
                                 "the VM may have stopped") from None

    async def close(self) -> None:
        """Detach: the guest goes on; its output goes to the serial log only."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self._ended = True
            self.reason = self.reason or "closed"
        self._released()      # QEMU takes the next client as soon as it sees this one's end
        with contextlib.suppress(FerryError, OSError):
            await self._writer.close()
        # QEMU closes its side once it sees ours closed; reading that end releases the socket.
        with contextlib.suppress(FerryError, OSError, EOFError, asyncio.TimeoutError):
            async with asyncio.timeout(2):
                while await self._reader.read(65536):
                    pass

    def _released(self) -> None:
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb()


async def open_serial(svc: Any, name: str) -> SerialConsole:
    """The serial console of the running VM `name`; Refused (one line and a hint) when it cannot be had."""
    row = await svc.find(name)
    vm = VMSpec.from_dict(row["spec"])
    if vm.is_template:
        raise Refused(f"{vm.name} is a template: it never runs, so it has no serial console",
                      f"deploy a VM from it: ferry vm deploy {vm.name}")
    h = svc.host(vm.host)
    if await h.pid(vm) is None:
        raise Refused(f"VM {vm.name} is not running, so its serial console is silent",
                      f"start it first: ferry vm start {vm.name}")
    attached = _ATTACHED.setdefault(svc, set())
    for _ in range(RELEASE_WAIT_S * 20):    # one just closed by a front end may still be on its way out
        if vm.id not in attached:
            break
        await asyncio.sleep(0.05)
    if vm.id in attached:
        raise Refused(f"the serial console of {vm.name} is already open in another console",
                      "QEMU takes one at a time: leave it there (ctrl+]) first")
    paths = h.paths(vm)
    if await h.t.stat(paths.serial_socket) is None:
        raise Refused(f"VM {vm.name} has no serial console socket: it was started before Ferry gave VMs one",
                      f"restart it to get one: ferry vm shutdown {vm.name}, then ferry vm start {vm.name}")
    history = await _tail(h, paths.serial)
    try:
        reader, writer = await asyncio.wait_for(h.t.open_unix(paths.serial_socket), 15)
    except asyncio.TimeoutError:
        raise PermanentError(f"the serial console of {vm.name} on {h.name} did not answer within 15 s",
                             "the host may be overloaded or unreachable") from None
    except FerryError as e:
        raise PermanentError(f"cannot attach to the serial console of {vm.name}: {e.message}", e.hint) from None
    attached.add(vm.id)
    return SerialConsole(vm.name, reader, writer, history, on_close=lambda: attached.discard(vm.id))


async def _tail(h: Any, path: str) -> bytes:
    """The last lines of the serial log (from a line start), or b"" when it cannot be read."""
    try:
        r = await h.t.run(["tail", "-c", str(HISTORY_BYTES), "--", path], timeout=15)
    except (FerryError, OSError):
        return b""
    data = r.stdout if r.ok else b""
    if len(data) >= HISTORY_BYTES and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data
