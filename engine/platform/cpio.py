"""A writer for the cpio "newc" format the Linux kernel unpacks as an initramfs."""

from __future__ import annotations

import stat
from typing import BinaryIO

# Written here rather than with the cpio tool: entries get owner root and exact modes (and device
# nodes such as /dev/console) without the builder running as root or faking ownership.

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Appends entries to a binary stream; call close() to write the trailer. Not thread-safe."""

    def __init__(self, out: BinaryIO, *, mtime: int = 0) -> None:
        self._out = out
        self._ino = 300000       # any unique numbers; the kernel only uses them to spot hard links
        self._mtime = mtime
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.strip("/") or "."
        if name in self._names and name != _TRAILER:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, self._mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, blob: bytes) -> None:
        self._out.write(blob)
        self._out.write(b"\0" * (-len(blob) % 4))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry(_TRAILER, 0, nlink=1)
