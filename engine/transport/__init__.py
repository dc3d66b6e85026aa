"""Transports: how the engine reaches a host. `TransportPool` hands out one per host, cached."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..config import SiteConfig
from ..workspace import Workspace
from .base import ByteReader, ByteWriter, FileStat, Process, RunResult, Transport
from .local import LocalTransport
from .paths import default_user_known_hosts

if TYPE_CHECKING:
    from .ssh import SshTransport

# asyncssh takes ~90 ms to import: the ssh transport and key tools load on first use.
_LAZY = {"SshTransport": "ssh", "HostKeyInfo": "knownhosts", "KeyStatus": "knownhosts",
         "fetch_host_key": "knownhosts", "record_host_key": "knownhosts"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)

__all__ = ["ByteReader", "ByteWriter", "FileStat", "HostKeyInfo", "KeyStatus", "LocalTransport", "Process",
           "RunResult", "SshTransport", "Transport", "TransportPool", "fetch_host_key", "record_host_key"]

LOCAL = "local"


class TransportPool:
    """One transport per host name for a site; ssh ones keep one pooled connection each."""

    def __init__(self, site: SiteConfig, workspace: Workspace, *,
                 ssh_config_paths: Sequence[str | Path] | None = None,
                 user_known_hosts: str | Path | None = None, use_agent: bool = True,
                 connect_timeout: float = 15.0) -> None:
        """ssh_config_paths None = ~/.ssh/config; user_known_hosts None = ~/.ssh/known_hosts."""
        self.site = site
        self.workspace = workspace
        self.ssh_config_paths = ssh_config_paths
        self.user_known_hosts = Path(user_known_hosts) if user_known_hosts else default_user_known_hosts()
        self.use_agent = use_agent
        self.connect_timeout = connect_timeout
        self._transports: dict[str, Transport] = {}

    @property
    def known_hosts(self) -> list[Path]:
        """Files of trusted host keys: the workspace's (written by `ferry hosts trust`), then the user's."""
        return [self.workspace.known_hosts_path, self.user_known_hosts]

    def get(self, host_name: str) -> Transport:
        """The transport for a host of the site (or "local"); raises PermanentError for an unknown name."""
        t = self._transports.get(host_name)
        if t is None:
            t = self._transports[host_name] = self._make(host_name)
        return t

    def _make(self, host_name: str) -> Transport:
        if host_name == LOCAL:
            return LocalTransport(LOCAL)
        spec = self.site.host(host_name)
        if spec.transport == "local":
            return LocalTransport(spec.name)
        from .ssh import SshTransport
        return SshTransport(spec, known_hosts=self.known_hosts, ssh_config_paths=self.ssh_config_paths,
                            use_agent=self.use_agent, connect_timeout=self.connect_timeout)

    def ssh(self, host_name: str) -> SshTransport:
        """The ssh transport of a host, for host-key commands; PermanentError for a local host."""
        from ..errors import PermanentError
        from .ssh import SshTransport
        t = self.get(host_name)
        if not isinstance(t, SshTransport):
            raise PermanentError(f"host {host_name} uses the local transport: it has no SSH host key",
                                 "only hosts with transport = \"ssh\" need `ferry hosts trust`")
        return t

    def hosts(self) -> list[str]:
        """The hosts with a transport made (pooled connections)."""
        return list(self._transports)

    async def drop(self, hosts: Sequence[str]) -> None:
        """Forget the transports of these hosts (their config changed): closed, made again on use."""
        for h in hosts:
            t = self._transports.pop(h, None)
            if t is not None:
                await t.close()

    async def close(self) -> None:
        transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            await t.close()
