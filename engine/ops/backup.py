"""Management-data backups (F5): the workspace's state in one archive, here and on remote servers.

An archive (`ferry-SITE-ID.tar.gz`, ID = `20261203-020000-daily`: its UTC time and kind) holds
- manifest.json, first: what is inside (each file's size and SHA-256), Ferry's version, the schema
  version of state.db, the site, when, and what was left out and why;
- state.db: a consistent online copy made with SQLite's backup API (one step, under one read
  transaction: other Ferry processes go on writing to the WAL meanwhile), checked with
  PRAGMA integrity_check before it counts;
- config.toml, known_hosts (host keys are public), themes/ (the workspace's), themes-builtin/ (the
  themes this Ferry ships, for reference: a restore leaves them alone), keys/*.pub and
  keys/*known_hosts. Private keys (keys/: the receiver key, the lab's identity) are never included.
Next to it, `ferry-SITE-ID.tar.gz.sha256` in sha256sum's format: a backup counts once both are there.

Phases and their durability: the archive is written under a dot-name, fsynced, renamed, then its
.sha256 written the same way, then the folder fsynced; a crash leaves either no backup or a whole one
(a dot-file left behind is removed by the next backup). A remote copy goes to a dot-name on the
server, its SHA-256 is computed on the server (sha256sum over SSH; read back when the server only
speaks SFTP) and compared with ours before it is renamed to its name and its .sha256 written: a
corrupted upload never counts.

Retention: each kind keeps its newest `[backup.keep]` KIND archives here; each remote keeps its newest
`keep` (30) of this site. Older ones are pruned after each backup (`ferry backup prune --dry-run`
shows what would go).

Restore (`restore`): with the engine stopped and its lock held, the current state is backed up first
(kind before-restore), the archive's files are checked against its manifest and state.db against
integrity_check and this Ferry's schema version, then state.db is replaced atomically (the old one
checkpointed first, so no WAL of it is left to be applied to the new one), and config.toml,
known_hosts and themes/ are put back.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import FerryError, PermanentError, Refused
from ..logs import logger
from . import service as _service
from .backupconfig import KINDS, BackupSettings, RemoteTarget, settings
from .backupmodel import BackupInfo, BackupList, BackupResult

log = logger("ferry.backup")

FORMAT = 1
CHUNK = 1 << 20
_ID_RE = r"\d{8}-\d{6}-(?:" + "|".join(KINDS) + r")(?:-\d+)?"
ID_RE = re.compile(rf"^{_ID_RE}$")
_ARCHIVE_RE = re.compile(rf"^ferry-(?P<site>.+)-(?P<id>{_ID_RE})\.tar\.gz$")
SCHEDULE_HINT = 'run = "backup" (or "backup hourly", "backup remote NAME") in a [schedules.NAME] of config.toml'


# ------------------------------------------------------------------------------ names

def site_slug(site: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", getattr(site, "name", "") or "site") or "site"


def local_dir(root: Path, site: Any) -> Path:
    d = settings(site).local_dir
    return Path(d).expanduser() if d else Path(root) / "backups"


def archive_name(site: Any, backup_id: str) -> str:
    return f"ferry-{site_slug(site)}-{backup_id}.tar.gz"


def kind_of(backup_id: str) -> str:
    rest = backup_id.split("-", 2)[2]
    return re.sub(r"-\d+$", "", rest)


def created_of(backup_id: str) -> float:
    return datetime.strptime(backup_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()


def new_id(kind: str, now: float, taken: Iterable[str]) -> str:
    base = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{kind}"
    taken = set(taken)
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}-{n}"
    return out


def _parse(name: str, site: Any) -> str | None:
    """The id of an archive of this site, from its file name (None: not one)."""
    m = _ARCHIVE_RE.match(name)
    return m.group("id") if m and m.group("site") == site_slug(site) else None


# ------------------------------------------------------------------------------ making one

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def copy_state(src: Path, dst: Path) -> tuple[int, str]:
    """A consistent copy of state.db at `dst` through SQLite's backup API, checked: (its schema
    version, integrity_check's answer). One step (pages=-1): the copy is the database as one read
    transaction saw it, while other processes keep writing (WAL lets them)."""
    if not src.exists():
        raise Refused(f"no state database at {src}", "the workspace has no state yet: nothing to back up")
    s = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    d = sqlite3.connect(str(dst))
    try:
        s.execute("PRAGMA busy_timeout=30000")
        s.backup(d)
        d.execute("PRAGMA journal_mode=DELETE")     # one self-contained file in the archive
        version = int(d.execute("PRAGMA user_version").fetchone()[0])
        ok = d.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.Error as e:
        raise PermanentError(f"cannot copy the state database {src}: {e}",
                             "see logs/ferry.log; PRAGMA integrity_check on it says whether it is damaged") from None
    finally:
        d.close()
        s.close()
    if ok != "ok":
        raise PermanentError(f"the copy of {src} fails integrity_check: {ok}",
                             "the database itself may be damaged: keep the backups you have")
    return version, ok


def _builtin_themes() -> Path | None:
    import importlib
    try:
        return Path(importlib.import_module("ferry.themes").__file__).parent
    except (ImportError, TypeError):
        return None


def _members(root: Path) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """The workspace's files that go into an archive (name inside, path) and what is left out, why."""
    take: list[tuple[str, Path]] = []
    left: list[dict[str, str]] = []
    for name in ("config.toml", "known_hosts"):
        if (root / name).is_file():
            take.append((name, root / name))
    themes = root / "themes"
    if themes.is_dir():
        take += [(f"themes/{p.relative_to(themes)}", p) for p in sorted(themes.rglob("*")) if p.is_file()]
    builtin = _builtin_themes()
    if builtin is not None:
        take += [(f"themes-builtin/{p.name}", p) for p in sorted(builtin.glob("*.toml"))]
    keys = root / "keys"
    if keys.is_dir():
        for p in sorted(keys.rglob("*")):
            if not p.is_file():
                continue
            rel = f"keys/{p.relative_to(keys)}"
            if p.name.endswith((".pub", "known_hosts")):
                take.append((rel, p))
            else:
                left.append({"path": rel, "why": "a private key: never backed up (make it again, or keep it "
                                                 "in your own secret store)"})
    return take, left


