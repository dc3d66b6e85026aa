"""Debian packages for the live image: resolve names, download with apt-get, unpack with dpkg -x."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import PermanentError, TransientError

# Nothing is installed on the build machine: packages are only downloaded (apt-get download) and
# unpacked (dpkg -x), so no maintainer script ever runs.

_NO_NETWORK = re.compile(r"Temporary failure resolving|Could not resolve|Could not connect|"
                         r"Connection (failed|refused|timed out)|Network is unreachable|No route to host|"
                         r"Unable to connect", re.I)
# The security archive drops superseded versions: lists older than the mirror point at 404s.
_STALE_LISTS = re.compile(r"404\s+Not Found|was not found", re.I)


@dataclass(frozen=True)
class DebPackage:
    """One binary package as the machine's package lists describe its candidate version."""

    name: str
    version: str
    arch: str
    sha256: str
    size: int

    @property
    def deb_name(self) -> str:
        # The file name apt-get download gives it (an epoch's ':' is written as %3a).
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


async def _run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 120.0) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env={**os.environ, "LC_ALL": "C", "LANG": "C"}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise PermanentError(f"{argv[0]} not found: the live image is built from Debian packages",
                             "build it on a Debian or Ubuntu machine (apt-get, dpkg) "
                             "or copy a built image into the workspace cache") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise TransientError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} took longer than {timeout:g} s",
                             "the Debian mirror may be slow or unreachable; try again") from None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("W:")]
    return lines[-1] if lines else "no error output"


async def resolve_meta(meta: str) -> str:
    """The exact package a meta package points at (linux-image-cloud-amd64 -> linux-image-6.1.0-N-cloud-amd64)."""
    deps = await direct_depends([meta])
    names = [d for d in deps.get(meta, []) if not d.startswith("<")]
    if not names:
        raise PermanentError(f"cannot resolve {meta} to an exact package",
                             "run apt-get update so the package lists are present")
    return names[0]


async def direct_depends(names: Iterable[str]) -> dict[str, list[str]]:
    """Each package's Depends and Pre-Depends (first of each alternative), as apt-cache sees them."""
    names = list(names)
    if not names:
        return {}
    rc, out, err = await _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                               "--no-breaks", "--no-replaces", "--no-enhances", *names])
    if rc != 0:
        raise PermanentError(f"apt-cache does not know these packages: {_last_line(err)}",
                             "run apt-get update so the package lists are present")
    deps: dict[str, list[str]] = {}
    current: list[str] | None = None
    skip_alternative = False
    for line in out.splitlines():
        if not line.startswith(" "):
            current = deps.setdefault(line.strip(), [])
            skip_alternative = False
            continue
        m = re.match(r"\s*(\|?)(Pre)?Depends: (\S+)", line)
        if not m or current is None:
            continue
        if not skip_alternative:
            current.append(m.group(3))
        # "|Depends: a" then "Depends: b" means a or b: keep the first choice only.
        skip_alternative = bool(m.group(1))
    return deps


async def describe(names: Iterable[str]) -> dict[str, DebPackage]:
    """The candidate version, checksum and size of each package, from the local package lists."""
    names = sorted(set(names))
    rc, out, err = await _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, DebPackage] = {}
    for stanza in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
        if "Package" in fields and fields["Package"] not in found:
            found[fields["Package"]] = DebPackage(fields["Package"], fields["Version"], fields["Architecture"],
                                                  fields.get("SHA256", ""), int(fields.get("Size", "0")))
    missing = [n for n in names if n not in found]
    if missing or (rc != 0 and not found):
        raise PermanentError(f"apt-cache knows no package {', '.join(missing) or _last_line(err)}",
                             "run apt-get update (the package lists may be missing or stale)")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _is_good(path: Path, pkg: DebPackage) -> bool:
    if not path.is_file():
        return False
    return not pkg.sha256 or await asyncio.to_thread(_sha256, path) == pkg.sha256


async def fetch(pkgs: Iterable[DebPackage], debs_dir: Path) -> dict[str, Path]:
    """The .deb of each package, downloaded into debs_dir unless a verified copy is already there."""
    pkgs = list(pkgs)
    await asyncio.to_thread(debs_dir.mkdir, parents=True, exist_ok=True)
    paths = {p.name: debs_dir / p.deb_name for p in pkgs}
    todo = [p for p in pkgs if not await _is_good(paths[p.name], p)]
    if not todo:
        return paths
    staging = Path(await asyncio.to_thread(_mkdtemp, debs_dir))
    try:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            # As root apt drops to the _apt user, who may not write here; we only download.
            argv += ["-o", "APT::Sandbox::User=root"]
        rc, out, err = await _run([*argv, *(f"{p.name}={p.version}" for p in todo)], cwd=staging, timeout=900)
        if rc != 0:
            if _STALE_LISTS.search(err):
                raise PermanentError(f"the Debian mirror no longer has a package version the lists name: "
                                     f"{_last_line(err)}", "run apt-get update, then build again")
            if _NO_NETWORK.search(err):
                raise TransientError("cannot download the live image's Debian packages: "
                                     "no network to the Debian mirror",
                                     f"check that apt-get update works, or put the .deb files in {debs_dir}")
            raise PermanentError(f"apt-get download failed: {_last_line(err)}",
                                 "run apt-get update (the package lists may be stale), then build again")
        for p in todo:
            got = staging / p.deb_name
            if not await _is_good(got, p):
                raise PermanentError(f"downloaded {p.deb_name} is missing or its checksum does not match",
                                     "run apt-get update and build again")
            await asyncio.to_thread(os.replace, got, paths[p.name])
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    return paths


def _mkdtemp(parent: Path) -> str:
    import tempfile
    return tempfile.mkdtemp(prefix=".download-", dir=parent)


async def unpack(deb: Path, dest: Path) -> None:
    """Extract a package's files (no maintainer scripts) into dest."""
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    rc, _out, err = await _run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=300)
    if rc != 0:
        raise PermanentError(f"cannot unpack {deb.name}: {_last_line(err)}",
                             f"delete {deb} so it is downloaded again")
