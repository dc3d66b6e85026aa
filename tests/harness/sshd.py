"""pytest plugin: real OpenSSH sshd servers on free loopback ports, with throw-away keys.

Never touches the machine's own sshd, its host keys or anyone's ~/.ssh. Load it with
`pytest_plugins = ["harness.sshd"]` in tests/conftest.py.
"""

from __future__ import annotations

import base64
import ctypes
import getpass
import hashlib
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ferry.engine.config import HostSpec, SiteConfig, dump_config, load_config
from ferry.engine.workspace import Workspace

from .waiting import until_sync

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def keygen(path: Path, comment: str) -> str:
    """A fresh unencrypted ed25519 key pair at `path`; returns the public line."""
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


def fingerprint_of(public_line: str) -> str:
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _die_with_parent() -> None:
    # If pytest itself is killed, its sshds go too (PR_SET_PDEATHSIG = 1, SIGTERM).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z":
            kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class SshServer:
    """One sshd on 127.0.0.1:port with its own host key; logs in `root/sshd.log`."""

    root: Path
    user_key: Path
    user_public: str
    port: int = 0
    address: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    host_public: str = ""
    also_listen: tuple[str, ...] = ()       # more addresses it takes connections on (same port)
    log_level: str = "INFO"                 # VERBOSE logs the address each connection came in on

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.host_public)

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {' '.join(self.host_public.split()[:2])}"

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def log(self) -> str:
        try:
            return (self.root / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.host_public = keygen(self.host_key, f"ferry-test-host-{self.root.name}")
        (self.root / "authorized_keys").write_text(self.user_public + "\n")
        self.port = self.port or free_port()

    def _write_config(self) -> Path:
        cfg = self.root / "sshd_config"
        cfg.write_text("\n".join([
            *(f"ListenAddress {a}" for a in (self.address, *self.also_listen)),
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"PidFile {self.root / 'sshd.pid'}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "Subsystem sftp internal-sftp",
            "AllowStreamLocalForwarding yes",
            "AllowTcpForwarding yes",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "PrintMotd no",
            "PermitUserRC no",
            "UseDNS no",
            # bash sources ~/.bashrc for ssh commands only at SHLVL < 2; this machine's root .bashrc
            # runs `pyenv init` (~100 ms, stray stderr), which is the machine's, not the host's behaviour.
            # ... and a Ferry started over it (a far engine) opens the suite's folder lab, as here
            "SetEnv SHLVL=1 FERRY_LAB=folders",
            f"LogLevel {self.log_level}",
            "",
        ]))
        return cfg

    def start(self, timeout: float = 10.0) -> "SshServer":
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)   # sshd's privilege-separation folder
        cfg = self._write_config()
        for attempt in range(3):
            log = open(self.root / "sshd.log", "ab")
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            log.close()
            if self._wait_listening(timeout):
                return self
            self.stop()
            if "Address already in use" in self.log and attempt < 2:
                self.port = free_port()   # lost the race for the port to another process
                cfg = self._write_config()
                continue
            break
        raise RuntimeError(f"sshd on {self.address}:{self.port} did not start:\n{self.log[-3000:]}")

    def _wait_listening(self, timeout: float) -> bool:
        """True once sshd sends its banner; False if it exits first or stays silent until the deadline."""
        def banner() -> bool:
            assert self.proc.poll() is None, "sshd exited"
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    return s.recv(4).startswith(b"SSH-")   # the banner: sshd is really there
            except OSError:
                return False
        try:
            return until_sync(banner, timeout=timeout, what=f"sshd on {self.address}:{self.port}")
        except AssertionError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        kids = descendants(pid) if self.proc.poll() is None else []
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for k in kids:   # sessions outlive the listener; end them too
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def regenerate_host_key(self) -> str:
        """A new host key (the "reinstalled or intercepted" case), sshd restarted; returns its fingerprint."""
        self.stop()
        self.host_public = keygen(self.host_key, f"ferry-test-host-{self.root.name}-new")
        self.start()
        return self.fingerprint

    def connection_pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def kill_connections(self, timeout: float = 5.0) -> int:
        """SIGKILL the server side of every live connection (the per-connection sshd processes and
        what they run); the listener stays up. Returns how many processes were killed."""
        pids = self.connection_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        until_sync(lambda: not any(_alive(p) for p in pids), timeout=timeout, what="the killed connections to end")
        return len(pids)

    def trust(self, known_hosts: Path) -> None:
        """Append this server's host key to a known_hosts file."""
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(known_hosts, "a") as f:
            f.write(self.known_hosts_line + "\n")

    def host_spec(self, name: str, cluster: str = "lab") -> HostSpec:
        return HostSpec(name=name, cluster=cluster, transport="ssh", address=self.address, port=self.port,
                        user=self.user, identity=str(self.user_key), runtime=str(self.root / "run"))

    def host_table(self, cluster: str = "lab") -> dict:
        """This server as a [hosts.X] table of config.toml."""
        return {"cluster": cluster, "transport": "ssh", "address": self.address, "port": self.port,
                "user": self.user, "identity": str(self.user_key), "runtime": str(self.root / "run")}


