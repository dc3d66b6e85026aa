"""`migration.sync` (ferry migration sync NAME): a sync round, the receiver pulling from the source (E4-E6).

File-level, as the lead decided (notes/issue13.md, session 2026-12-03 (b)): the target's receiver pulls
with dropbear's `dbclient` straight from the source, GNU tar on both ends; Ferry's machine carries
control only (SSH to the receiver and to the source), never the data.

    receiver$ dbclient -i PULL_KEY -p PORT USER@SOURCE "tar -c -g SNAR.next ... ." | tar -x -G ...

One tar stream ("unit") per target partition that takes a source filesystem, extracted into that
partition mounted on its own at RX_MOUNTS/p<i> (never nested: an incremental extraction (-G) empties a
directory its archive lists without children, which is what a nested mount point is to
--one-file-system); the source mount points merged into the first partition's tree are named on the
first unit's command line (tar then dumps them whole despite --one-file-system). Every round runs with
--numeric-owner --xattrs --acls -p -S --no-check-device --one-file-system, excluding the plan's excludes
and Ferry's own folder SOURCE_DIR. --listed-incremental: round 1 is level 0 (any older snapshot removed),
later rounds send the files whose mtime/ctime changed and the directories' listings, so the extraction
deletes on the target what the source deleted (renames are a deletion and a new file).

A round, and what a kill -9 anywhere leaves (the same command, or `ferry task resume`, finishes it):
1. Setup in the receiver (idempotent): the partitions mounted; the pull key made there (dropbearkey, RAM
   only, it never leaves the receiver); its public line authorized on the source (replacing an older
   line of the same migration) with from="<receiver address>" and no forwarding/pty; the receiver's
   known_hosts holding only the source's host keys pinned in the workspace (`ferry migration trust`).
2. A dry run on the source (`tar -c -g <copy of SNAR> --totals -f /dev/null`: tar reads no file
   contents then): the bytes and files the round will move, recorded as "changed since" and shown as
   the round's total.
3. The pull, started detached in the receiver (setsid), under a token (task id, round): its state is in
   RX_STATE (pid, per unit exit codes, files, deletions, bytes). A run that finds its own token adopts
   the pull (running: it follows it; ended: it takes its result); any other pull there is killed first.
   The source writes SNAR.next (a copy of SNAR); the receiver flushes (sync) before it reports success.
4. Only a pull that ended well on both ends renames SNAR.next to SNAR on the source (`[ -f next ] && mv`:
   idempotent); a killed or failed round is simply done again from SNAR.
5. The round recorded (bytes, files, deletions, duration), with the state change if any, in one
   transaction, audited; a resumed task finds its round recorded and only reports it.
A cancel (or a failure) kills the pull in the receiver, removes SNAR.next, and puts a first round's
migration back to target_prepared; a later round's state never changed.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from typing import Any, NamedTuple

from .. import api
from ..errors import FerryError, HostKeyError, PermanentError, Refused, TransientError, TransportError
from ..fmt import size as _size
from ..helpers import detached
from ..tasks import TaskContext, TaskKind, register
from .model import SOURCE_DIR, Change, Method, Migration, MigrationState, SyncRound
from .prepare import ensure_receiver, receiver_transport
from .service import AssessMigration, load, source_transport

RX_STATE = "/run/ferry-sync"        # in the receiver: the pull's state (RAM: gone with the receiver)
RX_MOUNTS = "/run/ferry-target"     # in the receiver: target partition i at p<i>
PULL_KEY = "/root/.ssh/ferry_pull"  # in the receiver: the pull key (dropbear's format)
RECORD = 10240                      # GNU tar's record: --checkpoint counts these
CHECKPOINT_RECORDS = 100            # a progress line per ~1 MiB
POLL_S = 1.0
# dbclient's receive window: its default (24 KiB) caps a stream at 24 KiB per round trip (under 2 MB/s
# between two TCG guests here); 4 MiB made the same pull 2.5 times faster.
RECEIVE_WINDOW = 4 << 20
# dbclient's keepalive (-K): now and then dbclient ends only at its next keepalive after the source's
# command ended (seen: 15 s after the last byte, with -K 15), which a round (and a cutover's offline
# sync, in the downtime) would wait out. 5 s bounds that wait; the source is given up after three
# unanswered keepalives (15 s without a word).
KEEPALIVE_S = 5
LOST_POLLS = 30                     # the receiver unreachable this many polls in a row: a transient failure
TAR_CREATE = ("--one-file-system", "--numeric-owner", "--xattrs", "--acls", "-p", "-S", "--no-check-device")
TAR_EXTRACT = ("--numeric-owner", "-p", "--xattrs", "--xattrs-include=*", "--acls")
RATE_ROUNDS = 5                     # the recent rounds a prediction learns from
# A first round's probe of the data path: samples of its own stream, each cut after PROBE_BYTES: big files
# (what a byte costs), small files (what a file costs), and nothing (what a connection costs).
PROBE_BYTES = 16 << 20
PROBE_SMALL_FILES = 1000          # names: the excludes leave fewer (55 of 400 on the lab's source)
PROBE_CP = 1                        # a probe's checkpoint: every record (10 KiB) extracted, its time
PROBE_MIN = 128 << 20               # below this a first round is not probed (it takes about as long)

S = MigrationState
SYNCABLE = (S.TARGET_PREPARED, S.INITIAL_SYNC, S.SYNCING, S.READY, S.ROLLED_BACK)


def _block():
    """The block-level rounds (blocksync builds on this module's pull machinery: imported when used)."""
    from . import blocksync
    return blocksync


def tag(name: str) -> str:
    """The comment of the pull key's line in the source user's authorized_keys."""
    return f"ferry-migration:{name}"


# ------------------------------------------------------------------ what a round copies


class Unit:
    """One tar stream: a source filesystem (and the mount points merged into it) into a target partition."""

    def __init__(self, index: int, root: str, paths: tuple[str, ...], device: str, name: str) -> None:
        self.index = index
        self.root = root                    # the source's mount point ("/")
        self.paths = paths                  # what tar archives, relative to root: "." and merged ("./var")
        self.device = device                # the partition in the receiver (/dev/vda1)
        self.dest = f"{RX_MOUNTS}/p{index}"
        self.snar = f"{SOURCE_DIR}/{name}/p{index}.snar"


def _file_target(mig: Migration):
    t = mig.target
    if t is None:
        raise Refused(f"migration {mig.name} has no prepared target", f"ferry migration prepare {mig.name}")
    if t.method != Method.FILE:
        raise Refused(f"migration {mig.name} is block-level: it has no tar streams",
                      "its rounds are blocksync's (sync.run_round dispatches)")
    return t


def units_of(mig: Migration) -> list[Unit]:
    """The tar streams of a round: one per target partition that takes a source filesystem; the merged
    mount points go with the first partition's (named relative to its root)."""
    t = _file_target(mig)
    out: list[Unit] = []
    for i, p in enumerate(t.partitions):
        if not p.source:
            continue
        paths = ["."]
        if not out:
            for m in t.merged:
                rel = _under(m, p.source)
                if rel:
                    paths.append(f"./{rel}")
        out.append(Unit(i, p.source, tuple(paths), p.device, mig.name))
    if not out:
        raise Refused(f"the target of {mig.name} has no partition that takes a source filesystem",
                      f"ferry migration show {mig.name}")
    return out


def _under(path: str, root: str) -> str | None:
    """`path` relative to `root` when it lies under it ("" for root itself), else None."""
    path = "/" + path.strip("/")
    root = "/" + root.strip("/")
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    return path[len(root) + 1:] if path.startswith(root + "/") else None


def excludes_of(mig: Migration, unit: Unit) -> list[str]:
    """The plan's excludes and Ferry's folder, as anchored patterns of the unit's member names (./tmp/*)."""
    out = []
    for pattern in (*mig.spec.excludes, SOURCE_DIR):
        rel = _under(pattern, unit.root)
        if rel:
            out.append(f"./{rel}")
    return out


def source_command(mig: Migration, unit: Unit, *, level0: bool) -> str:
    """What the receiver asks the source to run (its login shell) for one unit: SNAR.next from SNAR
    (or none: level 0), then the archive on stdout and its totals on stderr."""
    q = shlex.quote
    d, snar, nxt = f"{SOURCE_DIR}/{mig.name}", unit.snar, unit.snar + ".next"
    start = (f"rm -f {q(snar)} {q(nxt)}" if level0 else
             f"if [ -f {q(snar)} ]; then cp {q(snar)} {q(nxt)}; else rm -f {q(nxt)}; fi")
    tar = ["tar", "-c", "-f", "-", "-C", unit.root, "-g", nxt, *TAR_CREATE, "--anchored",
           *(f"--exclude={e}" for e in excludes_of(mig, unit)), "--totals", "--", *unit.paths]
    return (f"set -e; umask 077; mkdir -p {q(d)}; {start}; "
            f"exec {' '.join(q(a) for a in tar)}")


def probe_list(mig: Migration, sample: str) -> str:
    """Where the source keeps a probe sample's file names (found before the sample is timed)."""
    return f"/run/ferry-migration/{mig.name}/probe-{sample}.list"


def probe_list_command(mig: Migration, unit: Unit, sample: str) -> str:
    """What Ferry runs on the source, untimed, before a probe sample: the names of the big files ("big":
    over 1 MiB, 64) or the small ones ("small": under 16 KiB, PROBE_SMALL_FILES) under the unit's paths
    (one filesystem), into probe_list. (Timed, the search for them cost more than sending them, and
    varied tenfold with the source's cache.)"""
    q = shlex.quote
    size, count = ("+1M", 64) if sample == "big" else ("-16k", PROBE_SMALL_FILES)
    find = ["find", *unit.paths, "-xdev", "-type", "f", "-size", size, "-print0"]
    path = probe_list(mig, sample)
    return (f"umask 077; mkdir -p {q(path.rsplit('/', 1)[0])} && cd {q(unit.root)} && "
            f"{{ {' '.join(q(a) for a in find)} 2>/dev/null | head -z -n {count} > {q(path)}; }}")


def probe_command(mig: Migration, unit: Unit, sample: str) -> str:
    """What the receiver asks the source to run for a probe sample: the unit's own tar options over the
    names probe_list_command found (the excludes applied by tar), cut after PROBE_BYTES; "none":
    nothing, for the connection's own cost."""
    if sample == "none":
        return "true"
    q = shlex.quote
    tar = ["tar", "-c", "-f", "-", *TAR_CREATE, "--anchored", *(f"--exclude={e}" for e in excludes_of(mig, unit)),
           "--null", "--no-recursion", "-T", probe_list(mig, sample)]
    # the source's own reading time, on its stderr (the receiver keeps it): "@@src BEGAN ENDED"
    up = "$(cut -d' ' -f1 /proc/uptime)"
    return (f"cd {q(unit.root)} && b={up} && {{ {' '.join(q(a) for a in tar)} 2>/dev/null | head -c {PROBE_BYTES}; }} "
            f"&& echo \"@@src $b {up}\" >&2")


# On the source: the dry run of one unit ($1 Ferry's folder, $2 SNAR or "-" for level 0, $3 the root,
# then tar's options and paths): the bytes and files a round would move now (tar reads no contents when
# its archive is /dev/null), printed as "@@dry BYTES FILES".
DRY = r"""
set -e
umask 077
d=$1 snar=$2 root=$3; shift 3
mkdir -p "$d"
t=$(mktemp "$d/dry.XXXXXX")
if [ "$snar" != - ] && [ -f "$snar" ]; then cp "$snar" "$t"; else rm -f "$t"; fi
files=$(tar -c -f /dev/null -C "$root" -g "$t" "$@" 2>"$t.err" | awk '!/\/$/ { n++ } END { print n + 0 }')
bytes=$(sed -n 's/^Total bytes written: \([0-9]*\).*/\1/p' "$t.err")
if [ -z "$bytes" ]; then tail -n 3 "$t.err" >&2; rm -f "$t" "$t.err"; exit 2; fi
rm -f "$t" "$t.err"
echo "@@dry $bytes $files"
"""


def _dry_args(mig: Migration, u: Unit, *, level0: bool) -> list[str]:
    return [f"{SOURCE_DIR}/{mig.name}", "-" if level0 else u.snar, u.root, *TAR_CREATE, "--anchored",
            *(f"--exclude={e}" for e in excludes_of(mig, u)), "--totals", "-v", "--", *u.paths]


# ------------------------------------------------------------------ scripts in the receiver (busybox sh)

# Each partition given as DEVICE DIR: mounted there unless it is already.
MOUNT = r"""
set -e
while [ $# -gt 1 ]; do
  dev=$1 dir=$2; shift 2
  mkdir -p "$dir"
  awk -v d="$dir" '$2 == d { f = 1 } END { exit !f }' /proc/mounts || mount -t ext4 "$dev" "$dir"
done
"""

# The pull key (made once per receiver boot, in RAM); prints its public line.
PULL_KEY_SCRIPT = r"""
set -e
mkdir -p /root/.ssh
chmod 700 /root/.ssh
[ -f "$1" ] || dropbearkey -t ed25519 -f "$1" >/dev/null 2>&1
dropbearkey -y -f "$1" | grep '^ssh-ed25519 ' | cut -d' ' -f1-2
"""

def fill(script: str) -> str:
    """A receiver script with its placeholders filled: TAR_EXTRACT (tar's extract options), CHECKPOINT
    and PROBE_CP (records between checkpoints of a round and of a probe), WINDOW and KEEPALIVE
    (dbclient's -W and -K)."""
    for name, value in (("TAR_EXTRACT", " ".join(shlex.quote(a) for a in TAR_EXTRACT)),
                        ("CHECKPOINT", str(CHECKPOINT_RECORDS)), ("PROBE_CP", str(PROBE_CP)),
                        ("WINDOW", str(RECEIVE_WINDOW)), ("KEEPALIVE", str(KEEPALIVE_S))):
        script = script.replace(name, value)
    return script


# The pull of a round, detached: $1 state folder, $2 key, $3 port, $4 user@host; then DEST COMMAND per
# unit (GNU tar by its path: busybox's sh runs its own applets before $PATH). Each unit's exit codes, files
# and deletions (from tar's listing) and stderr (checkpoints, totals) land in the state folder; rc last,
# after a sync.
# (RECEIVE_HEAD and RECEIVE_END: how every pull, file- and block-level, begins and ends; a failed unit
# calls failed)
RECEIVE_HEAD = r"""
D=$1 KEY=$2 PORT=$3 UH=$4; shift 4
echo $$ > "$D/pid"
export HOME=/root
cut -d' ' -f1 /proc/uptime > "$D/began"
failed() { cut -d' ' -f1 /proc/uptime > "$D/ended"; echo 1 > "$D/rc"; exit 1; }
"""
RECEIVE_END = r"""
sync
cut -d' ' -f1 /proc/uptime > "$D/ended"
echo 0 > "$D/rc"
"""
RECEIVE = fill(RECEIVE_HEAD + r"""
# tar names the users and groups of ACLs: it resolves them with the source's passwd and group (given in
# $D.ids), bound over the receiver's own in a mount namespace of its own
names() {
  if [ -s "$D.ids/passwd" ] && [ -s "$D.ids/group" ]; then
    unshare -m sh -c 'mount --bind "$0/passwd" /etc/passwd && mount --bind "$0/group" /etc/group && exec "$@"' \
      "$D.ids" "$@"
  else
    "$@"
  fi
}
i=0
while [ $# -gt 1 ]; do
  dest=$1 cmd=$2; shift 2
  { dbclient -T -K KEEPALIVE -W WINDOW -i "$KEY" -p "$PORT" "$UH" "$cmd" 2>"$D/$i.src" & echo $! > "$D/$i.dbclient"
    wait $!; echo $? > "$D/$i.src.rc"; } \
  | { names /bin/tar -x -G -v -f - -C "$dest" TAR_EXTRACT --checkpoint=CHECKPOINT \
        --checkpoint-action='echo=CP %u' --totals 2>"$D/$i.rx"; r=$?; echo $r > "$D/$i.rx.rc"
      # (dbclient does not end when what it writes to has: it would wait for the source forever)
      [ $r = 0 ] || kill "$(cat "$D/$i.dbclient")" 2>/dev/null; } \
  | awk '/^[^ ]*tar: Deleting / { d++; next } !/\/$/ { n++ } END { print n + 0, d + 0 }' > "$D/$i.items"
  s=$(cat "$D/$i.src.rc") r=$(cat "$D/$i.rx.rc")
  if [ "$r" != 0 ] || { [ "$s" != 0 ] && [ "$s" != 1 ]; }; then failed; fi
  i=$((i + 1))
done
""" + RECEIVE_END)

# A probe sample of the data path before a first round ($1 key, $2 port, $3 user@host, $4 the partition's
# mount, $5 the source's command): pulled and extracted as a round does, into a scratch folder of the
# target partition (removed after); prints "@@probe BYTES FILES BEGAN PIPED ENDED" (uptime seconds: the
# start, the pipeline's end, the flush's end) and the source's "@@src BEGAN ENDED" (its clock).
PROBE = fill(r"""
KEY=$1 PORT=$2 UH=$3 DEST=$4 CMD=$5
export HOME=/root
P="$DEST/.ferry-probe" F=/run/ferry-probe.fifo N=/run/ferry-probe.n E=/run/ferry-probe.err
C=/run/ferry-probe.cp T=/run/ferry-probe.at
rm -rf "$P" "$F" "$N" "$E" "$C" "$T"; mkdir -p "$P"; mkfifo "$F" "$C"
wc -c < "$F" > "$N" &
# when each checkpoint of the extraction came (every PROBE_CP records): "@@at UPTIME RECORDS"
awk '/tar: CP / { getline u < "/proc/uptime"; close("/proc/uptime"); split(u, a, " "); print "@@at", a[1], $NF }' \
  < "$C" > "$T" &
b=$(cut -d' ' -f1 /proc/uptime)
files=$(dbclient -T -K KEEPALIVE -W WINDOW -i "$KEY" -p "$PORT" "$UH" "$CMD" 2>"$E" </dev/null | tee "$F" \
  | /bin/tar -x -v -f - -C "$P" TAR_EXTRACT --checkpoint=PROBE_CP --checkpoint-action='echo=CP %u' 2>"$C" | wc -l)
p=$(cut -d' ' -f1 /proc/uptime)
sync
e=$(cut -d' ' -f1 /proc/uptime)
wait
echo "@@probe $(cat "$N" 2>/dev/null || echo 0) $files $b $p $e"
grep -a '^@@src ' "$E" | tail -n 1
cat "$T"
rm -rf "$P" "$F" "$N" "$E" "$C" "$T"
""")

# Starts the pull under a token ($1 state folder, $2 token, $3 the RECEIVE script, then its arguments
# after the state folder), unless a pull of that token runs or ended there. Prints "@@pull STATE":
# started, running or ended.
START = r"""
D=$1 TOKEN=$2 SCRIPT=$3; shift 3
pid=$(cat "$D/pid" 2>/dev/null || true)
alive=0
[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
if [ "$(cat "$D/token" 2>/dev/null)" = "$TOKEN" ]; then
  [ -f "$D/rc" ] && { echo "@@pull ended"; exit 0; }
  [ $alive = 1 ] && { echo "@@pull running"; exit 0; }
fi
if [ $alive = 1 ]; then kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid"; fi
rm -rf "$D"
mkdir -p "$D"
echo "$TOKEN" > "$D/token"
setsid sh -c "$SCRIPT" ferry-pull "$D" "$@" </dev/null >"$D/log" 2>&1 &
echo $! > "$D/pid"
echo "@@pull started"
"""

# Where the pull of $1 stands: "@@meta STARTED TOTAL DRY_S" (what START kept), "@@rc RC ALIVE" (RC "-"
# while it runs), "@@cp UNIT RECORDS" per unit, and once it ended, per unit "@@unit I SRC_RC RX_RC FILES
# DELETED BYTES" and the tail of each side's stderr ("@@src I" / "@@rx I" then lines). "@@gone" when there
# is no such pull.
# (POLL_HEAD: the lines every pull's POLL starts with, file- and block-level; PullState reads them)
POLL_HEAD = r"""
D=$1 TOKEN=$2
[ "$(cat "$D/token" 2>/dev/null)" = "$TOKEN" ] || { echo "@@gone"; exit 0; }
echo "@@meta $(cat "$D/meta" 2>/dev/null)"
rc=$(cat "$D/rc" 2>/dev/null || echo -)
pid=$(cat "$D/pid" 2>/dev/null || true)
alive=0
[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
echo "@@rc $rc $alive"
"""
POLL = POLL_HEAD + r"""
i=0
while [ -f "$D/$i.rx" ]; do
  echo "@@cp $i $(sed -n 's/^[^ ]*tar: CP \([0-9]*\)$/\1/p' "$D/$i.rx" | tail -n 1)"
  i=$((i + 1))
done
[ "$rc" = - ] && exit 0
echo "@@time $(cat "$D/began" 2>/dev/null) $(cat "$D/ended" 2>/dev/null)"
i=0
while [ -f "$D/$i.src.rc" ] || [ -f "$D/$i.rx.rc" ]; do
  echo "@@unit $i $(cat "$D/$i.src.rc" 2>/dev/null || echo -) $(cat "$D/$i.rx.rc" 2>/dev/null || echo -)" \
       "$(cat "$D/$i.items" 2>/dev/null || echo 0 0)" \
       "$(sed -n 's/^Total bytes read: \([0-9]*\).*/\1/p' "$D/$i.rx")"
  echo "@@src $i"; grep -v '^Total bytes' "$D/$i.src" | tail -n 4
  echo "@@rx $i"; grep -v '^[^ ]*tar: CP \|^Total bytes' "$D/$i.rx" | tail -n 4
  i=$((i + 1))
done
"""

# Kills the pull of the state folder $1 when its token starts with $2 (a task's: "ID-"; "": any).
STOP = r"""
case "$(cat "$1/token" 2>/dev/null)" in "$2"*) ;; *) exit 0 ;; esac
pid=$(cat "$1/pid" 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid"; fi
rm -rf "$1"
"""


# ------------------------------------------------------------------ scripts on the source (POSIX sh)

# The pull key's line in the user's authorized_keys: $1 the line ("" removes), $2 its comment. Lines of
# that comment go (an older key of the same migration), the file is replaced atomically (cp -p keeps
# its owner and mode), nothing else changes.
AUTHORIZE = r"""
set -e
umask 077
line=$1 tag=$2
mkdir -p "$HOME/.ssh"
f="$HOME/.ssh/authorized_keys"
[ -f "$f" ] || { [ -n "$line" ] || exit 0; : > "$f"; }
if [ -n "$line" ] && grep -qxF -- "$line" "$f" && [ "$(awk -v t="$tag" '$NF == t' "$f" | wc -l)" -eq 1 ]; then
  exit 0
fi
cp -p "$f" "$f.ferry-tmp"
awk -v t="$tag" '$NF != t' "$f" > "$f.ferry-tmp"
[ -z "$line" ] || printf '%s\n' "$line" >> "$f.ferry-tmp"
mv -f "$f.ferry-tmp" "$f"
"""

# Each unit's SNAR.next becomes its SNAR (a round done on both ends); idempotent.
COMMIT = r"""
set -e
for snar in "$@"; do
  if [ -f "$snar.next" ]; then mv -f "$snar.next" "$snar"; fi
done
sync
"""


# ------------------------------------------------------------------ the pull's setup


def _marks(text: str, mark: str) -> list[list[str]]:
    return [ln.split()[1:] for ln in text.splitlines() if ln.startswith(f"@@{mark} ") or ln == f"@@{mark}"]


def _source_error(mig: Migration, e: FerryError) -> FerryError:
    """An error of Ferry's SSH to the source, said of the migration's source."""
    src = mig.spec.source
    if isinstance(e, HostKeyError):
        return HostKeyError(f"the source of {mig.name}: {e.message}",
                            f"check the fingerprint on the source, then: ferry migration trust {mig.name}",
                            host=e.host, fingerprint=e.fingerprint, changed=e.changed)
    cls = TransientError if isinstance(e, TransientError) else PermanentError
    return cls(f"the source of {mig.name} ({src.target}): {e.message}", e.hint)


def _receiver_error(mig: Migration, e: FerryError) -> FerryError:
    cls = TransientError if isinstance(e, TransientError) else PermanentError
    return cls(f"the receiver of {mig.name} ({mig.target.vm} at {mig.target.address}): {e.message}",
               e.hint or f"is {mig.target.vm} running? ferry vm show {mig.target.vm}")


def pinned_source_keys(svc: Any, mig: Migration) -> list[str]:
    """The source's host keys trusted in the workspace ("type base64" each); Refused when none."""
    from ..transport.knownhosts import TrustStore, public_line
    src = mig.spec.source
    keys = TrustStore.load_sync(svc.pool.known_hosts).trusted_keys(src.address, src.address, src.port)
    if not keys:
        raise Refused(f"the source of {mig.name} has no trusted host key: the receiver would not know it",
                      f"ferry migration trust {mig.name}")
    return [public_line(k) for k in keys]


async def _setup(svc: Any, mig: Migration, rx, src, units: list[Unit]) -> None:
    """The receiver ready to pull (idempotent): partitions mounted, then authorize_pull."""
    try:
        with detached():
            args = [a for u in units for a in (u.device, u.dest)]
            await rx.run(["sh", "-c", MOUNT, "ferry-mount", *args], timeout=120, check=True)
    except FerryError as e:
        raise _receiver_error(mig, e) from None
    await authorize_pull(svc, mig, rx, src)


async def authorize_pull(svc: Any, mig: Migration, rx, src) -> None:
    """The receiver ready to pull from the source (idempotent; file- and block-level): the pull key made
    there and authorized on the source, the source's pinned host keys its only known hosts."""
    s = mig.spec.source
    known = pinned_source_keys(svc, mig)
    names = [s.address] if s.port == 22 else [s.address, f"[{s.address}]:{s.port}"]
    try:
        with detached():
            pub = (await rx.run(["sh", "-c", PULL_KEY_SCRIPT, "ferry-key", PULL_KEY], timeout=60, check=True)).text()
            text = "".join(f"{n} {k}\n" for n in names for k in known)
            await rx.run(["sh", "-c", "umask 077; cat > /root/.ssh/known_hosts"], input=text.encode(), timeout=30,
                         check=True)
    except FerryError as e:
        raise _receiver_error(mig, e) from None
    pub = pub.strip()
    if not pub.startswith("ssh-ed25519 "):
        raise PermanentError(f"the receiver of {mig.name} made no pull key (dropbearkey said {pub!r})",
                             "the live image needs dropbearkey and dbclient (dropbear-bin)")
    line = (f'from="{mig.target.address}",no-agent-forwarding,no-port-forwarding,no-pty,no-X11-forwarding '
            f"{pub} {tag(mig.name)}")
    try:
        await src.run(["sh", "-c", AUTHORIZE, "ferry-authorize", line, tag(mig.name)], timeout=60, check=True)
    except FerryError as e:
        raise _source_error(mig, e) from None


async def _names(mig: Migration, rx, src, sdir: str) -> None:
    """The source's /etc/passwd and /etc/group into the receiver (SDIR.ids), for tar to resolve the users
    and groups ACLs name as the source does (RECEIVE's names())."""
    try:
        files = [(await src.run(["cat", f"/etc/{f}"], timeout=60, check=True)).stdout for f in ("passwd", "group")]
    except FerryError as e:
        raise _source_error(mig, e) from None
    try:
        with detached():
            for f, data in zip(("passwd", "group"), files):
                await rx.run(["sh", "-c", 'mkdir -p "$1" && cat > "$1/$2"', "ferry-ids", f"{sdir}.ids", f],
                             input=data, timeout=60, check=True)
    except FerryError as e:
        raise _receiver_error(mig, e) from None


async def remove_pull_key(t, name: str) -> None:
    """The migration's pull key out of the authorized_keys of the user `t` logs in as on the source
    (finalize and rollback); nothing else there changes. Idempotent."""
    await t.run(["sh", "-c", AUTHORIZE, "ferry-authorize", "", tag(name)], timeout=60, check=True)


class Sample(NamedTuple):
    """One probe sample: what crossed, and its seconds (from its start to its last byte extracted, plus
    the receiver's flush after it; of them the flush; the source's reading, its tar to its last byte,
    None when it did not say)."""
    bytes: int
    files: int
    seconds: float
    flush_s: float
    reading_s: float | None
    at: tuple[tuple[float, int], ...] = ()      # (seconds since its start, bytes extracted) at checkpoints
    tail_s: float = 0.0                         # from its last byte to its stream's end (not counted)

    def steady(self, skip: float = 0.25) -> tuple[float, int] | None:
        """(seconds, bytes) from the first checkpoint past `skip` of the bytes to the last: the sample
        without its start (the stream's ramp, what the guests first run)."""
        if len(self.at) < 3:
            return None
        first = next(p for p in self.at if p[1] >= skip * self.at[-1][1])
        dt, db = self.at[-1][0] - first[0], self.at[-1][1] - first[1]
        return (dt, db) if dt > 0 and db > 0 else None

    def text(self) -> str:
        parts = [f"flush {self.flush_s:.1f} s"] + ([] if self.reading_s is None else
                                                    [f"source reading {self.reading_s:.1f} s"])
        if self.at:
            parts.append(f"first byte at {self.at[0][0]:.1f} s")
        if (st := self.steady()) is not None:
            parts.append(f"{_size(st[1] / st[0])}/s after its first quarter")
        if self.tail_s >= 1:
            parts.append(f"its stream ended {self.tail_s:.1f} s after its last byte, not counted")
        return f"{_size(self.bytes)} in {self.files} files, {self.seconds:.1f} s ({', '.join(parts)})"


async def _sample(mig: Migration, rx, unit: Unit, sample: str) -> Sample:
    """One probe sample through the real pipeline."""
    s = mig.spec.source
    try:
        with detached():
            r = await rx.run(["sh", "-c", PROBE, "ferry-probe", PULL_KEY, str(s.port), f"{s.user}@{s.address}",
                              unit.dest, probe_command(mig, unit, sample)], timeout=600, check=True)
    except FerryError as e:
        raise _receiver_error(mig, e) from None
    got = parse_sample(r.text())
    if got is None:
        raise PermanentError(f"the probe of {mig.name}'s data path said nothing", r.text().strip()[-200:])
    return got


def parse_sample(text: str) -> Sample | None:
    """A sample from what PROBE printed (None when it printed no "@@probe" line). Timed to its last byte
    extracted (its last checkpoint), then the flush: a stream that takes long to end after its data
    (seen: 15 s now and then) says nothing of the data path."""
    m, src = _marks(text, "probe"), _marks(text, "src")
    if not m or len(m[0]) != 5:
        return None
    n, files = int(m[0][0]), int(m[0][1])
    began, piped, ended = (float(v) for v in m[0][2:])
    reading = float(src[0][1]) - float(src[0][0]) if src and len(src[0]) == 2 else None
    # checkpoint u comes as tar is about to read record u: u - 1 records have come (none: nothing yet)
    at = tuple((float(v[0]) - began, (int(v[1]) - 1) * RECORD) for v in _marks(text, "at")
               if len(v) == 2 and int(v[1]) > 1)
    last = at[-1][0] if at else piped - began
    flush = max(0.0, ended - piped)
    return Sample(n, files, max(0.0, last) + flush, flush, reading, at, max(0.0, piped - began - last))


def probe_fit(samples: dict[str, Sample]) -> tuple[float, float, float] | None:
    """(seconds per connection, per byte, per file) from the probe's samples: "none" gives the first;
    the big and the small files' samples the other two (two equations, two unknowns). None when the
    samples do not determine them (a source without big or small files: then the round is not
    predicted)."""
    c0 = samples["none"].seconds
    (b1, f1, t1), (b2, f2, t2) = (samples[k][:3] for k in ("big", "small"))
    t1, t2 = max(0.0, t1 - c0), max(0.0, t2 - c0)
    det = b1 * f2 - b2 * f1
    if b1 <= 0 or f2 <= 0 or det == 0:
        return None
    per_byte = (t1 * f2 - t2 * f1) / det
    per_file = (b1 * t2 - b2 * t1) / det
    if per_byte <= 0:
        per_byte, per_file = (t1 + t2) / (b1 + b2), 0.0
    return c0, per_byte, max(0.0, per_file)


def round_seconds(fit: tuple[float, float, float], nbytes: int, files: int, units: int = 1) -> float:
    """A round's pull predicted from the probe's fit (probe_fit): a connection per unit, then the bytes'
    time or the files' time, whichever is longer. Not their sum: the stream's stages run at once (the
    source's tar reading files, both ends' ciphers, the receiver's tar writing them), so the files'
    own cost hides behind the bytes' where another stage bears it (measured in the lab: the sum
    over-predicted a round by 25-40%, the longer of the two came within 15%)."""
    c0, per_byte, per_file = fit
    return units * c0 + max(nbytes * per_byte, files * per_file)


async def _probe(mig: Migration, rx, src, unit: Unit) -> tuple[dict[str, Sample], tuple | None]:
    """The data path measured as a round uses it: the samples, and their fit (probe_fit)."""
    for k in ("big", "small"):
        await src.run(["sh", "-c", probe_list_command(mig, unit, k)], timeout=600, check=True)
    samples = {k: await _sample(mig, rx, unit, k) for k in ("none", "big", "small")}
    return samples, probe_fit(samples)


async def _dry(mig: Migration, src, units: list[Unit], *, level0: bool) -> tuple[int, int]:
    """(bytes, files) a round would move now: the dry run of every unit on the source."""
    total = files = 0
    for u in units:
        try:
            r = await src.run(["sh", "-c", DRY, "ferry-dry", *_dry_args(mig, u, level0=level0)], timeout=1800,
                              check=True)
        except FerryError as e:
            raise _source_error(mig, e) from None
        found = _marks(r.text(), "dry")
        if not found or len(found[0]) != 2:
            raise PermanentError(f"the dry run on the source of {mig.name} said nothing for {u.root}",
                                 "GNU tar must be on the source (Debian: Essential)")
        total += int(found[0][0])
        files += int(found[0][1])
    return total, files


async def changed_since(svc: Any, mig: Migration) -> Change:
    """What changed on the source since the last round (bytes, files), measured by a dry run there
    (cheap: metadata only), recorded with its time (the migration's `changed`) and returned. Before
    the first round: everything. Block-level: blocksync.changed_since (it reads the source's disks)."""
    mig = await load(svc.store, mig.name)
    if mig.target is not None and mig.target.method == Method.BLOCK:
        return await _block().changed_since(svc, mig)
    units = units_of(mig)
    src = source_transport(svc.pool, mig)
    try:
        at = time.time()
        b, n = await _dry(mig, src, units, level0=mig.round == 0)
    finally:
        await src.close()
    change = Change(bytes=b, items=n, at=at)
    await svc.store.call(svc.store.migration_changed, mig.name, api.to_builtins(change))
    return change


# ------------------------------------------------------------------ a round


def _token(ctx: TaskContext, k: int) -> str:
    return f"{ctx.id}-{k}"


def _state_dir(name: str) -> str:
    return f"{RX_STATE}/{name}"


async def run_round(ctx: TaskContext, svc: Any, mig: Migration, *, label: str,
                    becomes: MigrationState | None = None, measure_after: bool = False, full: bool = False
                    ) -> SyncRound:
    """One sync round of a file-level migration, the receiver pulling from the source (see the module's
    phases), recorded (bytes, files, deletions, duration) and returned; with `becomes`, the migration
    goes to that state in the same transaction; with `measure_after`, what changed while it ran is
    measured at once (changed_since). Idempotent for a task: a round this task recorded with this label
    is returned as it is; a pull this task started is followed (or its result taken). Block-level
    targets: blocksync.run_round, with the same contract."""
    mig = await load(svc.store, mig.name)
    last = mig.rounds[-1] if mig.rounds else None
    if last is not None and last.task == ctx.id and last.label == label:
        return last
    if mig.target is not None and mig.target.method == Method.BLOCK:
        return await _block().run_round(ctx, svc, mig, label=label, becomes=becomes, measure_after=measure_after,
                                        full=full)
    k = mig.round + 1
    level0 = k == 1 or full
    units = units_of(mig)
    token, sdir = _token(ctx, k), _state_dir(mig.name)
    rx = receiver_transport(svc, mig.target)
    src = source_transport(svc.pool, mig)
    try:
        ctx.progress(item=f"round {k} ({label}): looking for its pull in the receiver", units_done=0,
                     units_total=len(units), bytes_done=0)
        try:
            state = await _poll(mig, rx, sdir, token)
        except FerryError as e:
            raise _receiver_error(mig, e) from None
        if state.gone:
            started = time.time()
            ctx.progress(item=f"round {k}: mounting the target, authorizing the pull key on the source")
            await _setup(svc, mig, rx, src, units)
            await _names(mig, rx, src, sdir)
            ctx.progress(item=f"round {k}: measuring what changed on the source")
            expected, files = await _dry(mig, src, units, level0=level0)
            predicted = None
            if level0 and expected >= PROBE_MIN:
                ctx.progress(item=f"round {k}: probing the data path {mig.spec.source.target} -> {mig.target.vm}")
                samples, fit = await _probe(mig, rx, src, units[0])
                said = "; ".join(f"{k_}: {v_.text()}" for k_, v_ in samples.items())
                if fit:
                    _, per_byte, per_file = fit
                    predicted = round(time.time() - started + round_seconds(fit, expected, files, len(units)), 1)
                    ctx.log(f"round {k}: the data path probed ({said}): {_size(1 / per_byte)}/s and "
                            f"{per_file * 1000:.1f} ms a file; {_size(expected)} in {files} files predicted to take "
                            f"{predicted:.0f} s")
                else:
                    ctx.log(f"round {k}: the data path probed ({said}): too few big or small files to predict "
                            "the round", "warning")
            dry_s = time.time() - started
            await svc.store.call(svc.store.migration_changed, mig.name,
                                 api.to_builtins(Change(bytes=expected, items=files, at=started)))
            cmds = [a for u in units for a in (u.dest, source_command(mig, u, level0=level0))]
            s = mig.spec.source
            args = [sdir, token, RECEIVE, PULL_KEY, str(s.port), f"{s.user}@{s.address}", *cmds]
            # the round's start, total and dry-run time, kept with the pull for a resume to find
            meta = f"{started} {expected} {dry_s:.3f} {predicted if predicted is not None else '-'}"
            try:
                with detached():
                    r = await rx.run(["sh", "-c", START + f'\necho {meta} > "$D/meta"\n', "ferry-start", *args],
                                     timeout=60, check=True)
            except FerryError as e:
                raise _receiver_error(mig, e) from None
            ctx.log(f"round {k} ({label}): {mig.target.vm} pulls {_size(expected)} ({files} files) from "
                    f"{s.target} directly" + ("" if "started" in r.text() else " (its pull was under way)"))
        else:
            ctx.log(f"round {k} ({label}): the pull this task started in {mig.target.vm} is "
                    f"{'over' if state.rc is not None else 'still running'}: followed, not started again")
        state = await _follow(ctx, mig, rx, sdir, token, k)
        rec = _result(ctx, mig, state, k, label)
        done = await commit_round(ctx, svc, mig, src, [u.snar for u in units], rec, becomes)
        ctx.log(describe(rec))
    finally:
        await asyncio.gather(rx.close(), src.close(), return_exceptions=True)
    if measure_after:
        try:
            change = await changed_since(svc, done)
            ctx.log(f"changed on the source while round {k} ran: {_size(change.bytes)} in {change.items} file(s)")
        except FerryError as e:     # the round is done and recorded: a measure that failed changes nothing
            ctx.log(f"could not measure what changed on the source while round {k} ran: {e.message}", "warning")
    return next((r for r in reversed(done.rounds) if r.round == k), rec)


async def commit_round(ctx: TaskContext, svc: Any, mig: Migration, src, lists: list[str], rec: SyncRound,
                       becomes: MigrationState | None) -> Migration:
    """A pull that ended well on both ends: each of `lists` (on the source) becomes its .next (COMMIT), then
    the round recorded (with the state change, if any). Returns the migration as recorded."""
    try:
        await src.run(["sh", "-c", COMMIT, "ferry-commit", *lists], timeout=120, check=True)
    except FerryError as e:
        raise _source_error(mig, e) from None
    row = await svc.store.call(svc.store.migration_round, mig.name, api.to_builtins(rec),
                               allowed_from=(str(mig.state),), to=str(becomes) if becomes else None)
    ctx.progress(item=f"round {rec.round} done", units_done=len(lists), bytes_done=rec.bytes, bytes_total=rec.bytes)
    return api.convert(row, Migration)


class PullState:
    """Where a pull in the receiver stands, as a POLL script says it (file- and block-level): gone, its
    exit code (None while it runs), alive, what START kept (meta), its duration, each side's stderr tail;
    bytes_done its progress."""
    bytes_done = 0

    def __init__(self, text: str) -> None:
        self.gone = bool(_marks(text, "gone"))
        rc = _marks(text, "rc")
        self.rc = None if not rc or rc[0][0] == "-" else int(rc[0][0])
        self.alive = bool(rc) and rc[0][1] == "1"
        meta = _marks(text, "meta")
        self.meta = meta[0] if meta else []
        t = _marks(text, "time")
        self.seconds = float(t[0][1]) - float(t[0][0]) if t and len(t[0]) == 2 else None
        self.stderr: dict[tuple[str, int], list[str]] = {}
        key = None
        for ln in text.splitlines():
            if ln.startswith("@@src ") or ln.startswith("@@rx "):
                side, i = ln[2:].split()
                key = (side, int(i))
                self.stderr[key] = []
            elif ln.startswith("@@"):
                key = None
            elif key is not None and ln.strip():
                self.stderr[key].append(ln.strip())


class _Pull(PullState):
    """Where a tar pull stands: its checkpoints (records) and, once ended, its units."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.records = sum(int(c[1]) for c in _marks(text, "cp") if len(c) > 1)
        self.bytes_done = self.records * RECORD
        self.units = [u for u in _marks(text, "unit")]


async def _poll(mig: Migration, rx, sdir: str, token: str, script: str = POLL, parse: type = _Pull) -> Any:
    with detached():
        r = await rx.run(["sh", "-c", script, "ferry-poll", sdir, token], timeout=60, check=True)
    return parse(r.text())


async def _follow(ctx: TaskContext, mig: Migration, rx, sdir: str, token: str, k: int, script: str = POLL,
                  parse: type = _Pull) -> Any:
    """Polls the pull until it ended, reporting its bytes against the round's expected total."""
    lost = 0
    dead = 0
    while True:
        try:
            p = await _poll(mig, rx, sdir, token, script, parse)
            lost = 0
        except TransportError as e:
            lost += 1
            if lost >= LOST_POLLS:
                raise _receiver_error(mig, e) from None
            await asyncio.sleep(POLL_S)
            continue
        except FerryError as e:
            raise _receiver_error(mig, e) from None
        if p.gone:
            raise TransientError(f"the pull of round {k} of {mig.name} is gone from the receiver {mig.target.vm} "
                                 "(it restarted?)", "the round starts again: ferry task resume, or the same command")
        if p.rc is not None:
            return p
        if not p.alive:
            dead += 1       # (between its last word and its rc file, a moment)
            if dead >= 3:
                raise TransientError(f"the pull of round {k} of {mig.name} ended in the receiver without a "
                                     "result (killed?)", "the round starts again: ferry task resume, or the same "
                                     "command")
        expected = int(p.meta[1]) if len(p.meta) > 1 else 0
        done = p.bytes_done
        ctx.progress(item=f"round {k}: pulling from {mig.spec.source.target}", bytes_done=min(done, expected)
                     if expected else done, bytes_total=expected or None)
        await asyncio.sleep(POLL_S)


def source_failure(mig: Migration, k: int, rc: str, err: list[str], tool: str) -> None:
    """Raises the error of a pull whose source side (dbclient, then `tool` on the source) ended with
    `rc`, said as the operator can act on it: host key, authentication, reachability, else the tool."""
    s = mig.spec.source
    why = next((ln for ln in reversed(err) if ln), f"exit status {rc}")
    text = " ".join(err)
    if "ost key" in text or "validate" in text:
        raise PermanentError(f"the receiver of {mig.name} does not trust the source {s.target}: {why}",
                             f"it trusts only the key pinned for the source: ferry migration trust {mig.name}")
    if "auth" in text.lower() or "denied" in text.lower():
        raise PermanentError(f"the source {s.target} refused the pull key of {mig.name}: {why}",
                             f"its sshd must take public keys for {s.user} from {mig.target.address} "
                             f"(~{s.user}/.ssh/authorized_keys, options from=...)")
    if "onnect" in text or "route" in text or "timed out" in text:
        raise TransientError(f"the receiver of {mig.name} cannot reach the source {s.target}: {why}",
                             f"{mig.target.address} must reach {s.address} port {s.port} directly")
    raise PermanentError(f"round {k} of {mig.name}: {tool} on the source failed: {why}",
                         "see the task's log; the round starts again with the same command")


def _result(ctx: TaskContext, mig: Migration, p: _Pull, k: int, label: str) -> SyncRound:
    """The round as the pull's end says it; an error (one line, a hint) when either end failed."""
    for u in p.units:
        i, src_rc, rx_rc = int(u[0]), u[1], u[2]
        src_err = p.stderr.get(("src", i), [])
        rx_err = p.stderr.get(("rx", i), [])
        if src_rc not in ("0", "1"):
            source_failure(mig, k, src_rc, src_err, "tar")
        if rx_rc != "0":
            why = next((ln for ln in reversed(rx_err) if ln), f"exit status {rx_rc}")
            raise PermanentError(f"round {k} of {mig.name}: tar in the receiver failed: {why}",
                                 f"is a target partition full? ferry migration show {mig.name}")
        if src_rc == "1":
            ctx.log(f"round {k}: some files on the source changed while they were read (the next round takes "
                    "them): " + "; ".join(src_err[-2:]), "warning")
    if p.rc != 0 or not p.units:
        raise PermanentError(f"round {k} of {mig.name} failed in the receiver (exit status {p.rc})",
                             "see the task's log")
    started = float(p.meta[0]) if p.meta else time.time()
    dry_s = float(p.meta[2]) if len(p.meta) > 2 else 0.0
    seconds = round((p.seconds or 0.0) + dry_s, 3)
    predicted = float(p.meta[3]) if len(p.meta) > 3 and p.meta[3] != "-" else None
    return SyncRound(round=k, label=label, started=started, ended=started + seconds, duration_s=seconds,
                     predicted_s=predicted,
                     bytes=sum(int(u[5]) if len(u) > 5 else 0 for u in p.units),
                     items=sum(int(u[3]) for u in p.units), deleted=sum(int(u[4]) for u in p.units), task=ctx.id)


async def abort_round(svc: Any, mig: Migration, *, task: int | None = None) -> None:
    """A round stopped (cancel, failure): the pull (of task `task`; None: any) killed in the receiver
    and its state there removed, SNAR.next removed on the source. Idempotent."""
    mig = await load(svc.store, mig.name)
    if mig.target is not None and mig.target.method == Method.BLOCK:
        return await _block().abort_round(svc, mig, task=task)
    units = units_of(mig)
    rx = receiver_transport(svc, mig.target)
    src = source_transport(svc.pool, mig)
    try:
        with detached():
            await rx.run(["sh", "-c", STOP, "ferry-stop", _state_dir(mig.name), f"{task}-" if task else ""],
                         timeout=60, check=True)
        await src.run(["rm", "-f", *(u.snar + ".next" for u in units)], timeout=60, check=True)
    finally:
        await asyncio.gather(rx.close(), src.close(), return_exceptions=True)


def describe(r: SyncRound) -> str:
    """One line: round 2 (incremental): 12.3 MiB, 45 file(s), 3 deleted, in 8.1 s (a block-level round's
    chunks as SyncRound.moved says them: the cutover's final syncs are described here whatever the method)."""
    return f"round {r.round} ({r.label}): {r.moved}, in {r.duration_s:.1f} s"


# ------------------------------------------------------------------ predictions


def _fit(rounds: tuple[SyncRound, ...]) -> tuple[float, float] | None:
    """(walk_s, bytes_per_s) of `duration = walk + bytes / throughput` through the recent rounds: the
    walk is what a round costs whatever it moves (the source's tree walked, the connections); the
    throughput what a byte costs. Fitted by least squares on the last RATE_ROUNDS rounds; a negative
    walk (or rounds of one size) falls back to walk 0 and the rounds' overall bytes per second."""
    recent = [r for r in rounds[-RATE_ROUNDS:] if r.duration_s > 0]
    if not recent or not sum(r.bytes for r in recent):
        return None
    n = len(recent)
    mx = sum(r.bytes for r in recent) / n
    my = sum(r.duration_s for r in recent) / n
    sxx = sum((r.bytes - mx) ** 2 for r in recent)
    if n >= 2 and sxx > 0:
        slope = sum((r.bytes - mx) * (r.duration_s - my) for r in recent) / sxx
        walk = my - slope * mx
        if slope > 0 and walk >= 0:
            return walk, 1 / slope
    return 0.0, sum(r.bytes for r in recent) / sum(r.duration_s for r in recent)


def _since(mig: Migration) -> float | None:
    """When the source's state the last round copied was taken (tar's snapshot time: the round's start)."""
    return mig.rounds[-1].started if mig.rounds else mig.last_sync


def change_rate(mig: Migration) -> float | None:
    """Bytes per second the source changes: the last measure of changes over the time since the last
    round's snapshot, else the last incremental round's bytes over the time between the two rounds'
    snapshots."""
    since = _since(mig)
    if mig.changed and since and mig.changed.at > since:
        return mig.changed.bytes / (mig.changed.at - since)
    for a, b in zip(reversed(mig.rounds[:-1]), reversed(mig.rounds[1:])):
        if b.round == a.round + 1 and b.started > a.started:
            return b.bytes / (b.started - a.started)
    return None


def predicted_final_sync_s(mig: Migration, *, offline: bool = False, now: float | None = None) -> float | None:
    """The final sync's predicted duration: walk + bytes / throughput (`_fit` of the recent rounds).
    Online (the final round while the source runs): the bytes changed since the last round's snapshot
    by now: the last measure, plus the change rate (change_rate) times the time since it was taken (or
    the rate times the time since the snapshot, unmeasured). Offline (after the services stopped): what
    changes while the online final round runs, at that rate. None before a round has moved anything,
    or without a change rate."""
    fit = _fit(mig.rounds)
    rate = change_rate(mig)
    since = _since(mig)
    if fit is None or not since:
        return None
    walk, bps = fit
    now = time.time() if now is None else now
    if mig.changed and mig.changed.at > since:
        online = mig.changed.bytes + (rate or 0) * max(0.0, now - mig.changed.at)
    elif rate is not None:
        online = rate * max(0.0, now - since)
    else:
        return None
    online_s = walk + online / bps
    if not offline:
        return round(online_s, 1)
    return round(walk + (rate or 0) * online_s / bps, 1)


def changed_bytes(mig: Migration) -> int | None:
    """The bytes the last measure found changed since the last round (None: not measured since)."""
    return mig.changed.bytes if mig.changed else None


def with_figures(mig: Migration) -> Migration:
    """The migration with its read-time figures: bytes_changed_since and predicted_final_sync_s."""
    from dataclasses import replace
    return replace(mig, bytes_changed_since=changed_bytes(mig), predicted_final_sync_s=predicted_final_sync_s(mig))


# ------------------------------------------------------------------ the task


def target_ran(mig: Migration) -> bool:
    """Whether the last cutover started the target from its own disk (its files may differ from the
    source's since: the next round is a full one)."""
    steps = (mig.cutover or {}).get("steps") or []
    return any(st.get("name") == "switch_boot" and st.get("state") != "pending" for st in steps)


@register
class SyncMigration(TaskKind):
    """A sync round: from target_prepared the initial full round (initial_sync while it runs, then
    syncing), from syncing or ready an incremental one (the state stays); from rolled_back (a cutover
    given up in its window, the target still there) a round that makes the migration syncing again: a
    full one when the cutover had started the target from its own disk (its files may have changed:
    a full round puts every file back as the source has it), else an incremental one. Before any round the receiver runs (prepare.ensure_receiver boots it again if its host
    restarted or the target ran from its disk)."""
    name = "migration.sync"
    rollback_on_failure = True      # a failed round is of no use: killed, and a first one's state put back

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("migration"):
            raise PermanentError("a sync round needs a migration's name", "ferry migration sync NAME")

    hosts = AssessMigration.hosts
    dedup_key = AssessMigration.dedup_key       # one task at a time per migration, whatever its kind

    def title(self, params: dict[str, Any]) -> str:
        return f"sync {params['migration']}"

    async def check(self, svc: Any, params: dict[str, Any], own: int | None = None) -> None:
        """Refused before a task is made: no such migration, one whose target is not prepared (or past
        its cutover), another task at work on it."""
        from .service import ensure_idle
        mig = await load(svc.store, params["migration"])
        if mig.state not in SYNCABLE:
            early = mig.state in (S.PLANNED, S.ASSESSED)
            raise Refused(f"migration {mig.name} is {mig.state}: it syncs once its target is prepared "
                          "and until its cutover",
                          f"ferry migration prepare {mig.name}" if early else f"ferry migration show {mig.name}")
        if mig.state == S.ROLLED_BACK and mig.target is None:
            raise Refused(f"migration {mig.name} is rolled back and has no target any more",
                          f"apply its plan again and prepare it: ferry migration prepare {mig.name}")
        if mig.target is not None and mig.target.method == Method.BLOCK:
            _block().disks_of(mig)
        else:
            units_of(mig)
        await ensure_idle(svc.store, mig.name, self.name, own)

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        from ..vm.service import VMService
        svc = VMService.of(ctx.engine)
        await self.check(svc, ctx.params, ctx.id)
        mig = await load(svc.store, ctx.params["migration"])
        first = mig.state in (S.TARGET_PREPARED, S.INITIAL_SYNC)
        again = mig.state == S.ROLLED_BACK
        full = again and target_ran(mig)
        mig = await ensure_receiver(ctx, svc, mig)
        if mig.state == S.TARGET_PREPARED:
            row = await svc.store.call(svc.store.migration_transition, mig.name, S.INITIAL_SYNC.value,
                                       allowed_from=(S.TARGET_PREPARED.value,), params={"task": ctx.id})
            mig = api.convert(row, Migration)
        label = ("initial" if first else "full, after a rolled-back cutover" if full
                 else "incremental, after a rollback" if again else "incremental")
        r = await run_round(ctx, svc, mig, label=label, becomes=S.SYNCING if first or again else None,
                            measure_after=True, full=full)
        done = await load(svc.store, mig.name)
        line = _block().describe(r) if mig.target.method == Method.BLOCK else describe(r)
        return {"migration": mig.name, "state": str(done.state), **api.to_builtins(r), "line": line}

    async def rollback(self, ctx: TaskContext) -> None:
        """The pull killed and SNAR.next removed (abort_round); a first round's migration back to
        target_prepared. A round recorded already stays (its state change went with it). Nothing is
        touched while another task works on the migration (this one was refused for it)."""
        from ..vm.service import VMService
        from .service import ensure_idle
        svc = VMService.of(ctx.engine)
        mig = await load(svc.store, ctx.params["migration"])
        if mig.target is None or mig.target.method not in (Method.FILE, Method.BLOCK):
            return
        try:
            await ensure_idle(svc.store, mig.name, self.name, ctx.id)
        except Refused:
            return
        try:
            await abort_round(svc, mig, task=ctx.id)
            ctx.log("the round's pull stopped in the receiver; its snapshot-to-be removed on the source")
        except FerryError as e:
            ctx.log(f"could not stop the round everywhere: {e.message} (the next round starts from the last "
                    "snapshot anyway)", "warning")
        if mig.state == S.INITIAL_SYNC:
            await svc.store.call(svc.store.migration_transition, mig.name, S.TARGET_PREPARED.value,
                                 allowed_from=(S.INITIAL_SYNC.value,),
                                 params={"why": "its first sync round was cancelled", "task": ctx.id})