def make_archive(root: Path, site: Any, kind: str, now: float, *, version: str = "") -> BackupInfo:
    """A new local backup of the workspace at `root` (blocking: run it in a thread)."""
    if kind not in KINDS:
        raise Refused(f"no backup kind {kind!r}", "kinds: " + ", ".join(KINDS))
    root = Path(root)
    d = local_dir(root, site)
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise PermanentError(f"cannot create the backup folder {d}: {e.strerror}",
                             "set [backup] local_dir in config.toml to a writable folder") from None
    for stale in d.glob(".ferry-*"):            # what a crashed backup left
        with contextlib.suppress(OSError):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    taken = [i for p in d.iterdir() if (i := _parse(p.name, site))]
    bid = new_id(kind, now, taken)
    name = archive_name(site, bid)
    staging = Path(tempfile.mkdtemp(prefix=".ferry-staging-", dir=d))
    try:
        db = staging / "state.db"
        schema, _ = copy_state(root / "state.db", db)
        files, left = _members(root)
        files = [("state.db", db), *files]
        listed = [{"path": n, "size": p.stat().st_size, "sha256": sha256_file(p)} for n, p in files]
        manifest = {
            "format": FORMAT, "id": bid, "kind": kind, "site": getattr(site, "name", ""),
            "created": now, "created_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "ferry_version": version or _ferry_version(), "schema_version": schema,
            "made_on": os.uname().nodename, "files": listed, "excluded": left,
            "note": "private keys (keys/ of the workspace) are never backed up; themes-builtin/ is for reference "
                    "only (a restore leaves Ferry's own themes alone)",
        }
        tmp = d / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
                body = json.dumps(manifest, indent=2, sort_keys=True).encode()
                ti = tarfile.TarInfo("manifest.json")
                ti.size, ti.mtime, ti.mode = len(body), int(now), 0o600
                tar.addfile(ti, io.BytesIO(body))
                for n, p in files:
                    tar.add(str(p), arcname=n, recursive=False)
            raw.flush()
            os.fsync(raw.fileno())
        final = d / name
        os.replace(tmp, final)
        digest = sha256_file(final)
        _write_atomic(d / f"{name}.sha256", f"{digest}  {name}\n".encode())
        _fsync_dir(d)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            (d / f".{name}.tmp").unlink()
    log.info("backup %s: %s (%d bytes)", bid, final, final.stat().st_size)
    return BackupInfo(bid, kind, created_of(bid), "local", str(final), final.stat().st_size, digest, True,
                      site=getattr(site, "name", ""), ferry_version=manifest["ferry_version"], schema_version=schema)


