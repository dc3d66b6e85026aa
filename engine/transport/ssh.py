"""The ssh transport: one pooled asyncssh connection per host, verified against known_hosts.

Retry rule: an operation that finds the pooled connection dead *before* anything was sent
(the connection is closed, or the session channel could not even be opened) reconnects once,
transparently. A command that was already sent when the link died is never re-run: it
surfaces a TransportError, because it may or may not have taken effect. SFTP operations are
idempotent (reads; writes go to a temp file then rename), so they are retried once either way.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import stat as stat_mod
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import asyncssh
from asyncssh.config import SSHClientConfig
from asyncssh.encryption import get_encryption_algs
from asyncssh.public_key import get_default_certificate_algs, get_default_public_key_algs

from ..config import HostSpec
from ..errors import FerryError, PermanentError, TransportError
from ..helpers import ENV, TASK_TAG, TAG_RE
from .base import ByteReader, ByteWriter, FileStat, Process, RunResult, Transport
from .local import command_error, describe_argv as _describe
from .openssh import openssh_argv, remote_command
from .paths import default_ssh_config_paths
from .knownhosts import (HostKeyInfo, KeyStatus, TrustStore, endpoint_name, fingerprint,
                         host_key_error, public_line, status_of)

# AES-GCM first: with AES instructions asyncssh moves ~900 MB/s with it and ~590 MB/s with chacha20.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes128-ctr", "aes192-ctr", "aes256-ctr")
DEFAULT_PORT = 22
MAX_JUMP_DEPTH = 8
# asyncssh's default 2 MiB channel window is kept: 4 and 8 MiB measured no faster on loopback
# (~600 MB/s down either way), and the window bounds the memory a stream can pin.


@dataclass(frozen=True)
class _Endpoint:
    """Where one hop connects, after ~/.ssh/config has been applied."""

    target: str                 # as given: an address or a ~/.ssh/config alias
    port_arg: int | tuple       # explicit port, or () to let the config decide
    user_arg: str | tuple
    host: str                   # HostName after config
    port: int
    user: str
    key_host: str               # the name known_hosts is searched for (HostKeyAlias or HostName)
    jump: str | None            # ProxyJump from the config
    client_keys: list[str] | tuple | None   # explicit identity, or () for config/defaults
    config_ciphers: bool
    config_hostkey_algs: bool
    jump_label: str | None      # set for a ProxyJump hop

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return endpoint_name(self.key_host, self.port)


class _Client(asyncssh.SSHClient):
    """Captures the host key asyncssh could not verify, so the refusal can name its fingerprint."""

    def __init__(self, seen: list) -> None:
        self._seen = seen

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Only called for keys not in known_hosts: refuse, never accept silently.
        self._seen.append(key)
        return False


class _Untrusted(Exception):
    def __init__(self, info: HostKeyInfo) -> None:
        self.info = info


# sshd refuses "signal" requests in root sessions (OpenSSH 9.2: "session signalling requires
# privilege separation"), so every command first reports its process group on stderr and is then
# exec'ed; kill() runs `kill -KILL -- -PGID` in a second session. Callers never see that line.
PGID_MARK = b"ferry-pgid:"
WRAPPER = b"printf 'ferry-pgid:%d\\n' $$ >&2; exec "


def _wrapped(command: bytes) -> bytes:
    """The remote command line: it says its process group first (so that it can be killed), and
    inside a task it carries the task's tag and, where the host has setpriv, dies with its session."""
    tag = TASK_TAG.get()
    if not tag or not TAG_RE.match(tag):
        return WRAPPER + command
    return (WRAPPER.removesuffix(b"exec ") + f"{ENV}={tag}; export {ENV}; ".encode()
            # (busybox's setpriv, as in Ferry's live image, has no --pdeathsig: then without it)
            + b"setpriv --pdeathsig KILL -- true >/dev/null 2>&1 && exec setpriv --pdeathsig KILL -- " + command
            + b"; exec " + command)


class _SessionProcess(asyncssh.SSHClientProcess):
    """An exec session that gives its slot back when the channel goes away (sshd's MaxSessions)."""

    def __init__(self, release) -> None:
        super().__init__()
        self._release = release

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._release:
            self._release()
            self._release = None


