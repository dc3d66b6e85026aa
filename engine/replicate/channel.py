"""Starting the replication agent on a host and talking frames to it."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from ..errors import FerryError, PermanentError, TransportError
from ..ship import MISSING, missing_python
from ..transport.base import Process
from . import agent as wire
from .hosts import AGENT, AgentHost

HDR = wire.HDR
# An agent says what it is doing at least every wire.BEAT_S while it works; this long without a
# word from it means it (or the link) is stuck.
STALL_S = 120.0


def bootstrap(role: str, cmd: dict[str, Any]) -> bytes:
    """What an agent reads first: its source, then the command frame."""
    frame = json.dumps({"role": role, **cmd}).encode()
    return AGENT.preamble() + HDR.pack(wire.F_JSON, len(frame)) + frame


class AgentError(PermanentError):
    """The agent on a host reported a failure it cannot recover from."""

    def __init__(self, message: str, hint: str = "", *, errno: int | None = None) -> None:
        super().__init__(message, hint)
        self.errno = errno


class ProtocolViolation(AgentError):
    """Something from an agent that does not have the shape the protocol gives it."""


class StalledError(TransportError):
    """Nothing came from an agent for longer than the stall timeout: it or the link is stuck."""


PROTOCOL_HINT = "the agent, the link or the other host sent something malformed; Ferry stopped before using it"


def protocol_error(host: str, role: str, what: str, e: BaseException | str) -> ProtocolViolation:
    return ProtocolViolation(f"{host}: protocol error from the replication agent ({role}): {what}: {e}",
                             PROTOCOL_HINT)


async def watching(aw: Any, reader: asyncio.Task) -> Any:
    """Await aw (a drain, say), unless the reader of the other end fails first: then its error.
    A stuck source blocks a drain for ever; its target's stall timeout must still end the wait."""
    fut = asyncio.ensure_future(aw)
    if reader.done():
        done = {reader}
    else:
        done, _ = await asyncio.wait({fut, reader}, return_when=asyncio.FIRST_COMPLETED)
    if fut in done:
        return fut.result()
    fut.cancel()
    await asyncio.gather(fut, return_exceptions=True)
    reader.result()   # its error
    raise TransportError("the reading end of a stream stopped early", "Ferry retries")