def _ferry_version() -> str:
    from .. import api
    return api.VERSION


def read_manifest(path: Path) -> dict:
    """The manifest of an archive (the first member)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            m = tar.extractfile("manifest.json")
            if m is None:
                raise KeyError("manifest.json")
            return json.loads(m.read())
    except (OSError, tarfile.TarError, KeyError, ValueError, EOFError) as e:
        raise PermanentError(f"{path} is not a readable Ferry backup: {e}",
                             "it may be truncated or damaged: pick another backup (ferry backup list)") from None


def _sidecar(path: Path) -> str | None:
    try:
        return Path(f"{path}.sha256").read_text().split()[0].lower()
    except (OSError, IndexError):
        return None


def local_info(path: Path, site: Any, *, verify: bool = True) -> BackupInfo:
    bid = _parse(path.name, site) or ""
    st = path.stat()
    want = _sidecar(path)
    verified: bool | None = None
    problem = ""
    if want is None:
        problem = "no .sha256 file"
    elif verify:
        got = sha256_file(path)
        verified = got == want
        problem = "" if verified else f"SHA-256 is {got[:12]}…, its .sha256 says {want[:12]}…"
    info = BackupInfo(bid, kind_of(bid), created_of(bid), "local", str(path), st.st_size, want or "", verified,
                      problem, site=getattr(site, "name", ""))
    if verified:
        with contextlib.suppress(FerryError):
            m = read_manifest(path)
            info = replace(info, ferry_version=str(m.get("ferry_version", "")), schema_version=m.get("schema_version"))
    return info


def list_local(root: Path, site: Any, *, verify: bool = True) -> list[BackupInfo]:
    """This site's archives in the local folder, newest first."""
    d = local_dir(root, site)
    if not d.is_dir():
        return []
    out = [local_info(p, site, verify=verify) for p in d.iterdir() if _parse(p.name, site) and p.is_file()]
    return sorted(out, key=lambda b: (b.created, b.id), reverse=True)


# ------------------------------------------------------------------------------ retention

def plan_prune(items: Iterable[BackupInfo], keep: Callable[[str], int], *, by_kind: bool = True) -> list[BackupInfo]:
    """What retention removes: past the newest `keep(kind)` of each kind (by_kind) or `keep("")` of
    all (a remote server), the oldest; oldest first."""
    groups: dict[str, list[BackupInfo]] = {}
    for b in items:
        groups.setdefault(b.kind if by_kind else "", []).append(b)
    out: list[BackupInfo] = []
    for kind, group in groups.items():
        group.sort(key=lambda b: (b.created, b.id), reverse=True)
        out += group[keep(kind):]
    return sorted(out, key=lambda b: (b.created, b.id))


