"""File-level replication rounds (tar/rsync-like) between two hosts, through the engine.

A round: walk both trees in parallel, plan the difference, then
  A. deletions and new directories (control stream),
  B. regular files over N parallel streams (source agent -> engine -> target agent),
  C. hard links, symlinks, device nodes, metadata updates, then directory metadata deepest first.
The target acknowledges data only after it is durable (syncfs/fsync); only then is a checkpoint
committed. Resuming verifies, rather than trusts, anything the last checkpoint did not cover:
files the target changed after it (by ctime) are compared by hash, and a partly written large
file continues from the longest prefix whose hash matches on both sides.
"""

from __future__ import annotations

import asyncio
import base64
import errno as E
import json
import stat
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import FerryError, PermanentError
from . import agent as W
from .channel import STALL_S, AgentChannel, AgentError, ProtocolViolation, protocol_error, watching
from .hosts import AgentHost
from .overlap import refuse_tree_overlap, resolved
from .pipeline import Stream

PART_PREFIX = W.PART_PREFIX
REQ_BATCH = 256
CHANGED_PASSES = 2


@dataclass(frozen=True)
class FileOptions:
    excludes: tuple[str, ...] = ()
    system_excludes: bool = False
    streams: int = 4
    bwlimit: float | None = None      # bytes per second, all streams together
    checksum: bool = False
    delete: bool = True
    one_file_system: bool = False
    stall_s: float = STALL_S          # no word from an agent for this long: it is stuck


