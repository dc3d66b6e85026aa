"""The Ferry live image: a small Linux built from Debian packages, cached per recipe version.

The recipe is the folder liveimage_recipe/ (recipe.toml + the guest's /init and helpers). The
image is a cloud kernel plus a gzip'd cpio initramfs, built under
<cache>/liveimage/<version>/ where version is a hash of the recipe and of this builder's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from ..errors import PermanentError
from . import debs, elf
from .cpio import CpioWriter

RECIPE_DIR = Path(__file__).with_name("liveimage_recipe")
# The builder's own code is part of the version: a change in how the image is put together
# must rebuild it just like a change in what goes in.
_BUILDER_FILES = ("liveimage.py", "debs.py", "elf.py", "cpio.py")
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib")
_IMAGE_LIB_DIR = "lib/x86_64-linux-gnu"
_MANIFEST = "manifest.json"
# Debian names library packages lib<name><soversion> (or <name><soversion>, like zlib1g); only
# those are followed, so a dependency on perl or debconf never drags in a tree of packages.
_LIBRARY_PACKAGE = re.compile(r"^lib|\d[a-z]?$")

Progress = Callable[[str, float], None]
"""Called with what the build is doing and the fraction done (0..1)."""


@dataclass(frozen=True)
class LiveImage:
    """A built live image: boot it with -kernel/-initrd (see liveboot.live_boot_argv)."""

    kernel: Path
    initrd: Path
    version: str            # the recipe hash this image was built from
    kernel_release: str     # what `uname -r` says in the guest
    size: int               # kernel + initrd, bytes
    packages: tuple[str, ...] = ()   # "name=version" of every Debian package used

    @property
    def directory(self) -> Path:
        return self.kernel.parent


@dataclass(frozen=True)
class Recipe:
    name: str
    kernel: str
    packages: dict[str, tuple[str, ...]]
    links: dict[str, str]
    modules_early: tuple[str, ...]
    modules_late: tuple[str, ...]
    version: str
    rootfs: Path = field(default=RECIPE_DIR / "rootfs")


# ------------------------------------------------------------------ recipe and version

def _recipe_files(recipe_dir: Path) -> Iterator[Path]:
    for path in sorted(recipe_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def recipe_version(recipe_dir: Path = RECIPE_DIR) -> str:
    """The hash that names an image: recipe files (names, contents, exec bits) and builder code."""
    h = hashlib.sha256(b"ferry-liveimage\0")
    for path in _recipe_files(recipe_dir):
        rel = path.relative_to(recipe_dir).as_posix()
        h.update(f"{rel}\0{os.access(path, os.X_OK):d}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    here = Path(__file__).parent
    for name in _BUILDER_FILES:
        h.update(name.encode() + b"\0" + hashlib.sha256((here / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def load_recipe(recipe_dir: Path = RECIPE_DIR) -> Recipe:
    try:
        data = tomllib.loads((recipe_dir / "recipe.toml").read_text())
        return Recipe(
            name=data["name"], kernel=data["kernel"],
            packages={k: tuple(v) for k, v in data["packages"].items()},
            links=dict(data.get("links", {})),
            modules_early=tuple(data.get("modules_early", ())),
            modules_late=tuple(data.get("modules_late", ())),
            version=recipe_version(recipe_dir), rootfs=recipe_dir / "rootfs")
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise PermanentError(f"the live image recipe in {recipe_dir} is unreadable: {e}",
                             "restore liveimage_recipe/recipe.toml from the repository") from None


# ------------------------------------------------------------------ cache

def _image_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "liveimage"


def _load_cached(directory: Path) -> LiveImage | None:
    """The image in directory if it is complete (manifest present, files of the recorded sizes)."""
    try:
        m = json.loads((directory / _MANIFEST).read_text())
        kernel, initrd = directory / m["kernel"], directory / m["initrd"]
        if kernel.stat().st_size != m["kernel_size"] or initrd.stat().st_size != m["initrd_size"]:
            return None
        return LiveImage(kernel=kernel, initrd=initrd, version=m["version"], kernel_release=m["kernel_release"],
                         size=m["kernel_size"] + m["initrd_size"], packages=tuple(m["packages"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def cached_live_image(cache_dir: Path, recipe_dir: Path = RECIPE_DIR) -> LiveImage | None:
    """The built image for the current recipe, or None when it must be built."""
    version = await asyncio.to_thread(recipe_version, recipe_dir)
    return await asyncio.to_thread(_load_cached, _image_root(cache_dir) / version)


@contextlib.asynccontextmanager
async def _build_lock(root: Path):
    """One build at a time per cache, across processes (polling flock keeps it cancellable)."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    fd = await asyncio.to_thread(os.open, root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)   # closing drops the lock


