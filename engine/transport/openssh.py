"""Running a command on an ssh host through the OpenSSH client binary.

Bulk transfers use it: its C cipher path costs a fraction of asyncssh's per-packet Python
work, and each stream gets its own connection (and its own sshd process on the host, so
decryption spreads over the host's cores). Trust is the same as the asyncssh transport's:
the workspace's known_hosts and the user's, strictly; keys and config alike. Importing this
module does not import asyncssh.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Sequence

from ..config import HostSpec

# curve25519 first: the post-quantum hybrid OpenSSH 9 prefers costs ~70 ms more per connection,
# and a bulk transfer opens several.
KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org", "sntrup761x25519-sha512@openssh.com",
       "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "diffie-hellman-group14-sha256")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes192-ctr", "aes256-ctr")


def remote_command(argv: Sequence[str | bytes | os.PathLike]) -> bytes:
    """argv as one line for the remote POSIX shell; arbitrary bytes survive via surrogateescape."""
    words = [a if isinstance(a, str) else os.fsdecode(a) for a in argv]
    return " ".join(shlex.quote(w) for w in words).encode("utf-8", "surrogateescape")


def mux_dir() -> Path | None:
    """A private folder for OpenSSH control sockets (short path: sockets have a 108-byte limit)."""
    d = Path(tempfile.gettempdir()) / f"ferry-ssh-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return None   # someone else's, or open to others: do without multiplexing
    return d


def openssh_argv(spec: HostSpec, argv: Sequence[str], *, known_hosts: Sequence[Path],
                 ssh_config_paths: Sequence[Path], use_agent: bool, keepalive_interval: float = 15.0,
                 keepalive_count_max: int = 3, connect_timeout: float = 15.0, shared: bool = False,
                 data: bool = False) -> list[str] | None:
    """The `ssh` command line that runs argv on the host, or None where it cannot be set up
    exactly like the asyncssh transport (no `ssh` binary, no trusted keys yet, several config
    files, paths with spaces): the caller then uses the asyncssh transport.

    shared=True multiplexes over one master connection that lingers 60 s after its last use
    (as Ansible does): quick starts for short commands. There is one master per host and per
    trust setting (known_hosts, identity, config): the host key is checked when the master
    connects, so another setting must not reuse it. Bulk streams use their own connection,
    so that encryption runs in parallel.

    data=True: a bulk stream, which goes to the host's migration network (D5): its
    `migration_address` when it has one, the host key checked under the host's management name
    (HostKeyAlias), so the key trusted for the host is the one that counts."""
    # FERRY_SSH_CLIENT=asyncssh: carry bulk data over asyncssh even where `ssh` exists.
    ssh = None if os.environ.get("FERRY_SSH_CLIENT") == "asyncssh" else shutil.which("ssh")
    trusted = [str(p) for p in known_hosts if p.exists()]
    if ssh is None or not trusted or len(ssh_config_paths) > 1:
        return None
    identity = os.path.expanduser(spec.identity) if spec.identity else None
    if any(" " in p for p in [*trusted, *map(str, ssh_config_paths), identity or ""]):
        return None
    args = [ssh, "-T", "-x", "-a", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=" + " ".join(trusted), "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no", "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={int(connect_timeout)}",
            "-o", f"ServerAliveInterval={int(keepalive_interval)}",
            "-o", f"ServerAliveCountMax={keepalive_count_max}", "-c", ",".join(CIPHERS),
            "-o", "KexAlgorithms=" + ",".join(KEX),
            "-F", str(ssh_config_paths[0]) if ssh_config_paths else "/dev/null"]
    if spec.port:
        args += ["-p", str(spec.port)]
    if spec.user:
        args += ["-l", spec.user]
    if identity:
        args += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    if not use_agent:
        args += ["-o", "IdentityAgent=none"]
    mux = mux_dir() if shared else None
    if mux is not None:
        # A command sent over a master connection skips the host-key check: the master did it,
        # with the known_hosts, keys and config it was opened with. So one master per host *and*
        # per such setting (everything on the command line so far), never another workspace's.
        setting = hashlib.sha256("\0".join(args).encode("utf-8", "surrogateescape")).hexdigest()[:12]
        args += ["-o", "ControlMaster=auto", "-o", f"ControlPath={mux}/{setting}-%C", "-o", "ControlPersist=60"]
    else:
        args += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    target = spec.address or spec.name
    if data and spec.migration_address and spec.migration_address != target:
        args += ["-o", "HostKeyAlias=" + (f"[{target}]:{spec.port}" if spec.port and spec.port != 22 else target)]
        target = spec.migration_address
    return args + [target, "--", remote_command(argv).decode("utf-8", "surrogateescape")]


def classify_failure(stderr: str) -> str:
    """What an `ssh` exit status 255 means: hostkey, auth, or link."""
    text = stderr.lower()
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return "hostkey"
    if "permission denied" in text or "too many authentication failures" in text:
        return "auth"
    return "link"
