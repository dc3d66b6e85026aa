"""SSH host-key trust: known_hosts files (OpenSSH format), fingerprints, and recording a trusted key.

Trusted keys come from the workspace known_hosts plus the user's ~/.ssh/known_hosts; Ferry writes
only to the workspace file. An unknown or changed key is refused until the operator runs
`ferry hosts trust HOST`, which uses `fetch_host_key` and `record_host_key` from here.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import asyncssh

from ..errors import HostKeyError
from .local import write_atomic

if TYPE_CHECKING:
    from .ssh import SshTransport

DEFAULT_PORT = 22


class KeyStatus(enum.StrEnum):
    TRUSTED = "trusted"
    UNKNOWN = "unknown"
    CHANGED = "changed"


@dataclass(frozen=True)
class HostKeyInfo:
    """The key a host presents, and what Ferry's known_hosts say about it."""

    host: str                      # Ferry's host name
    endpoint: str                  # the known_hosts name: "10.0.0.11" or "[10.0.0.11]:2222"
    key_type: str                  # e.g. "ssh-ed25519"
    fingerprint: str               # "SHA256:..."
    public_key: str                # "ssh-ed25519 AAAA..." (public, safe to show and store)
    status: KeyStatus
    old_fingerprints: tuple[str, ...] = ()
    jump: str | None = None        # set when the key belongs to a ProxyJump hop, not the host itself

    def to_dict(self) -> dict:
        return {"host": self.host, "endpoint": self.endpoint, "key_type": self.key_type,
                "fingerprint": self.fingerprint, "public_key": self.public_key,
                "status": str(self.status), "old_fingerprints": list(self.old_fingerprints),
                "jump": self.jump}


def endpoint_name(host: str, port: int | None) -> str:
    """The name known_hosts uses for host:port (OpenSSH writes `[host]:port` for non-22 ports)."""
    return host if not port or port == DEFAULT_PORT else f"[{host}]:{port}"


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


def public_line(key: asyncssh.SSHKey) -> str:
    """`algorithm base64` without a comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


# ---------------------------------------------------------------- reading


class TrustStore:
    """Host patterns from known_hosts files, matched the way asyncssh matches them during a connect."""

    def __init__(self, text: str) -> None:
        self._known = asyncssh.import_known_hosts(text)

    @classmethod
    async def load(cls, paths: Sequence[Path]) -> "TrustStore":
        return await asyncio.to_thread(cls.load_sync, paths)

    @classmethod
    def load_sync(cls, paths: Sequence[Path]) -> "TrustStore":
        good: list[str] = []
        for path in paths:
            try:
                text = Path(path).read_text(encoding="utf-8", errors="replace")
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for line in text.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                # A single malformed line (a hand edit, a key type asyncssh lacks) must not make
                # every other entry unusable, so lines are checked one by one.
                try:
                    asyncssh.import_known_hosts(line)
                except (ValueError, asyncssh.KeyImportError):
                    continue
                good.append(line)
        return cls("\n".join(good) + "\n" if good else "")

    def match(self, host: str, addr: str, port: int | None):
        """The 7-tuple asyncssh expects from a known_hosts callable."""
        return self._known.match(host, addr or "", None if port == DEFAULT_PORT else port)

    def trusted_keys(self, host: str, addr: str, port: int | None) -> list[asyncssh.SSHKey]:
        keys: list[asyncssh.SSHKey] = []
        for key in self.match(host, addr, port)[0]:   # an entry can match by name and by address
            if key not in keys:
                keys.append(key)
        return keys

    def has_ca(self, host: str, addr: str, port: int | None) -> bool:
        return bool(self.match(host, addr, port)[1])


def status_of(key: asyncssh.SSHKey, trusted: Sequence[asyncssh.SSHKey]) -> KeyStatus:
    if key in trusted:
        return KeyStatus.TRUSTED
    return KeyStatus.CHANGED if trusted else KeyStatus.UNKNOWN


def host_key_error(info: HostKeyInfo, address: str) -> HostKeyError:
    """The refusal the operator sees: fingerprint, unknown or CHANGED, and the command that trusts it."""
    whose = f"jump host {info.jump} for {info.host}" if info.jump else info.host
    kind = info.key_type.removeprefix("ssh-").upper()
    if info.status == KeyStatus.CHANGED:
        old = ", ".join(info.old_fingerprints) or "?"
        msg = (f"WARNING: the SSH host key of {whose} ({address}) has CHANGED: it now presents "
               f"{kind} key {info.fingerprint}, known_hosts has {old}; someone may be intercepting "
               f"the connection, or the host was reinstalled; connection refused")
        hint = (f"confirm the new fingerprint with the host's administrator; if the change is expected, "
                f"run: ferry hosts trust {info.host}")
    else:
        msg = (f"the SSH host key of {whose} ({address}) is unknown: {kind} key {info.fingerprint}; "
               f"connection refused")
        hint = f"confirm the fingerprint with the host's administrator, then run: ferry hosts trust {info.host}"
    return HostKeyError(msg, hint, host=info.host, fingerprint=info.fingerprint,
                        changed=info.status == KeyStatus.CHANGED)


# ---------------------------------------------------------------- writing


def _hashed_match(pattern: str, name: str) -> bool:
    """Does a hashed known_hosts name (|1|salt|hash) stand for `name`?"""
    try:
        _, kind, salt, digest = pattern.split("|")
        if kind != "1":
            return False
        mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def _without_endpoint(line: str, name: str) -> str | None:
    """The line with `name` removed from its host list; None when nothing is left of it."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return line
    fields = stripped.split()
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker == "@cert-authority" or marker == "@revoked" or not fields:
        return line   # CA and revocation entries are the operator's policy: never touched
    names = fields[0].split(",")
    keep = [n for n in names if n != name and not _hashed_match(n, name)]
    if len(keep) == len(names):
        return line
    if not keep:
        return None
    return " ".join(([marker] if marker else []) + [",".join(keep)] + fields[1:])


def record_host_key_sync(path: Path, endpoint: str, public_key: str) -> None:
    """Trust `public_key` for `endpoint` in `path`, replacing whatever that file said about it."""
    path = Path(path)
    try:
        old = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        old = []
    lines = [kept for line in old if (kept := _without_endpoint(line, endpoint)) is not None]
    lines.append(f"{endpoint} {public_key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic and durable: a crash leaves the old file or the new one, never half of it.
    write_atomic(str(path), ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)


def write_pinned(path: Path, text: str) -> Path:
    """A known_hosts file of its own holding exactly `text` (the keys pinned for one connection: a
    receiver, a parked source, a target at its final address), written atomically, 0600, in a 0700
    folder, when it says anything else; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except FileNotFoundError:
        pass
    write_atomic(str(path), text.encode("utf-8"), mode=0o600)
    return path


async def record_host_key(path: Path, info: HostKeyInfo) -> None:
    """Record the key of `info` in the workspace known_hosts (a changed entry is replaced)."""
    await asyncio.to_thread(record_host_key_sync, Path(path), info.endpoint, info.public_key)


async def fetch_host_key(transport: "SshTransport") -> HostKeyInfo:
    """The key the host presents (stopping after key exchange, no login) and whether it is trusted.

    With ProxyJump, an untrusted jump host is reported first (`jump` set): trust it, then ask again.
    """
    return await transport.fetch_host_key()