def remove_local(b: BackupInfo) -> None:
    for p in (Path(b.path), Path(f"{b.path}.sha256")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ------------------------------------------------------------------------------ remote servers (SFTP)

def remote_spec(site: Any, target: RemoteTarget) -> Any:
    """The HostSpec the SSH stack connects with: the host of config.toml it names (user, identity and
    port of [backup.remote.NAME] win), or its address."""
    from ..config import HostSpec
    base = site.hosts.get(target.host) if getattr(site, "hosts", None) else None
    if base is not None and base.transport == "ssh":
        address, port, user, identity = base.address or base.name, base.port, base.user, base.identity
    else:
        address, port, user, identity = target.host, None, None, None
    identity = target.identity or identity
    return HostSpec(f"backup-{target.name}", "", "ssh", address, target.port or port, target.user or user,
                    str(Path(identity).expanduser()) if identity else None)


class RemoteServer:
    """One [backup.remote.NAME] over SFTP, with the workspace's known_hosts and the site's SSH settings."""

    def __init__(self, site: Any, target: RemoteTarget, pool: Any) -> None:
        from ..transport.ssh import SshTransport
        self.site, self.target = site, target
        self.where = f"remote {target.name}"
        self.t = SshTransport(remote_spec(site, target), known_hosts=pool.known_hosts,
                              ssh_config_paths=pool.ssh_config_paths, use_agent=pool.use_agent,
                              connect_timeout=pool.connect_timeout)

    async def close(self) -> None:
        await self.t.close()

    def _path(self, name: str) -> str:
        return f"{self.target.path}/{name}"

    async def sha256(self, path: str) -> str:
        """SHA-256 of a file, computed on the server (sha256sum), else read back over SFTP."""
        r = await self.t.run(["sha256sum", "--", path], timeout=600)
        if r.ok and r.stdout.split():
            return r.text().split()[0].lower()
        if r.exit_status not in (126, 127):        # there, and it failed: the file is the problem
            raise PermanentError(f"sha256sum of {path} on {self.where} failed: "
                                 f"{r.stderr.decode(errors='replace').strip()[:200]}", "check the file on the server")
        h = hashlib.sha256(await self.t.read_file(path))
        return h.hexdigest()

    async def upload(self, b: BackupInfo) -> BackupInfo:
        """Copy a local archive here; it counts (renamed to its name, its .sha256 beside it) only once
        the server's SHA-256 of the copy matches."""
        import asyncssh

        from ..transport.ssh import _fsync, _replace
        name = Path(b.path).name
        final, tmp = self._path(name), self._path(f".{name}.{uuid.uuid4().hex[:8]}.part")
        await self.t.mkdir(self.target.path)

        async def put(sftp: asyncssh.SFTPClient) -> None:
            async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=0o600)) as f:
                with open(b.path, "rb") as src:
                    while chunk := await asyncio.to_thread(src.read, CHUNK):
                        await f.write(chunk)
                await _fsync(f)
        await self.t._files("upload", tmp, put)
        try:
            got = await self.sha256(tmp)
            if got != b.sha256:
                raise PermanentError(f"the upload of {b.id} to {self.where} is corrupt: the server's SHA-256 is "
                                     f"{got[:12]}…, ours {b.sha256[:12]}…", "it was removed; try again "
                                     "(ferry backup now --remote NAME), and check the server's disk")
            await self.t._files("rename", tmp, lambda sftp: _replace(sftp, tmp, final))
        except BaseException:
            with contextlib.suppress(FerryError, OSError):
                await self.t.remove(tmp)
            raise
        await self.t.write_file(f"{final}.sha256", f"{b.sha256}  {name}\n".encode(), mode=0o600)
        log.info("backup %s uploaded to %s:%s, SHA-256 checked there", b.id, self.target.host, final)
        return replace(b, where=self.where, path=final, verified=True, problem="")

    async def list(self, *, verify: bool = True) -> list[BackupInfo]:
        """This site's archives on the server, newest first; each checked with the server's sha256sum."""
        if await self.t.stat(self.target.path) is None:
            return []
        names = await self.t.listdir(self.target.path)
        ids = {n: i for n in names if (i := _parse(n, self.site))}
        sums: dict[str, str] = {}
        if verify and ids:
            r = await self.t.run(["sh", "-c", 'cd "$1" && shift && sha256sum -- "$@"', "sh", self.target.path,
                                  *sorted(ids)], timeout=600)
            for line in r.text().splitlines():
                parts = line.split(None, 1)
                if len(parts) == 2:
                    sums[parts[1].lstrip("*")] = parts[0].lower()
        out = []
        for n, bid in ids.items():
            st = await self.t.stat(self._path(n))
            want = ""
            if f"{n}.sha256" in names:
                with contextlib.suppress(FerryError):
                    want = (await self.t.read_file(self._path(f"{n}.sha256"))).decode().split()[0].lower()
            verified: bool | None = None
            problem = ""
            if not want:
                problem = "no .sha256 file"
            elif verify and n in sums:
                verified = sums[n] == want
                problem = "" if verified else f"the server's SHA-256 is {sums[n][:12]}…, its .sha256 says {want[:12]}…"
            elif verify:
                problem = "sha256sum did not run on the server"
            out.append(BackupInfo(bid, kind_of(bid), created_of(bid), self.where, self._path(n),
                                  st.size if st else 0, want, verified, problem, site=getattr(self.site, "name", "")))
        return sorted(out, key=lambda b: (b.created, b.id), reverse=True)

    async def remove(self, b: BackupInfo) -> None:
        await self.t.remove(b.path)
        await self.t.remove(f"{b.path}.sha256")

    async def download(self, b: BackupInfo, dest_dir: Path) -> BackupInfo:
        """Copy an archive of the server into `dest_dir` (checked against its .sha256 after the copy)."""
        data = await self.t.read_file(b.path)
        got = hashlib.sha256(data).hexdigest()
        if not b.sha256 or got != b.sha256:
            raise PermanentError(f"backup {b.id} on {self.where} is corrupt: SHA-256 {got[:12]}…, its .sha256 "
                                 f"says {(b.sha256 or 'nothing')[:12]}…", "pick another backup (ferry backup list)")
        dest = Path(dest_dir) / Path(b.path).name
        await asyncio.to_thread(_write_atomic, dest, data)
        await asyncio.to_thread(_write_atomic, Path(f"{dest}.sha256"), f"{got}  {dest.name}\n".encode())
        return replace(b, where="local", path=str(dest), verified=True)


