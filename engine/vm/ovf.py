"""OVF / OVA packages of one VM on a host: export and import of the disks, checked against the manifest.

A package is `<name>.ovf` + `<name>.mf` + one dynamic VHD per disk, either as a folder (OVF) or as one
tar archive whose members are in the DMTF order .ovf, .mf, disks (OVA). Big files are converted and hashed
on the host (qemu-img, sha256sum); only the descriptor and the manifest pass through Ferry, and are
read and written by ovfxml.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import posixpath
import secrets
import stat
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Sequence

from ..errors import FerryError, PermanentError, Refused
from ..transport.base import RunResult, Transport
from .hostcmd import Tail, last_line, qemu_img_progress, watch
from .ovfxml import (FILE_RE, HASH_TOOLS, Manifest, OvfDisk, OvfSpec, build_ovf, check_spec, manifest_text,
                     parse_manifest, parse_ovf)
from .progress import ByteMeter, ProgressFn

MAX_DESCRIPTOR = 16 << 20     # an .ovf is a few KiB; refuse to pull a huge "descriptor" into memory
MAX_MANIFEST = 1 << 20
VHD_MAX = 2040 << 30


# ------------------------------------------------------------------ running things on the host

async def _run(t: Transport, argv: Sequence[str], message: str, hint: str, *, timeout: float = 600) -> RunResult:
    r = await t.run(argv, timeout=timeout)
    if not r.ok:
        raise PermanentError(f"{message} on {t.host}: {last_line(r)}", hint)
    return r


async def _hash_file(t: Transport, path: str, algo: str, on_bytes: Callable[[int], None]) -> str:
    """Digest of a (big) file, computed on the host; dd in front of the hash tool reports the bytes read."""
    tool, length = HASH_TOOLS[algo]
    script = ('export LC_ALL=C; { dd if="$1" bs=4M status=progress; echo "ferry-dd-status $?" >&2; } | '
              + tool)
    r = await watch(t, ["sh", "-c", script, "sh", path],
                     on_err=Tail(r"(\d+) bytes", lambda n: on_bytes(int(n))))
    digest = r.stdout.split()[0].decode("ascii", "replace").lower() if r.stdout.split() else ""
    if not r.ok or b"ferry-dd-status 0" not in r.stderr or len(digest) != length:
        raise PermanentError(f"cannot compute the {algo} of {path} on {t.host}: {last_line(r)}",
                             "check that the file is readable and that the host has dd and " + tool)
    return digest


async def _image_info(t: Transport, image: str, *, fmt: str | None = None) -> dict:
    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), image]
    r = await _run(t, argv, f"cannot read the disk image {_shown(image)}",
                   "check the path, and that no running VM holds the image", timeout=120)
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise PermanentError(f"qemu-img info {_shown(image)} on {t.host} gave no JSON",
                             "check the qemu-img version on the host") from None


def _shown(image: str) -> str:
    if image.startswith("json:"):
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(image[5:])["file"]["filename"]
    return image


async def _convert(t: Transport, argv: list[str], capacity: int, meter: ByteMeter, label: str, message: str) -> None:
    r = await qemu_img_progress(t, ["convert", *argv], lambda f: meter.show(int(capacity * f), label))
    if not r.ok:
        raise PermanentError(f"{message} on {t.host}: {last_line(r)}",
                             "check the free space and that the image is not in use")


async def _rmtree(t: Transport, path: str) -> None:
    with contextlib.suppress(FerryError):
        await t.run(["rm", "-rf", "--", path], timeout=600)


def _split(out: str) -> tuple[str, str]:
    out = posixpath.normpath(out)
    return posixpath.dirname(out) or ".", posixpath.basename(out)


# ------------------------------------------------------------------ export

async def check_out(t: Transport, name: str, out: str, *, ova: bool) -> str:
    """The normalised path a package of VM `name` would be written to, once nothing there would be
    overwritten or mixed in; Refused (naming the path and the host) otherwise."""
    if not FILE_RE.match(f"{name}.ovf"):
        raise Refused(f"{name!r} cannot name the files of a package",
                      "export under a plain name of printable ASCII without '/' or '\\'")
    parent, base = _split(out)
    out = posixpath.join(parent, base)
    if ova and not base.lower().endswith(".ova"):
        raise Refused(f"{out}: an OVA package must be a file named *.ova", f"for example {out}.ova")
    pst = await t.stat(parent)
    if pst is None or not pst.is_dir:
        raise Refused(f"folder {parent} does not exist on {t.host}", "create it first, or choose another path")
    st = await t.stat(out)
    if st is not None and (ova or not st.is_dir):
        raise Refused(f"{out} already exists on {t.host}", "choose another path or move the old one away")
    if st is not None and await t.listdir(out):
        raise Refused(f"folder {out} on {t.host} is not empty",
                      "export into a new or empty folder, so no file of another package is mixed in")
    return out


async def export_package(t: Transport, spec: OvfSpec, disk_paths: dict[str, str], out: str, *, ova: bool,
                         progress: ProgressFn | None = None, stage: str | None = None, state: dict | None = None,
                         save: Callable[[dict], Awaitable[None]] | None = None,
                         keep: Callable[[], bool] | None = None) -> dict:
    """Write `spec` and its disks (converted to dynamic VHD) as an OVF folder or an .ova file at `out`.

    The package is made in a staging folder next to `out` (named `stage`, or a new random name), one
    step at a time (convert each disk, hash each disk, write the descriptor and the manifest, tar them
    for an OVA), and moved into place at the end. After each durable step `save` gets the state of the
    export; given back as `state`, it lets an interrupted export go on from there (when the staging
    folder is intact and the VM's disks have not changed since), else the export starts over; a disk it
    had converted counts only once checked again (_converted_before). An interruption for which
    `keep()` is true (a pause) keeps the staging folder; anything else removes it. Progress counts each
    disk's virtual size once per step, so its total is known from the start and never changes.

    Returns {"path": out, "files": {file: sha256}, "bytes": size of the package}."""
    check_spec(spec)
    out = await check_out(t, spec.name, out, ova=ova)
    parent, base = _split(out)
    missing = [d.name for d in spec.disks if d.name not in disk_paths]
    if missing:
        raise PermanentError(f"{spec.name}: no image given for disk(s) {', '.join(missing)}",
                             "internal: pass the image path of every disk")

    sources = {}
    disks = []
    marks: dict[str, list[int]] = {}      # disk -> [size, mtime] of its image: has it changed since?
    for d in spec.disks:
        info = await _image_info(t, disk_paths[d.name])
        sources[d.name] = (disk_paths[d.name], info.get("format") or "qcow2")
        if int(info["virtual-size"]) > VHD_MAX:
            raise PermanentError(f"{disk_paths[d.name]} ({int(info['virtual-size']) >> 30} GiB) is larger than a VHD "
                                 "can hold (2040 GiB)", "move this VM with block replication instead of a package")
        disks.append(replace(d, capacity=int(info["virtual-size"]), format="vpc"))
        sst = await t.stat(disk_paths[d.name])
        marks[d.name] = [sst.size, sst.mtime_ns] if sst else [0, 0]
    spec = replace(spec, disks=tuple(disks))

    ovf_name, mf_name = f"{spec.name}.ovf", f"{spec.name}.mf"
    capacity = sum(d.capacity for d in spec.disks)
    meter = ByteMeter(progress, capacity * (3 if ova else 2))     # convert, hash (and tar) each disk once

    old = state or {}
    stage = posixpath.join(parent, stage) if stage else posixpath.join(parent, f".{base}.ferry-tmp-{secrets.token_hex(4)}")
    sst = await t.stat(stage)
    again = bool(sst and sst.is_dir and old.get("stage") == stage and old.get("out") == out and old.get("ova") == ova
                 and old.get("sources") == marks)
    if sst is not None and not again:
        await _rmtree(t, stage)          # left by an earlier run that can no longer be trusted
    if not again:
        await t.mkdir(stage, parents=False, mode=0o755)
    sizes: dict[str, int] = dict(old.get("sizes") or {}) if again else {}       # VHD file -> bytes, once converted
    digests: dict[str, str] = dict(old.get("digests") or {}) if again else {}   # VHD file -> sha256, once hashed

    async def checkpoint() -> None:
        if save is not None:
            await save({"stage": stage, "out": out, "ova": ova, "sources": marks, "sizes": sizes,
                        "digests": digests})

    try:
        await checkpoint()
        for d in spec.disks:
            src, fmt = sources[d.name]
            dst = posixpath.join(stage, d.file)
            label = f"converting {d.name} to {d.file}"
            if await _converted_before(t, src, fmt, dst, sizes.get(d.file), digests.get(d.file),
                                       lambda f, what, d=d: meter.show(int(d.capacity * f), what)):
                meter.advance(d.capacity, f"{label}: done before")
                continue
            # Cut short, or changed after its task died: made again.
            sizes.pop(d.file, None)
            digests.pop(d.file, None)
            await _convert(t, ["-f", fmt, "-O", "vpc", "-o", "subformat=dynamic,force_size=on", src, dst],
                           d.capacity, meter, label, f"cannot convert {src} to {d.file}")
            await _run(t, ["sync", "--", dst], f"cannot flush {d.file} to disk", "check the folder's filesystem")
            vst = await t.stat(dst)
            sizes[d.file] = vst.size if vst else 0
            meter.advance(d.capacity, f"converted {d.name}")
            await checkpoint()
        for d in spec.disks:
            label = f"hashing {d.file}"
            if d.file not in digests:
                # bytes of the VHD, counted in the disk's virtual size like every step
                digests[d.file] = await _hash_file(
                    t, posixpath.join(stage, d.file), "SHA256",
                    lambda n, d=d, label=label: meter.show(_scaled(n, sizes[d.file], d.capacity), label))
                await checkpoint()
            meter.advance(d.capacity, label)
        ovf = build_ovf(spec, sizes=sizes).encode("utf-8")
        await t.write_file(posixpath.join(stage, ovf_name), ovf)
        files = {ovf_name: hashlib.sha256(ovf).hexdigest(), **{d.file: digests[d.file] for d in spec.disks}}
        mf = manifest_text(files).encode("ascii")
        await t.write_file(posixpath.join(stage, mf_name), mf)
        total_bytes = len(ovf) + len(mf) + sum(sizes.values())

        if ova:
            part = posixpath.join(stage, f".{base}.part")

            async def tar_size() -> None:
                pst = await t.stat(part)
                meter.show(_scaled(pst.size if pst else 0, total_bytes, capacity), f"writing {base}")

            members = [ovf_name, mf_name, *(d.file for d in spec.disks)]
            # pax (not plain ustar) so that disks over 8 GiB fit; without per-file time records, a package of
            # small files is byte-for-byte ustar
            r = await watch(t, ["tar", "--format=posix", "--pax-option=delete=atime,delete=ctime,delete=mtime",
                                 "--owner=0", "--group=0", "--numeric-owner", "--no-recursion",
                                 "-C", stage, "-cf", part, "--", *members], poll=tar_size)
            if not r.ok:
                raise PermanentError(f"cannot write {out} on {t.host}: {last_line(r)}", "check the free space")
            pst = await t.stat(part)
            total_bytes = pst.size if pst else total_bytes
            await _run(t, ["mv", "-n", "-T", "--", part, out], f"cannot move the finished package to {out}",
                       "check the permissions of the folder")
            if await t.stat(part) is not None:
                raise PermanentError(f"{out} appeared on {t.host} while the package was written",
                                     "choose another path or move the other file away")
            await _rmtree(t, stage)
        else:
            await _run(t, ["mv", "-T", "--", stage, out], f"cannot move the finished package to {out}",
                       "the folder must be new or empty; check its permissions")
        meter.show(meter.total, "done")
    except asyncio.CancelledError:
        if keep is None or not keep():
            await asyncio.shield(_rmtree(t, stage))
        raise
    except BaseException:
        await asyncio.shield(_rmtree(t, stage))
        raise
    return {"path": out, "files": files, "bytes": total_bytes}


async def _converted_before(t: Transport, src: str, fmt: str, vhd: str, size: int | None, digest: str | None,
                            report: Callable[[float, str], None]) -> bool:
    """Does the VHD an interrupted run converted from `src` (its size in the checkpoint) still hold what
    it did? Nothing written after that run died is trusted: hashed since, the VHD is read through again
    to that digest (the manifest's); not yet, it is compared with its source. `report(fraction, what)`."""
    st = await t.stat(vhd)
    if size is None or st is None or st.size != size:
        return False
    name = posixpath.basename(vhd)
    if digest:
        what = f"checking {name} (converted before) against its digest"
        return await _hash_file(t, vhd, "SHA256", lambda n: report(n / size if size else 1.0, what)) == digest.lower()
    what = f"comparing {name} (converted before) with its source"
    r = await qemu_img_progress(t, ["compare", "-f", fmt, "-F", "vpc", src, vhd], lambda f: report(f, what))
    return r.ok


def _scaled(n: int, of: int, to: int) -> int:
    """n bytes of `of`, as the same share of `to`."""
    return n * to // of if of > 0 else 0


# ------------------------------------------------------------------ reading a package

@dataclass(frozen=True)
class _Member:
    raw: str       # the name as tar stores it (what to ask tar for)
    name: str      # without a leading ./
    kind: str      # '-' regular file, 'd', 'l', 'h', ...
    size: int


@dataclass(frozen=True)
class _Package:
    path: str                      # what the operator named
    kind: str                      # "ova" | "ovf"
    ovf: str                       # the .ovf: member name (ova) or file path (ovf)
    members: dict[str, _Member]    # ova: regular members by name


async def _list_ova(t: Transport, path: str) -> list[_Member]:
    r = await t.run(["env", "LC_ALL=C", "tar", "--numeric-owner", "--quoting-style=escape", "-tvf", path],
                    timeout=600)
    if not r.ok:
        raise PermanentError(f"{path} on {t.host} is not a readable OVA (tar) archive: {last_line(r)}",
                             "the package is damaged or not an OVA")
    members = []
    for line in r.text().splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        kind, name = parts[0][:1], parts[5]
        if kind == "l":
            name = name.split(" -> ", 1)[0]
        elif kind == "h":
            name = name.split(" link to ", 1)[0]
        size = int(parts[2]) if parts[2].isdigit() else 0
        members.append(_Member(name, name[2:] if name.startswith("./") else name, kind, size))
    if not members:
        raise PermanentError(f"{path} on {t.host} is an empty archive", "the package is damaged or not an OVA")
    return members


async def _open(t: Transport, path: str) -> _Package:
    st = await t.stat(path)
    if st is None:
        raise PermanentError(f"{path} does not exist on {t.host}", "check the path of the package")
    if st.is_dir:
        ovfs = [n for n in await t.listdir(path) if n.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise PermanentError(f"folder {path} on {t.host} holds {len(ovfs)} .ovf files, not one",
                                 "name the .ovf file of the package")
        return _Package(path, "ovf", posixpath.join(path, ovfs[0]), {})
    if path.lower().endswith(".ovf"):
        return _Package(path, "ovf", path, {})
    if not path.lower().endswith(".ova"):
        raise PermanentError(f"{path} is neither an .ovf nor an .ova", "name the package's .ovf or .ova file")
    members = await _list_ova(t, path)
    first = members[0]
    if first.kind != "-" or not first.name.lower().endswith(".ovf") or not FILE_RE.match(first.name):
        raise PermanentError(f"{path}: the first member of the OVA is {first.name!r}, not the .ovf descriptor",
                             "an OVA starts with its .ovf (DMTF OVF); repack it with the .ovf first")
    seen: dict[str, _Member] = {}
    for m in members:
        if m.name in seen:
            raise PermanentError(f"{path}: the OVA holds {m.name} twice", "the package is damaged or tampered with")
        seen[m.name] = m
    return _Package(path, "ova", first.name, {m.name: m for m in members if m.kind == "-"})


async def _read_small(t: Transport, pkg: _Package, name: str, limit: int) -> bytes:
    """A small file of the package (descriptor, manifest), read into memory."""
    if pkg.kind == "ova":
        m = pkg.members[name]
        if m.size > limit:
            raise PermanentError(f"{pkg.path}: {name} is {m.size} bytes, too big for a descriptor or manifest",
                                 "the package is damaged or not an OVF package")
        r = await _run(t, ["tar", "-xOf", pkg.path, "--occurrence=1", "--no-wildcards", "--", m.raw],
                       f"cannot read {name} from {pkg.path}", "the package is damaged")
        return r.stdout
    st = await t.stat(name)
    if st is None:
        raise PermanentError(f"{name} does not exist on {t.host}", "check the path of the package")
    if st.size > limit:
        raise PermanentError(f"{name} is {st.size} bytes, too big for a descriptor or manifest",
                             "the package is damaged or not an OVF package")
    return await t.read_file(name)


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PermanentError(f"{file}: not UTF-8 text", "the package is damaged or not an OVF package") from None


def _ovf_label(pkg: _Package) -> str:
    return f"{pkg.path}: {pkg.ovf}" if pkg.kind == "ova" else pkg.ovf


async def read_package(t: Transport, path: str) -> tuple[OvfSpec, str]:
    """The VM an .ovf (or a folder holding one) or an .ova describes, and the descriptor's text."""
    pkg = await _open(t, path)
    text = _decode(await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR), _ovf_label(pkg))
    return parse_ovf(text, file=_ovf_label(pkg)), text


async def import_needs(t: Transport, path: str, *, disks: set[str] | None = None,
                       stage: str | None = None) -> tuple[OvfSpec, int]:
    """The VM a package describes, and the bytes its import writes in the datastore at most: each disk
    as qcow2 (no more than its file, which holds its data; a VMDK may be compressed, so its virtual
    size) and, for an OVA, the disk files extracted next to them while they are converted. `disks`:
    only those disks (what a resumed import still converts); `stage`: the folder an earlier run
    extracted into, whose files are replaced, not added to."""
    pkg = await _open(t, path)
    spec = parse_ovf(_decode(await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR), _ovf_label(pkg)), file=_ovf_label(pkg))
    need = 0
    for d in spec.disks:
        if disks is not None and d.name not in disks:
            continue
        if not d.file:
            need += 1 << 20             # a blank disk: its qcow2 header and tables
            continue
        if pkg.kind == "ova":
            size = pkg.members[d.file].size if d.file in pkg.members else 0
        else:
            st = await t.stat(posixpath.join(posixpath.dirname(pkg.ovf) or ".", d.file))
            size = st.size if st else 0
        need += (d.capacity if d.format == "vmdk" else min(size, d.capacity)) + (1 << 20)
        if pkg.kind == "ova":
            there = await t.stat(posixpath.join(stage, d.file)) if stage else None
            need += max(0, size - (there.size if there else 0))
    return spec, need


# ------------------------------------------------------------------ import

def _source_json(fmt: str, path: str) -> str:
    """A json: image spec that opens exactly one file with the given driver: no probing, no backing file,
    and a VHD's size as its footer states it (what the OVF capacity means), not its CHS geometry."""
    spec: dict = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "vpc":
        spec["force_size_calc"] = "current_size"
    if fmt == "qcow2":
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def _check_single_file(info: dict, path: str, label: str) -> None:
    """A disk from a package must not reach other files of the host (backing files, VMDK extents)."""
    data = (info.get("format-specific") or {}).get("data") or {}
    extents = [e.get("filename") for e in data.get("extents") or []]
    if info.get("backing-filename") or data.get("data-file") or any(
            posixpath.normpath(e or "") != posixpath.normpath(path) for e in extents):
        raise PermanentError(f"{label} refers to other files (backing file, data file or extents)",
                             "a package's disk must be self-contained; refusing it for safety")


@dataclass(frozen=True)
class _Verified:
    """A package whose descriptor matches its manifest, and the manifest's entries."""
    pkg: _Package
    spec: OvfSpec
    manifest: Manifest
    mf_name: str
    folder: str                    # an OVF package's folder (where its files are)
    sizes: dict[str, int]          # every file the manifest lists but the descriptor -> its size

    def mismatch(self, n: str) -> PermanentError:
        return PermanentError(f"{self.pkg.path}: {n} does not match its {self.manifest.algos[n]} in "
                              f"{self.mf_name} (package tampered or damaged)",
                              "get an intact copy of the package; nothing was imported")


async def _verified(t: Transport, path: str) -> _Verified:
    """Open a package and check its descriptor against its manifest, which must list every file."""
    pkg = await _open(t, path)
    label = _ovf_label(pkg)
    ovf_bytes = await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR)
    spec = parse_ovf(_decode(ovf_bytes, label), file=label)
    ovf_name = posixpath.basename(pkg.ovf)

    # the manifest: <stem>.mf, else the package's only .mf
    stem = posixpath.splitext(ovf_name)[0]
    if pkg.kind == "ova":
        names = list(pkg.members)
    else:
        names = await t.listdir(posixpath.dirname(pkg.ovf) or ".")
    mfs = [n for n in names if n.lower().endswith(".mf")]
    mf_name = f"{stem}.mf" if f"{stem}.mf" in mfs else (mfs[0] if len(mfs) == 1 else None)
    if mf_name is None:
        raise PermanentError(f"{path}: the package has no manifest ({stem}.mf)",
                             "a package without a manifest cannot be verified; export it again with its manifest")
    folder = posixpath.dirname(pkg.ovf) or "."
    mf_label = mf_name if pkg.kind == "ova" else posixpath.join(folder, mf_name)
    manifest = parse_manifest(_decode(await _read_small(t, pkg, mf_label, MAX_MANIFEST), f"{path}: {mf_name}"),
                              file=f"{path}: {mf_name}")
    needed = [ovf_name, *dict.fromkeys(d.file for d in spec.disks if d.file)]
    unlisted = [n for n in needed if n not in manifest]
    if unlisted:
        raise PermanentError(f"{path}: {', '.join(unlisted)} not listed in {mf_name}",
                             "every file of the package must be in its manifest; the package cannot be verified")
    for n in manifest:
        if not FILE_RE.match(n) or (pkg.kind == "ova" and n not in pkg.members) or (
                pkg.kind == "ovf" and n not in names):
            raise PermanentError(f"{path}: {n} is listed in {mf_name} but is not in the package",
                                 "the package is incomplete; copy it again")
    to_check = [n for n in manifest if n != ovf_name]
    if pkg.kind == "ova":
        sizes = {n: pkg.members[n].size for n in to_check}
    else:
        sizes = {}
        for n in to_check:
            st = await t.stat(posixpath.join(folder, n))
            if st is None or not stat.S_ISREG(st.mode):
                raise PermanentError(f"{path}: {n} is not a regular file", "the package is damaged")
            sizes[n] = st.size
    v = _Verified(pkg, spec, manifest, mf_name, folder, sizes)
    if getattr(hashlib, manifest.algos[ovf_name].lower())(ovf_bytes).hexdigest() != manifest[ovf_name]:
        raise v.mismatch(ovf_name)
    return v


