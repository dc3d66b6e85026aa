"""Block-level replication rounds (dd-like) of a block device or image file, through the engine.

Fixed-size chunks. A new target is created sparse and all-zero chunks are never sent; an
existing target (incremental round, or a resumed one) is compared chunk by chunk with hashes
computed on both sides in parallel, and only chunks that differ are sent. The target
acknowledges chunks after fsync; only then do they enter the checkpoint's chunk map.
Verification: the list of per-chunk hashes of both sides must be equal, and the digest of
that list is the round's content hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import FerryError, PermanentError
from .hosts import AgentHost
from . import agent as W
from .channel import STALL_S, AgentChannel, protocol_error, watching
from .overlap import refuse_block_overlap, resolved
from .pipeline import Stream

DEFAULT_CHUNK = 4 << 20
SEND_BATCH = 32


@dataclass(frozen=True)
class BlockOptions:
    chunk_size: int = DEFAULT_CHUNK
    streams: int = 4
    bwlimit: float | None = None
    compress: bool = False
    stall_s: float = STALL_S


@dataclass
class BlockStats:
    round: int = 0
    bytes_total: int = 0       # source size
    bytes_sent: int = 0        # chunk data that crossed to the target (compressed size when --compress)
    bytes_changed: int = 0     # uncompressed size of the chunks sent
    wire_bytes: int = 0        # everything through the agents' channels, hashes and framing included
    items_total: int = 0       # chunks
    items_changed: int = 0     # chunks sent (zero chunks to an existing target included)
    zero_chunks: int = 0
    hashed_chunks: int = 0     # chunks compared by hash on both sides
    resumed_chunks: int = 0    # chunks the checkpoint already held
    duration_s: float = 0.0
    # What was checked, and no more (see `verification`).
    verified_on_arrival: bool = False   # every chunk sent matched the source's SHA-256 when it arrived
    content_compared: bool = False      # and every chunk not sent was hashed on both sides and equal
    verification: str = ""
    content_sha256: str = ""
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _info(ch: AgentChannel, **req: Any) -> dict:
    ch.send_json({"op": "info", **req})
    await ch.drain()
    return await ch.recv_json()


class BlockRound:
    def __init__(self, src_t: AgentHost, src_path: str, dst_t: AgentHost, dst_path: str, opts: BlockOptions, *,
                 round_no: int, chunkmap: dict[int, bytes], progress: Callable[..., None],
                 save_checkpoint: Callable[[dict, list[tuple[int, bytes]]], Awaitable[None]],
                 log: Callable[[str, str], None], restart: bool = False) -> None:
        self.src_t, self.src_path, self.dst_t, self.dst_path = src_t, src_path, dst_t, dst_path
        # The paths as resolved on their hosts (/dev/VG/LV is a symlink): every agent after the
        # first two is given these.
        self.src_real, self.dst_real = src_path, dst_path
        self.opts = opts
        self.stats = BlockStats(round=round_no)
        self.chunkmap = dict(chunkmap)   # idx -> hash, durable on the target, from the checkpoint
        self.progress = progress
        self.save_checkpoint = save_checkpoint
        self.log = log
        self.restart = restart
        self.src_hash: dict[int, bytes] = {}
        self.dst_hash: dict[int, bytes] = {}
        self.pending: list[tuple[int, bytes]] = []   # acknowledged, not yet in a checkpoint
        self._last_ckpt = 0.0
        self._last_progress = 0.0
        self.channels: list[AgentChannel] = []
        # per stream: (bytes written, bytes on the wire, bytes of the image dealt with, zeros included)
        self.stream_bytes: dict[str, tuple[int, int, int]] = {}
        self.done_base = 0   # bytes of the image already dealt with before the current phase

    def where(self, side: str) -> str:
        return f"{self.src_t.host}:{self.src_path}" if side == "src" else f"{self.dst_t.host}:{self.dst_path}"

    async def _agent(self, side: str, **cmd: Any) -> AgentChannel:
        t, path = (self.src_t, self.src_real) if side == "src" else (self.dst_t, self.dst_real)
        ch = await AgentChannel.start(t, "blk", path=path, chunk=self.opts.chunk_size, target=side == "dst",
                                      compress=self.opts.compress, **cmd)
        ch.stall_s = self.opts.stall_s
        self.channels.append(ch)
        return ch

    def _resolved(self, src_info: dict, dst_info: dict) -> None:
        """Refuse a target that overlaps the source; from here on, agents open the resolved paths."""
        src, dst = self.where("src"), self.where("dst")
        refuse_block_overlap(src, src_info.get("where"), dst, dst_info.get("where"))
        self.src_real = resolved(src, src_info.get("where"), self.log) or self.src_real
        self.dst_real = resolved(dst, dst_info.get("where"), self.log) or self.dst_real

    async def run(self) -> BlockStats:
        try:
            return await self._run()
        finally:
            for ch in self.channels:
                self.stats.wire_bytes += ch.bytes_in + ch.bytes_out
                await ch.kill()

    async def _run(self) -> BlockStats:
        t0 = time.monotonic()
        st = self.stats
        chunk = self.opts.chunk_size
        src_ctl, dst_ctl = await asyncio.gather(self._agent("src"), self._agent("dst"))
        # The round's first look at its target also refuses one in use (mounted, or written by a
        # running VM); the agents it starts after this one hold the target open themselves.
        src_info, dst_info = await asyncio.gather(_info(src_ctl), _info(dst_ctl, check_in_use=True))
        if not src_info["exists"]:
            raise PermanentError(f"{self.where('src')}: no such file or device", "check the source path")
        self._resolved(src_info, dst_info)
        size = src_info["size"]
        st.bytes_total = size
        n_chunks = (size + chunk - 1) // chunk
        st.items_total = n_chunks
        fresh = False
        if dst_info["exists"] and not dst_info["device"] and self.restart:
            dst_info = await _info(dst_ctl, create_size=size)
            fresh = True
            self.chunkmap.clear()
        elif dst_info["exists"]:
            if dst_info["size"] < size:
                raise PermanentError(
                    f"{self.where('dst')} is {dst_info['size']} bytes, smaller than the source ({size} bytes)",
                    "use a target at least as large as the source; nothing was written")
        else:
            dst_info = await _info(dst_ctl, create_size=size)
            fresh = True
            self.chunkmap.clear()
        st.resumed_chunks = len(self.chunkmap)
        for idx, h in self.chunkmap.items():
            self.src_hash[idx] = self.dst_hash[idx] = h

        # The bar follows the image, through both phases and across resumes: its total is the
        # image, and what the checkpoint holds, what compares equal and what is copied are done.
        todo = [i for i in range(n_chunks) if i not in self.chunkmap]
        self.done_base = size - _span(todo, chunk, size)
        if not fresh and todo:
            self.progress(units_done=0, units_total=len(todo), bytes_done=self.done_base, bytes_total=size or None,
                          item="comparing chunks on both sides", detail={"phase": "compare", "round": st.round})
            compared = todo
            todo = await self._compare(todo, size)
            self.done_base += _span(compared, chunk, size) - _span(todo, chunk, size)
        await self._checkpoint(force=True)

        self.progress(units_done=0, units_total=max(1, len(todo)), bytes_done=self.done_base,
                      bytes_total=size or None, item="copying chunks", detail={"phase": "copy", "round": st.round})
        if todo:
            n = max(1, min(self.opts.streams, len(todo)))
            per = (len(todo) + n - 1) // n
            parts = [todo[i * per:(i + 1) * per] for i in range(n)]  # contiguous: sequential I/O
            await asyncio.gather(*(self._stream(i, p, size, fresh) for i, p in enumerate(parts) if p))
        await self._checkpoint(force=True)

        missing = [i for i in range(n_chunks) if i not in self.src_hash or i not in self.dst_hash]
        differ = [i for i in range(n_chunks) if i not in missing and self.src_hash[i] != self.dst_hash[i]]
        for i in (missing + differ)[:10]:
            st.errors.append(f"{self.where('dst')}: chunk {i} (offset {i * chunk}) does not match the source")
        src_digest = hashlib.sha256(b"".join(self.src_hash.get(i, b"") for i in range(n_chunks))).hexdigest()
        dst_digest = hashlib.sha256(b"".join(self.dst_hash.get(i, b"") for i in range(n_chunks))).hexdigest()
        st.verified_on_arrival = not missing and not differ and src_digest == dst_digest
        st.content_compared = st.verified_on_arrival and not fresh and not st.resumed_chunks
        sent = "every chunk sent checked on arrival against the source's SHA-256"
        if fresh:
            st.verification = f"{sent}; zero chunks left as holes of the new target"
        else:
            st.verification = f"{sent}; every other chunk compared by SHA-256 on both sides"
        if st.resumed_chunks:
            st.verification += f"; {st.resumed_chunks} chunks checked on arrival before the interruption, not re-read"
        st.content_sha256 = src_digest
        st.duration_s = time.monotonic() - t0
        self.progress(item="done", detail={"phase": "done"})
        return st

    async def _compare(self, todo: list[int], size: int) -> list[int]:
        """Hash the given chunks on both sides in parallel; return those that differ."""
        n = max(1, min(self.opts.streams, len(todo)))
        per = (len(todo) + n - 1) // n
        work = [_ranges(todo[i * per:(i + 1) * per]) for i in range(n)]
        done = [0]

        async def side(which: str, items: list[tuple[int, int]], sink: dict[int, bytes]) -> None:
            ch = await self._agent(which)
            await _info(ch)
            for first, count in items:
                ch.send_json({"op": "hash", "first": first, "count": count, "size": size})
                await ch.drain()
                while True:
                    typ, payload = await ch.recv()
                    if typ == W.F_HASHES:
                        if len(payload) % W.CHUNK_REC.size:
                            raise protocol_error(ch.host, ch.role, "chunk hashes", f"{len(payload)} bytes")
                        for off in range(0, len(payload), W.CHUNK_REC.size):
                            idx, h, _zero = W.CHUNK_REC.unpack_from(payload, off)
                            sink[idx] = h
                            if which == "src":
                                done[0] += 1
                        if which == "src":
                            self.progress(units_done=done[0],
                                          bytes_done=min(size, self.done_base + done[0] * self.opts.chunk_size))
                    elif typ == W.F_JSON:
                        break
            await ch.finish()

        src_h: dict[int, bytes] = {}
        dst_h: dict[int, bytes] = {}
        await asyncio.gather(*(side(w, items, sink) for items in work if items
                               for w, sink in (("src", src_h), ("dst", dst_h))))
        self.stats.hashed_chunks = len(todo)
        differ = []
        for i in todo:
            if src_h.get(i) is not None and src_h.get(i) == dst_h.get(i):
                self.src_hash[i] = self.dst_hash[i] = src_h[i]
            else:
                differ.append(i)
        return differ

    async def _stream(self, idx: int, chunks: list[int], size: int, fresh: bool) -> None:
        """One bulk stream: the source agent reads chunks, the target agent writes them (see pipeline)."""
        chunk = self.opts.chunk_size
        share = self.opts.bwlimit / max(1, self.opts.streams) if self.opts.bwlimit else None
        common = {"chunk": chunk, "compress": self.opts.compress}
        stream = await Stream.open(self.src_t, {**common, "path": self.src_real},
                                   self.dst_t, {**common, "path": self.dst_real, "target": True, "fresh": fresh,
                                                "open": True},
                                   role_src="blk", role_dst="blk", bwlimit=share)
        stream.target.stall_s = self.opts.stall_s
        st = self.stats
        name = f"stream{idx}"
        self.stream_bytes[name] = (0, 0, 0)

        async def target() -> None:
            while True:
                typ, payload = await stream.recv()
                if typ == W.F_ACK:
                    written, _t_ns = stream.target.parse("acknowledgement", block_ack, payload)
                    for i, h in written:
                        # The target checked each chunk against the source's digest before acknowledging.
                        self.src_hash[i] = self.dst_hash[i] = h
                        self.pending.append((i, h))
                        n = min(chunk, size - i * chunk)
                        if h == W.zero_hash(n):
                            st.zero_chunks += 1
                            if not fresh:
                                st.items_changed += 1
                        else:
                            st.items_changed += 1
                            st.bytes_changed += n
                    await self._checkpoint()
                elif typ == W.F_PROGRESS:
                    self.stream_bytes[name] = tuple(stream.target.parse(
                        "progress", lambda p: W.shaped(W.unpack_values(p), int, int, int), payload))
                    now = time.monotonic()
                    if now - self._last_progress >= 0.1:
                        self._last_progress = now
                        # Progress counts zero chunks as done too: the bar and the ETA follow the
                        # image, not only the data that has to travel.
                        self.progress(bytes_done=self.done_base + sum(c for _b, _w, c in self.stream_bytes.values()),
                                      detail={"phase": "copy",
                                              "streams": {k: b for k, (b, _w, _c) in self.stream_bytes.items()}})
                elif typ == W.F_EOF:
                    return

        reader = asyncio.create_task(target(), name=f"ferry-blk-{name}")
        try:
            for i in range(0, len(chunks), SEND_BATCH):
                stream.request(W.F_JSON, json.dumps({"op": "send", "chunks": chunks[i:i + SEND_BATCH],
                                                     "size": size, "skip_zero": True}).encode())
                await watching(stream.drain(), reader)
            stream.request(W.F_EOF)
            await watching(stream.drain(), reader)
            await reader
            await stream.finish()
        except BaseException as e:
            reader.cancel()
            failure = None
            if not isinstance(e, asyncio.CancelledError):
                try:
                    await asyncio.wait_for(asyncio.shield(reader), 3)
                except BaseException as r:   # noqa: BLE001 - the target's own reason is wanted
                    failure = r if isinstance(r, FerryError) else None
            await stream.kill()
            if failure is not None:
                raise failure from None
            raise
        finally:
            wire = self.stream_bytes.get(name, (0, 0, 0))[1]
            st.bytes_sent += wire
            st.wire_bytes += wire

    async def _checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_ckpt < 0.5:
            return
        self._last_ckpt = now
        new, self.pending = self.pending, []
        await self.save_checkpoint({"round": self.stats.round, "chunk": self.opts.chunk_size,
                                    "size": self.stats.bytes_total}, new)


def block_ack(payload: bytes) -> list:
    """A block target's acknowledgement: [[index, sha256], ...], time."""
    written, t_ns = W.shaped(W.unpack_values(payload), list, int, what="acknowledgement")
    for item in written:
        W.shaped(item, int, bytes, what="acknowledged chunk")
    return [written, t_ns]


def _span(indices: list[int], chunk: int, size: int) -> int:
    """Bytes of the image the given chunks cover (the last one may be short)."""
    return sum(min(chunk, size - i * chunk) for i in indices)


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk indices as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
