"""A small asyncio QMP client that runs over any (ByteReader, ByteWriter) pair.

Why not the qemu.qmp library: it wants to own the socket (it connects to a path or address itself),
while Ferry reaches a VM's QMP socket through Transport.open_unix, which for a remote host is an
SSH stream-local forward (a channel, not a socket). QMP is JSON lines with ids and events; the
little we need fits here. The guest agent client, which shares the JSON-lines framing, is in qga.py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..errors import FerryError, PermanentError, TransientError
from ..transport.base import ByteReader, ByteWriter, Transport

_MAX_LINE = 64 << 20    # query-* answers are large at most in the megabytes; anything bigger is broken


class QMPError(PermanentError):
    """QEMU answered a command with an error; carries QMP's error class and description."""

    def __init__(self, command: str, error_class: str, desc: str, *, vm: str = "") -> None:
        where = f" on {vm}" if vm else ""
        super().__init__(f"QMP {command}{where} failed: {error_class}: {desc}",
                         _HINTS.get(error_class, "see QEMU's message; the command or its arguments were refused"))
        self.command = command
        self.error_class = error_class
        self.desc = desc


_HINTS = {
    "CommandNotFound": "this QEMU does not have that command (too old, or capabilities not negotiated)",
    "DeviceNotFound": "check the device or node name (query-block / qom-list show what exists)",
    "DeviceNotActive": "the device is not active; check the VM's state",
    "KVMMissingCap": "the host's KVM lacks a needed capability; use TCG or another host",
}


class QMPTimeout(TransientError):
    """QEMU did not answer in time (busy, paused in a long operation, or hung)."""


class QMPDisconnected(TransientError):
    """The QMP connection closed (QEMU exited or the channel to the host broke)."""


class QMPProtocolError(PermanentError):
    """The peer does not speak QMP (no greeting, or malformed messages)."""


@dataclass(frozen=True)
class QMPEvent:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0     # QEMU's clock, seconds since the epoch