def _files_of(v: _Verified, disks: list[OvfDisk]) -> list[str]:
    """The files of the package an import of these disks reads: theirs, and every file that belongs to
    no disk (verified all the same: the manifest vouches for the package as a whole)."""
    of_disks = {d.file for d in v.spec.disks if d.file}
    wanted = {d.file for d in disks if d.file}
    return [n for n in v.sizes if n in wanted or n not in of_disks]


async def _verify(t: Transport, v: _Verified, n: str, where: str, meter: ByteMeter, *, measured: bool = True) -> bool:
    """Does the file `n` at `where` have the size and the digest the manifest gives it?"""
    st = await t.stat(where)
    if st is None or not stat.S_ISREG(st.mode) or st.size != v.sizes[n]:
        return False
    lbl = f"verifying {n}"
    digest = await _hash_file(t, where, v.manifest.algos[n], lambda b: meter.show(b, lbl))
    if digest != v.manifest[n]:
        return False
    meter.advance(v.sizes[n], lbl, measured=measured)
    return True


async def _staged(t: Transport, v: _Verified, files: list[str], stage: str, meter: ByteMeter) -> str:
    """The folder holding the files, each verified against the manifest: an OVF package's own folder,
    or, for an OVA, `stage`, into which they are extracted (files an earlier run extracted there are
    kept when they match the manifest)."""
    path = v.pkg.path
    if v.pkg.kind != "ova":
        for n in files:
            if not await _verify(t, v, n, posixpath.join(v.folder, n), meter):
                await _check_regular(t, v, n, posixpath.join(v.folder, n))
                raise v.mismatch(n)
        return v.folder
    st = await t.stat(stage)
    if st is None:
        await t.mkdir(stage, parents=False, mode=0o700)
    elif not st.is_dir:
        await t.remove(stage)
        await t.mkdir(stage, parents=False, mode=0o700)
    extract = []
    for n in files:
        # Trusted only once it matches: whatever wrote it (a tar of a run that died) is not.
        if await _verify(t, v, n, posixpath.join(stage, n), meter, measured=False):
            meter.advance(v.sizes[n], "extracted", measured=False)
        else:
            extract.append(n)
    if not extract:
        return stage
    await _run(t, ["rm", "-f", "--", *(posixpath.join(stage, n) for n in extract)],
               f"cannot clear {stage}", "check the permissions of the datastore")
    meter.show(0, f"extracting {posixpath.basename(path)}")

    async def extracted() -> None:
        done = 0
        for n in extract:
            st = await t.stat(posixpath.join(stage, n))
            done += st.size if st else 0
        meter.show(done, f"extracting {posixpath.basename(path)}")

    r = await watch(t, ["tar", "-xf", path, "-C", stage, "--no-same-owner", "--no-same-permissions",
                        "--occurrence=1", "--no-wildcards", "--",
                        *(v.pkg.members[n].raw for n in extract)], poll=extracted)
    if not r.ok:
        raise PermanentError(f"cannot extract {path} on {t.host}: {last_line(r)}",
                             "check the free space; the package may be damaged")
    meter.advance(sum(v.sizes[n] for n in extract), "extracted")
    for n in extract:
        if not await _verify(t, v, n, posixpath.join(stage, n), meter):
            await _check_regular(t, v, n, posixpath.join(stage, n))
            raise v.mismatch(n)
    return stage