async def fetch(root: Path, site: Any, backup_id: str, remote_name: str, pool: Any = None) -> BackupInfo:
    """The backup `backup_id` of remote `remote_name` copied into the local folder (checked on the
    server first, and after the copy)."""
    if pool is None:
        from ..transport import TransportPool
        from ..workspace import Workspace
        pool = TransportPool(site, Workspace(Path(root)))
    server = RemoteServer(site, remote_target(site, remote_name), pool)
    try:
        found = [b for b in await server.list(verify=True) if b.id == backup_id]
        if not found:
            raise Refused(f"no backup {backup_id} on remote {remote_name}", "ferry backup list shows the backups")
        if found[0].verified is not True:
            raise Refused(f"backup {backup_id} on remote {remote_name} does not match its checksum: "
                          f"{found[0].problem}", "pick another backup (ferry backup list)")
        d = local_dir(root, site)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return await server.download(found[0], d)
    finally:
        await server.close()


def remote_target(site: Any, name: str) -> RemoteTarget:
    cfg = settings(site)
    if name not in cfg.remotes:
        raise Refused(f"no backup remote {name!r}", "remotes: " + (", ".join(sorted(cfg.remotes)) or "none") +
                      " (add [backup.remote.NAME] with host and path to config.toml)")
    return cfg.remotes[name]


# ------------------------------------------------------------------------------ what the engine does