async def build_live_image(cache_dir: Path, *, force: bool = False, progress: Progress | None = None,
                           recipe_dir: Path = RECIPE_DIR) -> LiveImage:
    """The live image for the current recipe: from the cache, else built (about a minute, ~35 MB download)."""
    report = progress or (lambda _step, _fraction: None)
    root = _image_root(cache_dir)
    recipe = await asyncio.to_thread(load_recipe, recipe_dir)
    final = root / recipe.version
    if not force and (image := await asyncio.to_thread(_load_cached, final)):
        return image
    async with _build_lock(root):
        # Another process may have built it while we waited for the lock.
        if not force and (image := await asyncio.to_thread(_load_cached, final)):
            return image
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f".build-{recipe.version}-", dir=root))
        try:
            await _build(recipe, root / "debs", work, report)
            report("installing the image", 0.98)
            await asyncio.to_thread(_install, work / "image", final)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        image = await asyncio.to_thread(_load_cached, final)
        if image is None:
            raise PermanentError(f"the live image built in {final} is incomplete",
                                 "check the free space in the workspace cache and build again")
        report("live image ready", 1.0)
        return image


def _install(built: Path, final: Path) -> None:
    """Move a finished build into place; a half-built image never sits under the final name."""
    for path in built.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(built, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ build

@dataclass
class _Unpacked:
    """Packages unpacked so far, each in its own folder, and the lookup of files across them."""

    work: Path
    debs_dir: Path
    pkgs: dict[str, debs.DebPackage] = field(default_factory=dict)

    def root(self, name: str) -> Path:
        return self.work / "pkgs" / name

    async def add(self, names: list[str], report: Progress, base: float, span: float) -> None:
        names = [n for n in names if n not in self.pkgs]
        if not names:
            return
        described = await debs.describe(names)
        report(f"downloading {len(names)} Debian packages", base)
        paths = await debs.fetch(described.values(), self.debs_dir)
        sem = asyncio.Semaphore(2)

        async def one(name: str) -> None:
            async with sem:
                await debs.unpack(paths[name], self.root(name))

        report(f"unpacking {len(names)} packages", base + span / 2)
        await asyncio.gather(*(one(n) for n in names))
        self.pkgs.update(described)

    def resolve(self, name: str, rel: str, hops: int = 0) -> Path | None:
        """A path inside one package's files, following symlinks inside that package."""
        root = self.root(name)
        path = root / rel.lstrip("/")
        if hops > 20:
            return None
        # Follow links one component at a time, re-rooting absolute targets inside the package.
        parts = PurePosixPath(rel.lstrip("/")).parts
        current = root
        for i, part in enumerate(parts):
            current = current / part
            if current.is_symlink():
                target = os.readlink(current)
                rest = "/".join(parts[i + 1:])
                base = "" if target.startswith("/") else current.parent.relative_to(root).as_posix()
                joined = os.path.normpath(os.path.join("/", base, target, rest)).lstrip("/")
                return self.resolve(name, joined, hops + 1)
        return path if path.is_file() else None

    def find_library(self, soname: str) -> tuple[str, Path] | None:
        for name in self.pkgs:
            for d in _LIB_DIRS:
                if found := self.resolve(name, f"{d}/{soname}"):
                    return name, found
        return None


def _host_library(soname: str) -> Path | None:
    for d in _LIB_DIRS:
        p = Path("/") / d / soname
        if p.is_file():
            return p.resolve()
    return None


async def _build(recipe: Recipe, debs_dir: Path, work: Path, report: Progress) -> None:
    report("resolving packages", 0.02)
    kernel_pkg = await debs.resolve_meta(recipe.kernel)
    unpacked = _Unpacked(work, debs_dir)
    await unpacked.add([kernel_pkg, *recipe.packages], report, 0.05, 0.4)

    # Programs the recipe names, then the libraries they need, found in their dependencies.
    files, needy = await asyncio.to_thread(_program_files, unpacked, recipe)
    from_host: list[str] = []
    report("finding shared libraries", 0.5)
    await _add_libraries(unpacked, needy, files, from_host, report)

    kernel_root = unpacked.root(kernel_pkg)
    vmlinuz = await asyncio.to_thread(lambda: sorted((kernel_root / "boot").glob("vmlinuz-*")))
    if not vmlinuz:
        raise PermanentError(f"{kernel_pkg} has no kernel image", "check the kernel package in recipe.toml")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    report("collecting kernel modules", 0.6)
    modules, early, late = await asyncio.to_thread(
        _module_order, kernel_root / "lib/modules" / release / "kernel", recipe.modules_early, recipe.modules_late)

    report("writing the initramfs", 0.7)
    out = work / "image"
    await asyncio.to_thread(out.mkdir)
    packages = tuple(f"{p.name}={p.version}" for p in sorted(unpacked.pkgs.values(), key=lambda p: p.name))
    initrd_size = await asyncio.to_thread(
        _write_initrd, out / "initrd.gz", recipe, files, modules, early, late, release)
    await asyncio.to_thread(shutil.copyfile, vmlinuz[0], out / "vmlinuz")
    manifest = {
        "name": recipe.name, "version": recipe.version, "kernel_release": release,
        "kernel": "vmlinuz", "kernel_size": vmlinuz[0].stat().st_size,
        "initrd": "initrd.gz", "initrd_size": initrd_size,
        "packages": list(packages), "libraries_from_host": from_host,
        "modules": early + late, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    await asyncio.to_thread((out / _MANIFEST).write_text, json.dumps(manifest, indent=2) + "\n")


_Needy = list[tuple[str | None, Path]]     # (package it came from, None for the host; file to scan)
_Files = dict[str, tuple[Path, int]]       # image path -> (source, mode)


def _program_files(unpacked: _Unpacked, recipe: Recipe) -> tuple[_Files, _Needy]:
    files: _Files = {}
    needy: _Needy = []
    for pkg, entries in recipe.packages.items():
        for entry in entries:
            src, _, dst = (s.strip() for s in entry.partition("->"))
            found = unpacked.resolve(pkg, src)
            if found is None:
                raise PermanentError(f"package {pkg} has no file {src}",
                                     "fix the file list in liveimage_recipe/recipe.toml")
            files[dst or src] = (found, 0o755)
            needy.append((pkg, found))
    return files, needy


def _scan(unpacked: _Unpacked, pending: _Needy, files: _Files, seen: set[str]
          ) -> tuple[_Needy, dict[str, set[str | None]]]:
    """One round: the libraries (and loader) pending files need; returns new files to scan and what is missing."""
    needy: _Needy = []
    missing: dict[str, set[str | None]] = {}     # soname or loader path -> packages that need it
    for pkg, src in pending:
        try:
            data = src.read_bytes()
            wants = elf.needed_libraries(data)
            interp = elf.interpreter(data)
        except (elf.ElfError, ValueError, IndexError, struct.error):
            continue   # a script, or not something the loader maps
        if interp and interp.lstrip("/") not in files:
            loader = unpacked.resolve("libc6", interp) if "libc6" in unpacked.pkgs else None
            if loader is None:
                missing.setdefault(interp, set()).add(pkg)
            else:
                files[interp.lstrip("/")] = (loader, 0o755)
        for soname in wants:
            if soname in seen:
                continue
            hit = unpacked.find_library(soname)
            if hit is None:
                missing.setdefault(soname, set()).add(pkg)
                continue
            seen.add(soname)
            files[f"{_IMAGE_LIB_DIR}/{soname}"] = (hit[1], 0o644)
            needy.append(hit)
    return needy, missing


async def _add_libraries(unpacked: _Unpacked, needy: _Needy, files: _Files, from_host: list[str],
                         report: Progress) -> None:
    """Adds every shared library (and the loader) the programs need, transitively."""
    seen: set[str] = set()
    while needy:
        pending = needy
        needy, missing = await asyncio.to_thread(_scan, unpacked, pending, files, seen)
        if not missing:
            continue
        # Fetch the library packages that the needing packages depend on, then look again.
        needers = sorted({p for ps in missing.values() for p in ps if p is not None})
        deps = await debs.direct_depends(needers)
        wanted = sorted({d for ds in deps.values() for d in ds
                         if _LIBRARY_PACKAGE.search(d) and d not in unpacked.pkgs})
        if wanted:
            report(f"fetching libraries: {', '.join(wanted)}", 0.52)
            await unpacked.add(wanted, report, 0.52, 0.05)
            needy.extend(pending)
            continue
        for soname, who in missing.items():
            host = await asyncio.to_thread(_host_library, os.path.basename(soname))
            if host is None:
                raise PermanentError(f"{', '.join(sorted(p or 'a host library' for p in who))} needs {soname}, "
                                     "which no package provides",
                                     "add the package that ships it to liveimage_recipe/recipe.toml")
            # The host is Debian too; record it so the manifest says what did not come from packages.
            from_host.append(str(host))
            loader = soname.startswith("/")
            files[soname.lstrip("/") if loader else f"{_IMAGE_LIB_DIR}/{soname}"] = (host, 0o755 if loader else 0o644)
            seen.add(soname)
            needy.append((None, host))


def _module_order(kdir: Path, early: tuple[str, ...], late: tuple[str, ...]
                  ) -> tuple[dict[str, Path], list[str], list[str]]:
    """Kernel modules with their dependencies first (from .modinfo: no depmod output in the package)."""
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in kdir.rglob("*.ko")}
    deps_of: dict[str, list[str]] = {}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise PermanentError(f"kernel modules depend on each other in a loop: {' -> '.join(chain)}",
                                 "check the module list in recipe.toml")
        path = by_name.get(name)
        if path is None:
            raise PermanentError(f"the kernel has no module {name}",
                                 "it may be built in or renamed; fix the module list in recipe.toml")
        if name not in deps_of:
            info = elf.modinfo(path.read_bytes())
            deps_of[name] = [d for d in info.get("depends", "").split(",") if d]
        for dep in deps_of[name]:
            visit(dep, chain + (name,))
        order.append(name)

    for name in early:
        visit(name, ())
    n_early = len(order)
    for name in late:
        visit(name, ())
    return {n: by_name[n] for n in order}, order[:n_early], order[n_early:]


def _write_initrd(path: Path, recipe: Recipe, files: dict[str, tuple[Path, int]], modules: dict[str, Path],
                  early: list[str], late: list[str], release: str) -> int:
    entries: dict[str, tuple[str, object, int]] = {}   # image path -> (kind, payload, mode)

    def put(rel: str, kind: str, payload: object, mode: int) -> None:
        entries[rel.strip("/")] = (kind, payload, mode)

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "lib64", _IMAGE_LIB_DIR, "lib/modules", "etc",
              "dev", "proc", "sys", "run", "tmp", "root", "var/log", "mnt", "newroot"):
        put(d, "dir", None, 0o700 if d == "root" else 0o755)
    for rel, (src, mode) in files.items():
        put(rel, "file", src, mode)
    for name, src in modules.items():
        put(f"lib/modules/{name}.ko", "file", src, 0o644)
    put("lib/modules/early.list", "data", "".join(f"{m}\n" for m in early).encode(), 0o644)
    put("lib/modules/late.list", "data", "".join(f"{m}\n" for m in late).encode(), 0o644)
    put("etc/os-release", "data", (
        f'NAME="Ferry live image"\nID={recipe.name}\nVERSION_ID={recipe.version}\n'
        f'PRETTY_NAME="Ferry live image {recipe.version} (kernel {release})"\n').encode(), 0o644)
    for src in sorted(recipe.rootfs.rglob("*")):
        rel = src.relative_to(recipe.rootfs).as_posix()
        if src.is_dir():
            put(rel, "dir", None, 0o755)
        elif rel == "etc/shadow":
            put(rel, "file", src, 0o600)
        else:
            put(rel, "file", src, 0o755 if os.access(src, os.X_OK) else 0o644)
    for rel, target in recipe.links.items():
        put(rel, "link", target, 0o777)

    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    # The kernel's unpacker does not create parent folders: emit every folder before its contents.
    dirs = {str(PurePosixPath(p).parent) for p in entries} | {p for p, e in entries.items() if e[0] == "dir"}
    all_dirs = set()
    for d in dirs:
        parts = PurePosixPath(d).parts
        all_dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    all_dirs.discard(".")
    for d in sorted(all_dirs, key=lambda s: (s.count("/"), s)):
        mode = entries[d][2] if d in entries and entries[d][0] == "dir" else 0o755
        cpio.add_dir(d, mode)
    # /dev/console must exist before devtmpfs is mounted: the kernel opens it for init's stdio.
    cpio.add_char_device("dev/console", 5, 1, 0o600)
    cpio.add_char_device("dev/null", 1, 3, 0o666)
    for rel in sorted(entries):
        kind, payload, mode = entries[rel]
        if kind == "file":
            cpio.add_file(rel, Path(payload).read_bytes(), mode)
        elif kind == "data":
            cpio.add_file(rel, payload, mode)
        elif kind == "link":
            cpio.add_symlink(rel, payload)
    cpio.close()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(buf.getbuffer())
    return path.stat().st_size
