"""Transports against real parts: local subprocesses and OpenSSH sshd on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from ferry.engine.config import HostSpec
from ferry.engine.errors import CommandError, HostKeyError, PermanentError, TransportError
from ferry.engine.transport import (KeyStatus, LocalTransport, SshTransport, TransportPool, fetch_host_key,
                              record_host_key)
from ferry.engine.transport.openssh import classify_failure, openssh_argv
from harness.cli import ferry, ferry_process, isolate_ssh
from harness.sshd import free_port, keygen
from harness.trees import describe, diff, write
from harness.waiting import until

GIB = 1 << 30

# Writes each argument as the bytes the process received, NUL-separated.
ECHO_ARGV = "import os, sys; sys.stdout.buffer.write(b'\\0'.join(map(os.fsencode, sys.argv[1:])))"

# Emits n pseudo-random bytes (a random 1 MiB block with a counter per block, so order and
# loss show in the hash) and reports their sha256 on stderr.
GENERATE = r"""
import hashlib, os, sys
n = int(sys.argv[1]); block = bytearray(os.urandom(1 << 20)); h = hashlib.sha256(); out = sys.stdout.buffer
for i in range(n >> 20):
    block[:8] = i.to_bytes(8, "big"); h.update(block); out.write(block)
out.flush(); sys.stderr.write(h.hexdigest() + "\n")
"""

# Hashes stdin; python's sha256 is ~4x faster here than coreutils' sha256sum.
CONSUME = r"""
import hashlib, sys
h = hashlib.sha256(); n = 0; inp = sys.stdin.buffer
while chunk := inp.read1(1 << 20):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest())
"""


@pytest.fixture(params=["local", "ssh"])
async def transport(request, sshd_factory, tmp_path):
    if request.param == "local":
        t = LocalTransport("lab1")
        yield t
        await t.close()
        return
    site = sshd_factory.site(tmp_path / "site", 1)
    pool = site.pool()
    yield pool.get("ssh1")
    await pool.close()


@pytest.fixture
async def ssh_pool(ssh_site):
    pool = ssh_site.pool()
    yield pool
    await pool.close()


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:   # gone, possibly between open() and read()
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current RSS
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


# ---------------------------------------------------------------- commands


async def test_arguments_arrive_byte_for_byte(transport):
    args = ["two words", "it's", 'say "hi"', "$HOME", "`id`", "$(id)", "back\\slash", "line\nbreak",
            "tab\there", "", "*", "; rm -rf /", "a|b&&c", "-n", "grüße ☃", "日本語",
            "bad \udcff\udcfe utf-8"]   # non-UTF-8 bytes 0xff 0xfe, carried via surrogateescape
    r = await transport.run(["python3", "-c", ECHO_ARGV, *args], check=True)
    assert r.stdout.split(b"\0") == [os.fsencode(a) for a in args]
    r = await transport.run(["printf", "%s|", *args[:6]], check=True)
    assert r.stdout == "|".join(args[:6]).encode() + b"|"


async def test_exit_status_stdout_and_stderr(transport):
    r = await transport.run(["sh", "-c", "echo out; echo first >&2; echo 'last line' >&2; exit 3"])
    assert (r.exit_status, r.stdout, r.stderr) == (3, b"out\n", b"first\nlast line\n")
    assert not r.ok
    with pytest.raises(CommandError) as e:
        await transport.run(["sh", "-c", "echo first >&2; echo 'last line' >&2; exit 3"], check=True)
    assert e.value.exit_status == 3
    assert "last line" in e.value.message and transport.host in e.value.message
    r = await transport.run(["no-such-command-ferry"])
    assert r.exit_status == 127


async def test_input_is_fed_to_stdin(transport):
    data = os.urandom(5 << 20)
    r = await transport.run(["cat"], input=data)
    assert r.stdout == data


async def test_timeout_is_a_clear_error_and_kills_the_command(transport, tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e:
        await transport.run(["sh", "-c", f"echo $$ > {pidfile}; sleep 30 | cat"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert "timed out after 0.5 s" in e.value.message and transport.host in e.value.message
    assert "killed" in e.value.hint
    pid = int(pidfile.read_text())
    await until(lambda: not _alive(pid), timeout=10, what="the timed-out command killed, pipeline and all")
    assert (await transport.run(["true"])).ok   # and the transport still works


async def test_cancelled_run_kills_the_command(transport, tmp_path):
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(transport.run(["sh", "-c", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 30"]))
    await until(pidfile.exists, timeout=10, what="the command started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pidfile.read_text())
    await until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10,
                what="the command killed and reaped, not even a zombie left")


async def test_download_1gib_stream_with_bounded_memory(transport):
    base = _reset_peak_rss()
    proc = await transport.start(["python3", "-c", GENERATE, str(GIB)])
    h, n = hashlib.sha256(), 0
    while chunk := await proc.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    reported = (await proc.stderr.readall()).decode().strip()
    assert await proc.wait(30) == 0
    assert n == GIB and h.hexdigest() == reported
    assert _status("VmHWM") - base < 150 << 20


async def test_upload_1gib_stream_with_bounded_memory(transport):
    base = _reset_peak_rss()
    proc = await transport.start(["python3", "-c", CONSUME])
    block, h = bytearray(os.urandom(1 << 20)), hashlib.sha256()
    for i in range(GIB >> 20):
        block[:8] = i.to_bytes(8, "big")
        chunk = bytes(block)
        h.update(chunk)
        proc.stdin.write(chunk)
        await proc.stdin.drain()   # backpressure: never more than a window in flight
    await proc.stdin.close()
    out = (await proc.stdout.readall()).decode().split()
    assert await proc.wait(30) == 0
    assert out == [str(GIB), h.hexdigest()]
    assert _status("VmHWM") - base < 150 << 20


async def test_killed_process_reports_signal(transport):
    proc = await transport.start(["sh", "-c", "echo ready; exec sleep 30"])
    assert await proc.stdout.read(6) == b"ready\n"
    await proc.kill()
    assert await proc.wait(5) == -9


async def test_killing_a_process_that_just_exited_keeps_its_exit_status(caplog):
    """kill() of a child that has exited but is not reaped yet (a stream killed as it ends) must not
    reap it behind asyncio's child watcher: that loses the status (255) and prints "Unknown child
    process pid N" on the operator's terminal. On one CPU the watcher thread is late often enough
    that the old kill() (which polled the child) lost about every other status here."""
    t = LocalTransport("lab1")
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})   # the loop's thread, and the watcher threads it starts
    statuses = []
    try:
        for _ in range(100):
            proc = await t.start(["sh", "-c", "exec >&-; exit 7"])
            assert await proc.stdout.read() == b""   # it closed its output: it is exiting
            deadline = time.monotonic() + 30
            while _state(proc._p.pid) not in ("Z", None):   # exited; the watcher may not have seen it
                assert time.monotonic() < deadline
            await proc.kill()
            statuses.append(await proc.wait(10))
    finally:
        os.sched_setaffinity(0, cpus)
    assert set(statuses) == {7}
    assert not [r for r in caplog.records if "Unknown child process" in r.getMessage()]


# ---------------------------------------------------------------- files


async def test_file_operations(transport, tmp_path):
    root = tmp_path / "files"
    await transport.mkdir(str(root / "a" / "b"))
    await transport.mkdir(str(root / "a" / "b"))   # exists: fine
    assert (await transport.stat(str(root / "a"))).is_dir
    path = str(root / "a" / "b" / "data.bin")
    data = os.urandom(3 << 20) + "ü\n".encode()
    await transport.write_file(path, data, mode=0o640)
    assert await transport.read_file(path) == data
    st = await transport.stat(path)
    assert st.size == len(data) and not st.is_dir and st.mode & 0o777 == 0o640
    assert abs(st.mtime_ns - os.stat(path).st_mtime_ns) < 2_000_000_000
    assert await transport.listdir(str(root / "a" / "b")) == ["data.bin"]

    # Atomic overwrite: a new inode is renamed over the old one, no temp file is left behind.
    inode = os.stat(path).st_ino
    await transport.write_file(path, b"second")
    assert Path(path).read_bytes() == b"second" and os.stat(path).st_ino != inode
    assert await transport.listdir(str(root / "a" / "b")) == ["data.bin"]

    assert await transport.stat(str(root / "missing")) is None
    with pytest.raises(PermanentError) as e:
        await transport.read_file(str(root / "missing"))
    assert "missing" in e.value.message and transport.host in e.value.message
    with pytest.raises(PermanentError):
        await transport.remove(str(root / "a"))   # a directory
    await transport.remove(path)
    await transport.remove(path)   # already gone: fine
    assert await transport.listdir(str(root / "a" / "b")) == []
    with pytest.raises(PermanentError):
        await transport.mkdir(str(root / "x" / "y"), parents=False)


async def test_open_unix_reaches_a_socket_on_the_host(transport, tmp_path):
    sock = str(tmp_path / "echo.sock")

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(echo, sock)
    try:
        reader, writer = await transport.open_unix(sock)
        payload = os.urandom(1 << 20)
        writer.write(payload)
        await writer.drain()
        await writer.close()
        assert await reader.readall() == payload
        with pytest.raises(PermanentError) as e:
            await transport.open_unix(str(tmp_path / "nobody.sock"))
        assert "nobody.sock" in e.value.message
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- ssh: host keys


async def test_unknown_host_key_is_refused_and_nothing_runs(sshd_factory, tmp_path):
    site = sshd_factory.site(tmp_path, 1, trusted=False)
    server = site.servers["ssh1"]
    pool = site.pool()
    marker = tmp_path / "ran"
    with pytest.raises(HostKeyError) as e:
        await pool.get("ssh1").run(["touch", str(marker)])
    await pool.close()
    err = e.value
    assert not err.changed and err.fingerprint == server.fingerprint and err.host == "ssh1"
    assert "unknown" in err.message and server.fingerprint in err.message and "ssh1" in err.message
    assert "ferry hosts trust ssh1" in err.hint
    assert not marker.exists()
    assert "Accepted publickey" not in server.log


async def test_changed_host_key_is_refused(ssh_site):
    server = ssh_site.servers["ssh1"]
    old = server.fingerprint
    pool = ssh_site.pool()
    assert (await pool.get("ssh1").run(["true"])).ok
    await pool.close()
    new = server.regenerate_host_key()
    pool = ssh_site.pool()
    with pytest.raises(HostKeyError) as e:
        await pool.get("ssh1").run(["true"])
    await pool.close()
    err = e.value
    assert err.changed and err.fingerprint == new
    assert "CHANGED" in err.message and new in err.message and old in err.message
    assert "WARNING" in err.message and "ferry hosts trust ssh1" in err.hint


async def test_trust_records_the_key_then_connects(sshd_factory, tmp_path):
    site = sshd_factory.site(tmp_path, 1, trusted=False)
    server = site.servers["ssh1"]
    pool = site.pool()
    info = await fetch_host_key(pool.ssh("ssh1"))
    assert info.status == KeyStatus.UNKNOWN and info.fingerprint == server.fingerprint
    assert info.endpoint == f"[127.0.0.1]:{server.port}"
    await record_host_key(site.workspace.known_hosts_path, info)
    assert (await pool.get("ssh1").run(["echo", "ok"])).stdout == b"ok\n"
    assert (await fetch_host_key(pool.ssh("ssh1"))).status == KeyStatus.TRUSTED
    await pool.close()

    # The key changes: trusting again replaces the old entry rather than adding to it.
    old = server.fingerprint
    server.regenerate_host_key()
    pool = site.pool()
    info = await fetch_host_key(pool.ssh("ssh1"))
    assert info.status == KeyStatus.CHANGED and info.old_fingerprints == (old,)
    await record_host_key(site.workspace.known_hosts_path, info)
    assert (await pool.get("ssh1").run(["true"])).ok
    await pool.close()
    lines = site.workspace.known_hosts_path.read_text().splitlines()
    assert lines == [server.known_hosts_line]


async def test_user_known_hosts_is_trusted_too(sshd_factory, tmp_path):
    site = sshd_factory.site(tmp_path, 1, trusted=False)
    site.servers["ssh1"].trust(site.user_known_hosts)
    pool = site.pool()
    assert (await pool.get("ssh1").run(["true"])).ok
    await pool.close()


# ---------------------------------------------------------------- ssh: connection


async def test_concurrent_first_uses_share_one_connection(ssh_pool):
    t = ssh_pool.get("ssh1")
    results = await asyncio.gather(*(t.run(["echo", str(i)]) for i in range(20)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]
    assert t.connects == 1


async def test_reconnects_after_server_side_is_killed(ssh_site, ssh_pool):
    server, t = ssh_site.servers["ssh1"], ssh_pool.get("ssh1")
    assert (await t.run(["true"])).ok
    assert server.kill_connections() > 0
    # The dead link is found before the command is sent: one transparent reconnect.
    assert (await t.run(["echo", "again"])).stdout == b"again\n"
    assert t.connects == 2
    server.kill_connections()
    assert await t.read_file(str(ssh_site.workspace.config_path))   # SFTP reconnects too
    assert t.connects == 3


async def test_command_in_flight_when_link_dies_is_not_rerun(ssh_site, ssh_pool, tmp_path):
    server, t = ssh_site.servers["ssh1"], ssh_pool.get("ssh1")
    counter = tmp_path / "counter"
    task = asyncio.create_task(t.run(["sh", "-c", f"echo x >> {counter}; sleep 30"], timeout=60))
    await until(counter.exists, timeout=10, what="the command started")
    t0 = time.monotonic()
    server.kill_connections()
    with pytest.raises(TransportError) as e:
        await task
    assert time.monotonic() - t0 < 5
    assert "lost" in e.value.message and "ssh1" in e.value.message
    assert (await t.run(["true"])).ok
    assert counter.read_text() == "x\n"   # ran once, never silently re-run


async def test_connection_refused_names_the_host(tmp_path):
    port = free_port()   # nothing listens there
    keygen(tmp_path / "key", "test")   # an explicit key, so nothing looks into ~/.ssh
    spec = HostSpec("dead1", "lab", "ssh", "127.0.0.1", port, "root", str(tmp_path / "key"))
    t = SshTransport(spec, known_hosts=[tmp_path / "kh"], ssh_config_paths=[], use_agent=False)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e:
        await t.run(["true"])
    assert time.monotonic() - t0 < 3
    assert "dead1" in e.value.message and f"127.0.0.1:{port}" in e.value.message
    assert "refused" in e.value.message and "sshd running" in e.value.hint


async def test_unresolvable_address_is_a_transport_error(tmp_path):
    keygen(tmp_path / "key", "test")
    spec = HostSpec("ghost", "lab", "ssh", "no-such-host.invalid", None, "root", str(tmp_path / "key"))
    t = SshTransport(spec, known_hosts=[tmp_path / "kh"], ssh_config_paths=[], use_agent=False,
                     connect_timeout=5)
    with pytest.raises(TransportError) as e:
        await t.run(["true"])
    assert "ghost" in e.value.message and "no-such-host.invalid" in e.value.message


async def test_wrong_key_is_a_permanent_login_error(ssh_site, tmp_path):
    server = ssh_site.servers["ssh1"]
    other = tmp_path / "other_key"
    keygen(other, "not-authorized")
    spec = HostSpec("ssh1", "lab", "ssh", "127.0.0.1", server.port, server.user, str(other))
    t = SshTransport(spec, known_hosts=[ssh_site.workspace.known_hosts_path], ssh_config_paths=[],
                     use_agent=False)
    with pytest.raises(PermanentError) as e:
        await t.run(["true"])
    assert not isinstance(e.value, TransportError)
    assert "ssh1" in e.value.message and "refused" in e.value.message and "identity" in e.value.hint


async def test_ssh_config_alias_supplies_hostname_port_user_identity(ssh_site, tmp_path):
    server = ssh_site.servers["ssh1"]
    config = tmp_path / "alias_config"
    config.write_text(f"Host cna-alias\n  HostName 127.0.0.1\n  Port {server.port}\n"
                      f"  User {server.user}\n  IdentityFile {server.user_key}\n")
    spec = HostSpec("cna01", "lab", "ssh", "cna-alias", None, None, None)
    t = SshTransport(spec, known_hosts=[ssh_site.workspace.known_hosts_path], ssh_config_paths=[config],
                     use_agent=False)
    try:
        r = await t.run(["sh", "-c", 'echo "$USER $SSH_CONNECTION"'], check=True)
    finally:
        await t.close()
    user, _, _, _, port = r.stdout.decode().split()
    assert user == server.user and int(port) == server.port


async def test_proxyjump_through_a_second_server(sshd_factory, tmp_path):
    site = sshd_factory.site(tmp_path, 2)
    jump, target = site.servers["ssh1"], site.servers["ssh2"]
    site.ssh_config.write_text(
        f"Host jumpbox\n  HostName 127.0.0.1\n  Port {jump.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.user_key}\n"
        f"Host inner\n  HostName 127.0.0.1\n  Port {target.port}\n  ProxyJump jumpbox\n")
    spec = HostSpec("inner1", "lab", "ssh", "inner", None, target.user, str(target.user_key))
    kh = site.workspace.known_hosts_path
    t = SshTransport(spec, known_hosts=[kh], ssh_config_paths=[site.ssh_config], use_agent=False)
    try:
        r = await t.run(["sh", "-c", 'echo "$SSH_CONNECTION"'], check=True)
        assert int(r.stdout.split()[3]) == target.port
        assert jump.connection_pids(), "the jump server carries the connection"
        jump.kill_connections()   # the tunnel dies with the jump host's side
        assert (await t.run(["true"])).ok and t.connects == 4   # jump + target, twice
    finally:
        await t.close()

    # An unknown jump host is refused by name, and `fetch_host_key` reports it first.
    kh.write_text(target.known_hosts_line + "\n")
    t = SshTransport(spec, known_hosts=[kh], ssh_config_paths=[site.ssh_config], use_agent=False)
    with pytest.raises(HostKeyError) as e:
        await t.run(["true"])
    assert "jump host jumpbox" in e.value.message and e.value.fingerprint == jump.fingerprint
    info = await fetch_host_key(t)
    assert info.jump == "jumpbox" and info.status == KeyStatus.UNKNOWN
    await record_host_key(kh, info)
    assert (await fetch_host_key(t)).status == KeyStatus.TRUSTED
    assert (await t.run(["true"])).ok
    await t.close()


# ---------------------------------------------------------------- the pool


async def test_pool_hands_out_one_transport_per_host(ssh_site):
    cfg = ssh_site.config()
    pool = TransportPool(cfg, ssh_site.workspace, ssh_config_paths=[], user_known_hosts=ssh_site.user_known_hosts,
                         use_agent=False)
    assert isinstance(pool.get("local"), LocalTransport)
    assert isinstance(pool.get("ssh1"), SshTransport) and pool.get("ssh1") is pool.get("ssh1")
    assert pool.get("ssh2") is not pool.get("ssh1")
    with pytest.raises(PermanentError):
        pool.get("nope")
    with pytest.raises(PermanentError):
        pool.ssh("local")
    rs = await asyncio.gather(pool.get("ssh1").run(["echo", "1"]), pool.get("ssh2").run(["echo", "2"]))
    assert [r.stdout for r in rs] == [b"1\n", b"2\n"]
    await pool.close()


async def test_prefers_aes_gcm(ssh_pool):
    t = ssh_pool.get("ssh1")
    await t.connect()
    conn = t._conn
    assert conn.get_extra_info("send_cipher") == conn.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"


async def test_ssh_agent_is_used_when_enabled(ssh_site, tmp_path, monkeypatch):
    server = ssh_site.servers["ssh1"]
    # A throw-away agent, and a HOME without keys: nothing comes from the machine's ~/.ssh or agent.
    monkeypatch.setenv("HOME", str(tmp_path))
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        await until(sock.exists, timeout=10, what="the agent's socket")
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(server.user_key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        spec = HostSpec("ssh1", "lab", "ssh", "127.0.0.1", server.port, server.user, None)
        kh = [ssh_site.workspace.known_hosts_path]
        t = SshTransport(spec, known_hosts=kh, ssh_config_paths=[], use_agent=True)
        assert (await t.run(["true"])).ok
        await t.close()
        t = SshTransport(spec, known_hosts=kh, ssh_config_paths=[], use_agent=False)
        with pytest.raises(PermanentError) as e:
            await t.run(["true"])
        assert "refused" in e.value.message
    finally:
        agent.terminate()
        agent.wait(5)


# ---------------------------------------------------------------- replication through the OpenSSH client


def test_replications_through_openssh_print_no_stray_child_warnings(ssh_site, tmp_path, monkeypatch):
    """Each round starts and kills several OpenSSH clients (streams started early and not needed):
    none of them may be reaped twice, which printed "Unknown child process pid N, will report
    returncode 255" on stderr in some rounds."""

    isolate_ssh(monkeypatch, tmp_path / "home")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        write(src / f"f{i}", os.urandom(2000))
    ws = ssh_site.workspace.root
    for i in range(10):
        dst = tmp_path / f"dst{i % 3}"
        a, b = (f"ssh1:{src}", f"local:{dst}") if i % 2 else (f"local:{src}", f"ssh2:{dst}")
        if i % 3 == 2:
            write(src / f"f{i}", os.urandom(2000))   # some rounds have work to do, some do not
        proc = ferry_process(ws, "replicate", "files", a, b, "--streams", "4", env={"HOME": os.environ["HOME"]})
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Unknown child process" not in err and "returncode 255" not in err, err
        assert "Traceback" not in err, err
        assert diff(describe(src), describe(dst)) == []