async def _check_regular(t: Transport, v: _Verified, n: str, where: str) -> None:
    st = await t.stat(where)
    if st is None or not stat.S_ISREG(st.mode) or st.size != v.sizes[n]:
        raise PermanentError(f"{v.pkg.path}: {n} is not a regular file of {v.sizes[n]} bytes",
                             "the package is damaged")


async def _convert_disk(t: Transport, v: _Verified, d: OvfDisk, files_dir: str, part: str, meter: ByteMeter,
                        name: str) -> int:
    """One disk of the package written as qcow2 at `part` (a new file), at least as large as the
    descriptor says; returns its virtual size."""
    path = v.pkg.path
    if d.file:
        src = _source_json(d.format, posixpath.join(files_dir, d.file))
        _check_single_file(await _image_info(t, src), posixpath.join(files_dir, d.file), f"{path}: {d.file}")
        await _convert(t, ["-O", "qcow2", src, part], d.capacity, meter, f"converting {d.file}",
                       f"cannot convert {d.file} of {path} to qcow2")
    else:
        await _run(t, ["qemu-img", "create", "-q", "-f", "qcow2", part, str(d.capacity)],
                   f"cannot create blank disk {d.name} of {name}", "check the free space")
    size = int((await _image_info(t, part, fmt="qcow2"))["virtual-size"])
    if size < d.capacity:    # a VHD read by its geometry can be a little smaller than the OVF says
        await _run(t, ["qemu-img", "resize", "-q", "-f", "qcow2", part, str(d.capacity)],
                   f"cannot grow {d.name} of {name} to {d.capacity} bytes", "check the free space")
        size = d.capacity
    meter.advance(d.capacity, f"converted {d.name}")
    return size


