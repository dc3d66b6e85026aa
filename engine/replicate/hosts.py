"""Where replication agents start: this machine, or an ssh host through the OpenSSH client
(a child process of the engine), or, failing that, through the host's asyncssh transport."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..errors import FerryError, PermanentError, TransportError
from ..ship import Program
from ..transport.base import Process, Transport
from ..transport.local import LocalProcess, LocalTransport
from ..transport.openssh import classify_failure
from . import agent as W

PIPE_LIMIT = 1 << 20

# The agent is shipped on stdin: its source is too large for a command line (see ship.py), and stdin
# then carries its frames. On this machine it runs in the engine's own interpreter.
AGENT = Program("ferry-agent", Path(W.__file__).read_text(encoding="utf-8"), on_stdin=True)
REMOTE_AGENT = AGENT.argv()
LOCAL_AGENT = AGENT.argv(python=sys.executable)


# The OpenSSH client carrying an agent dies with the engine (the agent itself sees to that for
# itself, see agent.die_with_parent): its session then ends, and the agent on the host with it.
_SETPRIV = shutil.which("setpriv")


async def spawn(argv: list[str], *, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE) -> LocalProcess:
    """An agent (or the OpenSSH client carrying one) as a child of this process; stdin or stdout
    may be an fd (one end of a pipe to another agent)."""
    if _SETPRIV and argv is not LOCAL_AGENT:
        argv = [_SETPRIV, "--pdeathsig", "SIGTERM", "--", *argv]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True, limit=PIPE_LIMIT)
    return LocalProcess(proc, "local", "replication agent")


class AgentHost:
    """One end of a replication: a host name, how to start an agent there, and its transport."""

    def __init__(self, host: str, *, kind: str, child_argv: list[str] | None,
                 transport: Callable[[], Transport], shared_argv: list[str] | None = None) -> None:
        self.host = host
        self.kind = kind                 # "local" or "ssh"
        self.child_argv = child_argv     # starts an agent as a child of this process (own connection)
        self.shared_argv = shared_argv or child_argv   # same, over a shared connection (short work)
        self._transport = transport

    @classmethod
    def local(cls, host: str = "local") -> "AgentHost":
        t = LocalTransport(host)
        return cls(host, kind="local", child_argv=LOCAL_AGENT, transport=lambda: t)

    @classmethod
    def over(cls, transport: Transport) -> "AgentHost":
        """Agents through an existing transport only (no OpenSSH client)."""
        if isinstance(transport, LocalTransport):
            return cls(transport.host, kind="local", child_argv=LOCAL_AGENT, transport=lambda: transport)
        return cls(transport.host, kind="ssh", child_argv=None, transport=lambda: transport)

    def transport(self) -> Transport:
        return self._transport()

    async def start(self) -> Process:
        """Start an agent for short work: walks, control, hashing (it then reads its bootstrap)."""
        if self.shared_argv is not None:
            return await spawn(self.shared_argv)
        return await self.transport().start(REMOTE_AGENT)

    async def diagnose(self, status: int | None, stderr: str) -> FerryError | None:
        """Why an agent started through the OpenSSH client never spoke (exit status 255)."""
        if self.kind != "ssh" or self.child_argv is None or status != 255:
            return None
        line = (stderr.strip().splitlines() or ["ssh failed"])[-1]
        what = classify_failure(stderr)
        if what == "hostkey":
            # The asyncssh transport says it properly: fingerprint, unknown or changed, and the fix.
            try:
                await self.transport().connect()
            except FerryError as e:
                return e
            return PermanentError(f"{self.host}: the OpenSSH client refused the host key: {line}",
                                  f"check ~/.ssh/config for {self.host}; `ferry hosts trust {self.host}`")
        if what == "auth":
            return PermanentError(f"{self.host}: authentication failed: {line}",
                                  "check user and identity for the host in config.toml, or ssh-agent")
        return TransportError(f"{self.host}: {line}", "is the host up and sshd running? Ferry retries")


def agent_host(pool, name: str) -> AgentHost:
    """How to reach host `name` of the pool's site for replication. ssh hosts go through the
    OpenSSH client when it can be set up with the same trust; else through the pool's
    asyncssh transport (which is only created, and asyncssh only imported, when needed)."""
    from ..transport.openssh import openssh_argv
    from ..transport.paths import default_ssh_config_paths

    if name == "local":
        return AgentHost.local()
    spec = pool.site.host(name)
    if spec.transport == "local":
        return AgentHost.local(name)
    config = [Path(p) for p in pool.ssh_config_paths] if pool.ssh_config_paths is not None \
        else default_ssh_config_paths()
    def argv(shared: bool) -> list[str] | None:
        # the bulk streams (own connections) go over the host's migration network; short work over
        # the shared management connection
        return openssh_argv(spec, REMOTE_AGENT, known_hosts=pool.known_hosts, ssh_config_paths=config,
                            use_agent=pool.use_agent, shared=shared, data=not shared)
    return AgentHost(name, kind="ssh", child_argv=argv(False), shared_argv=argv(True),
                     transport=lambda: pool.get(name))