def _debug_log(server) -> None:
    """Make a test sshd log at DEBUG1 (each connection's client software and negotiated ciphers)."""
    write_config = server._write_config

    def with_debug():
        path = write_config()
        path.write_text(path.read_text().replace("LogLevel INFO", "LogLevel DEBUG1"))
        return path
    server._write_config = with_debug
    server.restart()


def test_openssh_data_path_negotiates_aes_gcm(ssh_site, tmp_path, monkeypatch):
    """The README's claim, read from sshd's own log: every connection of a replication is made by the
    OpenSSH client (not relayed through asyncssh) and encrypts with AES-GCM both ways, though the
    server would take chacha20-poly1305 (its own first choice) if the client preferred it."""

    isolate_ssh(monkeypatch, tmp_path / "home")
    server = ssh_site.servers["ssh1"]
    _debug_log(server)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", os.urandom(1 << 20))
    r = ferry(ssh_site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{tmp_path / 'dst'}",
              "--streams", "2", "--json")
    assert r.code == 0, r.err
    log = server.log.splitlines()
    clients = [line.split("remote software version ")[1] for line in log if "remote software version" in line]
    assert len(clients) >= 3 and all(c.startswith("OpenSSH") for c in clients), clients   # shared + 2 streams
    ciphers = [line.split("cipher: ")[1].split()[0] for line in log if "kex: client->server cipher" in line
               or "kex: server->client cipher" in line]
    assert len(ciphers) == 2 * len(clients), log
    assert set(ciphers) <= {"aes128-gcm@openssh.com", "aes256-gcm@openssh.com"}, ciphers


