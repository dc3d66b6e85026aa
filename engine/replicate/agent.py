"""Ferry's replication agent: the code that runs on a host, sent over the channel each session.

Python 3 standard library only, one file, nothing installed on the host. The engine ships it
as engine/ship.py ships a large program: `python3 -S -c BOOT` reads the length of this file's
source and the source itself from stdin and runs it as __main__. From then on stdin/stdout carry
frames: a 1-byte type, a 4-byte big-endian length and a payload. The first frame is a JSON
command naming the role:

  walk   list a tree (manifest records), optionally with content hashes
  send   read files or chunks the engine asks for and emit them as frames
  recv   write the frames it is given under its root, never outside it; acknowledge
         what is durable (after syncfs/fsync)
  blk    block-level source/target work: hash, read and write chunks

The engine imports this module too, so the codec below is shared, not duplicated.
"""

import errno
import hashlib
import json
import os
import stat
import struct
import sys
import time
import zlib

AGENT_VERSION = 1
HDR = struct.Struct(">cI")
MAX_FRAME = (64 << 20) + (64 << 10)   # the largest chunk (64 MiB) and its header
IO_CHUNK = 1 << 20
BEAT_S = 5.0   # an agent busy this long without sending anything says so (the engine's stall timeout is far longer)
ALIGN = 4096   # O_DIRECT: buffer address, file offset and length multiples of this
ZERO = bytes(IO_CHUNK)

# Frame types.
F_JSON = b"J"      # control, JSON
F_MANIFEST = b"M"  # a batch of manifest records
F_REQ = b"Q"       # engine -> source: files to send
F_FILE = b"F"      # a whole small file: meta + data
F_BEGIN = b"B"     # begin a large file: meta
F_DATA = b"D"      # u64 offset + data of the current large file
F_END = b"E"       # end of the current large file: hash, flags
F_ENTRY = b"N"     # a non-regular entry or a metadata-only update (dir, symlink, hard link, node, meta)
F_DELETE = b"X"    # delete a path (recursively)
F_DIRMETA = b"T"   # set a directory's metadata (after its contents)
F_SYNC = b"S"      # engine -> target: make everything durable and acknowledge
F_ACK = b"A"       # target -> engine: durable acknowledgements
F_ERR = b"R"       # a per-entry error (the rest continues)
F_CHUNK = b"C"     # block level: u64 index + data (possibly compressed)
F_EOF = b"Z"       # end of a stream of frames
F_PROGRESS = b"P"  # target -> engine: data bytes and files received so far
F_BEAT = b"K"      # agent -> engine: still working on something long (what, seconds so far)

# Entry types in manifests.
T_FILE, T_DIR, T_LINK, T_CHR, T_BLK, T_FIFO, T_SOCK = "f", "d", "l", "c", "b", "p", "s"
_TYPES = {t.encode(): t for t in (T_FILE, T_DIR, T_LINK, T_CHR, T_BLK, T_FIFO, T_SOCK)}
_TYPE_OF = {stat.S_IFREG: T_FILE, stat.S_IFDIR: T_DIR, stat.S_IFLNK: T_LINK, stat.S_IFCHR: T_CHR,
            stat.S_IFBLK: T_BLK, stat.S_IFIFO: T_FIFO, stat.S_IFSOCK: T_SOCK}

# type, mode, uid, gid, size, mtime_ns, rdev, dev, ino, nlink, xattr-crc, flags, len(path), len(link)
REC = struct.Struct("<cIIIQqQQQIIBHH")
FLAG_HASH = 1
FLAG_TOUCHED = 2   # the inode changed (ctime) after the instant the engine asked about


def encode_record(path, typ, mode, uid, gid, size, mtime_ns, rdev=0, dev=0, ino=0, nlink=1, xcrc=0,
                  link=b"", digest=None, touched=False):
    flags = (FLAG_HASH if digest else 0) | (FLAG_TOUCHED if touched else 0)
    out = REC.pack(typ.encode(), mode, uid, gid, size, mtime_ns, rdev, dev, ino, nlink, xcrc, flags,
                   len(path), len(link)) + path + link
    return out + digest if digest else out


_SHARED = {}


def decode_records(buf):
    """Yield (path, typ, mode, uid, gid, size, mtime_ns, rdev, dev, ino, nlink, xcrc, link, digest, touched).
    Raises ValueError on a damaged buffer (the peer may be hostile or the link broken).
    Values that repeat across a tree (mode, owner, device) share one object each: a manifest of
    many files then costs ~100 bytes less per entry."""
    off, n = 0, len(buf)
    size = REC.size
    shared = _SHARED.setdefault
    if len(_SHARED) > 4096:
        _SHARED.clear()
    while off < n:
        if off + size > n:
            raise ValueError("damaged manifest record at byte %d" % off)
        (typ, mode, uid, gid, fsize, mtime, rdev, dev, ino, nlink, xcrc, flags, lp,
         ll) = REC.unpack_from(buf, off)
        off += size
        end = off + lp + ll + (32 if flags & FLAG_HASH else 0)
        if end > n or typ not in _TYPES or not lp:
            raise ValueError("damaged manifest record at byte %d" % (off - size))
        path = bytes(buf[off:off + lp])
        off += lp
        link = bytes(buf[off:off + ll])
        off += ll
        digest = None
        if flags & FLAG_HASH:
            digest = bytes(buf[off:off + 32])
            off += 32
        yield (path, _TYPES[typ], shared(mode, mode), shared(uid, uid), shared(gid, gid), fsize, mtime, rdev,
               shared(dev, dev), ino, nlink, xcrc, link, digest, bool(flags & FLAG_TOUCHED))


# Values for file metadata frames: a tiny tagged encoding (no pickle: the peer may be hostile).

def pack_values(values):
    out = bytearray()
    for v in values:
        if isinstance(v, bool) or v is None:
            out += b"n" if v is None else (b"t" if v else b"f")
        elif isinstance(v, int):
            out += b"i" + struct.pack("<q", v)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            out += b"b" + struct.pack("<I", len(v)) + bytes(v)
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogateescape")
            out += b"s" + struct.pack("<I", len(raw)) + raw
        elif isinstance(v, (list, tuple)):
            inner = pack_values(v)
            out += b"l" + struct.pack("<I", len(inner)) + inner
        else:
            raise TypeError("cannot pack %r" % type(v))
    return bytes(out)


def unpack_values(buf, depth=0):
    """The values of pack_values; ValueError for anything malformed (never another exception)."""
    if depth > 8:
        raise ValueError("values nested too deeply")
    out, off, n = [], 0, len(buf)
    while off < n:
        tag = buf[off:off + 1]
        off += 1
        if tag == b"n":
            out.append(None)
        elif tag == b"t":
            out.append(True)
        elif tag == b"f":
            out.append(False)
        elif tag == b"i":
            if off + 8 > n:
                raise ValueError("truncated value")
            out.append(struct.unpack_from("<q", buf, off)[0])
            off += 8
        elif tag in (b"b", b"s", b"l"):
            if off + 4 > n:
                raise ValueError("truncated value")
            ln = struct.unpack_from("<I", buf, off)[0]
            off += 4
            if off + ln > n:
                raise ValueError("truncated value")
            raw = bytes(buf[off:off + ln])
            off += ln
            out.append(raw if tag == b"b" else raw.decode("utf-8", "surrogateescape") if tag == b"s"
                       else unpack_values(raw, depth + 1))
        else:
            raise ValueError("bad tag %r" % tag)
    return out


class ProtocolError(ValueError):
    """A frame from the other side that does not have the shape the protocol gives it."""


def _fits(v, t):
    """isinstance, except that a bool is not an int unless bool is asked for."""
    if isinstance(v, bool):
        return t is bool or (isinstance(t, tuple) and bool in t)
    return isinstance(v, t)


def shaped(vals, *types, what="frame"):
    """vals, checked against types (a type or a tuple of types). Raises ProtocolError naming the
    entry (the first bytes value) when it differs."""
    if not (isinstance(vals, list) and len(vals) == len(types) and all(map(_fits, vals, types))):
        name = next((v for v in vals if isinstance(v, bytes)), b"?") if isinstance(vals, list) else b"?"
        raise ProtocolError("protocol error: malformed %s for %s" % (what, os.fsdecode(name[:200])))
    return vals


def named(vals, i=0):
    """The entry a frame's values name at position i, for a message (b"?" when there is none)."""
    return vals[i] if isinstance(vals, list) and len(vals) > i and isinstance(vals[i], bytes) else b"?"


# ----------------------------------------------------------------------------- framed stdio


