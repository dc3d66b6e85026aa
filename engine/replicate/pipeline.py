"""A bulk stream: a source agent whose output is the target agent's input.

Where the engine can start both agents as its own children (a local agent, or the OpenSSH
client carrying the agent to an ssh host), they are joined by an OS pipe and the data never
passes through Python ("direct"). Otherwise (a host reached only through asyncssh) the engine
pumps the bytes from one to the other ("relay"), without parsing them. Either way the engine
writes requests to the source and reads the target's acknowledgements, progress and errors.
"""

from __future__ import annotations

import asyncio
import json
import os

from ..errors import FerryError, TransportError
from ..transport.base import Process
from . import agent as W
from .channel import AgentChannel, AgentError, bootstrap
from .hosts import AgentHost, spawn
from .ratelimit import RateLimiter

PUMP_CHUNK = 1 << 20
PIPE_SIZE = 1 << 20


def _widen(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, 1031, PIPE_SIZE)   # F_SETPIPE_SZ
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Stream:
    """Source agent -> target agent. `requests` writes to the source; `target` reads the target."""

    def __init__(self, src: AgentHost, dst: AgentHost, mode: str) -> None:
        self.src_where, self.dst_where = src, dst
        self.src_host, self.dst_host, self.mode = src.host, dst.host, mode
        self.src: Process | None = None
        self.dst: Process | None = None
        self.target: AgentChannel | None = None   # framed reader of the target's output
        self._pump: asyncio.Task | None = None

    @classmethod
    async def open(cls, src: AgentHost, src_cmd: dict, dst: AgentHost, dst_cmd: dict, *,
                   role_src: str, role_dst: str, bwlimit: float | None = None) -> "Stream":
        direct = src.child_argv is not None and dst.child_argv is not None
        st = cls(src, dst, "direct" if direct else "relay")
        try:
            if direct:
                await st._open_direct(src_cmd, dst_cmd, role_src, role_dst, bwlimit)
            else:
                await st._open_relay(src_cmd, dst_cmd, role_src, role_dst, bwlimit)
        except BaseException:
            await st.kill()
            raise
        return st

    async def _open_direct(self, src_cmd, dst_cmd, role_src, role_dst, bwlimit) -> None:
        r, w = os.pipe()
        try:
            _widen(w)
            # The target reads its bootstrap from the pipe first, then whatever the source writes.
            await asyncio.to_thread(_write_all, w, bootstrap(role_dst, dst_cmd))
            self.dst = await spawn(self.dst_where.child_argv, stdin=r)
            self.src = await spawn(self.src_where.child_argv, stdout=w)
        finally:
            os.close(r)
            os.close(w)
        self.src.stdin.write(bootstrap(role_src, {**src_cmd, "bwlimit": bwlimit}))
        await self.src.stdin.drain()
        self.target = AgentChannel(self.dst_where, self.dst, role_dst, self.dst_host)
        await self._hello()

    async def _open_relay(self, src_cmd, dst_cmd, role_src, role_dst, bwlimit) -> None:
        self.src, self.dst = await asyncio.gather(self.src_where.start(), self.dst_where.start())
        self.dst.stdin.write(bootstrap(role_dst, dst_cmd))
        self.src.stdin.write(bootstrap(role_src, src_cmd))
        await asyncio.gather(self.dst.stdin.drain(), self.src.stdin.drain())
        self.target = AgentChannel(self.dst_where, self.dst, role_dst, self.dst_host)
        self._pump = asyncio.create_task(self._relay(RateLimiter(bwlimit)), name="ferry-pump")
        await self._hello()

    async def _hello(self) -> None:
        """Both agents greet through the target's output: the source's hello passes through it."""
        for _ in range(2):
            typ, payload = await self.recv()
            msg = json.loads(payload) if typ == W.F_JSON else {}
            if "hello" not in msg:
                raise AgentError(f"{self.dst_host}: the replication agent did not start ({payload[:200]!r})",
                                 "check that python3 runs on both hosts")

    async def _relay(self, limiter: RateLimiter) -> None:
        """Copy the source's output to the target's input, byte for byte, with backpressure."""
        out, into = self.src.stdout, self.dst.stdin
        try:
            while chunk := await out.read(PUMP_CHUNK):
                into.write(chunk)
                await into.drain()
                await limiter.take(len(chunk))
        finally:
            await into.close()

    # -------------------------------------------------------------- talking to it

    def request(self, typ: bytes, payload: bytes = b"") -> None:
        self.src.stdin.write(W.HDR.pack(typ, len(payload)) + payload)

    async def drain(self) -> None:
        try:
            await self.src.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, FerryError):
            raise await self._why() from None

    async def recv(self) -> tuple[bytes, bytes]:
        try:
            return await self.target.recv()
        except TransportError:
            raise await self._why() from None

    async def _why(self) -> FerryError:
        """The reason a stream broke: the pump's error, the source's last words, or a lost link."""
        if self._pump and self._pump.done() and not self._pump.cancelled() and self._pump.exception():
            e = self._pump.exception()
            if isinstance(e, FerryError):
                return e
        err = b""
        try:
            err = await asyncio.wait_for(self.src.stderr.read(4096), 1)
        except Exception:
            pass
        text = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if text[0]:
            return AgentError(f"{self.src_host}: replication agent failed: {text[0]}")
        return TransportError(f"the stream {self.src_host} → {self.dst_host} broke",
                              "the link dropped or an agent ended; Ferry retries")

    async def finish(self) -> None:
        """After the target said EOF: let everything exit."""
        for p in (self.src, self.dst):
            if p is None:
                continue
            try:
                if p.stdin:
                    await p.stdin.close()
                await asyncio.wait_for(p.wait(), 30)
            except asyncio.CancelledError:
                await self.kill()   # every process of the stream, reaped, before the cancel goes on
                raise
            except Exception:
                await p.kill()
        if self._pump:
            await asyncio.gather(self._pump, return_exceptions=True)

    async def kill(self) -> None:
        if self._pump:
            self._pump.cancel()
        for p in (self.src, self.dst):
            if p is not None:
                try:
                    await p.kill()
                    await asyncio.wait_for(p.wait(), 5)
                except Exception:
                    pass
        if self._pump:
            await asyncio.gather(self._pump, return_exceptions=True)