def _work(v: _Verified) -> int:
    """The bytes an import goes through, whatever is left to do: each disk converted, each file
    verified (and extracted first, from an OVA)."""
    return sum(d.capacity for d in v.spec.disks) + sum(v.sizes.values()) * (2 if v.pkg.kind == "ova" else 1)


async def import_disks(t: Transport, path: str, parts: dict[str, str], *, stage: str,
                       progress: ProgressFn | None = None) -> OvfSpec:
    """For a task that makes a VM from a package: verify the package against its manifest, then write
    the named disks as qcow2, each to the new file `parts[disk name]` (the task flushes and renames
    them into place). An OVA's files are extracted into `stage` (kept for a resume, which trusts
    only those that match the manifest; removed at the end). Nothing is removed on failure: the
    task's rollback or resume does that. Progress counts the whole import; what is not redone (disks
    not named, files already extracted) advances it without being measured."""
    v = await _verified(t, path)
    by_name = {d.name: d for d in v.spec.disks}
    unknown = [n for n in parts if n not in by_name]
    if unknown:
        raise PermanentError(f"{path} has no disk {', '.join(unknown)} (the package changed since the import began?)",
                             "cancel the import (ferry task cancel) and import the package again")
    disks = [by_name[n] for n in parts]
    files = _files_of(v, disks)
    meter = ByteMeter(progress, _work(v))
    factor = 2 if v.pkg.kind == "ova" else 1
    meter.advance(sum(d.capacity for d in v.spec.disks if d.name not in parts)
                  + factor * sum(size for n, size in v.sizes.items() if n not in files), "already imported",
                  measured=False)
    files_dir = await _staged(t, v, files, stage, meter)
    for d in disks:
        await _convert_disk(t, v, d, files_dir, parts[d.name], meter, v.spec.name)
    if v.pkg.kind == "ova":
        await _rmtree(t, stage)
    return v.spec


