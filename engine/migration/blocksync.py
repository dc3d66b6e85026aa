"""Block-level sync rounds of `migration.sync` (E5): the target's disks made copies of the source's, chunk
for chunk, the receiver pulling from the source as file-level does (sync.py: the same task kind, records,
states and guarantees; this module holds what differs).

Chunks of CHUNK (4 MiB). One read pass per source disk on the source hashes every chunk (GNU dd with
O_DIRECT, so the kernel's cached copy of the device never hides a block the filesystem wrote since;
coreutils' `split --filter` runs md5sum per chunk); the list goes to LISTS_DIR/<migration>/<disk>.hashes
.next. The list of the last round that finished is <disk>.hashes: a chunk whose hash differs is sent.
The lists live in the source's RAM (/run), not in SOURCE_DIR: a list written to the disk it describes
changes that disk (a few chunks sent again every round, and a final offline sync copying a filesystem
Ferry is writing to). A source restarted has lost them: its next round compares with the target's own
chunks (see below), which is correct, and slower.
Round 1 has none: the target is a fresh qcow2 that reads zeros, so every chunk that is not all zeros
is sent. A round after the target was written outside the rounds (a test launch made it bootable and
took that back, a cutover started it from its disk) has none either: its base is the target's own
chunks, hashed in the receiver (a read of the target disk there).

    receiver$ dbclient -i PULL_KEY -p PORT USER@SOURCE "dd if=/dev/DISK bs=4M skip=S count=N iflag=direct" \
              | dd of=/dev/vdX bs=4M seek=S conv=notrunc iflag=fullblock

One connection per range of changed chunks (gaps of up to MERGE_GAP unchanged chunks are sent too: a
dbclient connection costs about a second between two TCG guests). The receiving dd has no count: what
the pipe gives is written contiguously from S; its records out are checked against the range's size.

Consistency: a round of a mounted, running filesystem is crash-consistent at best (the disk is read
over minutes while it changes; the next round takes what changed meanwhile). The cutover's final offline
sync runs after the services stopped and after `sync` on the source (every pass starts with one): its
copy is what a power cut at that moment leaves, and ext4's journal replays at the target's first boot.

A round, and what a kill -9 anywhere leaves (the same command, or `ferry task resume`, finishes it):
1. Setup (sync.authorize_pull): the pull key made in the receiver, authorized on the source with
   from="<receiver address>", the receiver trusting only the source's pinned host keys.
2. The hash pass on the source (a `sync` first; round 1 removes any older list), written to a temporary
   file then renamed to <disk>.hashes.next; the engine reads it and the base list, and computes the
   ranges (their bytes recorded as "changed since", with the round's start).
3. The pull, detached in the receiver under a token (task id, round) as file-level's (sync.START): its
   state in RX_STATE; a run finding its token adopts it; per range the exit codes of both ends and the
   receiving dd's records; `sync` before it reports success.
4. Only a pull that ended well on both ends renames <disk>.hashes.next to <disk>.hashes (sync.COMMIT:
   idempotent); a killed or failed round is done again from the committed list.
5. The round recorded (bytes moved, chunks moved, duration), as file-level's.
A cancel (or a failure) kills the pull and removes <disk>.hashes.next (abort_round).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from .. import api
from ..errors import FerryError, PermanentError, Refused, TransientError
from ..fmt import size as _size
from ..helpers import detached
from ..tasks import TaskContext
from . import sync
from .model import Change, Method, Migration, MigrationState, SyncRound
from .prepare import receiver_transport
from .service import load, source_transport

CHUNK = 4 << 20
MERGE_GAP = 2               # unchanged chunks between two changed ones sent anyway (one connection less)
HASH_TIMEOUT = 3600         # a pass reads the whole disk
LISTS_DIR = "/run/ferry-migration"      # on the source, in RAM (the module's docstring says why)


@dataclass(frozen=True)
class Disk:
    """A source disk and the target disk that mirrors it."""
    index: int
    source: str             # the source's device name (vda, sda)
    device: str             # the target disk in the receiver (/dev/vda)
    size: int               # the source disk's size: what is copied (the target's may be larger)
    hashes: str             # the committed list on the source

    @property
    def chunks(self) -> int:
        return -(-self.size // CHUNK)


@dataclass(frozen=True)
class Range:
    """Chunks [start, start + count) of a disk, sent in one connection."""
    disk: Disk
    start: int
    count: int

    @property
    def bytes(self) -> int:
        return min((self.start + self.count) * CHUNK, self.disk.size) - self.start * CHUNK


def is_block(mig: Migration) -> bool:
    return mig.target is not None and mig.target.method == Method.BLOCK


def disks_of(mig: Migration) -> list[Disk]:
    """The disks a block round copies: each target disk with the source disk it mirrors (sizes from the
    assessment's facts). Refused when the target is not prepared or the facts do not name the disks."""
    t = mig.target
    if t is None:
        raise Refused(f"migration {mig.name} has no prepared target", f"ferry migration prepare {mig.name}")
    facts = (((mig.assessment or {}).get("report") or {}).get("facts") or {})
    sizes = {d["name"]: int(d["size"]) for d in facts.get("devices", []) if d.get("type") == "disk"}
    out = []
    for i, d in enumerate(t.disks):
        if not d.source:
            continue
        size = sizes.get(d.source)
        if not size or size > d.size:
            raise Refused(f"the target disk {d.name} of {mig.name} does not fit the source's {d.source} "
                          f"({_size(size) if size else 'unknown size'}, target {_size(d.size)})",
                          f"assess it again and prepare it again: ferry migration assess {mig.name}")
        out.append(Disk(i, d.source, d.device, size, f"{LISTS_DIR}/{mig.name}/{d.source}.hashes"))
    if not out:
        raise Refused(f"the target of {mig.name} has no disk that mirrors a source disk",
                      f"ferry migration show {mig.name}")
    return out


# ------------------------------------------------------------------ hash lists


def zero_hash(n: int = CHUNK) -> str:
    """The md5 of n zero bytes: a chunk the fresh target already holds."""
    return hashlib.md5(bytes(n)).hexdigest()


def zero_list(disk: Disk) -> list[str]:
    last = disk.size - (disk.chunks - 1) * CHUNK
    return [zero_hash()] * (disk.chunks - 1) + [zero_hash(last)]


def parse_list(text: str, disk: Disk, what: str) -> list[str]:
    """A hash list ("NAME HASH ..." a line, NAME ending in the chunk's number) as hashes by chunk; an
    error when it does not cover the disk (a pass cut short)."""
    out: dict[int, str] = {}
    for ln in text.splitlines():
        w = ln.split()
        if len(w) >= 2 and w[0].lstrip("c").isdigit():
            out[int(w[0].lstrip("c"))] = w[1]
    if sorted(out) != list(range(disk.chunks)):
        raise PermanentError(f"the {what} of {disk.source} has {len(out)} chunk hashes, not {disk.chunks} "
                             f"({_size(disk.size)} in {_size(CHUNK)} chunks)",
                             "the pass was cut short or the disk changed size: the round starts again")
    return [out[i] for i in range(disk.chunks)]


def changed_ranges(disk: Disk, base: list[str], now: list[str], gap: int = MERGE_GAP) -> list[Range]:
    """The chunks whose hash differs, as ranges; runs closer than `gap` unchanged chunks merged."""
    changed = [i for i, (a, b) in enumerate(zip(base, now)) if a != b]
    out: list[Range] = []
    for i in changed:
        if out and i - (out[-1].start + out[-1].count) <= gap:
            last = out.pop()
            out.append(Range(disk, last.start, i + 1 - last.start))
        else:
            out.append(Range(disk, i, 1))
    return out


# On the source: $1 the lists' folder (LISTS_DIR/<migration>), $2 "next" (the lists become DISK.hashes.next), "fresh" (the same,
# older lists removed first: round 1) or "-" (printed only: a measure), $3 "base" to print the committed
# lists too; then the disks' names. A `sync` first (dirty pages reach the disk: the pass reads it with
# O_DIRECT). Prints per disk "@@now DISK" and its list, then "@@base DISK" and the committed one.
HASH = r"""
set -e
umask 077
d=$1 mode=$2 base=$3; shift 3
mkdir -p "$d"
sync
for disk in "$@"; do
  [ "$mode" = fresh ] && rm -f "$d/$disk.hashes" "$d/$disk.hashes.next"
  t=$(mktemp "$d/$disk.pass.XXXXXX")
  { dd if="/dev/$disk" bs=4194304 iflag=direct status=none 2>"$t.err" || echo "@@failed $?" >> "$t.err"; } \
    | split -d -a 8 -b 4194304 --filter='printf "%s %s\n" "$FILE" "$(md5sum)"' - c > "$t"
  if grep -q '^@@failed' "$t.err"; then
    echo "reading /dev/$disk failed: $(grep -v '^@@' "$t.err" | tail -n 1)" >&2; rm -f "$t" "$t.err"; exit 3
  fi
  rm -f "$t.err"
  echo "@@now $disk"; cat "$t"
  if [ "$mode" = - ]; then rm -f "$t"; else mv -f "$t" "$d/$disk.hashes.next"; fi
  if [ "$base" = base ]; then echo "@@base $disk"; cat "$d/$disk.hashes" 2>/dev/null || true; fi
done
"""

# In the receiver (busybox): the target disk's own hashes, $1 the device, $2 the chunks: "I HASH" a line.
RX_HASH = r"""
dev=$1 n=$2 i=0
while [ $i -lt $n ]; do
  h=$(dd if="$dev" bs=4194304 skip=$i count=1 iflag=direct 2>/dev/null | md5sum)
  echo "$i ${h%% *}"
  i=$((i + 1))
done
"""


def _sections(text: str) -> dict[tuple[str, str], str]:
    """HASH's output by ("now"|"base", disk)."""
    out: dict[tuple[str, str], list[str]] = {}
    key = None
    for ln in text.splitlines():
        if ln.startswith("@@now ") or ln.startswith("@@base "):
            what, disk = ln[2:].split()
            key = (what, disk)
            out[key] = []
        elif key is not None:
            out[key].append(ln)
    return {k: "\n".join(v) for k, v in out.items()}


async def _hash_pass(mig: Migration, src, disks: list[Disk], mode: str) -> dict[tuple[str, str], str]:
    try:
        r = await src.run(["sh", "-c", HASH, "ferry-hash", f"{LISTS_DIR}/{mig.name}", mode,
                           "base" if mode != "fresh" else "-", *(d.source for d in disks)],
                          timeout=HASH_TIMEOUT, check=True)
    except FerryError as e:
        err = sync._source_error(mig, e)
        if "Permission denied" in e.message:
            err.hint = f"{mig.spec.source.user} must read the source's disks (root, or the disk group)"
        raise err from None
    return _sections(r.text())


async def _target_list(mig: Migration, rx, disk: Disk) -> list[str]:
    """The target disk's own chunk hashes, read in the receiver."""
    try:
        with detached():
            r = await rx.run(["sh", "-c", RX_HASH, "ferry-rxhash", disk.device, str(disk.chunks)],
                             timeout=HASH_TIMEOUT, check=True)
    except FerryError as e:
        raise sync._receiver_error(mig, e) from None
    return parse_list(r.text(), disk, "target's hash list")


async def changed_since(svc: Any, mig: Migration) -> Change:
    """What changed on the source since the last round: a hash pass there compared with the committed
    lists (before round 1: every chunk that is not zeros). It READS THE SOURCE'S DISKS whole (minutes for
    big disks; no contents leave the source), recorded with its time and returned."""
    mig = await load(svc.store, mig.name)
    disks = disks_of(mig)
    src = source_transport(svc.pool, mig)
    try:
        at = time.time()
        lists = await _hash_pass(mig, src, disks, "-")
    finally:
        await src.close()
    chunks = nbytes = 0
    for d in disks:
        now = parse_list(lists.get(("now", d.source), ""), d, "source's hash list")
        committed = lists.get(("base", d.source), "")
        base = parse_list(committed, d, "committed hash list") if committed.strip() else zero_list(d)
        changed = changed_ranges(d, base, now, gap=0)
        chunks += sum(r.count for r in changed)
        nbytes += sum(r.bytes for r in changed)
    change = Change(bytes=nbytes, items=chunks, at=at, chunks=sum(d.chunks for d in disks))
    await svc.store.call(svc.store.migration_changed, mig.name, api.to_builtins(change))
    return change


# ------------------------------------------------------------------ the pull in the receiver (busybox sh)

# Detached by sync.START: $1 state folder, $2 key, $3 port, $4 user@host; then per range DEVICE SOURCE_DISK
# START COUNT BYTES. Per range i: i.at (its first byte and bytes), i.dd (the receiving dd's pid: POLL
# reads its position), i.src.rc (dbclient's: the source dd's), i.rx.rc, i.rx (dd's records); rc last,
# after a sync.
RECEIVE = sync.fill(sync.RECEIVE_HEAD + r"""
i=0
while [ $# -gt 4 ]; do
  dev=$1 disk=$2 start=$3 count=$4 bytes=$5; shift 5
  echo "$((start * CHUNK)) $bytes" > "$D/$i.at"
  cmd="dd if=/dev/$disk bs=CHUNK skip=$start count=$count iflag=direct status=none"
  { dbclient -T -K KEEPALIVE -W WINDOW -i "$KEY" -p "$PORT" "$UH" "$cmd" 2>"$D/$i.src" & echo $! > "$D/$i.dbclient"
    wait $!; echo $? > "$D/$i.src.rc"; } \
  | { exec 3<&0
      # (in the background for its pid; a background command's stdin would be /dev/null: fd 3 it is)
      dd of="$dev" bs=CHUNK seek="$start" conv=notrunc iflag=fullblock <&3 2>"$D/$i.rx" & echo $! > "$D/$i.dd"
      wait $!; r=$?; echo $r > "$D/$i.rx.rc"
      [ $r = 0 ] || kill "$(cat "$D/$i.dbclient")" 2>/dev/null; }
  s=$(cat "$D/$i.src.rc") r=$(cat "$D/$i.rx.rc")
  if [ "$r" != 0 ] || [ "$s" != 0 ]; then failed; fi
  i=$((i + 1))
done
""" + sync.RECEIVE_END).replace("CHUNK", str(CHUNK))

# Where the pull of $1 stands: "@@meta ..." (what START kept), "@@rc RC ALIVE", "@@done BYTES" (the ranges
# ended, and the running one's dd position), and once it ended "@@time BEGAN ENDED", per range "@@range I
# SRC_RC RX_RC FULL+PARTIAL" (the receiving dd's records out) and each side's stderr tail.
POLL = sync.POLL_HEAD + r"""
done=0 i=0
while [ -f "$D/$i.at" ]; do
  set -- $(cat "$D/$i.at")
  if [ -f "$D/$i.rx.rc" ]; then
    done=$((done + $2))
  else
    pos=$(awk '/^pos:/ { print $2 }' "/proc/$(cat "$D/$i.dd" 2>/dev/null)/fdinfo/1" 2>/dev/null)
    [ -n "$pos" ] && [ "$pos" -ge "$1" ] && done=$((done + pos - $1))
  fi
  i=$((i + 1))
done
echo "@@done $done"
[ "$rc" = - ] && exit 0
echo "@@time $(cat "$D/began" 2>/dev/null) $(cat "$D/ended" 2>/dev/null)"
i=0
while [ -f "$D/$i.at" ]; do
  echo "@@range $i $(cat "$D/$i.src.rc" 2>/dev/null || echo -) $(cat "$D/$i.rx.rc" 2>/dev/null || echo -)" \
       "$(sed -n 's/^\([0-9]*+[0-9]*\) records out$/\1/p' "$D/$i.rx" 2>/dev/null)"
  echo "@@src $i"; tail -n 4 "$D/$i.src" 2>/dev/null
  echo "@@rx $i"; grep -v 'records' "$D/$i.rx" 2>/dev/null | tail -n 4
  i=$((i + 1))
done
"""


class _Pull(sync.PullState):
    """Where a block pull in the receiver stands (POLL's answer)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        done = sync._marks(text, "done")
        self.bytes_done = int(done[0][0]) if done and done[0] else 0
        self.ranges = sync._marks(text, "range")


def _result(ctx: TaskContext, mig: Migration, p: _Pull, k: int, label: str, of: int) -> SyncRound:
    """The round as the pull's end says it (`of`: the chunks of its disks); an error (one line, a hint)
    when either end failed or the receiving dd wrote another amount than its range's."""
    for rg in p.ranges:
        i, src_rc, rx_rc = int(rg[0]), rg[1], rg[2]
        src_err = p.stderr.get(("src", i), [])
        rx_err = p.stderr.get(("rx", i), [])
        if src_rc != "0":
            sync.source_failure(mig, k, src_rc, src_err, "dd")
        if rx_rc != "0":
            why = next((ln for ln in reversed(rx_err) if ln), f"exit status {rx_rc}")
            raise PermanentError(f"round {k} of {mig.name}: dd in the receiver failed: {why}",
                                 f"see the task's log; ferry migration show {mig.name}")
    if p.rc != 0:
        raise PermanentError(f"round {k} of {mig.name} failed in the receiver (exit status {p.rc})",
                             "see the task's log")
    meta = p.meta
    expected = [int(x) for x in meta[4].split(",")] if len(meta) > 4 and meta[4] != "-" else []
    if len(p.ranges) != len(expected):
        raise TransientError(f"round {k} of {mig.name}: the receiver pulled {len(p.ranges)} of {len(expected)} "
                             "ranges", "the round starts again: the same command")
    for rg, n in zip(p.ranges, expected):
        full, _, part = (rg[3] if len(rg) > 3 else "").partition("+")
        if not full.isdigit() or int(full) != n // CHUNK or int(part or 0) != (1 if n % CHUNK else 0):
            raise TransientError(f"round {k} of {mig.name}: range {rg[0]} wrote {rg[3] if len(rg) > 3 else 'nothing'}"
                                 f" records of {_size(CHUNK)}, not the {_size(n)} it was sent (cut short?)",
                                 "the round starts again: the same command")
    started = float(meta[0]) if meta else time.time()
    hash_s = float(meta[2]) if len(meta) > 2 else 0.0
    seconds = round((p.seconds or 0.0) + hash_s, 3)
    chunks = int(meta[3]) if len(meta) > 3 else 0
    return SyncRound(round=k, label=label, started=started, ended=started + seconds, duration_s=seconds,
                     bytes=sum(expected), items=chunks, task=ctx.id, chunks=of)


def describe(r: SyncRound) -> str:
    """One line: round 2 (incremental): 12.0 MiB, 3 of 512 chunk(s) of 4 MiB, in 41.2 s."""
    of = f" of {r.chunks}" if r.chunks is not None else ""
    return (f"round {r.round} ({r.label}): {_size(r.bytes)}, {r.items}{of} chunk(s) of {_size(CHUNK)}, "
            f"in {r.duration_s:.1f} s")


# ------------------------------------------------------------------ a round


async def run_round(ctx: TaskContext, svc: Any, mig: Migration, *, label: str,
                    becomes: MigrationState | None = None, measure_after: bool = False, full: bool = False
                    ) -> SyncRound:
    """One block-level sync round (the module's phases), recorded and returned: as sync.run_round, whose
    contract it keeps. `full`: the target ran from its disk since the last round: its own chunks are the
    base (hashed in the receiver). Called by sync.run_round, which has loaded `mig` and returned a round
    this task recorded already."""
    k = mig.round + 1
    disks = disks_of(mig)
    of = sum(d.chunks for d in disks)
    token, sdir = sync._token(ctx, k), sync._state_dir(mig.name)
    rx = receiver_transport(svc, mig.target)
    src = source_transport(svc.pool, mig)
    try:
        ctx.progress(item=f"round {k} ({label}): looking for its pull in the receiver", units_done=0,
                     units_total=len(disks), bytes_done=0)
        try:
            state = await sync._poll(mig, rx, sdir, token, POLL, _Pull)
        except FerryError as e:
            raise sync._receiver_error(mig, e) from None
        if state.gone:
            started = time.time()
            ctx.progress(item=f"round {k}: authorizing the pull key on the source")
            await sync.authorize_pull(svc, mig, rx, src)
            ctx.progress(item=f"round {k}: hashing the source's disks in {_size(CHUNK)} chunks (reads them whole)")
            lists = await _hash_pass(mig, src, disks, "fresh" if k == 1 else "next")
            ranges = []
            for d in disks:
                now = parse_list(lists.get(("now", d.source), ""), d, "source's hash list")
                committed = lists.get(("base", d.source), "")
                if k == 1 and not full:
                    base = zero_list(d)
                elif committed.strip() and not full:
                    base = parse_list(committed, d, "committed hash list")
                else:
                    ctx.progress(item=f"round {k}: hashing the target's {d.device} in the receiver (it was "
                                      "written outside the rounds)")
                    ctx.log(f"round {k}: {d.source}'s base is the target's own chunks (no committed list: "
                            "the target was written since the last round)")
                    base = await _target_list(mig, rx, d)
                ranges += changed_ranges(d, base, now)
            chunks = sum(r.count for r in ranges)
            expected = sum(r.bytes for r in ranges)
            hash_s = time.time() - started
            await svc.store.call(svc.store.migration_changed, mig.name,
                                 api.to_builtins(Change(bytes=expected, items=chunks, at=started, chunks=of)))
            s = mig.spec.source
            args = [sdir, token, RECEIVE, sync.PULL_KEY, str(s.port), f"{s.user}@{s.address}",
                    *(a for r in ranges for a in (r.disk.device, r.disk.source, str(r.start), str(r.count),
                                                  str(r.bytes)))]
            sizes = ",".join(str(r.bytes) for r in ranges) or "-"
            meta = f"{started} {expected} {hash_s:.3f} {chunks} {sizes}"
            try:
                with detached():
                    r = await rx.run(["sh", "-c", sync.START + f'\necho {meta} > "$D/meta"\n', "ferry-start", *args],
                                     timeout=60, check=True)
            except FerryError as e:
                raise sync._receiver_error(mig, e) from None
            ctx.log(f"round {k} ({label}): {mig.target.vm} pulls {_size(expected)} ({chunks} chunk(s) in "
                    f"{len(ranges)} range(s), hashed in {hash_s:.0f} s) from {s.target} directly"
                    + ("" if "started" in r.text() else " (its pull was under way)"))
        else:
            ctx.log(f"round {k} ({label}): the pull this task started in {mig.target.vm} is "
                    f"{'over' if state.rc is not None else 'still running'}: followed, not started again")
        state = await sync._follow(ctx, mig, rx, sdir, token, k, POLL, _Pull)
        rec = _result(ctx, mig, state, k, label, of)
        done = await sync.commit_round(ctx, svc, mig, src, [d.hashes for d in disks], rec, becomes)
        ctx.log(describe(rec))
    finally:
        await asyncio.gather(rx.close(), src.close(), return_exceptions=True)
    if measure_after and MEASURE_AFTER:
        try:
            change = await changed_since(svc, done)
            ctx.log(f"changed on the source while round {k} ran: {change.said}")
        except FerryError as e:
            ctx.log(f"could not measure what changed on the source while round {k} ran: {e.message}", "warning")
    return next((r for r in reversed(done.rounds) if r.round == k), rec)


# A measure after a round reads the source's disks once more (a hash pass): off, the round's own pass
# having measured the changes at its start.
MEASURE_AFTER = False


async def abort_round(svc: Any, mig: Migration, *, task: int | None = None) -> None:
    """A round stopped: the pull (of task `task`; None: any) killed in the receiver and its state removed,
    the lists-to-be removed on the source. Idempotent."""
    mig = await load(svc.store, mig.name)
    disks = disks_of(mig)
    rx = receiver_transport(svc, mig.target)
    src = source_transport(svc.pool, mig)
    try:
        with detached():
            await rx.run(["sh", "-c", sync.STOP, "ferry-stop", sync._state_dir(mig.name), f"{task}-" if task else ""],
                         timeout=60, check=True)
        await src.run(["rm", "-f", *(d.hashes + ".next" for d in disks)], timeout=60, check=True)
    finally:
        await asyncio.gather(rx.close(), src.close(), return_exceptions=True)


async def forget_lists(src, mig: Migration) -> None:
    """The lists removed on the source (idempotent): the target is written outside the rounds (a test
    launch, a cutover), so the next round's base is the target's own chunks; or the migration is
    finalized or rolled back."""
    await src.run(["rm", "-rf", f"{LISTS_DIR}/{mig.name}"], timeout=60, check=True)
