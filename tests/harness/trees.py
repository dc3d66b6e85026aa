"""Trees with every kind of file and metadata, and an exact description of a tree to compare two."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import subprocess
from pathlib import Path

NS = 1_000_000_000


def acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_access: (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


# ACL tags: USER_OBJ 1, USER 2, GROUP_OBJ 4, GROUP 8, MASK 0x10, OTHER 0x20.
ACL_USER_1234 = acl_xattr([(1, 6, 0xFFFFFFFF), (2, 4, 1234), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                           (0x20, 0, 0xFFFFFFFF)])


def write(path: Path | bytes, data: bytes, *, mtime_ns: int | None = None, mode: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def rich_tree(root: Path, *, big: int = 3 << 20, specials: bool = True) -> None:
    """Every file type and piece of metadata Ferry preserves."""
    root.mkdir(parents=True, exist_ok=True)
    rnd = hashlib.sha256(b"seed").digest() * 4096
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    write(root / "empty-file", b"")
    write(root / "small.txt", b"hello ferry\n", mtime_ns=1_600_000_000 * NS + 123_456_789)
    write(root / "dir" / "medium.bin", rnd[:200_000])
    write(root / "dir" / "sub" / "big.bin", (rnd * (big // len(rnd) + 1))[:big])
    write(root / "dir" / "sub" / "deeper" / "note", b"deep\n")
    # setuid, setgid, sticky
    write(root / "suid-tool", b"#!/bin/sh\n", mode=0o4755)
    write(root / "sgid-tool", b"#!/bin/sh\n", mode=0o2711)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    # owners as numeric ids that need not exist on either side
    write(root / "owned", b"owned by 1234:5678\n")
    os.chown(root / "owned", 1234, 5678)
    # symlinks: relative, absolute, dangling, to a directory (never followed)
    os.symlink("small.txt", root / "link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("dir", root / "link-dir")
    os.lchown(root / "link-rel", 4321, 8765)
    # hard links: a group of three names
    write(root / "dir" / "hard-a", b"one inode, three names\n")
    os.link(root / "dir" / "hard-a", root / "dir" / "sub" / "hard-b")
    os.link(root / "dir" / "hard-a", root / "hard-c")
    # sparse file: holes stay holes
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"data in the middle" * 1000)
        f.seek(40 << 20)
        f.write(rnd[:65536])
    # xattrs and a POSIX ACL
    os.setxattr(root / "small.txt", "user.ferry.note", b"kept")
    os.setxattr(root / "dir", "user.ferry.dir", b"dir attr")
    try:
        os.setxattr(root / "dir" / "medium.bin", "system.posix_acl_access", ACL_USER_1234)
    except OSError:
        pass  # the filesystem has no ACLs: the comparison still covers what it has
    # names that are awkward: newline, invalid UTF-8, spaces and quotes
    write(root / "new\nline", b"n")
    write(os.fsencode(root) + b"/bad-\xff-utf8", b"i")
    write(root / "it's \"quoted\" & spaced", b"q")
    if specials:
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "null-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    # directory times last (creating entries above changed them)
    os.utime(root / "dir" / "sub", ns=(1_500_000_000 * NS, 1_500_000_000 * NS + 5))
    os.utime(root / "empty-dir", ns=(1_400_000_000 * NS, 1_400_000_000 * NS))


def extents(path: bytes) -> list[tuple[int, int]]:
    """Data regions of a file (holes excluded)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.close(fd)
    return out


def describe(root: Path, *, times_of_root: bool = True) -> dict[bytes, tuple]:
    """Every entry under root with type, mode, owners, mtime (ns), size, content hash, link target,
    xattrs, hard-link group and data extents — what a user would compare after a copy."""
    rootb = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inode_names: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, rootb)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            content = link = None
            ext = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                ext = tuple(extents(full)) if st.st_blocks * 512 < st.st_size else None
                if st.st_nlink > 1:
                    inode_names.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                link = os.readlink(full)
            try:
                xattrs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False))
                                      for n in os.listxattr(full, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0, content, link, xattrs,
                        st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0, ext)
    groups = {}
    for names in inode_names.values():
        names = sorted(names)
        for n in names:
            groups[n] = tuple(names)
    final = {rel: v + (groups.get(rel),) for rel, v in out.items()}
    if times_of_root:
        st = os.stat(rootb)
        final[b"."] = (stat.S_IFDIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    return final


def diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two describe() results."""
    out = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            out.append(f"missing on target: {rel!r}")
        elif rel not in a:
            out.append(f"extra on target: {rel!r}")
        elif a[rel] != b[rel]:
            out.append(f"differs: {rel!r}: {a[rel]} != {b[rel]}")
    return out


def resident(path: Path) -> int:
    """Bytes of the file held in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


@contextlib.contextmanager
def loop_device(backing: Path, *, read_only: bool = False):
    """A loop device over `backing` for the test's duration (skips the test where there are none)."""
    import pytest

    r = subprocess.run(["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(backing)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop devices here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
