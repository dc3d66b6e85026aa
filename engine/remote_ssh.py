"""`ferry --engine TARGET`: a front end on this machine attached to the engine of another, over SSH.

TARGET is a host of this workspace's config.toml, or `[user@]host[:port]` (a ~/.ssh/config alias
too), optionally followed by `:/path` (or `:~/path`) of the workspace over there; without it, the
remote user's default workspace.

The SSH connection is made as the engine makes its own (engine/transport/ssh.py, reused): keys and
the agent only, never a password, and the host key checked against this workspace's known_hosts
(then ~/.ssh/known_hosts); an unknown or changed key is refused until `ferry engine trust TARGET`.
The remote `ferry engine start --json` (`status --json` when nothing may start) starts the engine
there if needed and says where its workspace is; frames then flow over stream-local forwarding to
its engine.sock, as over the local socket. The engine sees sshd's forwarding process as its peer
(SO_PEERCRED): the SSH user must own that engine, or be in its `[engine] group`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import HostSpec, SiteConfig
from .errors import FerryError, HostKeyError, PermanentError, TransportError
from .protocol import SOCKET_NAME, UNIX_PATH_MAX
from .remote import START_TIMEOUT_S, EngineUnavailable
from .transport.knownhosts import HostKeyInfo, record_host_key
from .transport.paths import default_user_known_hosts
from .transport.ssh import SshTransport
from .workspace import Workspace

COMMAND_ENV = "FERRY_ENGINE_COMMAND"
DEFAULT_COMMAND = "ferry"


@dataclass(frozen=True)
class Target:
    host: str                   # TARGET without its workspace: how `ferry engine trust` names it
    spec: HostSpec              # how to reach it
    workspace: str | None       # over there; None: the remote user's default
    in_config: bool             # a host of this workspace's config.toml


def parse_target(text: str, site: SiteConfig | None) -> Target:
    """TARGET: a host of config.toml or [user@]host[:port], then optionally :/path of the workspace."""
    host, workspace = text, None
    cut = min((i for i in (text.find(":/"), text.find(":~")) if i >= 0), default=-1)
    if cut >= 0:
        host, workspace = text[:cut], text[cut + 1:]
    if not host:
        raise PermanentError(f"--engine {text!r} names no host", "write it as [user@]host[:port][:/path/to/workspace]")
    if site is not None and host in site.hosts:
        spec = site.hosts[host]
        if spec.transport != "ssh":
            raise PermanentError(f"host {host} uses the local transport: there is no engine to reach over SSH",
                                 "without --engine, Ferry attaches to this machine's engine")
        return Target(host, spec, workspace, True)
    user, _, hostport = host.rpartition("@")
    address, port = hostport, None
    try:
        if hostport.startswith("["):
            address, _, rest = hostport[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif hostport.count(":") == 1:
            address, _, p = hostport.partition(":")
            port = int(p)
    except ValueError:
        raise PermanentError(f"--engine {text!r}: the port is not a number",
                             "write it as [user@]host[:port][:/path/to/workspace]") from None
    spec = HostSpec(name=address, cluster="", transport="ssh", address=address, port=port, user=user or None)
    return Target(host, spec, workspace, False)


class _Channel:
    """The forwarded channel as the stream pair RemoteEngine speaks frames on: a broken link is a
    ConnectionError to it, as a broken local socket is."""

    def __init__(self, reader, writer) -> None:
        self._r, self._w = reader, writer
        self._closing: asyncio.Task | None = None

    async def readexactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await self._r.read(n - len(buf))
            except TransportError as e:
                raise ConnectionResetError(e.message) from None
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += chunk
        return bytes(buf)

    def write(self, data: bytes) -> None:
        try:
            self._w.write(data)
        except TransportError as e:
            raise ConnectionResetError(e.message) from None

    async def drain(self) -> None:
        try:
            await self._w.drain()
        except TransportError as e:
            raise ConnectionResetError(e.message) from None

    def close(self) -> None:
        # The end of our side: the engine reads EOF and closes, and sshd closes the channel.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._w.close())

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)


class SshEngineLink:
    """How a RemoteEngine reaches the engine of another machine (its `opener`): one SSH connection,
    kept and made again when it drops; a channel to the engine's socket per (re)connect."""

    def __init__(self, ws: Workspace, target: str, *, command: str | None = None,
                 ssh_config_paths: Sequence[str | Path] | None = None, use_agent: bool = True,
                 connect_timeout: float = 15.0) -> None:
        self.workspace = ws
        self.parsed = parse_target(target, ws.load_config(check_files=False))
        self.spec, self.remote_workspace = self.parsed.spec, self.parsed.workspace
        self.where = target
        command = command or os.environ.get(COMMAND_ENV) or DEFAULT_COMMAND
        self.command = shlex.split(command)
        if not self.command:
            raise PermanentError("the remote ferry command is empty", f"pass --engine-command or set {COMMAND_ENV}")
        self.transport = SshTransport(self.spec, known_hosts=[ws.known_hosts_path, default_user_known_hosts()],
                                      ssh_config_paths=ssh_config_paths, use_agent=use_agent,
                                      connect_timeout=connect_timeout)
        self.socket = f"{self.remote_workspace.rstrip('/')}/{SOCKET_NAME}" \
            if self.remote_workspace and self.remote_workspace.startswith("/") else None

    async def open(self, autostart: bool) -> tuple[_Channel, _Channel]:
        """A stream to the engine's socket; the engine started there first when `autostart`."""
        with self._told():
            await self.transport.connect()
            if self.socket:
                self._fits(self.socket)      # said before an engine is started there for nothing
                with contextlib.suppress(PermanentError):
                    return await self._forward(self.socket)
            doc = await self.ask("start" if autostart else "status")
            if not doc.get("running"):
                raise EngineUnavailable(f"no engine runs on {self.where} (workspace {doc.get('workspace')})",
                                        f"start it with `ferry --engine {self.where} engine start`")
            self.socket = f"{str(doc['workspace']).rstrip('/')}/{SOCKET_NAME}"
            self._fits(self.socket)
            return await self._forward(self.socket)

    def _fits(self, path: str) -> None:
        """sshd connects to the far socket by its path, which a UNIX socket address holds only up to
        107 bytes (this side reaches a deeper one through /proc/self/fd; sshd cannot): a shorter path
        to the same workspace, a symlink, is the way."""
        size = len(path.encode())
        if size > UNIX_PATH_MAX:
            folder = path.rsplit("/", 1)[0]
            raise PermanentError(f"the engine socket on {self.where}, {path}, is {size} bytes: longer than the "
                                 f"{UNIX_PATH_MAX} a UNIX socket path may have, so sshd cannot forward to it",
                                 f"give that workspace a shorter path over there (ln -s {folder} ~/ferry-ws) and "
                                 f"attach with --engine {self.parsed.host}:~/ferry-ws")

    @contextlib.contextmanager
    def _told(self) -> Iterator[None]:
        """The transport's errors, told for this target: a refused key names `ferry engine trust`, and
        a target that is no host of config.toml has no table there to check."""
        try:
            yield
        except HostKeyError as e:
            e.hint = (f"confirm the fingerprint with the host's administrator, then run: "
                      f"ferry engine trust {self.parsed.host}")
            raise
        except FerryError as e:
            if not self.parsed.in_config:
                e.hint = e.hint.replace(f"hosts.{self.spec.name} in config.toml", f"--engine {self.parsed.host}")
            raise

    async def _forward(self, path: str) -> tuple[_Channel, _Channel]:
        reader, writer = await self.transport.open_unix(path)
        channel = _Channel(reader, writer)
        return channel, channel

    async def ask(self, action: str) -> dict[str, Any]:
        """`ferry engine ACTION --json` over there, as a dict (its workspace, running or not)."""
        r = await self.run_remote(["engine", action, "--json"], timeout=START_TIMEOUT_S + 30)
        out = r.stdout.decode("utf-8", "replace")
        start = out.find("{")
        try:
            doc = json.loads(out[start:]) if start >= 0 else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "workspace" not in doc:
            lines = [x.strip() for x in r.stderr.decode("utf-8", "replace").splitlines() if x.strip()]
            last = lines[-1].removeprefix("ferry: ") if lines else f"exit status {r.exit_status}"
            s = self.spec
            ssh = shlex.join(["ssh", *(["-p", str(s.port)] if s.port else []),
                              f"{s.user}@{s.address or s.name}" if s.user else s.address or s.name])
            raise PermanentError(f"`{shlex.join(self._argv(['engine', action]))}` on {self.where} failed: {last}",
                                 f"try it there: {ssh} {shlex.join(self._argv(['engine', action]))}")
        return doc

    def _argv(self, argv: list[str]) -> list[str]:
        return [*self.command, *(["--workspace", self.remote_workspace] if self.remote_workspace else []), *argv]

    async def run_remote(self, argv: list[str], *, timeout: float | None = 120.0):
        """The remote ferry command with `argv` (and the remote workspace when TARGET names one)."""
        full = self._argv(argv)
        with self._told():
            r = await self.transport.run(full, timeout=timeout)
        if r.exit_status == 127:    # the shell's "command not found"
            raise PermanentError(f"`{shlex.join(self.command)}` was not found on {self.where}",
                                 f"install Ferry there, or name its command with --engine-command or {COMMAND_ENV}")
        return r

    async def host_key(self) -> HostKeyInfo:
        """The key the target presents (no login) and whether this workspace trusts it."""
        with self._told():
            return await self.transport.fetch_host_key()

    async def trust(self, info: HostKeyInfo) -> None:
        """Record the key in this workspace's known_hosts (the file `ferry hosts trust` writes)."""
        await record_host_key(self.workspace.known_hosts_path, info)

    async def close(self) -> None:
        await self.transport.close()