@dataclass
class RoundStats:
    round: int = 0
    bytes_total: int = 0        # size of the source tree's regular files
    bytes_to_send: int = 0
    bytes_sent: int = 0         # file data sent this round (resumed prefixes excluded)
    items_total: int = 0        # entries in the source tree
    items_changed: int = 0      # entries created, updated or deleted on the target
    files_sent: int = 0
    deleted: int = 0
    duration_s: float = 0.0
    # What was checked, and no more (see `verification`): every byte copied this round arrived
    # as it was read (CRC-32), and the entries not copied were judged unchanged by `unchanged_by`.
    verified_on_arrival: bool = False
    content_compared: bool = False     # every file's content compared by SHA-256 (--checksum)
    unchanged_by: str = ""
    verification: str = ""
    touched_compared: int = 0   # files whose inode changed since the last round, compared by SHA-256
    source_walk_ns: int = 0     # when this round's walk of the source began, on the source's clock
    resumed_bytes: int = 0      # partial-file bytes kept on the target after hash verification
    rechecked: int = 0          # files written after the last checkpoint, verified by hash
    changed_during_copy: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Manifest:
    """A tree listing: path -> (typ, mode, uid, gid, size, mtime, rdev, dev, ino, nlink, xcrc, link, digest,
    touched), and where the root really is (agent.locate)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple] = {}
        self.summary: dict[str, Any] = {}
        self.where: dict[str, Any] = {}

    @property
    def exists(self) -> bool:
        return self.summary.get("exists", True)


async def walk(t: AgentHost, root: str, opts: FileOptions, *, missing_ok: bool = False,
               hash_ctime_after: int | None = None, flag_ctime_after: int | None = None,
               on_where: Callable[[dict], None] | None = None) -> Manifest:
    """The manifest of t:root. `on_where` hears where the root really is as soon as the agent
    says so, before the listing (to refuse an overlap early)."""
    ch = await AgentChannel.start(t, "walk", root=root, excludes=list(opts.excludes),
                                  system_excludes=opts.system_excludes, checksum=opts.checksum,
                                  missing_ok=missing_ok, hash_ctime_after=hash_ctime_after,
                                  flag_ctime_after=flag_ctime_after, one_file_system=opts.one_file_system)
    ch.stall_s = opts.stall_s
    m = Manifest()
    entries = m.entries

    def records(payload: bytes) -> None:
        for rec in W.decode_records(payload):
            entries[rec[0]] = rec[1:]
    try:
        while True:
            typ, payload = await ch.recv()
            if typ == W.F_MANIFEST:
                ch.parse("manifest", records, payload)
            elif typ == W.F_JSON:
                msg = ch.parse("walk summary", json.loads, payload)
                if isinstance(msg, dict) and isinstance(msg.get("where"), dict):
                    m.where = msg["where"]
                    if on_where is not None:
                        on_where(m.where)
                    continue
                m.summary = msg if isinstance(msg, dict) else {}
                break
    except ProtocolViolation:
        raise
    except AgentError as e:
        raise PermanentError(f"{t.host}:{root}: {e.message.split(': ', 1)[-1]}", e.hint or "check the path") from None
    finally:
        await ch.finish()
    return m


def b64(p: bytes) -> str:
    return base64.b64encode(p).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def show(p: bytes) -> str:
    """A path for messages: exact where it is UTF-8, escaped where it is not."""
    return p.decode("utf-8", "backslashreplace")


def parent_of(rel: bytes) -> bytes:
    return rel.rsplit(b"/", 1)[0] if b"/" in rel else b"."


def depth(rel: bytes) -> int:
    return 0 if rel == b"." else rel.count(b"/") + 1


# Record field positions (after the path).
TYP, MODE, UID, GID, SIZE, MTIME, RDEV, DEV, INO, NLINK, XCRC, LINK, DIGEST, TOUCHED = range(14)


@dataclass
class Plan:
    deletes: list[bytes] = field(default_factory=list)
    mkdirs: list[bytes] = field(default_factory=list)
    files: list[tuple[bytes, int]] = field(default_factory=list)
    hardlinks: list[tuple[bytes, bytes]] = field(default_factory=list)
    entries: list[tuple[str, bytes]] = field(default_factory=list)   # (op, rel) for the source to describe
    dirmeta: list[bytes] = field(default_factory=list)
    keep_partials: set[bytes] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.changed or self.dirmeta or self.keep_partials)

    @property
    def changed(self) -> int:
        return (len(self.deletes) + len(self.mkdirs) + len(self.files) + len(self.hardlinks)
                + len(self.entries))


def _meta_differs(s: tuple, t: tuple, is_root: bool) -> bool:
    if stat.S_IMODE(s[MODE]) != stat.S_IMODE(t[MODE]) or s[XCRC] != t[XCRC]:
        return True
    return is_root and (s[UID] != t[UID] or s[GID] != t[GID])


def plan_round(src: Manifest, dst: Manifest, opts: FileOptions, *, target_is_root: bool,
               partials: set[bytes] = frozenset(), suspect: set[bytes] = frozenset()) -> Plan:
    """What must change on the target so that it equals the source. `suspect` files are re-sent."""
    plan = Plan()
    s_ent, d_ent = src.entries, dst.entries
    touched_dirs: set[bytes] = set()

    # Deletions: target entries the source does not have (or has with another type).
    for rel, t in d_ent.items():
        base = rel.rsplit(b"/", 1)[-1]
        if base.startswith(PART_PREFIX):
            if rel in partials:
                plan.keep_partials.add(rel)
            else:
                plan.deletes.append(rel)   # leftovers of an abandoned transfer
            continue
        s = s_ent.get(rel)
        if s is None and not opts.delete:
            continue
        if s is None or s[TYP] != t[TYP]:
            plan.deletes.append(rel)
    # Only the topmost of deleted trees needs a delete frame.
    deleted: set[bytes] = set()
    for rel in sorted(plan.deletes):
        if not _ancestors_in(rel, deleted):
            deleted.add(rel)
    plan.deletes = sorted(deleted, key=lambda r: (-depth(r), r))
    for rel in plan.deletes:
        touched_dirs.add(parent_of(rel))

    # Hard-link groups: the first path (sorted) is sent, the others are linked to it.
    leaders: dict[tuple[int, int], bytes] = {}
    for rel in sorted(s_ent):
        s = s_ent[rel]
        if s[TYP] == W.T_FILE and s[NLINK] > 1:
            leaders.setdefault((s[DEV], s[INO]), rel)

    sent: set[bytes] = set()
    for rel in sorted(s_ent):
        s = s_ent[rel]
        t = d_ent.get(rel)
        if t is not None and (t[TYP] != s[TYP] or rel in deleted):
            t = None
        typ = s[TYP]
        if typ == W.T_DIR:
            if rel != b"." and t is None:
                plan.mkdirs.append(rel)
                touched_dirs.add(parent_of(rel))
                touched_dirs.add(rel)
            elif t is not None and (_meta_differs(s, t, target_is_root) or s[MTIME] != t[MTIME]):
                touched_dirs.add(rel)
            continue
        if typ == W.T_FILE:
            key = (s[DEV], s[INO])
            leader = leaders.get(key) if s[NLINK] > 1 else None
            if leader is not None and leader != rel:
                lt = d_ent.get(leader)
                linked = (t is not None and lt is not None and t[INO] == lt[INO] and t[DEV] == lt[DEV]
                          and leader not in sent and leader not in deleted)
                if not linked:
                    plan.hardlinks.append((rel, leader))
                    touched_dirs.add(parent_of(rel))
                continue
            same = (t is not None and t[SIZE] == s[SIZE] and t[MTIME] == s[MTIME]
                    and rel not in suspect)
            if same and opts.checksum:
                same = s[DIGEST] is not None and s[DIGEST] == t[DIGEST]
            if not same:
                plan.files.append((rel, s[SIZE]))
                sent.add(rel)
                touched_dirs.add(parent_of(rel))
            elif _meta_differs(s, t, target_is_root):
                plan.entries.append(("meta", rel))
            continue
        if typ == W.T_LINK:
            if t is None or t[LINK] != s[LINK] or t[MTIME] != s[MTIME] or (
                    target_is_root and (t[UID], t[GID]) != (s[UID], s[GID])):
                plan.entries.append(("symlink", rel))
                touched_dirs.add(parent_of(rel))
            continue
        if typ == W.T_SOCK:
            continue  # sockets belong to running programs; they are not copied
        # Device nodes and FIFOs.
        if t is None or t[RDEV] != s[RDEV] or _meta_differs(s, t, target_is_root) or t[MTIME] != s[MTIME]:
            plan.entries.append(("node", rel))
            touched_dirs.add(parent_of(rel))

    # Directory metadata, deepest first, after everything inside them.
    plan.dirmeta = sorted({d for d in touched_dirs if d in s_ent}, key=lambda r: (-depth(r), r))
    return plan


def touched_unchanged(src: Manifest, dst: Manifest, *, exclude: set[bytes]) -> list[bytes]:
    """Source files flagged as touched (their inode changed since the last round) that the target
    has with the same size and mtime: size and mtime alone would leave them as they are."""
    out = []
    d_ent = dst.entries
    for rel, s in src.entries.items():
        if s[TOUCHED] and s[TYP] == W.T_FILE and rel not in exclude:
            t = d_ent.get(rel)
            if t is not None and t[TYP] == W.T_FILE and t[SIZE] == s[SIZE] and t[MTIME] == s[MTIME]:
                out.append(rel)
    return sorted(out)


def _ancestors_in(rel: bytes, roots: set[bytes]) -> list[bytes]:
    out = []
    parts = rel.split(b"/")
    for i in range(1, len(parts)):
        p = b"/".join(parts[:i])
        if p in roots:
            out.append(p)
    return out


BIG_FILE = 8 << 20
SMALL_ROUND = 64 << 20   # less to send than this: no separate streams
FILE_COST = 32768   # what creating one file costs, in bytes of transfer


def split_streams(files: list[tuple[bytes, int]], streams: int) -> list[list[tuple[bytes, int]]]:
    """Share files among streams by bytes plus a per-file cost. Small files go by whole
    directories, so that two streams never create files in the same directory at once (they
    would wait on its lock); big files are shared one by one."""
    n = max(1, min(streams, len(files)))
    groups: dict[bytes, list[tuple[bytes, int]]] = {}
    units: list[tuple[int, list[tuple[bytes, int]]]] = []
    for item in files:   # the plan's own tuples, not copies of them
        rel, size = item
        if size >= BIG_FILE:
            units.append((size, [item]))
        else:
            groups.setdefault(parent_of(rel), []).append(item)
    units += [(sum(s for _, s in g) + FILE_COST * len(g), g) for g in groups.values()]
    buckets: list[list[tuple[bytes, int]]] = [[] for _ in range(n)]
    loads = [0] * n
    for cost, unit in sorted(units, key=lambda u: -u[0]):
        i = loads.index(min(loads))
        buckets[i].extend(unit)
        loads[i] += cost
    for b in buckets:
        b.sort()   # directory order: kinder to both filesystems
    return [b for b in buckets if b]


# --------------------------------------------------------------------------- the target side


def ack_values(payload: bytes) -> list:
    """A target's acknowledgement: seq, [[rel, digest, size, changed, mismatch]...], partial, notes, time."""
    seq, acked, partial, notes, t_ns = W.shaped(W.unpack_values(payload), int, list, (list, type(None)), list, int,
                                               what="acknowledgement")
    for item in acked:
        W.shaped(item, bytes, bytes, int, bool, bool, what="acknowledged entry")
    if partial is not None:
        W.shaped(partial, bytes, int, str, what="partial file")
    if not all(isinstance(n, str) for n in notes):
        raise ValueError("notes that are not text")
    return [seq, acked, partial, notes, t_ns]