def _is_link_error(e: BaseException) -> bool:
    return isinstance(e, (asyncssh.ConnectionLost, asyncssh.ChannelOpenError, asyncssh.DisconnectError,
                          asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection,
                          ConnectionError, BrokenPipeError, EOFError))


class _Reader(ByteReader):
    def __init__(self, reader: asyncssh.SSHReader, owner: "SshTransport", what: str) -> None:
        self._r, self._owner, self._what = reader, owner, what

    async def read(self, n: int = 65536) -> bytes:
        try:
            return await self._r.read(n)
        except Exception as e:
            if _is_link_error(e):
                raise self._owner._lost(self._what, e) from None
            raise

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._r.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise EOFError(f"stream ended after {len(e.partial)} of {n} bytes") from None
        except Exception as e:
            if _is_link_error(e):
                raise self._owner._lost(self._what, e) from None
            raise


class _Writer(ByteWriter):
    def __init__(self, writer: asyncssh.SSHWriter, owner: "SshTransport", what: str) -> None:
        self._w, self._owner, self._what = writer, owner, what

    def write(self, data: bytes) -> None:
        try:
            self._w.write(data)
        except Exception as e:
            if _is_link_error(e):
                raise self._owner._lost(self._what, e) from None
            raise

    async def drain(self) -> None:
        try:
            await self._w.drain()
        except Exception as e:
            if _is_link_error(e):
                raise self._owner._lost(self._what, e) from None
            raise

    async def close(self) -> None:
        try:
            if self._w.can_write_eof():
                self._w.write_eof()
        except (OSError, asyncssh.Error):
            pass  # the peer is gone already; the reader side will say so