@dataclass
class SshSite:
    """A workspace whose config.toml names ssh hosts served by test sshds, keys already trusted.

    Isolated from the machine: no ~/.ssh/config, an empty user known_hosts, no ssh-agent.
    """

    workspace: Workspace
    servers: dict[str, SshServer]
    user_known_hosts: Path
    ssh_config: Path
    datastores: dict[str, Path] = field(default_factory=dict)

    def config(self) -> SiteConfig:
        return load_config(self.workspace.config_path)

    def pool(self, **kw):
        from ferry.engine.transport import TransportPool
        kw.setdefault("ssh_config_paths", [self.ssh_config])
        kw.setdefault("user_known_hosts", self.user_known_hosts)
        kw.setdefault("use_agent", False)
        kw.setdefault("connect_timeout", 5.0)
        return TransportPool(self.config(), self.workspace, **kw)


class SshdFactory:
    """Starts sshd servers that share one throw-away user key; stops them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.user_key = base / "id_ed25519"
        self.user_public = keygen(self.user_key, "ferry-test-user")
        self.servers: list[SshServer] = []

    def __call__(self, n: int = 1) -> list[SshServer]:
        return [self.one() for _ in range(n)]

    def one(self) -> SshServer:
        server = SshServer(self.base / f"sshd{len(self.servers)}", self.user_key, self.user_public)
        server.setup()
        self.servers.append(server)
        return server.start()

    def one_on(self, addresses: tuple[str, ...], *, log_level: str = "INFO") -> SshServer:
        """One server taking connections on each of `addresses` (loopback ones), the first its own."""
        server = SshServer(self.base / f"sshd{len(self.servers)}", self.user_key, self.user_public,
                           address=addresses[0], also_listen=tuple(addresses[1:]), log_level=log_level)
        server.setup()
        self.servers.append(server)
        return server.start()

    def site(self, root: Path, n: int = 2, *, names: list[str] | None = None,
             trusted: bool = True, extra_hosts: dict | None = None) -> SshSite:
        """A workspace at `root` with `n` ssh hosts (ssh1..sshN) on fresh servers, and a datastore each."""
        names = names or [f"ssh{i + 1}" for i in range(n)]
        return self.site_of(root, dict(zip(names, self(len(names)))), trusted=trusted, extra_hosts=extra_hosts)

    def site_of(self, root: Path, servers: dict[str, SshServer], *, trusted: bool = True,
                extra_hosts: dict | None = None) -> SshSite:
        """A workspace at `root` whose ssh hosts are `servers` (by host name), a datastore each."""
        ws = Workspace(root / "ws").ensure()
        doc: dict = {"site": {"name": "test"}, "clusters": {"lab": {}}, "hosts": {}, "datastores": {}}
        stores: dict[str, Path] = {}
        for name, server in servers.items():
            doc["hosts"][name] = server.host_table()
            path = root / "datastores" / name
            path.mkdir(parents=True, exist_ok=True)
            doc["datastores"][f"{name}-local"] = {"path": str(path), "hosts": [name]}
            stores[f"{name}-local"] = path
            if trusted:
                server.trust(ws.known_hosts_path)
        doc["hosts"].update(extra_hosts or {})
        ws.config_path.write_text(dump_config(doc))
        user_known_hosts = root / "user_known_hosts"
        user_known_hosts.touch()
        ssh_config = root / "ssh_config"
        ssh_config.touch()
        return SshSite(ws, servers, user_known_hosts, ssh_config, stores)

    def stop_all(self) -> None:
        for server in self.servers:
            try:
                server.stop()
            except Exception:   # one stuck server must not leave the others running
                pass


@pytest.fixture
def sshd_factory(tmp_path_factory):
    """Start real sshd servers: `sshd_factory(2)` -> [SshServer, SshServer]; all stopped after the test."""
    factory = SshdFactory(tmp_path_factory.mktemp("sshd"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def ssh_site(sshd_factory, tmp_path) -> SshSite:
    """A workspace with two ssh hosts (ssh1, ssh2) on real sshds, their keys trusted."""
    return sshd_factory.site(tmp_path, 2)
