"""Just enough ELF reading for the live-image builder: shared-library needs and kernel-module info."""

from __future__ import annotations

import struct

# Read ourselves rather than run ldd/modinfo: ldd runs the host's loader against the unpacked
# libraries (breaks when the host's glibc differs from the image's), and the host may lack kmod.

_DT_NEEDED = 1
_DT_STRTAB = 5
_PT_DYNAMIC = 2
_PT_LOAD = 1


class ElfError(ValueError):
    """Not an ELF file this reader understands (64-bit little-endian only)."""


def _header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)
    return e_phoff, e_phentsize, e_phnum, e_shoff, e_shentsize, e_shnum, e_shstrndx


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    for offset, start, size in loads:
        if start <= vaddr < start + size:
            return offset + (vaddr - start)
    raise ElfError(f"address {vaddr:#x} is in no loaded segment")


def needed_libraries(data: bytes) -> list[str]:
    """The DT_NEEDED sonames of an executable or shared library; [] for a static binary."""
    phoff, phentsize, phnum, *_ = _header(data)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_offset, p_vaddr, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = []
    strtab = None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            entries.append(val)
        elif tag == _DT_STRTAB:
            strtab = _vaddr_to_offset(loads, val)
    if strtab is None:
        raise ElfError("dynamic section without a string table")
    return [_cstring(data, strtab + off) for off in entries]


def interpreter(data: bytes) -> str | None:
    """The program interpreter (PT_INTERP), e.g. /lib64/ld-linux-x86-64.so.2; None when static."""
    phoff, phentsize, phnum, *_ = _header(data)
    for i in range(phnum):
        p_type, _flags, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def section(data: bytes, name: str) -> bytes | None:
    """The raw bytes of a named section, or None."""
    _po, _pe, _pn, shoff, shentsize, shnum, shstrndx = _header(data)

    def sh(i: int) -> tuple[int, int, int]:
        sh_name, _type, _flags, _addr, sh_offset, sh_size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return sh_name, sh_offset, sh_size

    _n, names_off, _s = sh(shstrndx)
    for i in range(shnum):
        sh_name, off, size = sh(i)
        if _cstring(data, names_off + sh_name) == name:
            return data[off:off + size]
    return None


def modinfo(data: bytes) -> dict[str, str]:
    """A kernel module's .modinfo fields (name, depends, vermagic, ...); repeated keys keep the first."""
    raw = section(data, ".modinfo") or b""
    info: dict[str, str] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode("utf-8", "replace").partition("=")
            info.setdefault(key, value)
    return info


def _cstring(data: bytes, pos: int) -> str:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", "replace")
