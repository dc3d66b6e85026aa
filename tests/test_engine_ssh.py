"""Issue 11: `ferry --engine TARGET` attaches the CLI and the console of one machine to the engine of
another over SSH (stream-local forwarding to its socket), the host key checked against the local
workspace's known_hosts as for every host. Here the other machine is a real sshd on loopback: the
engine of workspace R runs behind it, and the local workspace L reaches it only through SSH."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from ferry.engine.config import dump_config, lab_document
from ferry.engine.remote import RemoteEngine
from ferry.engine.remote_ssh import SshEngineLink
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.cli import engine_held_off, engine_pid, engines_under, ferry, isolate_ssh
from harness.waiting import until

MiB = 1 << 20
# The ferry command on the other machine: this checkout's, as `pip install` would put it on PATH.
FERRY = str(Path(sys.executable).with_name("ferry"))


def tree(root: Path, files: int, size: int) -> dict[str, str]:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:02d}.bin").write_bytes(os.urandom(size))
    return hashes(root)


def hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture
def far(sshd_factory, tmp_path, monkeypatch):
    """(sshd, R, L): the engine of workspace R serves behind a loopback sshd; L names that sshd as
    host `far` in its config.toml and trusts its host key. ~ is a throw-away folder, no agent."""
    isolate_ssh(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("FERRY_ENGINE_COMMAND", FERRY)
    sshd = sshd_factory.one()
    remote = Workspace(tmp_path / "R").ensure()
    doc = lab_document(remote.root)
    doc["site"]["name"] = "far-site"
    remote.config_path.write_text(dump_config(doc))
    local = Workspace(tmp_path / "L").ensure()
    local.config_path.write_text(dump_config({"site": {"name": "laptop"}, "clusters": {"lab": {}},
                                              "hosts": {"far": sshd.host_table()}, "datastores": {}}))
    sshd.trust(local.known_hosts_path)
    return sshd, remote.root, local.root


def test_the_cli_over_ssh_lists_and_runs_the_tasks_of_the_other_machines_engine(far, tmp_path):
    sshd, R, L = far
    src, dst = tmp_path / "src", tmp_path / "dst"
    want = tree(src, 6, MiB)
    r = ferry(R, "replicate", "files", f"local:{src}", f"local:{dst}")
    assert r.code == 0, r.err
    pid = engine_pid(R)
    assert pid

    r = ferry(L, "--engine", f"far:{R}", "tasks")
    assert r.code == 0, r.err
    assert "replicate" in r.out and "succeeded" in r.out and str(src) in r.out, r.out

    # A task started through the attachment runs in R's engine, on R's machine.
    src2, dst2 = tmp_path / "src2", tmp_path / "dst2"
    want2 = tree(src2, 5, 2 * MiB)
    r = ferry(L, "--engine", f"far:{R}", "replicate", "files", f"local:{src2}", f"local:{dst2}", "--json")
    assert r.code == 0, r.err
    assert r.json["state"] == "succeeded" and r.json["task"] == 2, r.out
    assert hashes(dst2) == want2 and hashes(dst) == want
    listed = ferry(R, "tasks", "--json").json
    assert [t["id"] for t in listed] == [2, 1] and listed[0]["created_by"], listed
    assert engine_pid(R) == pid, "the attachment used the engine that ran, not one of its own"
    assert not engines_under(L) and not (L / "state.db").exists(), "no engine was started for L"

    # `engine` commands with --engine act on the engine over there.
    st = json.loads(ferry(L, "--engine", f"far:{R}", "engine", "status", "--json").out)
    assert st["running"] and st["pid"] == pid and st["workspace"] == str(R), st


def test_the_remote_users_default_workspace_and_an_engine_started_on_demand(far, tmp_path, monkeypatch):
    sshd, R, L = far
    assert engine_pid(R) is None
    # No path in TARGET: the remote ferry uses its own default workspace (here $FERRY_WORKSPACE,
    # set for it by the command), starts its engine, and says where it is.
    monkeypatch.setenv("FERRY_ENGINE_COMMAND", f"env FERRY_WORKSPACE={R} {FERRY}")
    r = ferry(L, "--engine", "far", "tasks")
    assert r.code == 0 and "no tasks" in r.out, r.err
    assert engine_pid(R), "the engine over there was started on demand"

    # An ad hoc target, [user@]host:port, with the key and known_hosts of an ssh user's own files.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    shutil.copy(sshd.user_key, home / ".ssh" / "id_ed25519")
    target = f"{sshd.user}@{sshd.address}:{sshd.port}:{R}"
    r = ferry(L, "--engine", target, "--engine-command", FERRY, "engine", "status")
    assert r.code == 0 and "engine running" in r.out and str(R) in r.out, r.out + r.err

    # The remote command missing: one line that says so and how to name it.
    r = ferry(L, "--engine", target, "--engine-command", "/nonexistent/ferry", "engine", "status")
    assert r.code == 1 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "/nonexistent/ferry` was not found on" in r.err and "--engine-command" in r.err, r.err


def test_an_unknown_host_key_is_refused_until_trusted(far, tmp_path):
    sshd, R, L = far
    Path(L, "known_hosts").write_text("")
    r = ferry(L, "--engine", f"far:{R}", "tasks")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert sshd.fingerprint in r.err and "is unknown" in r.err and "ferry engine trust far" in r.err, r.err
    r = ferry(L, "--engine", f"far:{R}")                # the console: refused before its screen opens
    assert r.code == 1 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert sshd.fingerprint in r.err and "is unknown" in r.err, r.err
    assert engine_pid(R) is None, "nothing was run over there"

    r = ferry(L, "engine", "trust", "far", "--fingerprint", "SHA256:not-this-one")
    assert r.code == 1 and "not SHA256:not-this-one" in r.err, r.err
    r = ferry(L, "engine", "trust", "far", "--fingerprint", sshd.fingerprint)
    assert r.code == 0 and f"recorded in {L / 'known_hosts'}" in r.out, r.out + r.err
    r = ferry(L, "--engine", f"far:{R}", "tasks")
    assert r.code == 0 and "no tasks" in r.out, r.err

    # A changed key (the host reinstalled, or someone in between) is refused as loudly.
    new = sshd.regenerate_host_key()
    r = ferry(L, "--engine", f"far:{R}", "tasks")
    assert r.code == 1 and "CHANGED" in r.err and new in r.err and len(r.err.strip().splitlines()) == 1, r.err


async def test_a_console_over_ssh_shows_the_far_engine_and_reconnects_when_the_link_drops(far, tmp_path):
    from ferry.console.app import FerryApp
    from ferry.console.widgets.header import FerryHeader

    sshd, R, L = far
    ws = Workspace(L)
    site = Workspace(R).load_config()
    client = RemoteEngine(ws, client="console", reconnect=True, site=site, opener=SshEngineLink(ws, f"far:{R}"))
    app = FerryApp(client, own_client=True)

    def header() -> str:
        return str(app.query_one(FerryHeader).query_one("#engine").render())

    async with app.run_test(size=(120, 32)) as pilot:
        await until(lambda: client.engine_state == "running" and "running" in header(), pause=pilot.pause,
                    timeout=60, what="the console attached over SSH")
        assert client.site.name == "far-site" and client.engine_pid == engine_pid(R)
        first = client.engine_pid
        sshd.stop()                                # the SSH link drops, and stays down a moment
        await until(lambda: "reconnecting…" in header(), pause=pilot.pause, what="reconnecting… shown")
        await pilot.pause(1.0)
        assert app.is_running and "reconnecting…" in header()
        sshd.start()
        await until(lambda: client.engine_state == "running" and "running" in header(), timeout=60,
                    pause=pilot.pause, what="the console attached again over a new SSH connection")
        assert client.engine_pid == first == engine_pid(R), "the engine went on without its console"
        assert client.opener.transport.connects == 2

        os.kill(first, signal.SIGKILL)             # the engine over there dies
        with engine_held_off(R):                   # and none can start there for a moment
            await until(lambda: "reconnecting…" in header(), pause=pilot.pause, what="reconnecting… shown")
            await pilot.pause(1.0)
            assert app.is_running and "reconnecting…" in header()
        await until(lambda: client.engine_state == "running" and "running" in header(), timeout=60,
                    pause=pilot.pause, what="the console attached to the engine started again over there")
        assert client.engine_pid != first and client.engine_pid == engine_pid(R)
        assert client.opener.transport.connects == 2, "the SSH connection was kept"
        src, dst = tmp_path / "src", tmp_path / "dst"
        want = tree(src, 4, MiB)
        tid, _ = await client.replicate("files", {"src": f"local:{src}", "dst": f"local:{dst}"})
        await until(lambda: tid in app.feed.tasks and app.feed.tasks[tid].state.final, timeout=120,
                    pause=pilot.pause, what="the far engine's task in the console")
        assert app.feed.tasks[tid].state == TaskState.SUCCEEDED
        assert hashes(dst) == want


def test_the_console_in_a_terminal_over_ssh_shows_the_far_sites_tasks(far, tmp_path):
    from harness.tmux import Terminal

    sshd, R, L = far
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 2, MiB)
    assert ferry(R, "replicate", "files", f"local:{src}", f"local:{dst}").code == 0
    term = Terminal([sys.executable, "-m", "ferry.console.cli", "--workspace", str(L), "--engine", f"far:{R}"],
                    env={"HOME": str(tmp_path / "home"), "FERRY_ENGINE_COMMAND": FERRY, "SSH_AUTH_SOCK": ""})
    try:
        term.wait_for("far-site", timeout=60)     # the site of the engine over there, not L's "laptop"
        term.wait_for("running")
        term.keys(":")
        term.wait_for("overview · inventory")      # the command line is open, the views it knows listed
        term.keys("tasks", "Enter")
        screen = term.wait_for("replicate")
        assert "succeeded" in screen and "laptop" not in screen, screen
    finally:
        term.close()


def test_a_far_workspace_whose_socket_path_is_too_long_is_said_with_its_length(far, tmp_path):
    """sshd forwards to a socket path of at most 107 bytes; a far workspace deeper than that is said
    in one line naming the path and its length, with a shorter path (a symlink) as the way out."""
    sshd, _, L = far
    deep = tmp_path / ("w" * 60) / ("s" * 60)
    r = ferry(L, "--engine", f"far:{deep}", "tasks")
    sock = f"{deep}/engine.sock"
    assert r.code == 1 and r.out == "", r.out
    [line] = r.err.splitlines()
    assert sock in line and f"{len(sock.encode())} bytes" in line and "107" in line, line
    assert "ln -s" in line, line
    # The way out the hint gives: a short path to the same workspace over there.
    deep.mkdir(parents=True)
    short = tmp_path / "fw"
    short.symlink_to(deep)
    r = ferry(L, "--engine", f"far:{short}", "tasks")
    assert r.code == 0 and "no tasks" in r.out, r.err