def err_values(payload: bytes) -> list:
    """A per-entry error: side, rel, errno, message."""
    vals = W.shaped(W.unpack_values(payload), str, bytes, int, str, what="error report")
    if vals[0] not in ("source", "target"):
        raise ValueError(f"an error from side {vals[0]!r}")
    return vals


class TargetStream:
    """A target agent plus the task reading its acknowledgements."""

    def __init__(self, ch: AgentChannel, rnd: "FileRound", name: str) -> None:
        self.ch = ch
        self.rnd = rnd
        self.name = name
        self.received = 0     # file data the target has taken in (its progress reports)
        self.last_ack_ns = int(ch.hello.get("time_ns", 0))
        self.wrote = False
        self.partial: list | None = None
        self.seq = 0
        self._waiters: dict[int, asyncio.Future] = {}
        self._eof = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read(), name=f"ferry-acks-{name}")

    async def _read(self) -> None:
        try:
            while True:
                typ, payload = await self.ch.recv()
                if typ == W.F_ACK:
                    seq, acked, partial, notes, t_ns = self.ch.parse("acknowledgement", ack_values, payload)
                    self.last_ack_ns = t_ns
                    self.partial = partial
                    self.rnd.on_ack(self, acked, notes)
                    fut = self._waiters.pop(seq, None)
                    if fut and not fut.done():
                        fut.set_result(None)
                    await self.rnd.durable()
                elif typ == W.F_ERR:
                    side, rel, code, msg = self.ch.parse("error report", err_values, payload)
                    self.rnd.on_error(side, rel, code, msg)
                elif typ == W.F_PROGRESS:
                    self.received = self.ch.parse("progress", lambda p: W.shaped(W.unpack_values(p), int, int), payload)[0]
                    self.rnd.on_progress()
                elif typ == W.F_EOF:
                    self._eof.set_result(None)
                    return
                elif typ == W.F_JSON:
                    self.rnd.on_reply(self.ch.parse("reply", json.loads, payload))
                else:
                    raise protocol_error(self.ch.host, self.ch.role, "a frame", f"unexpected type {typ!r}")
        except BaseException as e:
            for fut in [*self._waiters.values(), self._eof]:
                if not fut.done():
                    fut.set_exception(e)
                    fut.exception()  # mark it seen: the error surfaces through the task itself
            self._waiters.clear()
            if not isinstance(e, asyncio.CancelledError):
                raise

    async def sync(self) -> None:
        """Barrier: everything sent so far is durable and acknowledged."""
        self.seq += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters[self.seq] = fut
        self.ch.send(W.F_SYNC, struct.pack("<q", self.seq))
        await self.ch.drain()
        await fut

    async def failure(self, timeout: float = 3.0) -> BaseException | None:
        """The target's own error, if it ended with one (it may arrive just after a broken pipe)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except asyncio.TimeoutError:
            return None
        except BaseException as e:   # noqa: BLE001 - this is the error being looked for
            return e
        return None

    async def end(self) -> None:
        self.ch.send(W.F_EOF)
        await self.ch.drain()
        await self.finished()
        await self.ch.finish()

    async def finished(self) -> None:
        """Until the target has said end-of-stream (after its final sync)."""
        await self._eof
        await self.task


# --------------------------------------------------------------------------- a round


ProgressFn = Callable[..., None]
CheckpointFn = Callable[[dict], Awaitable[None]]


class FileRound:
    """One round of file-level replication from src_t:src_root to dst_t:dst_root."""

    def __init__(self, src_t: AgentHost, src_root: str, dst_t: AgentHost, dst_root: str, opts: FileOptions, *,
                 round_no: int, checkpoint: dict | None, progress: ProgressFn, save_checkpoint: CheckpointFn,
                 log: Callable[[str, str], None], touched_after: int | None = None) -> None:
        self.src_t, self.src_root, self.dst_t, self.dst_root = src_t, src_root, dst_t, dst_root
        # The roots as the agents resolved them (symlinks, '..'): every agent after the walks is
        # given these, so the round works on one place whatever the paths do meanwhile.
        self.src_real, self.dst_real = src_root, dst_root
        # The previous round began here (the source's clock): a file whose inode changed since
        # may have new content under the same size and mtime.
        self.touched_after = touched_after
        self.opts = opts
        self.stats = RoundStats(round=round_no)
        self.checkpoint = checkpoint or {}
        self.progress = progress
        self.save_checkpoint = save_checkpoint
        self.log = log
        self.unacked: set[bytes] = set()   # files sent and neither acknowledged nor reported failed
        self.sent_before = 0                # file data of streams already finished
        self.targets: list[TargetStream] = []
        self.replies: asyncio.Queue = asyncio.Queue()
        self.retry: set[bytes] = set()
        self.mismatch: list[bytes] = []
        self.fatal: FerryError | None = None
        self._last_ckpt = 0.0
        self.walked_ns = 0   # the target's clock when its walk began: nothing of ours is newer yet
        self.early: asyncio.Task | None = None   # agents being started during the walk (new target)
        self.ready: list[Stream] = []             # bulk streams started early, not yet used
        self._last_progress = 0.0
        self.bytes_durable = 0     # file data the targets acknowledged as on disk, this run
        self.round_total = 0       # file data of the whole round, fixed when it began
        self.done_before = 0       # of which earlier runs of the round took care
        self._partials: dict[bytes, list] = {}

    # -- callbacks from target streams

    def on_ack(self, ts: TargetStream, acked: list, notes: list) -> None:
        for rel, digest, size, changed, mismatch in acked:
            self.unacked.discard(rel)
            if not digest:
                continue   # a symlink, node, link or metadata update: nothing to hash
            self.bytes_durable += size
            self.stats.files_sent += 1
            if changed:
                self.retry.add(rel)
            elif mismatch:
                self.mismatch.append(rel)
        for n in notes:
            if n not in self.stats.notes:
                self.stats.notes.append(n)
                self.log(f"{self.dst_t.host}: {n}", "warning")

    def on_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < 0.1:
            return
        self._last_progress = now
        sent = self.sent_before + sum(ts.received for ts in self.targets)
        self.progress(bytes_done=self.done_before + sent, detail={"phase": "copy",
                                               "streams": {ts.name: ts.received for ts in self.targets
                                                           if ts.name != "control"}})

    def on_error(self, side: str, rel: bytes, code: int, msg: str) -> None:
        """A per-entry error from the source (passed on by the target) or from the target."""
        self.unacked.discard(rel)
        if side == "source":
            self._source_error(rel, code, msg)
            return
        text = f"{self.dst_t.host}:{self.dst_root}: {msg}"
        if msg.startswith("refused"):
            self.stats.refused.append(text)
        else:
            self.stats.errors.append(text)
        self.log(text, "error")

    def on_reply(self, msg: Any) -> None:
        self.replies.put_nowait(msg)

    async def durable(self) -> None:
        """Commit a checkpoint describing what the targets have acknowledged as durable."""
        now = time.monotonic()
        if now - self._last_ckpt < 0.5:
            return
        self._last_ckpt = now
        await self._commit()

    async def _commit(self) -> None:
        partials = {}
        for ts in self.targets:
            if ts.partial:
                rel, offset, _h = ts.partial
                partials[b64(rel)] = offset
        durable = self.bytes_durable + sum(partials.values())
        boundary = min((ts.last_ack_ns for ts in self.targets), default=self.walked_ns)
        prev = self.checkpoint.get("verified_before_ns")
        if prev and self.checkpoint.get("round") == self.stats.round and boundary < prev:
            boundary = prev
        self.checkpoint = {"round": self.stats.round, "partials": partials, "verified_before_ns": boundary,
                           "bytes_sent": self.sent_before + sum(ts.received for ts in self.targets),
                           "bytes_durable": durable, "total": self.round_total}
        await self.save_checkpoint(self.checkpoint)

    # -- the round

    async def run(self) -> RoundStats:
        t0 = time.monotonic()
        opts = self.opts
        st = self.stats
        resumed_round = self.checkpoint.get("round") == st.round
        ctime_after = self.checkpoint.get("verified_before_ns") if resumed_round else None
        self.progress(item="walking both trees", detail={"phase": "walk", "round": st.round})
        src_where: asyncio.Future = asyncio.get_running_loop().create_future()
        src_walk = asyncio.create_task(walk(self.src_t, self.src_root, opts, flag_ctime_after=self.touched_after,
                                            on_where=lambda w: src_where.done() or src_where.set_result(w)))
        try:
            dst_m = await walk(self.dst_t, self.dst_root, opts, missing_ok=True, hash_ctime_after=ctime_after)
            await asyncio.wait({src_where, src_walk}, return_when=asyncio.FIRST_COMPLETED)
            if not src_where.done():
                await src_walk   # it failed before saying where it is: its error
            # Before anything is written (the early agents below make the target's root).
            self._refuse_overlap(src_where.result(), dst_m.where)
            if len(dst_m.entries) <= 1:
                # A new target: everything will be sent. Start the agents while the source is walked.
                self.early = asyncio.create_task(self._agents_for_full_copy())
            src_m = await src_walk
        except BaseException:
            src_walk.cancel()
            await asyncio.gather(src_walk, return_exceptions=True)
            await self._drop_early()
            raise
        self.walked_ns = dst_m.summary.get("time_ns", 0)
        st.source_walk_ns = src_m.summary.get("time_ns", 0)
        for rec in src_m.entries.values():
            if rec[TYP] == W.T_FILE:
                st.bytes_total += rec[SIZE]
        st.items_total = len(src_m.entries)
        for err in src_m.summary.get("errors", []):
            st.errors.append(f"{self.src_t.host}: {err}")
            self.log(f"{self.src_t.host}: {err}", "error")

        part_names = {self._part_name(rel): rel for rel in self._partial_offsets(resumed_round)}
        target_is_root = dst_m.summary.get("uid") == 0
        # Files the target wrote after the last checkpoint: their hashes are compared before they are trusted.
        hashed = [] if opts.checksum else [
            rel for rel, rec in dst_m.entries.items()
            if rec[DIGEST] is not None and rec[TYP] == W.T_FILE and rel in src_m.entries]
        # Files whose inode changed on the source since the last round, but whose size and mtime
        # say "unchanged": their content is compared (mtime can be set back; ctime cannot).
        touched = [] if opts.checksum else touched_unchanged(src_m, dst_m, exclude=set(hashed))
        plan = plan_round(src_m, dst_m, opts, target_is_root=target_is_root, partials=set(part_names))
        if plan.empty and dst_m.exists and not hashed and not touched:
            # Nothing to do: no agents beyond the two walks.
            await self._drop_early()
            if not resumed_round:
                await self._commit()
            return self._finish(plan, t0)

        if self.early is not None:
            try:
                ctl_src, ctl_dst, self.ready = await self.early
            finally:
                self.early = None
        else:
            ctl_src, ctl_dst = await self._control_agents()
        ctl = TargetStream(ctl_dst, self, "control")
        self.targets.append(ctl)
        try:
            if hashed or touched:
                src_hashes, dst_hashes = await asyncio.gather(self._source_hashes(ctl_src, hashed + touched),
                                                              self._target_hashes(ctl, touched))
                dst_hashes.update((rel, dst_m.entries[rel][DIGEST].hex()) for rel in hashed)
                suspect = {rel for rel in hashed + touched
                           if src_hashes.get(rel) is None or src_hashes.get(rel) != dst_hashes.get(rel)}
                st.rechecked, st.touched_compared = len(hashed), len(touched)
                if touched:
                    self.log(f"{len(touched)} file(s) changed on the source since the last round under the same "
                             f"size and mtime: compared by content, {len(suspect & set(touched))} differed", "info")
                if suspect:
                    plan = plan_round(src_m, dst_m, opts, target_is_root=target_is_root,
                                      partials=set(part_names), suspect=suspect)
            return await self._run(plan, part_names, ctl_src, ctl, resumed_round, t0)
        except BaseException:
            for ts in self.targets:
                ts.task.cancel()
                await ts.ch.kill()
            await ctl_src.kill()
            raise
        finally:
            await self._drop_early()

    def _refuse_overlap(self, src_where: dict, dst_where: dict) -> None:
        """Refuse a source and target that overlap on one machine; from here on, agents work on the
        roots as resolved."""
        src, dst = f"{self.src_t.host}:{self.src_root}", f"{self.dst_t.host}:{self.dst_root}"
        refuse_tree_overlap(src, src_where, dst, dst_where)
        self.src_real = resolved(src, src_where, self.log) or self.src_real
        self.dst_real = resolved(dst, dst_where, self.log) or self.dst_real

    async def _control_agents(self) -> tuple[AgentChannel, AgentChannel]:
        # The control agent carries the files of a small round itself: it keeps --bwlimit too.
        chans = await asyncio.gather(AgentChannel.start(self.src_t, "send", root=self.src_real,
                                                        bwlimit=self.opts.bwlimit),
                                     AgentChannel.start(self.dst_t, "recv", root=self.dst_real))
        for ch in chans:
            ch.stall_s = self.opts.stall_s
        return chans

    async def _agents_for_full_copy(self) -> tuple[AgentChannel, AgentChannel, list[Stream]]:
        """Control agents and bulk streams, started in parallel (and early, for a new target)."""
        (ctl_src, ctl_dst), *streams = await asyncio.gather(
            self._control_agents(), *(self._open_stream() for _ in range(max(1, self.opts.streams))))
        return ctl_src, ctl_dst, list(streams)

    async def _drop_early(self) -> None:
        """Stop agents started early that the round turned out not to need."""
        early, self.early = self.early, None
        if early is not None:
            early.cancel()
            try:
                ctl_src, ctl_dst, self.ready = await early
                await ctl_src.kill()
                await ctl_dst.kill()
            except BaseException:   # noqa: BLE001 - whatever it was, it is not needed any more
                pass
        ready, self.ready = self.ready, []
        for stream in ready:
            await stream.kill()

    async def _open_stream(self) -> Stream:
        share = self.opts.bwlimit / max(1, self.opts.streams) if self.opts.bwlimit else None
        stream = await Stream.open(self.src_t, {"root": self.src_real}, self.dst_t,
                                   {"root": self.dst_real, "sync_bytes": 512 << 20},
                                   role_src="send", role_dst="recv", bwlimit=share)
        stream.target.stall_s = self.opts.stall_s
        return stream

    def _finish(self, plan: Plan, t0: float) -> RoundStats:
        st = self.stats
        for rel in self.mismatch:
            st.errors.append(f"{self.dst_t.host}:{self.dst_root}: {show(rel)}: content hash differs from the source")
        st.duration_s = time.monotonic() - t0
        st.verified_on_arrival = not (st.errors or st.refused or st.changed_during_copy or self.mismatch)
        self._say_what_was_verified()
        self.progress(units_done=max(1, plan.changed), item="done", detail={"phase": "done"})
        return st

    def _say_what_was_verified(self) -> None:
        """Name exactly what this round compared, and nothing more."""
        st = self.stats
        if self.opts.checksum:
            st.content_compared = True
            st.unchanged_by = "sha256"
            st.verification = ("every file's content compared with the source (SHA-256); "
                               "copied data checked on arrival (CRC-32)")
            return
        st.unchanged_by = "size+mtime+ctime" if self.touched_after is not None else "size+mtime"
        since = (f"; files whose inode changed since the last round ({st.touched_compared}) compared by SHA-256"
                 if self.touched_after is not None else "")
        st.verification = ("copied data checked on arrival (CRC-32); files not copied judged unchanged by size "
                           f"and mtime{since}; contents not compared (--checksum compares them)")

    async def _run(self, plan: Plan, part_names: dict[bytes, bytes], ctl_src: AgentChannel, ctl: TargetStream,
                   resumed_round: bool, t0: float) -> RoundStats:
        st = self.stats
        st.items_changed = plan.changed
        st.bytes_to_send = sum(size for _, size in plan.files)

        resume_at = await self._verify_partials(ctl_src, ctl, plan, part_names, self._partial_offsets(resumed_round))
        st.resumed_bytes = sum(resume_at.values())
        # The bar's total is the round's, fixed when it began: a resumed round starts where the
        # one before left off (what is left now, measured again, is never more than that).
        remaining = max(0, st.bytes_to_send - st.resumed_bytes)
        first_total = self.checkpoint.get("total") if resumed_round else None
        self.round_total = max(first_total or 0, remaining)
        self.done_before = self.round_total - remaining
        if not resumed_round:
            await self._commit()   # the round has begun: a re-run from here on resumes it

        self.progress(units_done=0, units_total=max(1, plan.changed), bytes_done=self.done_before,
                      bytes_total=self.round_total or None,
                      item="deleting and creating directories", detail={"phase": "prepare"})
        # A. deletions, then new directories (parents first: the list is sorted).
        for rel in plan.deletes:
            ctl.ch.send(W.F_DELETE, W.pack_values([rel]))
        for rel in plan.mkdirs:
            ctl.ch.send(W.F_ENTRY, W.pack_values(["dir", rel, 0o700]))
        st.deleted = len(plan.deletes)
        if plan.deletes or plan.mkdirs:
            await ctl.ch.drain()
            await ctl.sync()
            self._check_fatal()

        # B. regular files over parallel streams; files that changed while read go again.
        files = plan.files
        for attempt in range(1 + CHANGED_PASSES):
            if not files:
                break
            self.retry.clear()
            await self._send_files(files, resume_at, ctl_src, ctl)
            resume_at = {}
            if not self.retry:
                break
            sizes = {rel: size for rel, size in plan.files}
            files = [(rel, sizes.get(rel, 0)) for rel in sorted(self.retry)]
            if attempt < CHANGED_PASSES:
                self.log(f"{len(files)} file(s) changed while being read; copying them again", "warning")
        st.changed_during_copy = [show(r) for r in sorted(self.retry)]
        for rel in self.retry:
            self.log(f"{self.src_t.host}:{self.src_root}: {show(rel)} changed while being copied; "
                     "the next round copies it again", "warning")

        # C. links, symlinks, nodes, metadata, then directory metadata deepest first.
        self.progress(item="links, metadata and directories", detail={"phase": "finish"})
        for rel, leader in plan.hardlinks:
            ctl.ch.send(W.F_ENTRY, W.pack_values(["hardlink", rel, leader]))
        requests = [[op, rel, None] for op, rel in plan.entries] + [["dirmeta", rel, None] for rel in plan.dirmeta]
        await self._relay_requests(ctl_src, ctl, requests)
        await ctl.end()
        await ctl_src.finish()
        self._check_fatal()
        await self._commit()
        return self._finish(plan, t0)

    def _partial_offsets(self, resumed_round: bool) -> dict[bytes, int]:
        if not resumed_round:
            return {}
        return {unb64(k): v for k, v in (self.checkpoint.get("partials") or {}).items()}

    @staticmethod
    def _part_name(rel: bytes) -> bytes:
        parent, _, name = rel.rpartition(b"/")
        part = W.part_name(name)
        return parent + b"/" + part if parent else part

    def _check_fatal(self) -> None:
        if self.fatal:
            raise self.fatal

    async def _source_hashes(self, ctl_src: AgentChannel, rels: list[bytes]) -> dict[bytes, str | None]:
        out: dict[bytes, str | None] = {}
        for i in range(0, len(rels), REQ_BATCH):
            batch = rels[i:i + REQ_BATCH]
            ctl_src.send(W.F_REQ, W.pack_values([["hash", rel, None] for rel in batch]))
            await ctl_src.drain()
            for _ in batch:
                reply = await ctl_src.recv_json()
                if not isinstance(reply.get("path"), str):
                    raise protocol_error(ctl_src.host, ctl_src.role, "a hash reply", "no path in it")
                out[reply["path"].encode("utf-8", "surrogateescape")] = reply.get("sha256")
        return out

    async def _target_hashes(self, ctl: TargetStream, rels: list[bytes]) -> dict[bytes, str | None]:
        """SHA-256 of files as they are on the target (asked of its control agent)."""
        out: dict[bytes, str | None] = {}
        for i in range(0, len(rels), REQ_BATCH):
            batch = rels[i:i + REQ_BATCH]
            for rel in batch:
                ctl.ch.send_json({"op": "hash", "path": rel.decode("utf-8", "surrogateescape")})
            await ctl.ch.drain()
            for _ in batch:
                reply = await self._reply(ctl)
                out[reply["path"].encode("utf-8", "surrogateescape")] = reply.get("sha256")
        return out

    async def _reply(self, ts: TargetStream) -> dict:
        """The next JSON reply of a target (its reader task hands them over), or its failure."""
        getter = asyncio.ensure_future(self.replies.get())
        done, _ = await asyncio.wait({getter, ts.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            reply = getter.result()
            if not isinstance(reply, dict) or not isinstance(reply.get("path"), str):
                raise protocol_error(ts.ch.host, ts.ch.role, "a reply", "no path in it")
            return reply
        getter.cancel()
        ts.task.result()   # raises the target's error
        raise ts.ch.lost()

    async def _verify_partials(self, ctl_src: AgentChannel, ctl: TargetStream, plan: Plan,
                               part_names: dict[bytes, bytes], offsets: dict[bytes, int]) -> dict[bytes, int]:
        """For each kept partial file, a prefix whose hash is the same on both sides: all of what
        the target kept, else what the checkpoint recorded as durable, else nothing."""
        resume: dict[bytes, int] = {}
        wanted = {rel for rel, _ in plan.files}
        for part, rel in part_names.items():
            if part not in plan.keep_partials or rel not in wanted:
                continue
            limit = None
            for _ in range(2):
                target = await self._target_prefix(ctl, rel, limit)
                length, digest = target["length"], target["sha256"]
                if not length or not digest:
                    break
                if await self._source_prefix(ctl_src, rel, length) == digest:
                    resume[rel] = length
                    self.log(f"{show(rel)}: resuming after {length} bytes verified on both sides", "info")
                    break
                durable = offsets.get(rel, 0)
                if limit is not None or durable >= length:
                    break
                limit = durable   # the end differs (a torn write?): try what the checkpoint vouched for
            if rel not in resume:
                self.log(f"{show(rel)}: the kept partial copy differs from the source; sending it whole", "warning")
        return resume

    async def _target_prefix(self, ctl: TargetStream, rel: bytes, limit: int | None) -> dict:
        ctl.ch.send_json({"path": rel.decode("utf-8", "surrogateescape"),
                          **({"max": limit} if limit is not None else {})})
        await ctl.ch.drain()
        return await self._reply(ctl)

    async def _source_prefix(self, ctl_src: AgentChannel, rel: bytes, length: int) -> str | None:
        ctl_src.send(W.F_REQ, W.pack_values([["hash", rel, length]]))
        await ctl_src.drain()
        return (await ctl_src.recv_json()).get("sha256")

    async def _send_files(self, files: list[tuple[bytes, int]], resume_at: dict[bytes, int],
                          ctl_src: AgentChannel, ctl: TargetStream) -> None:
        todo = sum(size for _, size in files) - sum(resume_at.values())
        if todo < SMALL_ROUND and len(files) < 5000:
            # Little to send: the control agents carry it; starting streams would cost more.
            self.unacked.update(rel for rel, _ in files)
            await self._relay_requests(ctl_src, ctl, [["file", rel, resume_at.get(rel, 0)] for rel, _ in files],
                                       last=False)
            await ctl.sync()
        else:
            buckets = split_streams(files, self.opts.streams)
            await asyncio.gather(*(self._stream(i, b, resume_at) for i, b in enumerate(buckets) if b))
        self.stats.bytes_sent = self.sent_before + sum(ts.received for ts in self.targets)
        for rel in sorted(self.unacked)[:10]:
            self.stats.errors.append(f"{self.dst_t.host}:{self.dst_root}: {show(rel)}: the target never "
                                     "acknowledged it")
        self.unacked.clear()

    async def _stream(self, idx: int, files: list[tuple[bytes, int]], resume_at: dict[bytes, int]) -> None:
        """One bulk stream: the source agent's output goes to the target agent (see pipeline)."""
        stream = self.ready.pop() if self.ready else await self._open_stream()
        ts = TargetStream(stream.target, self, f"stream{idx}")
        self.targets.append(ts)
        self.unacked.update(rel for rel, _ in files)
        try:
            for i in range(0, len(files), REQ_BATCH):   # built a batch at a time: ~90 B a file less
                stream.request(W.F_REQ, W.pack_values([["file", rel, resume_at.get(rel, 0)]
                                                       for rel, _ in files[i:i + REQ_BATCH]]))
                await watching(stream.drain(), ts.task)
            stream.request(W.F_EOF)
            await watching(stream.drain(), ts.task)
            await ts.finished()
            await stream.finish()
        except BaseException as e:
            ts.task.cancel()
            failure = await ts.failure(0) if not isinstance(e, asyncio.CancelledError) else None
            await stream.kill()
            if isinstance(failure, FerryError):
                raise failure from None   # the target's own reason (disk full, say) beats a broken pipe
            raise
        finally:
            self.targets.remove(ts)
            self.sent_before += ts.received

    async def _relay_requests(self, src: AgentChannel, ts: TargetStream, requests: list, *,
                              last: bool = True) -> None:
        """Control stream: ask the source for entries and hand its frames to the target.
        last=False keeps the source for more requests afterwards."""
        async def ask() -> None:
            for i in range(0, len(requests), REQ_BATCH):
                src.send(W.F_REQ, W.pack_values(requests[i:i + REQ_BATCH]))
                await src.drain()
            if last:
                src.send(W.F_EOF)
            else:
                src.send(W.F_REQ, W.pack_values([["mark", b"", 0]]))
            await src.drain()

        asker = asyncio.create_task(ask())
        dst = ts.ch
        try:
            while True:
                typ, payload = await src.recv()
                if typ == W.F_EOF or (typ == W.F_JSON and b'"mark"' in payload):
                    break
                if typ == W.F_ERR:
                    _side, rel, code, msg = src.parse("error report", err_values, payload)
                    self._source_error(rel, code, msg)
                    continue
                try:
                    dst.send(typ, payload)
                    await dst.drain()
                except FerryError:
                    raise (await ts.failure()) or dst.lost()
                if ts.task.done():
                    ts.task.result()   # a target failure surfaces here, not after the source is drained
            await asker
        finally:
            if not asker.done():
                asker.cancel()

    def _source_error(self, rel: bytes, code: int, msg: str) -> None:
        where = f"{self.src_t.host}:{self.src_root}"
        if msg == "vanished":
            text = f"{where}: {show(rel)} vanished during the copy"
            hint = "it was deleted on the source; the next round reflects that"
        elif code == E.EACCES or code == E.EPERM:
            text, hint = f"{where}: {msg}", "Ferry could not read it: check its permissions or run as root"
        else:
            text, hint = f"{where}: {msg}", ""
        self.stats.errors.append(text + (f" (hint: {hint})" if hint else ""))
        self.log(text, "error")