async def import_package(t: Transport, path: str, dest_dir: str, *, name: str | None = None,
                         progress: ProgressFn | None = None) -> tuple[OvfSpec, dict[str, str]]:
    """Verify a package against its manifest, then convert its disks to dest_dir/<disk>.qcow2; on its own,
    outside a task: whatever it wrote is removed when it fails.

    Returns the spec (named `name` if given; capacities as imported) and {disk name: qcow2 path}."""
    v = await _verified(t, path)
    spec = replace(v.spec, name=name) if name else v.spec
    dest_dir = posixpath.normpath(dest_dir)
    targets = {d.name: posixpath.join(dest_dir, f"{d.name}.qcow2") for d in spec.disks}
    for target in targets.values():
        if await t.stat(target) is not None:
            raise PermanentError(f"{target} already exists on {t.host}",
                                 "import into another folder or under another name")
    meter = ByteMeter(progress, _work(v))
    made_dest = await t.stat(dest_dir) is None
    tmp = posixpath.join(dest_dir, f".ferry-import-{secrets.token_hex(4)}")
    created: list[str] = []
    try:
        if made_dest:
            await t.mkdir(dest_dir)
        files_dir = await _staged(t, v, list(v.sizes), tmp, meter)
        disks = []
        for d in spec.disks:
            target = targets[d.name]
            part = posixpath.join(dest_dir, f".{d.name}.qcow2.ferry-tmp")
            created.append(part)
            size = await _convert_disk(t, v, d, files_dir, part, meter, spec.name)
            await _run(t, ["mv", "-n", "-T", "--", part, target], f"cannot move {d.name} into place",
                       "check the permissions of the folder")
            created.append(target)
            if await t.stat(part) is not None:
                created.remove(target)
                raise PermanentError(f"{target} appeared on {t.host} during the import",
                                     "import into another folder or under another name")
            disks.append(replace(d, capacity=size))
        if v.pkg.kind == "ova":
            await _rmtree(t, tmp)
    except BaseException:
        async def undo() -> None:
            for p in created:
                with contextlib.suppress(FerryError):
                    await t.remove(p)
            await _rmtree(t, tmp)
            if made_dest:
                with contextlib.suppress(FerryError):
                    await t.run(["rmdir", "--", dest_dir])
        with contextlib.suppress(Exception):
            await asyncio.shield(undo())
        raise
    return replace(spec, disks=tuple(disks)), targets