class LineReader:
    """Splits a byte stream into lines; shared by QMP and the guest agent."""

    def __init__(self, reader: ByteReader, limit: int = _MAX_LINE) -> None:
        self._r = reader
        self._buf = bytearray()
        self._limit = limit

    async def _fill(self) -> bool:
        chunk = await self._r.read(65536)
        if not chunk:
            return False
        self._buf += chunk
        if len(self._buf) > self._limit:
            raise QMPProtocolError(f"a message longer than {self._limit} bytes arrived",
                                   "the peer is not QMP or the stream is corrupted")
        return True

    async def readline(self) -> bytes | None:
        """The next line including its newline; None at end of stream."""
        while (i := self._buf.find(b"\n")) < 0:
            if not await self._fill():
                return None
        line = bytes(self._buf[:i + 1])
        del self._buf[:i + 1]
        return line

    def discard_buffered(self) -> None:
        self._buf.clear()


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any] | None:
    """One JSON object, or None for a blank or unparsable line."""
    try:
        msg = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class EventSubscription:
    """Events with chosen names (all when none were given), queued from the moment of subscribing."""

    def __init__(self, client: "QMPClient", names: frozenset[str]) -> None:
        self._client = client
        self.names = names
        self._queue: asyncio.Queue[QMPEvent | None] = asyncio.Queue()

    def _offer(self, event: QMPEvent | None) -> None:
        if event is None or not self.names or event.name in self.names:
            self._queue.put_nowait(event)

    async def get(self, timeout: float | None = None) -> QMPEvent:
        """The next event; QMPTimeout when none comes in time, QMPDisconnected when QMP closed."""
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(f"no {'/'.join(sorted(self.names)) or 'QMP'} event from {self._client.name} "
                             f"within {timeout:g} s", "the VM did not do what was expected in time") from None
        if event is None:
            self._queue.put_nowait(None)    # stay closed for later callers
            raise self._client._closed_error()
        return event

    async def wait_for(self, name: str, timeout: float | None = None) -> QMPEvent:
        """Skips other events until one called name arrives."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            event = await self.get(left)
            if event.name == name:
                return event

    def close(self) -> None:
        self._client._subscribers.discard(self)

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[QMPEvent]:
        return self

    async def __anext__(self) -> QMPEvent:
        try:
            return await self.get()
        except QMPDisconnected:
            raise StopAsyncIteration from None


class QMPClient:
    """One QMP connection: commands with ids (several may be in flight) and an event stream."""

    def __init__(self, reader: ByteReader, writer: ByteWriter, *, name: str = "VM") -> None:
        self.name = name
        self.greeting: dict[str, Any] = {}
        self.recent_events: collections.deque[QMPEvent] = collections.deque(maxlen=256)
        self._lines = LineReader(reader)
        self._writer = writer
        self._ids = itertools.count(1)
        # Ids unique to this connection: QEMU may hand a killed client's late replies to the next one.
        self._id_prefix = f"ferry-{secrets.token_hex(4)}-"
        self._pending: dict[str, tuple[str, asyncio.Future]] = {}
        self._subscribers: set[EventSubscription] = set()
        self._write_lock = asyncio.Lock()
        self._reader_task: asyncio.Task | None = None
        self._close_reason: str | None = None

    # ------------------------------------------------------------ connecting

    @classmethod
    async def open(cls, transport: Transport, path: str, *, name: str = "VM", timeout: float = 10.0) -> "QMPClient":
        """Connects to a QMP UNIX socket on a host and negotiates capabilities."""
        try:
            reader, writer = await asyncio.wait_for(transport.open_unix(path), timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(f"cannot reach the QMP socket of {name} on {transport.host} within {timeout:g} s",
                             "the host may be unreachable") from None
        except FerryError as e:
            raise QMPDisconnected(f"cannot connect to the QMP socket of {name}: {e.message}",
                                  "is the VM running on that host?") from None
        client = cls(reader, writer, name=name)
        try:
            await client.start(timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def start(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Reads the greeting, starts the reader and enters command mode; returns the QEMU version."""
        try:
            line = await asyncio.wait_for(self._lines.readline(), timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(f"no QMP greeting from {self.name} within {timeout:g} s",
                             "another client may hold the monitor, or QEMU is hung") from None
        msg = decode(line) if line else None
        if not msg or "QMP" not in msg:
            raise QMPProtocolError(f"{self.name}: the socket did not greet like QMP",
                                   "is this a QMP socket (-mon mode=control)?")
        self.greeting = msg["QMP"]
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"qmp-{self.name}")
        await self.execute("qmp_capabilities", timeout=timeout)
        return self.version

    @property
    def version(self) -> dict[str, Any]:
        return self.greeting.get("version", {}).get("qemu", {})

    async def close(self) -> None:
        if self._close_reason is None:
            self._close_reason = "closed by Ferry"
        try:
            await self._writer.close()
        except (OSError, FerryError):
            pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all()

    async def __aenter__(self) -> "QMPClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ commands and events

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float | None = 30.0) -> Any:
        """Runs a command and returns its "return" value; raises QMPError with QMP's class and desc."""
        if self._close_reason is not None:
            raise self._closed_error()
        msg_id = f"{self._id_prefix}{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (command, future)
        try:
            async with self._write_lock:
                self._writer.write(encode(message))
                await self._writer.drain()
            reply = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(f"QMP {command} on {self.name} got no answer within {timeout:g} s",
                             "QEMU may be busy or hung; the command may still complete") from None
        except (OSError, EOFError) as e:
            self._close_reason = self._close_reason or f"write failed: {e}"
            raise self._closed_error() from None
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, err.get("class", "GenericError"), err.get("desc", "no description"), vm=self.name)
        return reply.get("return")

    def subscribe(self, *names: str) -> EventSubscription:
        """Starts queueing events (of these names, or all); subscribe before the command that causes them."""
        sub = EventSubscription(self, frozenset(names))
        if self._close_reason is not None:
            sub._offer(None)
        self._subscribers.add(sub)
        return sub

    async def wait_event(self, name: str, *, timeout: float | None = 30.0) -> QMPEvent:
        """The next event called name from now on (use subscribe() when it may come before this call)."""
        with self.subscribe(name) as sub:
            return await sub.get(timeout)

    # ------------------------------------------------------------ internals

    async def _read_loop(self) -> None:
        reason = "QEMU closed the QMP connection"
        try:
            while (line := await self._lines.readline()) is not None:
                msg = decode(line)
                if msg is None:
                    continue
                if "event" in msg:
                    ts = msg.get("timestamp", {})
                    event = QMPEvent(msg["event"], msg.get("data") or {},
                                     ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6)
                    self.recent_events.append(event)
                    for sub in list(self._subscribers):
                        sub._offer(event)
                elif "id" in msg and msg["id"] in self._pending:
                    _cmd, fut = self._pending[msg["id"]]
                    if not fut.done():
                        fut.set_result(msg)
                elif "error" in msg and "id" not in msg and self._pending:
                    # QEMU answers a message it could not parse without an id: it was our oldest.
                    _cmd, fut = next(iter(self._pending.values()))
                    if not fut.done():
                        fut.set_result(msg)
        except asyncio.CancelledError:
            raise
        except (OSError, EOFError, FerryError) as e:
            reason = f"the QMP connection broke: {e}"
        finally:
            if self._close_reason is None:
                self._close_reason = reason
            self._fail_all()

    def _closed_error(self) -> QMPDisconnected:
        return QMPDisconnected(f"QMP connection to {self.name} is closed ({self._close_reason})",
                               "check that the VM is still running, then reconnect")

    def _fail_all(self) -> None:
        for _cmd, fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(self._closed_error())
        for sub in list(self._subscribers):
            sub._offer(None)