class AgentChannel:
    """One agent process on one host, speaking frames over its stdin/stdout."""

    def __init__(self, where: AgentHost | None, proc: Process, role: str, host: str) -> None:
        self.where = where
        self.proc = proc
        self.role = role
        self.host = host
        self.hello: dict[str, Any] = {}
        self.bytes_out = 0
        self.bytes_in = 0
        self.stall_s = STALL_S
        self.busy: tuple[str, int] | None = None   # what the agent last said it was busy with

    @classmethod
    async def start(cls, where: AgentHost, role: str, **cmd: Any) -> "AgentChannel":
        proc = await where.start()
        ch = cls(where, proc, role, where.host)
        try:
            proc.stdin.write(bootstrap(role, cmd))
            await ch.drain()
            typ, payload = await ch.recv()
            if typ != wire.F_JSON or "hello" not in (msg := json.loads(payload)):
                raise AgentError(f"{ch.host}: the replication agent did not start ({payload[:200]!r})",
                                 "check that python3 runs on the host")
        except BaseException:
            await ch.kill()   # nobody else holds it: stop and reap it here (a refused host key, say)
            raise
        ch.hello = msg
        return ch

    # -------------------------------------------------------------- frames

    def send(self, typ: bytes, payload: bytes = b"") -> None:
        try:
            self.proc.stdin.write(HDR.pack(typ, len(payload)))
            if payload:
                self.proc.stdin.write(payload)
        except TransportError:
            raise self.lost() from None
        self.bytes_out += HDR.size + len(payload)

    def lost(self) -> TransportError:
        """The error for a channel that broke under a read or a write."""
        return TransportError(f"{self.host}: the channel to the replication agent ({self.role}) was lost",
                              "the link dropped or the agent ended; Ferry retries")

    def send_json(self, obj: Any) -> None:
        self.send(wire.F_JSON, json.dumps(obj).encode())

    async def drain(self) -> None:
        try:
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise await self._ended(e) from None
        except TransportError:
            raise self.lost() from None

    async def recv(self) -> tuple[bytes, bytes]:
        """The next frame; a JSON frame carrying "fatal" is raised as AgentError. Beats (the agent
        saying it is busy) are taken here; nothing at all for stall_s is a StalledError."""
        while True:
            typ, payload = await self._read_frame()
            if typ == wire.F_BEAT:
                self.busy = tuple(self.parse("beat", wire.unpack_values, payload)[:2])
                continue
            self.busy = None
            if typ == wire.F_JSON:
                msg = self.parse("control frame", json.loads, payload)
                if isinstance(msg, dict) and "fatal" in msg:
                    raise self._fatal(msg)
            return typ, payload

    async def _read_frame(self) -> tuple[bytes, bytes]:
        try:
            async with asyncio.timeout(self.stall_s):
                head = await self.proc.stdout.readexactly(HDR.size)
                typ, ln = HDR.unpack(head)
                if ln > wire.MAX_FRAME:
                    raise protocol_error(self.host, self.role, f"a frame of {ln} bytes",
                                         f"the limit is {wire.MAX_FRAME}")
                payload = await self.proc.stdout.readexactly(ln) if ln else b""
        except TimeoutError:
            busy = f" (it last said: {self.busy[0]} for {self.busy[1]} s)" if self.busy else ""
            raise StalledError(f"{self.host}: the replication agent ({self.role}) sent nothing for "
                               f"{self.stall_s:g} s{busy}",
                               "the host, its disk or the link is stuck; Ferry retries (--stall-timeout "
                               "sets how long to wait)") from None
        except EOFError as e:
            raise await self._ended(e) from None
        except TransportError:
            raise self.lost() from None
        self.bytes_in += HDR.size + ln
        return typ, payload

    def parse(self, what: str, fn: Any, payload: Any) -> Any:
        """fn(payload), or a protocol error naming this agent and what was being read."""
        try:
            return fn(payload)
        except (ValueError, TypeError, KeyError, IndexError, struct.error, UnicodeDecodeError) as e:
            raise protocol_error(self.host, self.role, what, e) from None

    async def recv_json(self) -> dict:
        typ, payload = await self.recv()
        if typ != wire.F_JSON:
            raise protocol_error(self.host, self.role, "a reply", f"frame {typ!r} where a reply was expected")
        msg = self.parse("a reply", json.loads, payload)
        if not isinstance(msg, dict):
            raise protocol_error(self.host, self.role, "a reply", "not a JSON object")
        return msg

    def _fatal(self, msg: dict) -> AgentError:
        import errno as E
        code = msg.get("errno")
        if msg.get("protocol"):
            return protocol_error(self.host, self.role, "it refused what it was sent", msg["fatal"])
        text = f"{self.host}: {msg['fatal']}"
        hint = {E.ENOSPC: "free space on the target, then run the same command again to resume",
                E.EDQUOT: "raise the quota on the target, then run the same command again to resume",
                E.EROFS: "the target filesystem is read-only; remount it read-write",
                E.ENOENT: "check the path", E.ENOTDIR: "the path must be a directory",
                E.EACCES: "check permissions (Ferry runs as the ssh user on the host)",
                E.EBUSY: "unmount it, or stop what writes to it (a running VM: shut it down), then run the "
                         "same command again"}.get(code, "")
        return AgentError(text, hint, errno=code)

    async def _ended(self, e: BaseException) -> FerryError:
        """The channel closed early: report why (python3 missing, agent crash, or a dropped link)."""
        if isinstance(e, FerryError):
            return e
        try:
            status = await asyncio.wait_for(self.proc.wait(), 5)
        except (asyncio.TimeoutError, FerryError):
            status = None
        err = b""
        try:
            err = await asyncio.wait_for(self.proc.stderr.read(4096), 2)
        except Exception:
            pass
        if self.where is not None:
            diagnosed = await self.where.diagnose(status, err.decode("utf-8", "replace"))
            if diagnosed is not None:
                return diagnosed
        text = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if status == MISSING:
            return missing_python(self.host)
        if status not in (None, 0) and text[0]:
            return AgentError(f"{self.host}: replication agent failed: {text[0]}")
        return TransportError(f"{self.host}: the channel to the replication agent closed unexpectedly",
                              "the link dropped or the host killed the process; Ferry retries")

    async def finish(self, timeout: float = 30) -> None:
        try:
            await self.proc.stdin.close()
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
            # Read the streams to their end so their pipes close with the process.
            for stream in (self.proc.stdout, self.proc.stderr):
                while await asyncio.wait_for(stream.read(65536), 5):
                    pass
        except (asyncio.TimeoutError, FerryError):
            await self.kill()
        except asyncio.CancelledError:
            # Cancelled while waiting (a round that refuses to go on, say): the agent is still
            # ours to stop and reap, or it outlives the event loop unreaped.
            await self.kill()
            raise

    async def kill(self) -> None:
        """Stop the agent now, and reap it (so no process or pipe outlives the round)."""
        try:
            await self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 5)
        except Exception:
            pass