class Wire:
    """Blocking framed I/O on stdin/stdout (the agent is a simple sequential program).

    Bulk data is copied as little as possible: a large frame is read straight into its own
    buffer (or a reused, aligned one: see land_at), and a large payload is written with writev
    next to its header."""

    BIG = 64 * 1024

    def __init__(self, rfd=0, wfd=1):
        self.rfd, self.wfd = rfd, wfd
        self.rbuf = bytearray()
        self.rpos = 0
        self.wbuf = bytearray()
        self.land = None    # an aligned buffer large payloads are read into (see land_at)
        self.lead = 0
        self.landed = False  # the last payload is a view of `land`, its data at an aligned address
        self.last_out = time.monotonic()   # when something last went out (see beat)
        self.busy_since = None

    def land_at(self, capacity, lead):
        """Read each large payload into one reused, page-aligned buffer, placed so that the data
        after its first `lead` bytes (the frame's own header) starts on a page boundary: it can
        then go to an O_DIRECT file as it is. Such a payload is a view, valid until the next read."""
        import mmap
        self.land = mmap.mmap(-1, ALIGN + capacity)
        self.lead = lead

    def _fill(self, n):
        """At least n unread bytes in rbuf."""
        while len(self.rbuf) - self.rpos < n:
            if self.rpos:
                del self.rbuf[:self.rpos]
                self.rpos = 0
            chunk = os.read(self.rfd, max(self.BIG, n - len(self.rbuf)))
            if not chunk:
                raise EOFError("peer closed the channel")
            self.rbuf += chunk

    def read_frame(self):
        self.flush()
        self._fill(HDR.size)
        typ, ln = HDR.unpack_from(self.rbuf, self.rpos)
        if ln > MAX_FRAME:
            raise ProtocolError("protocol error: a frame of %d bytes (the limit is %d)" % (ln, MAX_FRAME))
        self.rpos += HDR.size
        have = len(self.rbuf) - self.rpos
        self.landed = False
        if ln > self.BIG and have < ln:
            # Take what is buffered, then read the rest straight into the payload.
            if self.land is not None and ln <= len(self.land) - ALIGN + self.lead:
                payload = view = memoryview(self.land)[ALIGN - self.lead:ALIGN - self.lead + ln]
                self.landed = True
            else:
                payload = bytearray(ln)
                view = memoryview(payload)
            view[:have] = memoryview(self.rbuf)[self.rpos:]
            del self.rbuf[:]
            self.rpos = 0
            got = have
            while got < ln:
                n = os.readv(self.rfd, [view[got:]])
                if not n:
                    raise EOFError("peer closed the channel")
                got += n
            if not self.landed:
                view.release()
            return typ, payload
        self._fill(ln)
        payload = bytes(self.rbuf[self.rpos:self.rpos + ln])
        self.rpos += ln
        return typ, payload

    def has_input(self):
        """Is a frame (or part of one) waiting, without blocking?"""
        if len(self.rbuf) > self.rpos:
            return True
        import select
        r, _, _ = select.select([self.rfd], [], [], 0)
        return bool(r)

    def write(self, typ, payload=b""):
        if len(payload) >= self.BIG:
            self.wbuf += HDR.pack(typ, len(payload))
            self._writev([self.wbuf, payload])
            self.wbuf.clear()
            return
        self.wbuf += HDR.pack(typ, len(payload))
        self.wbuf += payload
        if len(self.wbuf) >= IO_CHUNK:
            self.flush()

    def write_parts(self, typ, parts):
        """One frame whose payload is the concatenation of parts (no joining copy)."""
        total = sum(len(p) for p in parts)
        self.wbuf += HDR.pack(typ, total)
        self._writev([self.wbuf] + list(parts))
        self.wbuf.clear()

    def beat(self, what):
        """Call often during long work: if nothing went out for BEAT_S, tell the engine what is
        going on (so silence means stuck, and the engine's stall timeout can say so)."""
        now = time.monotonic()
        if now - self.last_out < BEAT_S:
            return
        if self.busy_since is None or now - self.last_out > 2 * BEAT_S:
            self.busy_since = self.last_out
        self.write(F_BEAT, pack_values([what, int(now - self.busy_since)]))
        self.flush()

    def blocking(self, fn, what, *args):
        """fn(*args) in a thread, with beats while it runs (a long fsync, say). Its result, or its error."""
        import threading
        out = []

        def run():
            try:
                out.append((True, fn(*args)))
            except BaseException as e:   # handed to the caller below
                out.append((False, e))
        t = threading.Thread(target=run, daemon=True)
        t.start()
        while True:
            t.join(BEAT_S / 2)
            if not t.is_alive():
                break
            self.beat(what)
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def _writev(self, bufs):
        self.last_out = time.monotonic()
        views = [memoryview(b) for b in bufs if len(b)]
        while views:
            n = os.writev(self.wfd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def write_json(self, obj):
        self.write(F_JSON, json.dumps(obj).encode())

    def flush(self):
        if self.wbuf:
            self._writev([self.wbuf])
            self.wbuf.clear()


class Pacer:
    """--bwlimit on the host side: sleep so that no more than `rate` bytes/s go out."""

    def __init__(self, rate):
        self.rate = float(rate) if rate else 0.0
        self.start = time.monotonic()
        self.sent = 0

    def take(self, n):
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def passes_through(typ, payload):
    """Frames a target hands on to the engine unchanged: the source's greeting, errors and beats."""
    if typ == F_ERR or typ == F_BEAT:
        return True
    if typ == F_JSON:
        try:
            msg = json.loads(payload)
        except ValueError:
            raise ProtocolError("protocol error: a control frame that is not JSON")
        return isinstance(msg, dict) and ("hello" in msg or "fatal" in msg)
    return False


def describe_oserror(e, what):
    return "%s: %s" % (what, e.strerror or os.strerror(e.errno) if e.errno else str(e))


# ----------------------------------------------------------------------------- paths and excludes

SYSTEM_EXCLUDES = ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/mnt/*", "/media/*", "lost+found")


def check_relpath(rel):
    """Refuse anything that could name a place outside the root. Returns the components."""
    if not rel or rel.startswith(b"/") or b"\0" in rel:
        raise ValueError("unsafe path %r" % rel)
    parts = rel.split(b"/")
    for p in parts:
        if p in (b"", b".", b".."):
            raise ValueError("unsafe path %r" % rel)
    return parts


class Excluder:
    """rsync-like patterns: '/x' anchored at the root, 'a/b' matches a path suffix, 'x' any basename;
    a trailing '/' matches directories only."""

    def __init__(self, patterns):
        import fnmatch
        self._fn = fnmatch.fnmatchcase
        self.rules = []
        for p in patterns:
            pb = p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p
            dir_only = pb.endswith(b"/")
            pb = pb.rstrip(b"/")
            if not pb:
                continue
            anchored = pb.startswith(b"/")
            self.rules.append((pb.lstrip(b"/"), anchored, b"/" in pb.lstrip(b"/"), dir_only))

    def excluded(self, rel, is_dir):
        if not self.rules:
            return False
        base = rel.rsplit(b"/", 1)[-1]
        for pat, anchored, has_slash, dir_only in self.rules:
            if dir_only and not is_dir:
                continue
            if anchored:
                if self._fn(rel, pat):
                    return True
            elif has_slash:
                if self._fn(rel, pat) or self._fn(rel, b"*/" + pat):
                    return True
            elif self._fn(base, pat):
                return True
        return False


def swap_files(root):
    """Active swap files under root (from /proc/swaps), as paths relative to root."""
    out = []
    try:
        with open("/proc/swaps", "rb") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    rootb = os.fsencode(os.path.abspath(root)).rstrip(b"/") + b"/"
    for line in lines:
        parts = line.split()
        if len(parts) > 1 and parts[1] == b"file" and parts[0].startswith(rootb):
            out.append(parts[0][len(rootb):])
    return out


def xattr_items(path_or_fd, follow=False):
    """Sorted (name, value) pairs; [] where the filesystem has none or no support."""
    try:
        names = os.listxattr(path_or_fd, follow_symlinks=follow) if not isinstance(path_or_fd, int) \
            else os.listxattr(path_or_fd)
    except OSError:
        return []
    items = []
    for name in sorted(names):
        try:
            value = os.getxattr(path_or_fd, name, follow_symlinks=follow) if not isinstance(path_or_fd, int) \
                else os.getxattr(path_or_fd, name)
        except OSError:
            continue
        items.append((name.encode("utf-8", "surrogateescape"), value))
    return items


def xattr_crc(items):
    if not items:
        return 0
    c = 0
    for name, value in items:
        c = zlib.crc32(value, zlib.crc32(name + b"\0", c))
    return c or 1


def hash_file(fd, size, wire=None):
    """sha256 of a file's content (holes read as zeros)."""
    h = hashlib.sha256()
    off = 0
    while off < size:
        data = os.pread(fd, min(IO_CHUNK * 4, size - off), off)
        if not data:
            break
        h.update(data)
        off += len(data)
        if wire is not None:
            wire.beat("hashing")
    return h.digest()


class Crc32:
    """A file's transfer check: CRC-32 of its content, as read and as received. Every byte also
    crosses an authenticated SSH channel; this catches Ferry's own mistakes (a lost or misplaced
    piece) at a fraction of SHA-256's cost. Content comparisons (--checksum, resume) use SHA-256."""

    __slots__ = ("v",)

    def __init__(self, v=0):
        self.v = v

    def update(self, data):
        self.v = zlib.crc32(data, self.v)

    def digest(self):
        return struct.pack(">I", self.v)

    def hexdigest(self):
        return "%08x" % self.v

    def copy(self):
        return Crc32(self.v)


def hash_prefix(fd, length, h=None, wire=None):
    """The hasher (SHA-256 unless given) fed with a file's first `length` bytes."""
    h = h if h is not None else hashlib.sha256()
    off = 0
    while off < length:
        data = os.pread(fd, min(IO_CHUNK * 4, length - off), off)
        if not data:
            raise EOFError("file shorter than %d" % length)
        h.update(data)
        off += len(data)
        if wire is not None:
            wire.beat("hashing")
    return h


# ----------------------------------------------------------------------------- walk


def machine_id():
    """Which running kernel this is: files on two hosts with the same id are on one machine
    (namespaces and containers included), so their (device, inode) pairs can be compared."""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
        except OSError:
            pass
    return "host:" + os.uname().nodename


def locate(path):
    """Where an operator's path really is on this machine: the path with every symlink and '..'
    resolved, whether it exists, and the (device, inode) of it (or of its nearest existing
    ancestor) and of every directory above, up to '/'."""
    real = os.path.realpath(path)
    probe = real
    while True:
        try:
            st = os.stat(probe)
            break
        except FileNotFoundError:
            parent = os.path.dirname(probe)
            if parent == probe:
                raise
            probe = parent
    chain = [[st.st_dev, st.st_ino]]
    p = probe
    while p != "/":
        p = os.path.dirname(p)
        up = os.stat(p)
        chain.append([up.st_dev, up.st_ino])
    out = {"machine": machine_id(), "path": path, "real": real, "exists": probe == real, "chain": chain,
           "type": _TYPE_OF.get(stat.S_IFMT(st.st_mode), "?") if probe == real else None}
    if probe == real and stat.S_ISBLK(st.st_mode):
        out["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        out["disk"] = whole_disk(st.st_rdev)
        out["backing"] = loop_backing(st.st_rdev)
    return out


def whole_disk(rdev):
    """[major, minor] of the disk a partition belongs to (the device itself when it is whole)."""
    base = "/sys/dev/block/%d:%d" % (os.major(rdev), os.minor(rdev))
    try:
        if os.path.exists(base + "/partition"):
            with open(os.path.join(os.path.realpath(base), "..", "dev")) as f:
                return [int(x) for x in f.read().split(":")]
    except (OSError, ValueError):
        pass
    return [os.major(rdev), os.minor(rdev)]


def loop_backing(rdev):
    """[device, inode] of the file a loop device reads and writes, if it is one."""
    try:
        with open("/sys/dev/block/%d:%d/loop/backing_file" % (os.major(rdev), os.minor(rdev))) as f:
            st = os.stat(f.read().strip())
        return [st.st_dev, st.st_ino]
    except OSError:
        return None


_PROC_FD = None


def at_path(dirfd, name, fallback):
    """A path naming `name` in the directory open as dirfd, for calls that take no dir_fd (xattrs):
    /proc/self/fd/N/name, where the directory is the one opened, whatever its path does meanwhile."""
    global _PROC_FD
    if _PROC_FD is None:
        _PROC_FD = os.path.isdir("/proc/self/fd")
    return b"/proc/self/fd/%d/%s" % (dirfd, name) if _PROC_FD else fallback


OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular(name, dirfd, noatime=True):
    """Open a regular file for reading without following a symlink or blocking on a FIFO or a
    device; OSError(EINVAL, "not a regular file") for anything else."""
    flags = OPEN_READ | (getattr(os, "O_NOATIME", 0) if noatime else 0)
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except PermissionError:
        fd = os.open(name, OPEN_READ, dir_fd=dirfd)   # O_NOATIME needs ownership
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symlink now, not a regular file")
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return fd


def role_locate(wire, cmd):
    """Where the operator's path really is (see locate), and nothing more: the engine's check,
    before a task exists, that a source and a target do not overlap."""
    try:
        wire.write_json({"where": locate(cmd["path"])})
    except OSError as e:
        wire.write_json({"fatal": describe_oserror(e, cmd["path"]), "errno": e.errno})
    wire.flush()


def role_walk(wire, cmd):
    """Stream the manifest of a tree: first where the root really is (see locate), then records
    in batches, then a JSON summary. Directories are opened one component at a time from the
    root, never following a symlink: a directory swapped for a symlink during the walk is
    reported, not followed."""
    try:
        where = locate(cmd["root"])
    except OSError as e:
        wire.write_json({"fatal": describe_oserror(e, cmd["root"]), "errno": e.errno})
        wire.flush()
        return
    wire.write_json({"where": where})
    root = os.fsencode(where["real"])
    want_hash = cmd.get("checksum", False)
    hash_paths = set(os.fsencode(p) for p in cmd.get("hash_paths", ()))
    # Files changed on this side after this instant (ctime) get hashed, to verify what a checkpoint
    # did not cover: ctime cannot be set by a source, so it tells what was written when.
    ctime_after = cmd.get("hash_ctime_after")
    # Files whose inode changed after this instant are flagged (the last round's start: their
    # content may differ even where size and mtime do not).
    touched_after = cmd.get("flag_ctime_after")
    patterns = list(cmd.get("excludes", ()))
    if cmd.get("system_excludes"):
        patterns += list(SYSTEM_EXCLUDES) + ["/" + p.decode("utf-8", "surrogateescape") for p in swap_files(root)]
    excl = Excluder(patterns)
    errors = []
    if not where["exists"]:
        if cmd.get("missing_ok"):
            wire.write_json({"done": True, "exists": False, "entries": 0, "bytes": 0, "errors": [],
                             "uid": os.geteuid(), "time_ns": time.time_ns()})
            wire.flush()
            return
        wire.write_json({"fatal": "%s: %s" % (cmd["root"], os.strerror(errno.ENOENT)), "errno": errno.ENOENT})
        wire.flush()
        return
    try:
        rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        code = errno.ENOTDIR if e.errno == errno.ELOOP else e.errno
        what = "%s: not a directory" % cmd["root"] if code == errno.ENOTDIR else describe_oserror(e, cmd["root"])
        wire.write_json({"fatal": what, "errno": code})
        wire.flush()
        return
    st = os.fstat(rootfd)
    root_dev = st.st_dev
    started_ns = time.time_ns()
    batch = bytearray()
    count = total = 0
    # The root itself, so its metadata is replicated too.
    batch += encode_record(b".", T_DIR, st.st_mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns,
                           xcrc=xattr_crc(xattr_items(rootfd)))
    one_fs = cmd.get("one_file_system", False)
    # Depth first; each level holds its directory open (so open descriptors = depth) and the
    # names of the subdirectories still to visit, with the (dev, ino) the listing saw for each.
    stack = [(rootfd, b"", [])]
    pending = stack[0][2]

    def scan(dfd, rel_dir, subdirs):
        nonlocal count, total, batch
        try:
            entries = list(os.scandir(dfd))
            # Extended attributes are read by name relative to the directory being listed (the
            # calls take no directory descriptor): the walk works in it. Its own process, one thread.
            os.fchdir(dfd)
        except OSError as e:
            errors.append(describe_oserror(e, os.fsdecode(root + b"/" + rel_dir)))
            return

        def shown():
            return os.fsdecode(root + b"/" + rel)

        for ent in entries:
            wire.beat("walking")
            name = os.fsencode(ent.name)
            rel = rel_dir + b"/" + name if rel_dir else name
            try:
                est = ent.stat(follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENOENT:  # vanished while walking: simply not there
                    errors.append(describe_oserror(e, shown()))
                continue
            typ = _TYPE_OF.get(stat.S_IFMT(est.st_mode))
            if typ is None:
                continue
            is_dir = typ == T_DIR
            if excl.excluded(rel, is_dir):
                continue
            link = b""
            if typ == T_LINK:
                try:
                    link = os.readlink(name, dir_fd=dfd)
                except OSError as e:
                    errors.append(describe_oserror(e, shown()))
                    continue
            xitems = xattr_items(name) if typ != T_LINK else []
            digest = None
            if typ == T_FILE and (want_hash or rel in hash_paths
                                  or (ctime_after is not None and est.st_ctime_ns > ctime_after)):
                try:
                    fd = open_regular(name, dfd)
                except OSError as e:
                    errors.append(describe_oserror(e, shown()))
                    fd = None
                if fd is not None:
                    try:
                        digest = hash_file(fd, est.st_size, wire)
                    finally:
                        os.close(fd)
            touched = touched_after is not None and est.st_ctime_ns > touched_after
            batch += encode_record(rel, typ, est.st_mode, est.st_uid, est.st_gid,
                                   est.st_size if typ == T_FILE else 0, est.st_mtime_ns,
                                   est.st_rdev if typ in (T_CHR, T_BLK) else 0,
                                   est.st_dev, est.st_ino, est.st_nlink, xattr_crc(xitems), link, digest,
                                   touched)
            count += 1
            if typ == T_FILE:
                total += est.st_size
            if is_dir and not (one_fs and est.st_dev != root_dev):
                subdirs.append((name, est.st_dev, est.st_ino))
            if len(batch) >= 256 * 1024:
                wire.write(F_MANIFEST, bytes(batch))
                batch = bytearray()

    scan(rootfd, b"", pending)
    while stack:
        dfd, rel_dir, subdirs = stack[-1]
        if not subdirs:
            stack.pop()
            os.close(dfd)
            continue
        name, dev, ino = subdirs.pop()
        rel = rel_dir + b"/" + name if rel_dir else name
        try:
            cfd = os.open(name, SafeRoot.DIR_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue   # gone since the listing: the next round reflects that
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                errors.append("%s: became a symlink or a file during the walk; not followed"
                              % os.fsdecode(root + b"/" + rel))
            else:
                errors.append(describe_oserror(e, os.fsdecode(root + b"/" + rel)))
            continue
        cst = os.fstat(cfd)
        if (cst.st_dev, cst.st_ino) != (dev, ino):
            os.close(cfd)
            errors.append("%s: replaced by another directory during the walk; not followed"
                          % os.fsdecode(root + b"/" + rel))
            continue
        subs = []
        scan(cfd, rel, subs)
        stack.append((cfd, rel, subs))
    if batch:
        wire.write(F_MANIFEST, bytes(batch))
    wire.write_json({"done": True, "exists": True, "entries": count, "bytes": total, "errors": errors[:100],
                     "error_count": len(errors), "uid": os.geteuid(), "time_ns": started_ns})
    wire.flush()


# ----------------------------------------------------------------------------- send (source side)


def data_extents(fd, size, sparse_hint):
    """(offset, length) of the data regions; holes are skipped when the file looks sparse."""
    if not sparse_hint or size == 0:
        return [(0, size)] if size else []
    out = []
    off = 0
    try:
        while off < size:
            start = os.lseek(fd, off, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            end = min(end, size)
            if end > start:
                out.append((start, end - start))
            off = end
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data past `off`: the rest is a hole
            return out
        return [(0, size)]
    return out


def file_meta(rel, st, xitems):
    return pack_values([rel, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        [list(x) for x in xitems]])


SMALL_FILE = 256 * 1024


def role_send(wire, cmd):
    """Read the files the engine asks for, in order, and emit them as frames. Every path is opened
    one component at a time from the root, never following a symlink (see SafeRoot)."""
    src = SafeRoot(os.fsencode(cmd["root"]), create=False)
    pacer = Pacer(cmd.get("bwlimit"))
    while True:
        typ, payload = wire.read_frame()
        if typ == F_EOF:
            wire.write(F_EOF)
            wire.flush()
            return
        if typ != F_REQ:
            raise ProtocolError("protocol error: send: unexpected frame %r" % typ)
        for req in unpack_values(payload):
            op, rel, arg = shaped(req, str, bytes, (int, type(None)), what="request")
            if op == "file":
                send_one(wire, src, rel, arg or 0, pacer)
            elif op == "hash":
                send_hash(wire, src, rel, arg)
            elif op == "mark":
                wire.write_json({"mark": arg})   # tells the engine a batch of requests is done
            else:
                send_entry(wire, src, op, rel)


def source_error(wire, src, rel, e):
    """Report a per-entry error on the source (the rest goes on)."""
    code = getattr(e, "errno", None) or 0
    where = os.fsdecode(src.root + b"/" + rel)
    if code == errno.ENOENT:
        msg = "vanished"
    elif isinstance(e, Refused):
        msg = "refused: %s" % e
    elif isinstance(e, OSError):
        msg = describe_oserror(e, where)
    else:
        msg = "%s: %s" % (where, e)
    wire.write(F_ERR, pack_values(["source", rel, code, msg]))


def send_one(wire, src, rel, resume_at, pacer=None):
    try:
        dfd, name = src.parent(rel)
        fd = open_regular(name, dfd)
    except (OSError, Refused) as e:
        source_error(wire, src, rel, e)
        return
    try:
        st = os.fstat(fd)
        xitems = xattr_items(fd)
        size = st.st_size
        sparse = st.st_blocks * 512 < size
        if size <= SMALL_FILE and not sparse and not resume_at:
            data = os.pread(fd, size, 0) if size else b""
            st2 = os.fstat(fd)
            changed = (len(data) != size or st2.st_mtime_ns != st.st_mtime_ns or st2.st_size != size
                       or st2.st_ctime_ns != st.st_ctime_ns)
            digest = Crc32(zlib.crc32(data)).digest()
            meta = file_meta(rel, st, xitems)
            if pacer:
                pacer.take(size)
            wire.write_parts(F_FILE, (struct.pack("<II", len(meta), len(digest) + 1), meta, digest,
                                      b"\1" if changed else b"\0", data))
            return
        h = hash_prefix(fd, resume_at, Crc32(), wire) if resume_at else Crc32()
        wire.write(F_BEGIN, pack_values([rel, st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns,
                                         [list(x) for x in xitems], resume_at]))
        pos = resume_at
        for off, ln in data_extents(fd, size, sparse):
            end = off + ln
            if end <= pos:
                continue
            off = max(off, pos)
            while pos < off:  # a hole: hash it as zeros
                n = min(IO_CHUNK, off - pos)
                h.update(ZERO[:n])
                pos += n
            while off < end:
                data = os.pread(fd, min(IO_CHUNK, end - off), off)
                if not data:
                    break
                h.update(data)
                if pacer:
                    pacer.take(len(data))
                wire.write_parts(F_DATA, (struct.pack("<Q", off), data))
                off += len(data)
                pos = off
            if off < end:
                break
        while pos < size:
            n = min(IO_CHUNK, size - pos)
            h.update(ZERO[:n])
            pos += n
        st2 = os.fstat(fd)
        changed = (st2.st_mtime_ns != st.st_mtime_ns or st2.st_size != size or st2.st_ctime_ns != st.st_ctime_ns)
        wire.write(F_END, pack_values([rel, h.digest(), changed]))
    except OSError as e:
        source_error(wire, src, rel, e)
    finally:
        os.close(fd)


def send_hash(wire, src, rel, length):
    """sha256 of a file's first `length` bytes (None: all of it), as a JSON reply."""
    wire.write_json(hash_reply(wire, src, rel, length))


def hash_reply(wire, root, rel, length):
    """{"path", "length", "sha256"} of a file under root (a SafeRoot); sha256 None when it cannot
    be read."""
    try:
        dfd, name = root.parent(rel)
        fd = open_regular(name, dfd, noatime=False)
        try:
            size = os.fstat(fd).st_size
            n = size if length is None else min(length, size)
            digest = hash_prefix(fd, n, wire=wire).hexdigest() if n == length or length is None else None
        finally:
            os.close(fd)
    except (OSError, Refused, EOFError):
        digest, n = None, 0
    return {"path": os.fsdecode(rel), "length": n, "sha256": digest}


def send_entry(wire, src, op, rel):
    """The source's current truth for a non-regular entry or a metadata update, as one frame."""
    try:
        if rel == b".":
            if op != "dirmeta":
                raise Refused("%s of the root itself" % op)
            dfd, name, path = src.rootfd, None, src.root
            st = os.fstat(src.rootfd)
        else:
            dfd, name = src.parent(rel)
            path = at_path(dfd, name, src.root + b"/" + rel)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if op == "dirmeta":
            if not stat.S_ISDIR(st.st_mode):
                return
            wire.write(F_DIRMETA, pack_values([rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                               [list(x) for x in xattr_items(path)]]))
        elif op == "symlink":
            if not stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EINVAL, "no longer a symlink")
            wire.write(F_ENTRY, pack_values(["symlink", rel, os.readlink(name, dir_fd=dfd), st.st_uid, st.st_gid,
                                             st.st_mtime_ns]))
        elif op == "node":
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
                raise OSError(errno.EINVAL, "no longer a device node or FIFO")
            wire.write(F_ENTRY, pack_values(["node", rel, st.st_mode, st.st_rdev, st.st_uid, st.st_gid,
                                             st.st_mtime_ns]))
        elif op == "meta":
            wire.write(F_ENTRY, pack_values(["meta", rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                             [list(x) for x in xattr_items(path)]]))
        else:
            raise Refused("unknown request %r" % op)
    except (OSError, Refused) as e:
        source_error(wire, src, rel, e)


# ----------------------------------------------------------------------------- recv (target side)


PART_PREFIX = b".ferry-part."


def part_name(name):
    """Where a file is written before it is renamed into place (and kept to resume it)."""
    return PART_PREFIX + name if len(name) < 200 else PART_PREFIX + hashlib.sha256(name).hexdigest().encode()


class Refused(Exception):
    """An entry that would escape the root or cannot be placed safely."""


class SafeRoot:
    """Opens parents component by component with O_NOFOLLOW: a symlink anywhere in a path is refused.
    The target's root is made when missing; a source's must exist."""

    DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, root, create=True):
        self.root = root
        self.side = "target" if create else "source"
        if create:
            os.makedirs(root, exist_ok=True)
        self.rootfd = os.open(root, self.DIR_FLAGS)
        self.cache = {}
        self.retired = []   # dropped from the cache, closed at the next frame boundary (see trim)

    def parent(self, rel):
        """(dirfd, name) for rel; raises Refused for unsafe paths or symlinked parents."""
        try:
            parts = check_relpath(rel)
        except ValueError as e:
            raise Refused(str(e))
        dir_rel = b"/".join(parts[:-1])
        fd = self.cache.get(dir_rel)
        if fd is None:
            fd = self._open_dir(parts[:-1])
        return fd, parts[-1]

    def _open_dir(self, parts):
        fd = self.rootfd
        prefix = b""
        for comp in parts:
            prefix = prefix + b"/" + comp if prefix else comp
            cached = self.cache.get(prefix)
            if cached is not None:
                fd = cached
                continue
            try:
                nfd = os.open(comp, self.DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused("%s: a parent is a symlink or not a directory on the %s"
                                  % (os.fsdecode(prefix), self.side))
                raise
            self.cache[prefix] = nfd
            fd = nfd
        return fd

    def drop(self):
        """Forget every open directory (after a delete: a path may name another directory now).
        Descriptors handed out during this frame stay valid until trim()."""
        self.retired.extend(self.cache.values())
        self.cache.clear()

    def trim(self):
        """Between frames: close what was dropped, and keep the cache small."""
        if len(self.cache) > 512:
            self.drop()
        for fd in self.retired:
            os.close(fd)
        self.retired = []


def _syncfs(fd):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except Exception:
        pass
    os.sync()


class BackgroundSync:
    """One flush at a time in a thread (fsync and syncfs release the GIL), so that writing goes on
    while what came before becomes durable; once it is done, what it covered is acknowledged."""

    def __init__(self, flush, ack):
        self.flush = flush     # flush(*args): makes everything written so far durable
        self.ack = ack         # ack(snapshot): says what is durable now
        self.running = None    # (thread, snapshot)

    @property
    def busy(self):
        return self.running is not None

    def start(self, snapshot, *args):
        import threading
        self.running = (threading.Thread(target=self.flush, args=args, daemon=True), snapshot)
        self.running[0].start()

    def poll(self, wait=False):
        """Acknowledge the flush once it has finished (wait: wait for it)."""
        if self.running is None:
            return
        thread, snapshot = self.running
        if wait:
            thread.join()
        if not thread.is_alive():
            self.running = None
            self.ack(snapshot)


def open_for_writing(name, dirfd, truncate):
    """A temporary file of ours under dirfd, for writing: made when missing; a symlink, FIFO or
    anything else put in its place is refused, never followed or blocked on."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags | (os.O_CREAT | os.O_TRUNC if truncate else 0), 0o600, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise Refused("%s: something that is not a regular file is in the way" % os.fsdecode(name))
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("%s: something that is not a regular file is in the way" % os.fsdecode(name))
    return fd


def xattr_list(items, rel):
    """Extended attributes as the protocol carries them: [[name, value], ...], both bytes."""
    for item in items:
        shaped(item, bytes, bytes, what="extended attribute of %s" % os.fsdecode(rel))
    return items


class Receiver:
    def __init__(self, wire, cmd):
        self.wire = wire
        self.root = SafeRoot(os.fsencode(cmd["root"]))
        self.is_root = os.geteuid() == 0
        self.acked = []        # (rel, digest, size) written since the last acknowledgement
        self.partial = None    # the large file being written: dict
        self.bytes_since_sync = 0
        self.last_sync = time.monotonic()
        self.sync_bytes = int(cmd.get("sync_bytes", 256 << 20))
        self.sync_seconds = float(cmd.get("sync_seconds", 1.0))
        self.notes = set()
        self.dirty = False     # anything changed since the last sync?
        self.bg = BackgroundSync(_syncfs, lambda snap: self._ack(-1, snap))
        self.received = 0      # file data received (for the engine's progress)
        self.files = 0
        self.last_progress = 0.0

    def report_progress(self, force=False):
        now = time.monotonic()
        if force or now - self.last_progress >= 0.1:
            self.last_progress = now
            self.wire.write(F_PROGRESS, pack_values([self.received, self.files]))

    # -- helpers

    tmp_name = staticmethod(lambda name: part_name(name))

    def set_meta_fd(self, fd, mode, uid, gid, mtime_ns, xitems):
        if self.is_root:
            try:
                os.fchown(fd, uid, gid)
            except OSError as e:
                self.notes.add("owners not preserved: %s" % os.strerror(e.errno))
        os.fchmod(fd, stat.S_IMODE(mode))  # after chown: chown clears setuid bits
        self.set_xattrs(fd, xitems)
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def set_xattrs(self, fd, xitems):
        """Make fd's xattrs (ACLs included) exactly the source's: set, and remove extra ones."""
        try:
            have = set(os.listxattr(fd))
        except OSError:
            have = set()
        want = {}
        for name, value in xitems:
            want[name.decode("utf-8", "surrogateescape")] = value
        for name in have - set(want):
            try:
                os.removexattr(fd, name)
            except OSError:
                pass
        for name, value in want.items():
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES):
                    self.notes.add("xattr %s not preserved: %s" % (name, os.strerror(e.errno)))
                else:
                    raise

    def replace_with(self, dfd, tmp, name):
        """Move tmp over name; a directory in the way (type change) is removed first."""
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove_tree_at(dfd, name)
            self.root.drop()
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def error(self, rel, e):
        code = getattr(e, "errno", 0) or 0
        if isinstance(e, (Refused, ProtocolError)):
            msg = "refused: %s" % e
        elif isinstance(e, OSError):
            msg = describe_oserror(e, os.fsdecode(rel))
        else:
            msg = "%s: %s" % (os.fsdecode(rel), e)
        self.wire.write(F_ERR, pack_values(["target", rel, code, msg]))
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise FatalTarget(code, msg)

    # -- entries

    def write_small(self, payload):
        if len(payload) < 8:
            raise ProtocolError("protocol error: a file frame of %d bytes" % len(payload))
        mlen, tlen = struct.unpack_from("<II", payload, 0)
        if 8 + mlen + tlen > len(payload) or tlen < 1:
            raise ProtocolError("protocol error: a file frame whose parts do not add up")
        meta = unpack_values(payload[8:8 + mlen])
        trailer = payload[8 + mlen:8 + mlen + tlen]
        data = memoryview(payload)[8 + mlen + tlen:]
        try:
            rel, mode, uid, gid, size, mtime_ns, xitems = shaped(meta, bytes, int, int, int, int, int, list,
                                                                 what="file")
            xitems = xattr_list(xitems, rel)
            if size != len(data):
                raise ProtocolError("protocol error: %s: %d bytes announced, %d sent"
                                    % (os.fsdecode(rel), size, len(data)))
        except ProtocolError as e:
            self.error(named(meta), e)
            return
        digest, changed = bytes(trailer[:-1]), trailer[-1:] == b"\1"
        try:
            dfd, name = self.root.parent(rel)
            tmp = self.tmp_name(name)
            fd = open_for_writing(tmp, dfd, truncate=True)
            try:
                view = data
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                self.set_meta_fd(fd, mode, uid, gid, mtime_ns, xitems)
            finally:
                os.close(fd)
            self.replace_with(dfd, tmp, name)
        except (OSError, Refused) as e:
            self.error(rel, e)
            return
        got = Crc32(zlib.crc32(data)).digest()
        self.acked.append([rel, got, size, changed, got != digest])
        self.bytes_since_sync += size
        self.received += size
        self.files += 1

    def begin_large(self, payload):
        vals = unpack_values(payload)
        self.abandon_partial()
        self.partial = None
        try:
            rel, mode, uid, gid, size, mtime_ns, xitems, resume_at = shaped(
                vals, bytes, int, int, int, int, int, list, int, what="large file")
            xitems = xattr_list(xitems, rel)
            if not 0 <= resume_at <= size:
                raise ProtocolError("protocol error: %s: resumes at %d of %d bytes"
                                    % (os.fsdecode(rel), resume_at, size))
        except ProtocolError as e:
            self.error(named(vals), e)
            self.partial = {"skip": True, "rel": named(vals)}
            return
        dfd = None
        try:
            pdfd, name = self.root.parent(rel)
            dfd = os.dup(pdfd)   # its own: held across frames, while the cache may be trimmed
            tmp = self.tmp_name(name)
            if resume_at:
                fd = open_for_writing(tmp, dfd, truncate=False)
                h = hash_prefix(fd, resume_at, Crc32(), self.wire)
                os.ftruncate(fd, resume_at)
            else:
                fd = open_for_writing(tmp, dfd, truncate=True)
                h = Crc32()
        except (OSError, Refused, EOFError) as e:
            if dfd is not None:
                os.close(dfd)
            self.error(rel, e if not isinstance(e, EOFError) else OSError(errno.EIO, str(e)))
            self.partial = {"skip": True, "rel": rel}
            return
        self.partial = {"rel": rel, "fd": fd, "dfd": dfd, "name": name, "tmp": tmp, "hash": h, "pos": resume_at,
                        "mode": mode, "uid": uid, "gid": gid, "size": size, "mtime": mtime_ns, "x": xitems,
                        "out": Direct(fd)}

    def write_data(self, payload):
        p = self.partial
        if p is None or p.get("skip"):
            return
        if len(payload) < 8:
            raise ProtocolError("protocol error: a data frame of %d bytes" % len(payload))
        off = struct.unpack_from("<Q", payload, 0)[0]
        data = memoryview(payload)[8:]
        if off < p["pos"] or off + len(data) > p["size"]:
            self.abandon_partial()
            self.error(p["rel"], ProtocolError("protocol error: %s: data at offset %d does not follow %d or runs "
                                               "past %d bytes" % (os.fsdecode(p["rel"]), off, p["pos"], p["size"])))
            return
        try:
            h = p["hash"]
            while p["pos"] < off:  # a hole the source skipped
                n = min(IO_CHUNK, off - p["pos"])
                h.update(ZERO[:n])
                p["pos"] += n
            p["out"].write(data, off, self.wire.landed)
            h.update(data)
            p["pos"] = off + len(data)
            self.bytes_since_sync += len(data)
            self.received += len(data)
        except OSError as e:
            self.abandon_partial()
            self.error(p["rel"], e)

    def abandon_partial(self):
        p = self.partial
        if p and not p.get("skip"):
            for close in (p["out"].close, lambda: os.close(p["fd"]), lambda: os.close(p["dfd"])):
                try:
                    close()
                except OSError:
                    pass
            p["skip"] = True

    def end_large(self, payload):
        p = self.partial
        if p is None:
            raise ProtocolError("protocol error: the end of a large file that was never begun")
        try:
            rel, digest, changed = shaped(unpack_values(payload), bytes, bytes, bool, what="end of file")
            if rel != p["rel"]:
                raise ProtocolError("protocol error: %s ends while %s is being written"
                                    % (os.fsdecode(rel), os.fsdecode(p["rel"])))
        except ProtocolError as e:
            self.abandon_partial()
            self.partial = None
            self.error(p["rel"], e)
            return
        self.partial = None
        if p.get("skip"):
            return
        try:
            h = p["hash"]
            while p["pos"] < p["size"]:
                n = min(IO_CHUNK, p["size"] - p["pos"])
                h.update(ZERO[:n])
                p["pos"] += n
            p["out"].close()
            os.ftruncate(p["fd"], p["size"])  # trailing hole
            self.set_meta_fd(p["fd"], p["mode"], p["uid"], p["gid"], p["mtime"], p["x"])
            os.close(p["fd"])
            p["fd"] = None
            self.replace_with(p["dfd"], p["tmp"], p["name"])
        except (OSError, Refused) as e:
            self.error(rel, e)
            return
        finally:
            if p["fd"] is not None:
                os.close(p["fd"])
            os.close(p["dfd"])
        got = h.digest()
        self.acked.append([rel, got, p["size"], changed, got != digest])
        self.files += 1

    # The shape of each entry kind's values after (kind, rel).
    ENTRY_SHAPES = {"dir": (int,), "symlink": (bytes, int, int, int), "hardlink": (bytes,),
                    "node": (int, int, int, int, int), "meta": (int, int, int, int, list)}

    def entry(self, payload):
        """dir, symlink, hard link, device/fifo, or metadata-only update."""
        vals = unpack_values(payload)
        rel = named(vals, 1)
        try:
            kind = vals[0] if vals and isinstance(vals[0], str) else None
            shape = self.ENTRY_SHAPES.get(kind)
            if shape is None:
                raise ProtocolError("protocol error: unknown entry kind %r for %s" % (kind, os.fsdecode(rel)))
            shaped(vals, str, bytes, *shape, what="%s entry" % kind)
            if kind == "meta":
                xattr_list(vals[6], rel)
            if rel == b".":
                if kind == "dir":
                    return   # the root exists; its metadata comes with dirmeta
                raise ProtocolError("protocol error: a %s entry for the root itself" % kind)
            dfd, name = self.root.parent(rel)
            if kind == "dir":
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                except FileExistsError:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(name, dir_fd=dfd)
                        os.mkdir(name, 0o700, dir_fd=dfd)
                return
            if kind == "symlink":
                target, uid, gid, mtime_ns = vals[2:]
                tmp = self.fresh_tmp(dfd, name)
                os.symlink(target, tmp, dir_fd=dfd)
                if self.is_root:
                    os.chown(tmp, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
                self.replace_with(dfd, tmp, name)
            elif kind == "hardlink":
                sdfd, sname = self.root.parent(vals[2])
                tmp = self.fresh_tmp(dfd, name)
                os.link(sname, tmp, src_dir_fd=sdfd, dst_dir_fd=dfd, follow_symlinks=False)
                self.replace_with(dfd, tmp, name)
            elif kind == "node":
                mode, rdev, uid, gid, mtime_ns = vals[2:]
                if stat.S_ISFIFO(mode):
                    make = lambda n: os.mkfifo(n, stat.S_IMODE(mode), dir_fd=dfd)  # noqa: E731
                elif not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
                    raise ProtocolError("protocol error: node %s of mode %o is no device or FIFO"
                                        % (os.fsdecode(rel), mode))
                elif not self.is_root:
                    self.notes.add("device nodes not created: not root on the target")
                    return
                else:
                    make = lambda n: os.mknod(n, mode, rdev, dir_fd=dfd)  # noqa: E731
                tmp = self.fresh_tmp(dfd, name)
                make(tmp)
                if self.is_root:
                    os.chown(tmp, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.chmod(tmp, stat.S_IMODE(mode), dir_fd=dfd)
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
                self.replace_with(dfd, tmp, name)
            else:   # meta
                mode, uid, gid, mtime_ns, xitems = vals[2:]
                fd = open_regular(name, dfd, noatime=False)
                try:
                    self.set_meta_fd(fd, mode, uid, gid, mtime_ns, xitems)
                finally:
                    os.close(fd)
            self.acked.append([rel, b"", 0, False, False])
        except (OSError, Refused, ProtocolError) as e:
            self.error(rel, e)

    def fresh_tmp(self, dfd, name):
        """The temporary name for name, with whatever an earlier attempt left there removed."""
        tmp = self.tmp_name(name)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            remove_tree_at(dfd, tmp)
        return tmp

    def dirmeta(self, payload):
        vals = unpack_values(payload)
        rel = named(vals)
        try:
            rel, mode, uid, gid, mtime_ns, xitems = shaped(vals, bytes, int, int, int, int, list,
                                                           what="directory metadata")
            xattr_list(xitems, rel)
            if rel == b".":
                fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root.rootfd)
            else:
                dfd, name = self.root.parent(rel)
                fd = os.open(name, SafeRoot.DIR_FLAGS, dir_fd=dfd)
            try:
                self.set_meta_fd(fd, mode, uid, gid, mtime_ns, xitems)
            finally:
                os.close(fd)
        except (OSError, Refused, ProtocolError) as e:
            self.error(rel, e)

    def delete(self, payload):
        vals = unpack_values(payload)
        rel = named(vals)
        try:
            (rel,) = shaped(vals, bytes, what="delete")
            dfd, name = self.root.parent(rel)
            remove_tree_at(dfd, name)
        except FileNotFoundError:
            pass
        except (OSError, Refused, ProtocolError) as e:
            self.error(rel, e)
        self.root.drop()

    def answer(self, cmd):
        """A JSON request from the engine: the hash of a kept partial file's prefix ("partial")
        or of a file as it is ("hash")."""
        if not isinstance(cmd, dict) or not isinstance(cmd.get("path"), str):
            raise ProtocolError("protocol error: a request without a path")
        rel = os.fsencode(cmd["path"])
        if cmd.get("op") == "hash":
            self.wire.write_json({"hashed": True, **hash_reply(self.wire, self.root, rel, None)})
            return
        limit = int(cmd.get("max", 1 << 62))

        def aligned(n):   # the prefix compared: whole MiB, at most what the checkpoint vouched for
            n = min(n, limit)
            return n - n % IO_CHUNK
        try:
            dfd, name = self.root.parent(rel)
            fd = open_regular(self.tmp_name(name), dfd, noatime=False)
        except (OSError, Refused):
            self.wire.write_json({"partial": True, "path": cmd["path"], "length": 0, "sha256": None})
            return
        try:
            length = aligned(os.fstat(fd).st_size)
            digest = hash_prefix(fd, length, wire=self.wire).hexdigest() if length else None
        finally:
            os.close(fd)
        self.wire.write_json({"partial": True, "path": cmd["path"], "length": length, "sha256": digest})

    def _snapshot(self):
        """What the next acknowledgement will cover: taken *before* the sync starts."""
        p = self.partial
        partial = [p["rel"], p["pos"], p["hash"].copy().hexdigest()] if p and not p.get("skip") else None
        snap = (self.acked, partial, self.dirty or partial is not None, time.time_ns())
        self.acked = []
        self.bytes_since_sync = 0
        self.dirty = False
        self.last_sync = time.monotonic()
        return snap

    def _ack(self, seq, snap):
        acked, partial, _dirty, t_ns = snap
        self.report_progress(force=True)
        self.wire.write(F_ACK, pack_values([seq, acked, partial, sorted(self.notes), t_ns]))
        self.wire.flush()

    def sync(self, seq):
        """Make everything written durable, then acknowledge it (waits for a background sync)."""
        self.bg.poll(wait=True)
        snap = self._snapshot()
        if snap[2]:
            self.wire.blocking(_syncfs, "making what was written durable", self.root.rootfd)
        self._ack(seq, snap)

    def maybe_sync(self):
        """Start a background sync when enough was written; writing goes on meanwhile."""
        self.bg.poll()
        if self.bg.busy:
            return
        if self.bytes_since_sync >= self.sync_bytes or (
                self.bytes_since_sync and time.monotonic() - self.last_sync >= self.sync_seconds):
            self.bg.start(self._snapshot(), self.root.rootfd)


class FatalTarget(Exception):
    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


def remove_tree_at(dfd, name):
    """Remove name (file, link, or directory tree) under dfd without following symlinks."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    fd = os.open(name, SafeRoot.DIR_FLAGS, dir_fd=dfd)
    try:
        for entry in os.listdir(fd):
            remove_tree_at(fd, os.fsencode(entry))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


def role_recv(wire, cmd):
    rc = Receiver(wire, cmd)
    wire.land_at(IO_CHUNK + ALIGN, 8)   # F_DATA: a u64 offset, then the data
    handlers = {F_FILE: rc.write_small, F_BEGIN: rc.begin_large, F_DATA: rc.write_data, F_END: rc.end_large,
                F_ENTRY: rc.entry, F_DIRMETA: rc.dirmeta, F_DELETE: rc.delete}
    try:
        while True:
            rc.bg.poll()
            if rc.bytes_since_sync and not wire.has_input():
                rc.maybe_sync()
            typ, payload = wire.read_frame()
            if typ == F_EOF:
                rc.report_progress(force=True)
                rc.sync(-2)
                wire.write(F_EOF)
                wire.flush()
                return
            if typ == F_SYNC:
                if len(payload) != 8:
                    raise ProtocolError("protocol error: a sync frame of %d bytes" % len(payload))
                rc.sync(struct.unpack("<q", payload)[0])
                continue
            if passes_through(typ, payload):
                wire.write(typ, payload)
                wire.flush()
                continue
            if typ == F_JSON:
                rc.answer(json.loads(payload))
                wire.flush()
                continue
            handler = handlers.get(typ)
            if handler is None:
                raise ProtocolError("protocol error: recv: unexpected frame %r" % typ)
            try:
                handler(payload)
            except ValueError as e:   # a malformed frame: said, and the rest goes on
                rc.error(b"?", e if isinstance(e, ProtocolError) else ProtocolError("protocol error: %s" % e))
            rc.root.trim()
            rc.dirty = True
            if typ in (F_FILE, F_END, F_DATA):
                rc.maybe_sync()
                rc.report_progress()
    except FatalTarget as e:
        # Keep what is already written durable (a partial large file resumes from it).
        try:
            rc.abandon_partial()
            rc.bg.poll(wait=True)
            _syncfs(rc.root.rootfd)
        except OSError:
            pass
        wire.write_json({"fatal": str(e), "errno": e.code})
        wire.flush()


# ----------------------------------------------------------------------------- block level

F_HASHES = b"H"    # block level: packed (u64 index, 32-byte hash, u8 zero) records
CHUNK_REC = struct.Struct("<Q32sB")
CH_ZERO, CH_DATA, CH_ZLIB, CH_PART = 0, 1, 2, 3
# A data frame (CH_PART, CH_DATA): index, kind, the chunk's digest (CH_DATA, the chunk's last
# part; zeros in a CH_PART), the part's offset in the chunk, then the data.
DATA_HDR = struct.Struct("<QB32sI")
PART = 1 << 20   # uncompressed chunks travel in 1 MiB parts: the target writes while more arrives
BLKZEROOUT = 0x127F


def dev_size(fd):
    """Size of a regular file or a block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def open_block(path, write, create_size=None):
    flags = os.O_RDWR if write else os.O_RDONLY
    if create_size is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, create_size)  # sparse: untouched chunks stay holes
        return fd
    return os.open(path, flags | os.O_NOFOLLOW)


def is_hole(fd, off, n):
    """Is [off, off+n) a hole of a sparse file? (then it reads as zeros without being read)"""
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + n
    except OSError as e:
        return e.errno == errno.ENXIO   # no data at or after off
    except AttributeError:
        return False


def read_chunk(fd, idx, chunk, size):
    off = idx * chunk
    n = min(chunk, size - off)
    data = os.pread(fd, n, off)
    while len(data) < n:  # short reads happen on devices; keep going
        more = os.pread(fd, n - len(data), off + len(data))
        if not more:
            raise OSError(errno.EIO, "short read at offset %d" % (off + len(data)))
        data += more
    return data


ZERO_HASHES = {}
_ZERO_BUFS = {}


def is_zero(data):
    """All zero bytes? (memcmp against a cached zero buffer of the same length: no copies)."""
    z = _ZERO_BUFS.get(len(data))
    if z is None:
        if len(_ZERO_BUFS) > 8:
            _ZERO_BUFS.clear()
        z = _ZERO_BUFS[len(data)] = bytes(len(data))
    return data == z


def zero_hash(n):
    h = ZERO_HASHES.get(n)
    if h is None:
        h = ZERO_HASHES[n] = hashlib.sha256(bytes(n)).digest()
    return h


def refuse_in_use(wire, real, wait_s=15.0):
    """Refuse (EBUSY) to write a device or image that is in use: a mounted filesystem or one held
    by LVM, RAID or a device mapper (an exclusive open fails), or a file or device another
    program holds open for writing (a running VM's disk, say). Agents of an interrupted Ferry
    run still writing to it are waited for a while: they end as soon as they notice."""
    st = os.stat(real)
    deadline = time.monotonic() + wait_s
    while True:
        others, agents = writers_of(st)
        held = False
        if stat.S_ISBLK(st.st_mode):
            try:
                os.close(os.open(real, os.O_RDONLY | os.O_EXCL))
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                held = True
        if others:
            raise OSError(errno.EBUSY, "refused: open for writing by %s; nothing was written" % ", ".join(others[:3]))
        if not agents:
            if held:
                raise OSError(errno.EBUSY, "refused: in use (mounted, or held by LVM, RAID or another "
                                           "device); nothing was written")
            return
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, "refused: open for writing by another Ferry run's replication agents: "
                                       "%s; nothing was written" % ", ".join(agents[:3]))
        wire.beat("waiting for the agents of an interrupted run to stop writing to it")
        time.sleep(0.1)


def writers_of(st):
    """Other processes holding the file (or block device) `st` describes open for writing, as
    'pid N (command)': (other programs, Ferry's own replication agents)."""
    others, agents = [], []
    me = os.getpid()
    same = ((lambda o: stat.S_ISBLK(o.st_mode) and o.st_rdev == st.st_rdev) if stat.S_ISBLK(st.st_mode)
            else (lambda o: (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino)))
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return others, agents
    for pid in pids:
        if pid == me:
            continue
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if not same(os.stat("/proc/%d/fd/%s" % (pid, fd))):
                    continue
                with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                    flags = next(int(l.split()[1], 8) for l in f if l.startswith("flags:"))
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        ours = b"ferry-agent" in f.read()
                    with open("/proc/%d/comm" % pid) as c:
                        (agents if ours else others).append("pid %d (%s)" % (pid, c.read().strip()))
                    break
            except (OSError, StopIteration, ValueError):
                continue
    return others, agents


def check_chunk(payload, chunk, size):
    """(index, kind, offset in the image, bytes it covers) of a chunk frame, checked against the
    image: a frame that names a place outside it is a protocol error, never a write there."""
    if len(payload) < 9 or size is None:
        raise ProtocolError("protocol error: a chunk frame of %d bytes before the image was opened" % len(payload))
    idx, kind = struct.unpack_from("<QB", payload, 0)
    off = idx * chunk
    if off >= size:
        raise ProtocolError("protocol error: chunk %d lies beyond the end of the image" % idx)
    room = min(chunk, size - off)   # a target may be larger than the source: its chunks may be shorter
    if kind == CH_ZERO:
        n = struct.unpack_from("<I", payload, 9)[0] if len(payload) == 13 else 0
        if not 0 < n <= room:
            raise ProtocolError("protocol error: zero chunk %d of the wrong size" % idx)
        return idx, kind, off, n
    if kind == CH_ZLIB:
        if len(payload) < 41:
            raise ProtocolError("protocol error: compressed chunk %d is truncated" % idx)
        return idx, kind, off, room
    if kind in (CH_PART, CH_DATA):
        if len(payload) < DATA_HDR.size:
            raise ProtocolError("protocol error: chunk %d is truncated" % idx)
        part = DATA_HDR.unpack_from(payload)[3]
        n = len(payload) - DATA_HDR.size
        if part % PART or part + n > room or (kind == CH_PART and n != PART):
            raise ProtocolError("protocol error: chunk %d: %d bytes at %d do not fit its %d" % (idx, n, part, room))
        return idx, kind, off, part + n
    raise ProtocolError("protocol error: chunk %d of unknown kind %d" % (idx, kind))


class BlockEnd:
    """One end of a block-level copy (role blk): a source or a target image or device. Answers
    "info", "hash", "send" and "sync" requests; a target also takes chunks, writes them, and
    acknowledges what is durable (fsync'd) in the background while chunks keep coming."""

    def __init__(self, wire, cmd):
        self.wire = wire
        self.name = cmd["path"]                 # as the operator gave it, for messages
        self.path = os.fsencode(cmd["path"])
        self.chunk = int(cmd["chunk"])
        self.target = cmd.get("target", False)
        self.compress = cmd.get("compress", False)
        self.sync_bytes = int(cmd.get("sync_bytes", 512 << 20))
        self.sync_seconds = float(cmd.get("sync_seconds", 1.0))
        self.pacer = Pacer(cmd.get("bwlimit"))
        self.fd = None
        self.size = None
        self.is_dev = False
        self.sparse = False                     # a regular file: holes can be found without reading them
        self.fresh = bool(cmd.get("fresh"))     # a new sparse target: all-zero chunks need no writing
        self.sink = None                        # the target's writer (see Direct)
        self.written = []       # (idx, hash) written since the last acknowledgement
        self.since_sync = 0
        self.last_sync = time.monotonic()
        self.bg = BackgroundSync(os.fsync, self._ack)
        self.chunk_hash = None  # the hash of a chunk arriving in parts, so far
        self.chunk_at = None    # (index, offset) the next part of a chunk in parts must have
        self.received = 0       # bytes written (zero chunks to a fresh target excluded)
        self.wire_bytes = 0     # chunk payload that arrived (compressed size)
        self.covered = 0        # bytes of the image dealt with: data written and zero chunks alike
        self.last_progress = 0.0
        if self.target:
            wire.land_at(PART + ALIGN, DATA_HDR.size)
        if self.target and cmd.get("open"):
            self.fd = open_block(self.path, True)
            self.size = dev_size(self.fd)
            self.is_dev = stat.S_ISBLK(os.fstat(self.fd).st_mode)
            self.sink = Direct(self.fd)

    # -- durability

    def _snapshot(self):
        """What the next acknowledgement will cover: taken *before* the fsync starts."""
        snap = (self.written, self.since_sync, time.time_ns())
        self.written = []
        self.since_sync = 0
        self.last_sync = time.monotonic()
        return snap

    def _ack(self, snap):
        self.wire.write(F_ACK, pack_values([[[i, h] for i, h in snap[0]], snap[2]]))
        self.wire.flush()

    def sync(self):
        """Make everything written durable, then acknowledge it (waits for a background fsync)."""
        self.bg.poll(wait=True)
        snap = self._snapshot()
        if self.fd is not None and snap[1]:
            self.wire.blocking(os.fsync, "making what was written durable", self.fd)
        self._ack(snap)

    def maybe_sync(self):
        """Start a background fsync when enough was written; writing goes on meanwhile."""
        self.bg.poll()
        if self.bg.busy:
            return
        if self.since_sync >= self.sync_bytes or time.monotonic() - self.last_sync >= self.sync_seconds:
            self.bg.start(self._snapshot(), self.fd)

    def report_progress(self, force=False):
        now = time.monotonic()
        if force or now - self.last_progress >= 0.1:
            self.last_progress = now
            self.wire.write(F_PROGRESS, pack_values([self.received, self.wire_bytes, self.covered]))

    # -- requests

    def answer(self, req):
        op = req["op"]
        if op == "info":
            self.info(req)
        elif op == "hash":
            self.hash(req)
        elif op == "send":
            self.send(req)
        elif op == "sync":
            self.sync()
        else:
            raise ValueError("blk: unknown op %r" % op)

    def info(self, req):
        """Open the image (a target: create it, or refuse it while in use) and say what it is."""
        # The operator's path is resolved once, here (/dev/VG/LV, /dev/mapper/* and
        # /dev/disk/by-id/* are symlinks); the engine then names the resolved path to
        # every agent of the round, which opens it without following anything.
        where = None
        try:
            where = locate(os.fsdecode(self.path))
            if self.target and req.get("create_size") is not None:
                self.fd = open_block(os.fsencode(where["real"]), True, req["create_size"])
                self.fresh = True
                where = locate(os.fsdecode(self.path))
            elif self.fd is None:
                if self.target and where["exists"] and req.get("check_in_use"):
                    refuse_in_use(self.wire, where["real"])
                self.fd = open_block(os.fsencode(where["real"]), self.target)
            if self.target:
                if self.sink is not None:
                    self.sink.close()
                self.sink = Direct(self.fd)
            self.size = dev_size(self.fd)
            st = os.fstat(self.fd)
            self.is_dev = stat.S_ISBLK(st.st_mode)
            self.sparse = stat.S_ISREG(st.st_mode)
            if not (self.is_dev or self.sparse):
                raise OSError(errno.EINVAL, "neither a block device nor a regular file")
            self.wire.write_json({"size": self.size, "exists": True, "device": self.is_dev, "fresh": self.fresh,
                                  "where": where})
        except OSError as e:
            if e.errno == errno.ENOENT:
                self.wire.write_json({"size": 0, "exists": False, "device": False,
                                      "error": describe_oserror(e, self.name), "where": where})
            else:
                self.wire.write_json({"fatal": describe_oserror(e, self.name), "errno": e.errno})
        self.wire.flush()

    def hash(self, req):
        """The hashes of `count` chunks from `first` (up to `size`), holes and zeros without hashing."""
        first, count = req["first"], req["count"]
        chunk, limit = self.chunk, req.get("size", self.size)
        out = bytearray()
        for idx in range(first, first + count):
            if idx * chunk >= limit:
                break
            n = min(chunk, limit - idx * chunk)
            if self.sparse and is_hole(self.fd, idx * chunk, n):
                out += CHUNK_REC.pack(idx, zero_hash(n), 1)
                continue
            data = read_chunk(self.fd, idx, chunk, limit)
            zero = is_zero(data)
            out += CHUNK_REC.pack(idx, zero_hash(len(data)) if zero else hashlib.sha256(data).digest(),
                                  1 if zero else 0)
            self.wire.beat("hashing chunks")
            if len(out) >= 64 * 1024:
                self.wire.write(F_HASHES, bytes(out))
                out.clear()
        self.wire.write(F_HASHES, bytes(out))
        self.wire.write_json({"hashed": [first, count]})
        self.wire.flush()

    def send(self, req):
        """Source: read the chunks asked for, in order; all-zero chunks travel as a flag only."""
        wire, chunk = self.wire, self.chunk
        if self.fd is None:
            self.fd = open_block(self.path, False)
            self.size = dev_size(self.fd)
            self.sparse = stat.S_ISREG(os.fstat(self.fd).st_mode)
        limit = req.get("size", self.size)
        skip_zero = req.get("skip_zero", True)
        for idx in req["chunks"]:
            n = min(chunk, limit - idx * chunk)
            if skip_zero and self.sparse and is_hole(self.fd, idx * chunk, n):
                wire.write(F_CHUNK, struct.pack("<QB", idx, CH_ZERO) + struct.pack("<I", n))
                continue
            data = read_chunk(self.fd, idx, chunk, limit)
            if skip_zero and is_zero(data):
                wire.write(F_CHUNK, struct.pack("<QB", idx, CH_ZERO) + struct.pack("<I", len(data)))
                continue
            digest = hashlib.sha256(data).digest()
            self.pacer.take(len(data))
            if self.compress:
                z = zlib.compress(data, 1)
                if len(z) < len(data):
                    wire.write_parts(F_CHUNK, (struct.pack("<QB", idx, CH_ZLIB), digest, z))
                    continue
            view = memoryview(data)
            last = (len(data) - 1) // PART * PART if data else 0   # where the last part starts
            for part in range(0, last, PART):
                wire.write_parts(F_CHUNK, (DATA_HDR.pack(idx, CH_PART, b"", part), view[part:part + PART]))
            wire.write_parts(F_CHUNK, (DATA_HDR.pack(idx, CH_DATA, digest, last), view[last:]))
        wire.flush()

    # -- chunks (target)

    def take_chunk(self, payload):
        """Write a chunk frame where it belongs; False when the target failed (said, the role ends)."""
        idx, kind, off, n = check_chunk(payload, self.chunk, self.size)
        try:
            if kind in (CH_PART, CH_DATA):
                part = DATA_HDR.unpack_from(payload)[3]
                if part and (self.chunk_hash is None or self.chunk_at != (idx, part)):
                    raise ProtocolError("protocol error: chunk %d: a part at %d that does not follow" % (idx, part))
                self.chunk_at = (idx, n) if kind == CH_PART else None
            if kind == CH_PART:
                self.write_part(payload, off, part)
                return True   # the chunk is acknowledged with its last part
            if kind == CH_ZERO:
                if not self.fresh:
                    zero_range(self.fd, off, n, self.is_dev)
                digest = zero_hash(n)
                self.covered += n
            else:
                digest, n = self.write_last(payload, idx, kind, off, n)
            self.written.append((idx, digest))
            self.since_sync += n
        except OSError as e:
            try:
                self.sync()   # what was written before is durable: acknowledge it, then fail
            except OSError:
                pass
            self.wire.write_json({"fatal": describe_oserror(e, "%s at offset %d" % (self.name, off)),
                                  "errno": e.errno})
            self.wire.flush()
            return False
        self.report_progress()
        self.maybe_sync()
        return True

    def write_part(self, payload, off, part):
        """Part of a chunk: written now, hashed on the way; the chunk's last part checks it."""
        data = memoryview(payload)[DATA_HDR.size:]
        if part == 0:
            self.chunk_hash = hashlib.sha256()
        self.sink.write(data, off + part, self.wire.landed)
        self.chunk_hash.update(data)
        self.received += len(data)
        self.covered += len(data)
        self.wire_bytes += len(data)

    def write_last(self, payload, idx, kind, off, room):
        """A whole chunk (compressed or not) or a chunk's last part: written and checked against the
        chunk's digest. (digest, the chunk's length)."""
        if kind == CH_ZLIB:
            want = bytes(payload[9:41])
            z = zlib.decompressobj()
            try:
                data = z.decompress(memoryview(payload)[41:], room)   # room: the bytes the chunk covers
            except zlib.error:
                data = b""
            if not z.eof or z.unconsumed_tail or not data:
                raise OSError(errno.EIO, "chunk %d does not decompress into its %d bytes" % (idx, room))
            part = 0
        else:
            _i, _k, want, part = DATA_HDR.unpack_from(payload)
            data = memoryview(payload)[DATA_HDR.size:]
        self.sink.write(data, off + part, self.wire.landed)
        h = self.chunk_hash if part else hashlib.sha256()
        self.chunk_hash = None
        h.update(data)
        digest = h.digest()
        if digest != want:
            raise OSError(errno.EIO, "chunk %d arrived damaged" % idx)
        self.received += len(data)
        self.covered += len(data)
        self.wire_bytes += len(payload) - (41 if kind == CH_ZLIB else DATA_HDR.size)
        return digest, part + len(data)

    def finish(self):
        """End of the stream: a target reports and makes everything durable first."""
        if self.target:
            self.report_progress(force=True)
            self.sync()
        self.wire.write(F_EOF)
        self.wire.flush()


def role_blk(wire, cmd):
    end = BlockEnd(wire, cmd)
    while True:
        typ, payload = wire.read_frame()
        if typ == F_EOF:
            end.finish()
            return
        if end.target and passes_through(typ, payload):
            wire.write(typ, payload)
            wire.flush()
        elif typ == F_JSON:
            end.answer(json.loads(payload))
        elif typ == F_CHUNK and end.target:
            if not end.take_chunk(payload):
                return
        else:
            raise ProtocolError("protocol error: blk: unexpected frame %r" % typ)


class Direct:
    """Writes to a target file (or device) open as `fd`. Aligned data read into the wire's landing
    buffer goes straight to the disk through a second, O_DIRECT descriptor of the same inode: no
    copy into the page cache (which cost the target more CPU than the rest of a copy together,
    measured here) and no evicting of the target host's cached data. The caller's fsync/syncfs
    still makes it durable. Anything else, or a filesystem refusing direct I/O, is buffered, and
    its writeback started at once."""

    def __init__(self, fd):
        self.fd = fd
        self.dio = None
        if hasattr(os, "O_DIRECT"):
            try:   # the same inode, whatever its path does meanwhile
                self.dio = os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                pass

    def write(self, data, at, landed):
        if self.dio is not None and landed and at % ALIGN == 0 and len(data) % ALIGN == 0:
            try:
                write_at(self.dio, data, at)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.close()
        write_at(self.fd, data, at)
        start_writeback(self.fd, at, len(data))

    def close(self):
        """Close the direct descriptor (the caller owns `fd`)."""
        if self.dio is not None:
            os.close(self.dio)
            self.dio = None


def write_at(fd, data, off):
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, off)
        view = view[k:]
        off += k


def start_writeback(fd, off, n):
    """Start writing [off, off+n) to disk now, without waiting: the next fsync then has little
    left to do, and the copy's tail is short."""
    try:
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def zero_range(fd, off, n, is_dev):
    """Make [off, off+n) read as zeros: discard on devices, punch a hole in files, else write zeros."""
    if is_dev:
        try:
            import fcntl
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", off, n))
            return
        except OSError:
            pass
    else:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            if libc.fallocate(fd, 0x01 | 0x02, off, n) == 0:  # KEEP_SIZE | PUNCH_HOLE
                return
        except Exception:
            pass
    pos = off
    while pos < off + n:
        k = os.pwrite(fd, ZERO[:min(IO_CHUNK, off + n - pos)], pos)
        pos += k


# ----------------------------------------------------------------------------- entry point


def widen_pipes():
    """1 MiB pipe buffers on stdin/stdout (where they are pipes): far fewer context switches."""
    try:
        import fcntl
        for fd in (0, 1):
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, 1031, 1 << 20)   # F_SETPIPE_SZ
    except (OSError, ImportError):
        pass


def die_with_parent():
    """Be killed when the process that started this agent dies (the engine for a local agent, the
    SSH session for a remote one): an agent of a killed engine must not write on unwatched."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
    except Exception:   # not Linux, or no libc to ask: the agent then ends at its next read or write
        return
    if os.getppid() == 1:   # the parent is already gone
        os._exit(0)


def main():
    die_with_parent()
    widen_pipes()
    wire = Wire()
    role = None
    try:
        typ, payload = wire.read_frame()
        cmd = json.loads(payload)
        role = cmd.get("role")
        wire.write_json({"hello": AGENT_VERSION, "pid": os.getpid(), "uid": os.geteuid(),
                         "python": sys.version.split()[0], "time_ns": time.time_ns()})
        fn = ROLES.get(role)
        if fn is None:
            raise ValueError("unknown role %r" % role)
        fn(wire, cmd)
    except EOFError:
        pass
    except BrokenPipeError:
        pass
    except Exception as e:  # report, then exit non-zero: the engine turns it into a task error
        try:
            what = str(e) if isinstance(e, ProtocolError) else "%s: %s" % (type(e).__name__, e)
            wire.write_json({"fatal": what, "role": role, "protocol": isinstance(e, ProtocolError)})
            wire.flush()
        except OSError:
            pass
        sys.exit(3)


ROLES = {"locate": role_locate, "walk": role_walk, "send": role_send, "recv": role_recv, "blk": role_blk}

if __name__ == "__main__":
    main()