def test_openssh_data_path_refuses_a_changed_host_key(ssh_site, tmp_path, monkeypatch):
    """Strict host-key checking in the OpenSSH client itself: after the host key changed, its
    connections end before any login, the target is untouched, and known_hosts is not rewritten."""

    isolate_ssh(monkeypatch, tmp_path / "home")
    server = ssh_site.servers["ssh1"]
    old = server.fingerprint
    _debug_log(server)
    server.regenerate_host_key()
    known = ssh_site.workspace.known_hosts_path.read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"data")
    r = ferry(ssh_site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{tmp_path / 'dst'}", "--json")
    assert r.code == 1 and server.fingerprint in r.json["error"] and old in r.json["error"], r.out
    log = server.log.splitlines()
    assert any("remote software version OpenSSH" in line for line in log), "the OpenSSH client was tried"
    assert not [line for line in log if "Accepted publickey" in line], "nobody logged in"
    assert not (tmp_path / "dst").exists()
    assert ssh_site.workspace.known_hosts_path.read_bytes() == known


def test_a_shared_openssh_connection_is_not_reused_under_other_trust(ssh_site, tmp_path):
    """Short work shares one OpenSSH master connection per host, which lingers 60 s. A command run
    with other trust (another workspace's known_hosts, holding another key for the host) must not
    ride on a master opened with this one: its own host-key check refuses the host, and nothing runs."""

    server = ssh_site.servers["ssh1"]
    spec = server.host_spec("ssh1")
    other = keygen(tmp_path / "other_host_key", "someone else")
    elsewhere = tmp_path / "other_known_hosts"
    elsewhere.write_text(f"[{server.address}]:{server.port} {' '.join(other.split()[:2])}\n")

    def touch(known_hosts: Path, marker: Path) -> subprocess.CompletedProcess:
        argv = openssh_argv(spec, ["touch", str(marker)], known_hosts=[known_hosts], ssh_config_paths=[],
                            use_agent=False, shared=True)
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    r = touch(ssh_site.workspace.known_hosts_path, tmp_path / "trusted")
    assert r.returncode == 0 and (tmp_path / "trusted").exists(), r.stderr   # its master now lingers
    r = touch(elsewhere, tmp_path / "untrusted")
    assert r.returncode == 255 and classify_failure(r.stderr) == "hostkey", r.stderr
    assert not (tmp_path / "untrusted").exists()


def test_a_task_command_runs_where_setpriv_has_no_pdeathsig(tmp_path):
    """The remote command line of a task's command (the task's tag, and dying with its session where
    setpriv can) runs on a host whose setpriv lacks --pdeathsig, as busybox's (Ferry's live image)."""
    from ferry.engine.helpers import TASK_TAG
    from ferry.engine.transport.ssh import _wrapped
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # A test double, named so: busybox's setpriv's answer to an option it lacks (the real one is
    # inside the live image only).
    busybox_like_setpriv = bin_ / "setpriv"
    busybox_like_setpriv.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '$1'\" >&2\nexit 1\n")
    busybox_like_setpriv.chmod(0o755)
    token = TASK_TAG.set("ws1-t42")
    try:
        line = _wrapped(b"echo \"$FERRY_TASK ran\"")
    finally:
        TASK_TAG.reset(token)
    r = subprocess.run(["sh", "-c", line], env={"PATH": f"{bin_}:/usr/bin:/bin"}, capture_output=True)
    assert r.returncode == 0 and r.stdout == b"ws1-t42 ran\n", r