class _Stderr(_Reader):
    """stderr without the process-group line the command wrapper writes first (see PGID_MARK)."""

    readexactly = ByteReader.readexactly   # through read(), which strips the mark

    def __init__(self, reader: asyncssh.SSHReader, owner: "SshTransport", what: str) -> None:
        super().__init__(reader, owner, what)
        self.pgid: int | None = None
        self._pending = b""
        self._scan = asyncio.ensure_future(self._find_mark())
        # A process nobody reads from must not leave "exception never retrieved" behind.
        self._scan.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _find_mark(self) -> None:
        buf = b""
        while len(buf) < (1 << 20):   # rc-file noise may come first; give up if there is lots
            chunk = await super().read(65536)
            if not chunk:
                break
            buf += chunk
            i = buf.find(PGID_MARK)
            j = buf.find(b"\n", i) if i >= 0 else -1
            if j >= 0 and (i == 0 or buf[i - 1] == 10):
                try:
                    self.pgid = int(buf[i + len(PGID_MARK):j])
                except ValueError:
                    pass
                buf = buf[:i] + buf[j + 1:]
                break
        self._pending = buf

    async def started(self, timeout: float) -> None:
        """Wait (bounded) until the command has reported its process group."""
        try:
            await asyncio.wait_for(asyncio.shield(self._scan), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            pass

    async def read(self, n: int = 65536) -> bytes:
        if not self._scan.done():
            await self._scan
        self._scan.result()   # re-raise a link error seen while scanning
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        return await super().read(n)

    def cancel(self) -> None:
        if not self._scan.done():
            self._scan.cancel()


class _SshProcess(Process):
    def __init__(self, proc: _SessionProcess, stderr: _Stderr, owner: "SshTransport", what: str) -> None:
        self._p, self._owner, self._what = proc, owner, what
        self.stdin = _Writer(proc.stdin, owner, what)
        self.stdout = _Reader(proc.stdout, owner, what)
        self.stderr = stderr

    async def wait(self, timeout: float | None = None) -> int:
        try:
            await asyncio.wait_for(self._p.wait_closed(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise TransportError(f"{self._what} on {self._owner.host} did not finish within {timeout:g} s",
                                 "the host may be overloaded; kill it or wait longer") from None
        code = self._p.returncode
        if code is None:
            raise self._owner._lost(self._what, None)
        return code

    async def kill(self) -> None:
        if self._p.returncode is not None:
            return
        await self.stderr.started(5)
        if not await self._owner._kill_group(self.stderr.pgid):
            self._p.close()   # could not signal it: at least drop the channel


class SshTransport(Transport):
    """A host reached over SSH: commands, streams, SFTP files, and UNIX-socket forwarding."""

    kind = "ssh"

    def __init__(self, spec: HostSpec, *, known_hosts: Sequence[Path],
                 ssh_config_paths: Sequence[str | Path] | None = None, use_agent: bool = True,
                 connect_timeout: float = 15.0, keepalive_interval: float = 15.0,
                 keepalive_count_max: int = 3, max_sessions: int = 10) -> None:
        """known_hosts: files of trusted keys (workspace first); ssh_config_paths None = ~/.ssh/config."""
        super().__init__(spec.name)
        self.spec = spec
        self.known_hosts = [Path(p) for p in known_hosts]
        self.ssh_config_paths = ([Path(p) for p in ssh_config_paths] if ssh_config_paths is not None
                                 else default_ssh_config_paths())
        self.use_agent = use_agent   # asyncssh finds the agent via SSH_AUTH_SOCK or IdentityAgent
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self._conn: asyncssh.SSHClientConnection | None = None
        self._jumps: list[asyncssh.SSHClientConnection] = []
        self._lock = asyncio.Lock()
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()
        # sshd refuses sessions beyond MaxSessions (default 10): one is kept for SFTP, one for kill.
        self._sessions = asyncio.Semaphore(max(1, max_sessions - 2))
        self._background: set[asyncio.Task] = set()
        self.connects = 0   # how many connections were made (tests and `ferry probe` read it)

    # ------------------------------------------------------------ resolving ~/.ssh/config

    async def _resolve(self, target: str, port: int | None, user: str | None, *,
                       identity: str | None, jump_label: str | None) -> _Endpoint:
        return await asyncio.to_thread(self._resolve_sync, target, port, user, identity, jump_label)

    def _resolve_sync(self, target: str, port: int | None, user: str | None,
                      identity: str | None, jump_label: str | None) -> _Endpoint:
        try:
            local_user = getpass.getuser()
        except KeyError:
            local_user = "root"
        try:
            cfg = SSHClientConfig.load(None, self.ssh_config_paths, False, False, False,
                                       local_user, user or (), target, port or ())
        except (OSError, ValueError) as e:
            paths = ", ".join(map(str, self.ssh_config_paths))
            raise PermanentError(f"cannot use SSH config {paths} for {self.host}: {e}",
                                 "fix the file, or pass other ssh config paths") from None
        host = str(cfg.get("Hostname", target))
        real_port = int(port or cfg.get("Port", DEFAULT_PORT))
        jump = cfg.get("ProxyJump")
        if jump_label is None and identity:
            keys: list[str] | tuple = [identity]
        elif jump_label is not None and not cfg.get("IdentityFile") and identity:
            keys = [identity]   # a jump host without its own IdentityFile: use the host's key
        else:
            keys = ()
        for k in keys:
            if not os.path.isfile(k):
                raise PermanentError(f"identity {k} for {self.host} does not exist",
                                     f"fix identity for hosts.{self.host} in config.toml")
        return _Endpoint(target=target, port_arg=port or (), user_arg=user or (), host=host,
                         port=real_port, user=str(user or cfg.get("User", local_user)),
                         key_host=str(cfg.get("HostKeyAlias") or host), jump=str(jump) if jump else None,
                         client_keys=keys, config_ciphers=bool(cfg.get("Ciphers")),
                         config_hostkey_algs=bool(cfg.get("HostKeyAlgorithms")), jump_label=jump_label)

    def openssh_argv(self, argv: Sequence[str]) -> list[str] | None:
        """argv through the OpenSSH client binary, with this host's trust and keys (or None)."""
        return openssh_argv(self.spec, argv, known_hosts=self.known_hosts, ssh_config_paths=self.ssh_config_paths,
                            use_agent=self.use_agent, keepalive_interval=self.keepalive_interval,
                            keepalive_count_max=self.keepalive_count_max)

    async def _final_endpoint(self) -> _Endpoint:
        s = self.spec
        return await self._resolve(s.address or s.name, s.port, s.user, identity=self._identity(), jump_label=None)

    # ------------------------------------------------------------ connecting

    def _who(self, ep: _Endpoint) -> str:
        return f"jump host {ep.jump_label} (for {self.host})" if ep.jump_label else self.host

    def _conn_kwargs(self, ep: _Endpoint, store: TrustStore) -> dict:
        kw: dict = dict(
            username=ep.user_arg, encoding=None,
            connect_timeout=self.connect_timeout, login_timeout=self.connect_timeout,
            keepalive_interval=self.keepalive_interval, keepalive_count_max=self.keepalive_count_max,
            x509_trusted_certs=None, x509_trusted_cert_paths=[],
            # Ferry never asks for or stores a password: keys and the agent only.
            password_auth=False, kbdint_auth=False, host_based_auth=False,
            gss_kex=False, gss_auth=False, ignore_encrypted=True,
        )
        if not self.use_agent:
            kw.update(agent_path=None, agent_identities=None)
        if ep.client_keys:
            kw["client_keys"] = list(ep.client_keys)
        if not ep.config_ciphers:
            have = {a.decode() for a in get_encryption_algs()}
            kw["encryption_algs"] = [c for c in PREFERRED_CIPHERS if c in have]
        algs = self._host_key_algs(ep, store)
        if algs:
            kw["server_host_key_algs"] = algs
        return kw

    def _host_key_algs(self, ep: _Endpoint, store: TrustStore) -> list[str] | None:
        """Known key types first, then every other: a host whose key type changed is then
        reported as a changed key (with its fingerprint) rather than failing key exchange."""
        if ep.config_hostkey_algs or store.has_ca(ep.key_host, "", ep.port):
            return None
        trusted = store.trusted_keys(ep.key_host, "", ep.port)
        if not trusted:
            return None
        algs: list[str] = []
        for key in trusted:
            algs += [a.decode() for a in key.sig_algorithms]
        algs += [a.decode() for a in get_default_certificate_algs() + get_default_public_key_algs()]
        return list(dict.fromkeys(algs))

    def _key_info(self, ep: _Endpoint, key: asyncssh.SSHKey, store: TrustStore) -> HostKeyInfo:
        trusted = store.trusted_keys(ep.key_host, "", ep.port)
        return HostKeyInfo(host=self.host, endpoint=ep.endpoint, key_type=key.get_algorithm(),
                           fingerprint=fingerprint(key), public_key=public_line(key),
                           status=status_of(key, trusted),
                           old_fingerprints=tuple(fingerprint(k) for k in trusted),
                           jump=ep.jump_label)

    def _connect_error(self, ep: _Endpoint, e: BaseException) -> FerryError:
        who, addr = self._who(ep), ep.address
        hint = f"is sshd running on {addr}? check address/port for hosts.{self.host} in config.toml"
        if isinstance(e, asyncssh.PermissionDenied):
            return PermanentError(f"SSH login to {who} as {ep.user}@{addr} was refused",
                                  f"check user/identity for hosts.{self.host} in config.toml, the key in the "
                                  f"host's authorized_keys, or ssh-agent (SSH_AUTH_SOCK)")
        if isinstance(e, (asyncssh.KeyExchangeFailed, asyncssh.ProtocolNotSupported, asyncssh.ProtocolError)):
            return PermanentError(f"SSH handshake with {who} at {addr} failed: {e}",
                                  "is that port an SSH server? check address/port, Ciphers and HostKeyAlgorithms")
        if isinstance(e, asyncssh.HostKeyNotVerifiable):
            return PermanentError(f"SSH host key of {who} at {addr} was rejected: {e}",
                                  f"check @revoked/@cert-authority entries; run: ferry hosts trust {self.host}")
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            return TransportError(f"cannot reach {who} at {addr}: no answer within {self.connect_timeout:g} s",
                                  f"is the host up and the port open? {hint}")
        if isinstance(e, socket.gaierror):
            return TransportError(f"cannot resolve the address {ep.host!r} of {who}: {e.strerror or e}",
                                  f"check address for hosts.{self.host} in config.toml or HostName in the ssh config")
        if isinstance(e, ConnectionRefusedError):
            return TransportError(f"cannot connect to {who} at {addr}: connection refused", hint)
        if isinstance(e, OSError):
            return TransportError(f"cannot connect to {who} at {addr}: {e.strerror or e}", hint)
        if isinstance(e, (asyncssh.Error, asyncssh.ChannelOpenError)):
            return TransportError(f"SSH connection to {who} at {addr} failed: {e}", hint)
        if isinstance(e, (asyncssh.KeyImportError, ValueError)):
            return PermanentError(f"cannot use the SSH settings for {who}: {e}",
                                  "check identity in config.toml and the ssh config")
        return TransportError(f"SSH connection to {who} at {addr} failed: {type(e).__name__}: {e}", hint)

    async def _connect_endpoint(self, ep: _Endpoint, tunnel) -> asyncssh.SSHClientConnection:
        store = await TrustStore.load(self.known_hosts)
        seen: list[asyncssh.SSHKey] = []

        def known(host: str, addr: str, port: int | None):
            return store.match(host, addr, port)[:3]

        try:
            conn = await asyncssh.connect(ep.target, ep.port_arg, tunnel=tunnel,
                                          config=self.ssh_config_paths, client_factory=lambda: _Client(seen),
                                          known_hosts=known, **self._conn_kwargs(ep, store))
        except asyncio.CancelledError:
            raise
        except asyncssh.HostKeyNotVerifiable as e:
            if seen:
                raise host_key_error(self._key_info(ep, seen[-1], store), ep.address) from None
            raise self._connect_error(ep, e) from None
        except Exception as e:
            raise self._connect_error(ep, e) from None
        self.connects += 1
        return conn

    async def _open_tunnel(self, ep: _Endpoint, opened: list, *, fetch: bool, depth: int = 0):
        """Connect the ProxyJump hops of `ep` (each verified and logged in); None when direct."""
        if not ep.jump:
            return None
        if depth >= MAX_JUMP_DEPTH:
            raise PermanentError(f"ProxyJump for {self.host} nests more than {MAX_JUMP_DEPTH} deep",
                                 "check the ssh config for a ProxyJump loop")
        tunnel = None
        for i, hop in enumerate(h.strip() for h in ep.jump.split(",")):
            target, port, user = _parse_hop(hop)
            hep = await self._resolve(target, port, user, identity=self._identity(), jump_label=hop)
            if i == 0:
                tunnel = await self._open_tunnel(hep, opened, fetch=fetch, depth=depth + 1)
            if fetch:
                info = await self._probe_key(hep, tunnel)
                if info.status != KeyStatus.TRUSTED:
                    raise _Untrusted(info)
            tunnel = await self._connect_endpoint(hep, tunnel)
            opened.append(tunnel)
        return tunnel

    def _identity(self) -> str | None:
        return str(Path(self.spec.identity).expanduser()) if self.spec.identity else None

    async def _open(self) -> tuple[asyncssh.SSHClientConnection, list]:
        ep = await self._final_endpoint()
        opened: list = []
        try:
            tunnel = await self._open_tunnel(ep, opened, fetch=False)
            conn = await self._connect_endpoint(ep, tunnel)
        except BaseException:
            for c in reversed(opened):
                c.close()
            raise
        return conn, opened

    async def _connection(self) -> asyncssh.SSHClientConnection:
        """The pooled connection; made on first use and again after it dropped."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._lock:   # concurrent first uses share one connect
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._discard()
            self._conn, self._jumps = await self._open()
            return self._conn

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        for c in reversed(self._jumps):
            c.close()
        self._conn, self._jumps, self._sftp, self._sftp_conn = None, [], None, None

    async def connect(self) -> None:
        """Make sure the connection is up (raises TransportError / HostKeyError / PermanentError)."""
        await self._connection()

    async def close(self) -> None:
        conns = [c for c in [self._conn, *self._jumps] if c is not None]
        self._discard()
        for c in conns:
            try:
                await asyncio.wait_for(c.wait_closed(), 5)
            except (TimeoutError, asyncio.TimeoutError, OSError, asyncssh.Error):
                pass

    def _lost(self, what: str, e: BaseException | None) -> TransportError:
        why = f": {e}" if e and str(e) else ""
        return TransportError(f"connection to {self.host} lost during {what}{why}",
                              "it may or may not have completed on the host; Ferry reconnects on the next use")

    # ------------------------------------------------------------ host keys

    async def _probe_key(self, ep: _Endpoint, tunnel) -> HostKeyInfo:
        store = await TrustStore.load(self.known_hosts)
        try:
            opts = await asyncssh.SSHClientConnectionOptions.construct(
                None, config=self.ssh_config_paths, host=ep.target, port=ep.port_arg,
                client_keys=None, agent_path=None, agent_identities=None, x509_trusted_certs=None,
                x509_trusted_cert_paths=[], gss_kex=False, gss_auth=False,
                connect_timeout=self.connect_timeout)
            key = await asyncssh.get_server_host_key(
                ep.target, ep.port_arg, tunnel=tunnel, config=self.ssh_config_paths, options=opts,
                server_host_key_algs=self._host_key_algs(ep, store) or ())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self._connect_error(ep, e) from None
        if key is None:
            raise PermanentError(f"{self._who(ep)} at {ep.address} presented no host key",
                                 "is that port an SSH server?")
        return self._key_info(ep, key, store)

    async def fetch_host_key(self) -> HostKeyInfo:
        """The key the host presents (no login) and its status; an untrusted jump host comes first."""
        ep = await self._final_endpoint()
        opened: list = []
        try:
            tunnel = await self._open_tunnel(ep, opened, fetch=True)
            return await self._probe_key(ep, tunnel)
        except _Untrusted as u:
            return u.info
        finally:
            for c in reversed(opened):
                c.close()

    # ------------------------------------------------------------ commands

    async def _exec(self, argv: Sequence) -> tuple[_SessionProcess, _Stderr, str]:
        what = _describe(argv)
        if not argv:
            raise PermanentError("empty command", "pass the program and its arguments")
        command = _wrapped(remote_command(argv))
        for attempt in (1, 2):
            conn = await self._connection()
            await self._sessions.acquire()
            made: list[_SessionProcess] = []

            def factory() -> _SessionProcess:
                # Called once the channel is open: from here on the command may be on its way.
                made.append(_SessionProcess(self._sessions.release))
                return made[-1]

            try:
                _, proc = await conn.create_session(factory, command, encoding=None)
                return proc, _Stderr(proc.stderr, self, what), what
            except asyncio.CancelledError:
                if not made:
                    self._sessions.release()
                raise
            except Exception as e:
                if not made:
                    self._sessions.release()
                if not _is_link_error(e):
                    raise
                if attempt == 1 and not made and conn.is_closed():
                    continue   # the link was dead before the command was sent: reconnect once
                if made:
                    made[0].close()
                if isinstance(e, asyncssh.ChannelOpenError) and not conn.is_closed():
                    raise TransportError(f"{self.host} refused a new SSH session for {what}: {e.reason}",
                                         "sshd's MaxSessions may be lower than 10; raise it or lower "
                                         "max_sessions for this host") from None
                raise self._lost(what, e) from None
        raise AssertionError("unreachable")

    async def _kill_group(self, pgid: int | None) -> bool:
        """SIGKILL a command's process group through a second session; False if that was impossible."""
        conn = self._conn
        if not pgid or conn is None or conn.is_closed():
            return False
        try:
            r = await asyncio.wait_for(conn.run(f"kill -KILL -- -{pgid} || kill -KILL {pgid}", encoding=None), 10)
        except (TimeoutError, asyncio.TimeoutError, OSError, asyncssh.Error):
            return False
        return r.exit_status == 0

    async def _abort(self, proc: _SessionProcess, stderr: _Stderr) -> bool:
        """Kill a command we gave up on, then drop its channel; True if the kill was delivered."""
        await stderr.started(5)   # its process-group line may still be on the wire
        killed = await self._kill_group(stderr.pgid)
        proc.close()
        stderr.cancel()
        return killed

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = 60.0, check: bool = False) -> RunResult:
        proc, stderr, what = await self._exec(argv)

        async def feed() -> None:
            if input:
                proc.stdin.write(input)
                await proc.stdin.drain()
            proc.stdin.write_eof()

        try:
            async with asyncio.timeout(timeout):
                _, out, err = await asyncio.gather(feed(), proc.stdout.read(), stderr.readall())
                await proc.wait_closed()
        except (TimeoutError, asyncio.TimeoutError):
            killed = await self._abort(proc, stderr)
            raise TransportError(f"{what} on {self.host} timed out after {timeout:g} s",
                                 "the host may be overloaded or the command hung; "
                                 + ("it was killed" if killed else "it could not be killed")) from None
        except asyncio.CancelledError:
            # Killed in the background: a cancelled caller must not wait on a slow link.
            task = asyncio.ensure_future(self._abort(proc, stderr))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        except Exception as e:
            proc.close()
            stderr.cancel()
            if _is_link_error(e):
                raise self._lost(what, e) from None
            raise
        status = proc.returncode
        if status is None:
            raise self._lost(what, None)
        result = RunResult(status, out, err)
        if check and status != 0:
            raise command_error(self.host, what, result)
        return result

    async def start(self, argv: Sequence[str]) -> Process:
        proc, stderr, what = await self._exec(argv)
        await stderr.started(self.connect_timeout)   # so that kill() knows whom to kill
        return _SshProcess(proc, stderr, self, what)

    # ------------------------------------------------------------ files (SFTP)

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        conn = await self._connection()
        if self._sftp is not None and self._sftp_conn is conn:
            return self._sftp
        async with self._sftp_lock:
            if self._sftp is None or self._sftp_conn is not conn:
                self._sftp = await conn.start_sftp_client()
                self._sftp_conn = conn
            return self._sftp

    async def _files(self, what: str, path: str, op):
        """Run an SFTP operation, retrying once on a dropped link (every op here is idempotent)."""
        for attempt in (1, 2):
            try:
                sftp = await self._sftp_client()
                return await op(sftp)
            except asyncssh.SFTPError as e:
                if isinstance(e, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)) and attempt == 1:
                    self._sftp = None
                    continue
                if isinstance(e, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)):
                    raise self._lost(f"{what} {path}", e) from None
                raise PermanentError(f"cannot {what} {path} on {self.host}: {e.reason}",
                                     _sftp_hint(e)) from e
            except (FerryError, asyncio.CancelledError):
                raise
            except Exception as e:
                if not _is_link_error(e):
                    raise
                self._sftp = None
                if attempt == 2:
                    raise self._lost(f"{what} {path}", e) from None
        raise AssertionError("unreachable")

    async def read_file(self, path: str) -> bytes:
        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            # Read to EOF in pieces: /proc and /sys files stat as empty, so "read it all" returns nothing.
            parts = []
            async with sftp.open(path, "rb") as f:
                while chunk := await f.read(1 << 20):
                    parts.append(chunk)
            return b"".join(parts)
        return await self._files("read", path, op)

    async def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        async def op(sftp: asyncssh.SFTPClient) -> None:
            directory = os.path.dirname(path) or "."
            tmp = f"{directory}/.{os.path.basename(path)}.ferry-{uuid.uuid4().hex[:12]}"
            try:
                attrs = asyncssh.SFTPAttrs(permissions=mode if mode is not None else 0o644)
                async with sftp.open(tmp, "wb", attrs) as f:
                    await f.write(data)
                    if mode is not None:
                        await f.chmod(mode)   # the umask on the host may have trimmed it
                    await _fsync(f)
                await _replace(sftp, tmp, path)
            except BaseException:
                try:
                    await sftp.remove(tmp)
                except (asyncssh.SFTPError, OSError, asyncssh.Error):
                    pass
                raise
            await _fsync_dir(sftp, directory)
        await self._files("write", path, op)

    async def stat(self, path: str) -> FileStat | None:
        async def op(sftp: asyncssh.SFTPClient) -> FileStat | None:
            try:
                a = await sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
            mtime_ns = (a.mtime or 0) * 1_000_000_000 + (a.mtime_ns or 0)
            return FileStat(path, a.size or 0, a.permissions or 0, mtime_ns, a.uid or 0, a.gid or 0)
        return await self._files("stat", path, op)

    async def listdir(self, path: str) -> list[str]:
        async def op(sftp: asyncssh.SFTPClient) -> list[str]:
            names = await sftp.listdir(path)
            return sorted(n for n in names if n not in (".", ".."))
        return await self._files("list", path, op)

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        async def op(sftp: asyncssh.SFTPClient) -> None:
            attrs = asyncssh.SFTPAttrs(permissions=mode)
            if parents:
                await sftp.makedirs(path, attrs, exist_ok=True)
            else:
                await sftp.mkdir(path, attrs)
        await self._files("create directory", path, op)

    async def remove(self, path: str) -> None:
        async def op(sftp: asyncssh.SFTPClient) -> None:
            try:
                a = await sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return
            if a.permissions is not None and stat_mod.S_ISDIR(a.permissions):
                raise PermanentError(f"cannot remove {path} on {self.host}: it is a directory",
                                     "remove() deletes files only")
            try:
                await sftp.remove(path)
            except asyncssh.SFTPNoSuchFile:
                pass
        await self._files("remove", path, op)

    # ------------------------------------------------------------ UNIX sockets

    async def open_unix(self, path: str):
        what = f"connection to UNIX socket {path}"
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                reader, writer = await conn.open_unix_connection(path)
                return _Reader(reader, self, what), _Writer(writer, self, what)
            except asyncssh.ChannelOpenError as e:
                if attempt == 1 and conn.is_closed():
                    continue
                if conn.is_closed():
                    raise self._lost(what, e) from None
                raise PermanentError(f"cannot connect to UNIX socket {path} on {self.host}: {e.reason}",
                                     "is the service listening there (for QMP: is the VM running)? "
                                     "sshd needs AllowStreamLocalForwarding yes") from None
            except (asyncssh.Error, OSError) as e:
                if attempt == 1 and conn.is_closed():
                    continue
                raise self._lost(what, e) from None
        raise AssertionError("unreachable")