class Backups:
    """Backups of one workspace: made, uploaded, listed, pruned (the engine's side; blocking work in threads)."""

    def __init__(self, root: Path, site: Callable[[], Any], pool: Any, now: Callable[[], float] = time.time) -> None:
        self.root, self._site, self.pool, self.now = Path(root), site, pool, now
        self._lock = asyncio.Lock()          # one backup at a time (a schedule and `backup now`)

    @property
    def site(self) -> Any:
        return self._site()

    @property
    def cfg(self) -> BackupSettings:
        return settings(self.site)

    def _server(self, name: str) -> RemoteServer:
        return RemoteServer(self.site, remote_target(self.site, name), self.pool)

    async def now_(self, kind: str = "manual", remote: str | None = None, *, at: float | None = None) -> BackupResult:
        """A backup of `kind`, uploaded to `remote` and to every remote with auto = true; then pruned."""
        site = self.site
        if remote is not None:
            remote_target(site, remote)            # Refused before anything is made
        async with self._lock:
            t0 = time.monotonic()
            b = await asyncio.to_thread(make_archive, self.root, site, kind, at if at is not None else self.now())
            targets = [remote] if remote else []
            targets += [n for n, r in sorted(self.cfg.remotes.items()) if r.auto and n not in targets
                        and kind != "before-restore"]
            uploaded, pruned = [], []
            failed: list[str] = []
            for name in targets:
                server = self._server(name)
                try:
                    uploaded.append(await server.upload(b))
                    pruned += await self._prune_remote(server, dry_run=False)
                except FerryError as e:
                    if name == remote:
                        raise
                    failed.append(f"{name}: {e.message}")
                    log.warning("backup %s: the upload to %s failed: %s", b.id, name, e)
                finally:
                    await server.close()
            pruned = await self._prune_local([kind], dry_run=False) + pruned
            if failed:
                raise PermanentError(f"backup {b.id} made here, but its upload failed ({'; '.join(failed)})",
                                     "ferry backup now --remote NAME tries again; ferry backup list shows what is there")
            return BackupResult(b, tuple(uploaded), tuple(pruned), round(time.monotonic() - t0, 3))

    async def list(self, *, remotes: bool = True, verify: bool = True) -> BackupList:
        """Every backup here and on each remote, newest first; the remotes that could not be listed, why."""
        out = await asyncio.to_thread(list_local, self.root, self.site, verify=verify)
        problems: list[str] = []
        if remotes:
            for name in sorted(self.cfg.remotes):
                server = self._server(name)
                try:
                    out += await server.list(verify=verify)
                except FerryError as e:
                    problems.append(f"remote {name}: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""))
                finally:
                    await server.close()
        out.sort(key=lambda b: (b.created, b.id), reverse=True)
        return BackupList(tuple(out), tuple(problems))

    async def _prune_local(self, kinds: list[str] | None, *, dry_run: bool) -> list[BackupInfo]:
        items = await asyncio.to_thread(list_local, self.root, self.site, verify=False)
        if kinds is not None:
            items = [b for b in items if b.kind in kinds]
        doomed = plan_prune(items, self.cfg.kept)
        if not dry_run:
            for b in doomed:
                await asyncio.to_thread(remove_local, b)
                log.info("backup %s pruned (past [backup.keep] %s = %d)", b.id, b.kind, self.cfg.kept(b.kind))
        return doomed

    async def _prune_remote(self, server: RemoteServer, *, dry_run: bool) -> list[BackupInfo]:
        doomed = plan_prune(await server.list(verify=False), lambda kind: server.target.keep, by_kind=False)
        if not dry_run:
            for b in doomed:
                await server.remove(b)
                log.info("backup %s pruned from %s (past keep = %d)", b.id, server.where, server.target.keep)
        return doomed

    async def prune(self, *, dry_run: bool = False) -> BackupList:
        """Retention applied here and on each remote (dry_run: only what would go)."""
        async with self._lock:
            out = await self._prune_local(None, dry_run=dry_run)
            problems: list[str] = []
            for name in sorted(self.cfg.remotes):
                server = self._server(name)
                try:
                    out += await self._prune_remote(server, dry_run=dry_run)
                except FerryError as e:
                    problems.append(f"remote {name}: {e.message}")
                finally:
                    await server.close()
            return BackupList(tuple(out), tuple(problems))


# ------------------------------------------------------------------------------ freshness (the health check)

@dataclass(frozen=True)
class Expected:
    schedule: str
    kind: str
    remote: str | None
    slot: float                     # the last slot due (a backup at or after it is fresh)


def kind_of_run(run: str, at: str = "") -> tuple[str, str | None]:
    """(kind, remote) a schedule's run makes: `backup [KIND] [remote NAME]`; the kind defaults to the
    alias of its `at` (hourly, daily, weekly, monthly), else daily."""
    words = run.split()[1:]
    remote = None
    if len(words) >= 2 and words[-2] == "remote":
        remote, words = words[-1], words[:-2]
    if len(words) > 1 or (words and words[0] not in KINDS):
        raise PermanentError(f"run = {run!r}: not a backup run", SCHEDULE_HINT + "; kinds: " + ", ".join(KINDS))
    if words:
        return words[0], remote
    head = (at.split() or [""])[0].lower().lstrip("@")
    return (head if head in ("hourly", "daily", "weekly", "monthly") else "daily"), remote


def expected(site: Any, now: float) -> list[Expected]:
    """Each backup schedule with the slot whose backup should be there by now (stale_after past it)."""
    from .schedule import last_at_or_before, zone
    tz = zone(getattr(site, "timezone", None))
    grace = settings(site).stale_after
    out = []
    for name, spec in sorted((getattr(site, "schedules", {}) or {}).items()):
        if spec.run.split()[:1] != ["backup"]:
            continue
        try:
            kind, remote = kind_of_run(spec.run, spec.at)
        except FerryError:
            continue
        slot = last_at_or_before(spec.cron, tz, now - grace)
        if slot is not None:
            out.append(Expected(name, kind, remote, slot))
    return out


def stale(site: Any, backups: list[BackupInfo], now: float) -> tuple[list[str], list[str]]:
    """(problems, fine): for each backup schedule, whether a backup where it puts them (here, or on its
    remote) is as recent as its last slot due. Any kind counts: the management data is backed up."""
    problems, fine = [], []
    for e in expected(site, now):
        where = f"remote {e.remote}" if e.remote else "local"
        mine = [b for b in backups if b.where == where]
        newest = max((b.created for b in mine), default=None)
        # The id's time is whole seconds: a backup that started within the slot's second is its backup.
        if newest is None or newest < e.slot - 1:
            last = (datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if newest
                    else "never")
            due = datetime.fromtimestamp(e.slot, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            problems.append(f"schedule {e.schedule}: no backup ({where}) since its run due {due} (newest: {last})")
        else:
            fine.append(f"{e.schedule}: {where} {_age(now - newest)} old")
    return problems, fine


def _age(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


async def check(engine: Any, now: float) -> Any:
    """The health check `backup`: CRITICAL when a backup schedule's newest backup is older than its
    last slot due (alarm backup.stale), OK otherwise; remote ones are listed over SFTP."""
    from .nagios import CheckResult, CheckState, PerfDatum, unknown
    site = engine.site
    root = Path(engine.store.path).parent
    exp = expected(site, now)
    if not exp:
        return CheckResult(CheckState.OK, "no backup schedule (" + SCHEDULE_HINT + ")")
    backups = await asyncio.to_thread(list_local, root, site, verify=False)
    unreadable: list[str] = []
    for name in sorted({e.remote for e in exp if e.remote}):
        try:
            server = RemoteServer(site, remote_target(site, name), engine.transports)
        except FerryError as err:
            unreadable.append(f"remote {name}: {err.message}")
            continue
        try:
            backups += await server.list(verify=False)
        except FerryError as err:
            unreadable.append(f"remote {name}: {err.message}")
        finally:
            await server.close()
    problems, fine = stale(site, backups, now)
    local = [b for b in backups if b.where == "local"]
    newest = max((b.created for b in local), default=None)
    perf = (PerfDatum("newest_age", round(now - newest) if newest else -1, "s", "", "", 0),
            PerfDatum("backups", len(local), "", "", "", 0))
    if problems:
        return CheckResult(CheckState.CRITICAL, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1
                                                               else ""), "\n".join(problems + unreadable), perf)
    if unreadable:
        return unknown("; ".join(unreadable))
    return CheckResult(CheckState.OK, "backups are fresh: " + "; ".join(fine), "", perf)


# ------------------------------------------------------------------------------ restore

@dataclass(frozen=True)
class RestoreReport:
    restored: BackupInfo
    before: BackupInfo              # the backup of the state that was replaced
    files: tuple[str, ...]


@contextlib.contextmanager
def engine_lock(root: Path):
    """The workspace's engine lock, held: no engine runs (nor starts) while it is held."""
    from ..protocol import LOCK_NAME
    path = Path(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"the engine of workspace {root} runs", "ferry engine stop, then restore") from None
        yield
    finally:
        os.close(fd)


def _busy_tasks(db_path: Path) -> list[str]:
    from ..taskstate import ACTIVE_STATES
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = db.execute(f"SELECT id, title, state FROM tasks WHERE state IN ({marks}) ORDER BY id",
                          [str(s) for s in ACTIVE_STATES]).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return [f"task {i} ({t}) is {s}" for i, t, s in rows]


def find_local(root: Path, site: Any, backup_id: str) -> BackupInfo:
    if not ID_RE.match(backup_id):
        raise Refused(f"{backup_id!r} is no backup id", "ids look like 20261203-020000-daily (ferry backup list)")
    path = local_dir(root, site) / archive_name(site, backup_id)
    if not path.is_file():
        raise Refused(f"no backup {backup_id} in {path.parent}", "ferry backup list shows the backups "
                      "(a remote one: ferry backup restore ID --remote NAME)")
    return local_info(path, site, verify=True)


def restore(root: Path, site: Any, backup_id: str, *, now: float | None = None) -> RestoreReport:
    """Put a local backup back (blocking). The engine must be stopped: its lock is taken here. The
    current state is backed up first (kind before-restore)."""
    from ..store import SCHEMA_VERSION
    root = Path(root)
    b = find_local(root, site, backup_id)
    if b.verified is not True:
        raise Refused(f"backup {backup_id} does not match its checksum: {b.problem}",
                      "pick another backup (ferry backup list)")
    with engine_lock(root):
        busy = _busy_tasks(root / "state.db")
        if busy:
            raise Refused(f"the engine's tasks are not idle: {busy[0]}" + (f" (+{len(busy) - 1} more)"
                                                                           if len(busy) > 1 else ""),
                          "wait for them to end (ferry tasks), or cancel them, then restore")
        manifest = read_manifest(Path(b.path))
        schema = int(manifest.get("schema_version") or 0)
        if schema > SCHEMA_VERSION:
            raise Refused(f"backup {backup_id} has schema version {schema}, newer than this Ferry's "
                          f"({SCHEMA_VERSION})", f"restore it with Ferry {manifest.get('ferry_version')} or newer")
        staging = Path(tempfile.mkdtemp(prefix=".ferry-restore-", dir=root))
        try:
            wanted = {f["path"]: f for f in manifest.get("files", [])}
            with tarfile.open(b.path, "r:gz") as tar:
                for m in tar.getmembers():
                    if m.name in wanted and m.isfile():
                        tar.extract(m, staging, filter="data")
            for name, f in wanted.items():
                p = staging / name
                if not p.is_file() or sha256_file(p) != f["sha256"]:
                    raise PermanentError(f"backup {backup_id}: {name} does not match its manifest",
                                         "the archive is damaged: pick another backup (ferry backup list)")
            db = sqlite3.connect(str(staging / "state.db"))
            try:
                ok = db.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                db.close()
            if ok != "ok":
                raise PermanentError(f"backup {backup_id}: its state.db fails integrity_check: {ok}",
                                     "pick another backup (ferry backup list)")
            before = make_archive(root, site, "before-restore", time.time() if now is None else now)
            _swap_state(root / "state.db", staging / "state.db")
            done = ["state.db"]
            for name in ("config.toml", "known_hosts"):
                if name in wanted:
                    os.replace(staging / name, root / name)
                    done.append(name)
            themes = [n for n in wanted if n.startswith("themes/")]
            if themes:
                old = root / "themes"
                if old.is_dir():
                    shutil.rmtree(old)
                os.replace(staging / "themes", old)
                done.append("themes/")
            _fsync_dir(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("backup %s restored (the state before: backup %s)", backup_id, before.id)
    return RestoreReport(b, before, tuple(done))


def _swap_state(current: Path, new: Path) -> None:
    """state.db replaced by `new` in one rename. The old database is checkpointed into its main file
    and its WAL removed first: a WAL left beside the new file would be applied to it."""
    if current.exists():
        db = sqlite3.connect(str(current), timeout=30)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode=DELETE")     # removes -wal and -shm (we are alone: the lock)
        finally:
            db.close()
    for extra in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{current}{extra}").unlink()
    with open(new, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(new, current)


# ------------------------------------------------------------------------------ on schedule

def backups_of(ops: Any) -> Backups:
    """The engine's Backups (one per Ops, so that one backup runs at a time)."""
    b = getattr(ops, "backups", None)
    if b is None:
        engine = getattr(ops, "engine", None)
        pool = getattr(engine, "transports", None)
        b = ops.backups = Backups(Path(ops.store.path).parent, lambda: ops.site, pool, ops.now)
    return b


async def _scheduled(ops: Any, run: str, spec: Any) -> str:
    """A schedule's `run = "backup [KIND] [remote NAME]"`: the backup, its uploads, retention."""
    kind, remote = kind_of_run(run, getattr(spec, "at", ""))
    r = await backups_of(ops).now_(kind, remote)
    await record_freshness(ops)
    return summary(r)


def summary(r: BackupResult) -> str:
    out = f"backup {r.backup.id} ({r.backup.size / 1e6:.1f} MB)"
    if r.uploaded:
        out += ", uploaded to " + ", ".join(u.where.removeprefix("remote ") for u in r.uploaded) + " (verified)"
    if r.pruned:
        out += f", {len(r.pruned)} pruned"
    return out


async def record_freshness(ops: Any) -> None:
    """After a backup: the `backup` health check judged again now, so that backup.stale clears at once."""
    engine = getattr(ops, "engine", None)
    if engine is None:
        return
    from . import health as _health
    try:
        await _health.recheck_site(engine, ops, ("backup",))
    except FerryError as e:
        log.warning("the backup check after a backup: %s", e)


_service.register_runner("backup", _scheduled)

__all__ = ["Backups", "BackupInfo", "BackupList", "BackupResult", "RemoteServer", "RestoreReport", "check", "engine_lock",
           "expected", "kind_of_run", "list_local", "make_archive", "plan_prune", "restore", "stale"]