def _parse_hop(hop: str) -> tuple[str, int | None, str | None]:
    """ProxyJump's [user@]host[:port] (or ssh://user@host:port)."""
    hop = hop.removeprefix("ssh://")
    user, _, hostport = hop.rpartition("@")
    port: int | None = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    else:
        host = hostport
    return host, port, user or None


def _sftp_hint(e: asyncssh.SFTPError) -> str:
    if isinstance(e, asyncssh.SFTPNoSuchFile):
        return "check the path and that its parent folder exists"
    if isinstance(e, asyncssh.SFTPPermissionDenied):
        return "check the permissions on the host and the SSH user"
    if isinstance(e, asyncssh.SFTPFailure):
        return "the host refused it: the folder may exist already, be non-empty, or the disk may be full"
    return "check the path and the host's free space"


async def _fsync(f) -> None:
    try:
        await f.fsync()
    except asyncssh.SFTPOpUnsupported:
        pass   # servers without fsync@openssh.com: the rename is still atomic, only less durable


async def _replace(sftp: asyncssh.SFTPClient, src: str, dst: str) -> None:
    try:
        await sftp.posix_rename(src, dst)
    except asyncssh.SFTPOpUnsupported:
        # Plain SFTP rename refuses to overwrite: fall back to remove + rename (not atomic).
        try:
            await sftp.remove(dst)
        except asyncssh.SFTPNoSuchFile:
            pass
        await sftp.rename(src, dst)


async def _fsync_dir(sftp: asyncssh.SFTPClient, directory: str) -> None:
    """fsync the folder so the rename itself survives a crash (works with OpenSSH's sftp-server)."""
    try:
        async with sftp.open(directory, "rb") as d:
            await d.fsync()
    except (asyncssh.SFTPError, OSError):
        pass
