"""The headless command line as a script would use it: hosts, trust, probe, tasks, task control, audit."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from ferry.engine.config import dump_config
from harness.cli import engine_pid, ferry, ferry_process, isolate_ssh
from harness.waiting import running, until_sync


@pytest.fixture
def home(tmp_path, monkeypatch):
    isolate_ssh(monkeypatch, tmp_path / "home")


def test_hosts_on_the_lab_reports_facts_of_this_machine(tmp_path):
    r = ferry(tmp_path / "ws", "hosts", "--json")
    assert r.code == 0, r.err
    facts = {f["host"]: f for f in r.json}
    assert set(facts) == {"lab1", "lab2", "lab3"}
    for f in facts.values():
        assert f["reachable"] is True
        assert f["kernel"] == os.uname().release
        assert f["cpus"] == os.cpu_count()
        assert f["mem_total"] > 0
    table = ferry(tmp_path / "ws", "hosts")
    assert "lab1" in table.out and os.uname().release in table.out


def test_unreachable_host_is_reported_without_delaying_the_others(sshd_factory, tmp_path, home):
    dead_port = 1  # nothing listens on port 1 of loopback
    site = sshd_factory.site(tmp_path, 1, extra_hosts={"gone": {"cluster": "lab", "transport": "ssh",
                                                                 "address": "127.0.0.1", "port": dead_port}})
    t0 = time.monotonic()
    r = ferry(site.workspace.root, "hosts", "--json", "--timeout", "3")
    assert time.monotonic() - t0 < 8
    assert r.code == 0
    facts = {f["host"]: f for f in r.json}
    assert facts["ssh1"]["reachable"] is True
    assert facts["gone"]["reachable"] is False and "gone" in facts["gone"]["error"]
    plain = ferry(site.workspace.root, "hosts", "--timeout", "3")
    assert plain.code == 1
    assert "gone:" in plain.err and "hint:" in plain.err


def test_unknown_host_key_refused_then_trusted_with_fingerprint(sshd_factory, tmp_path, home):
    site = sshd_factory.site(tmp_path, 1, trusted=False)
    server = site.servers["ssh1"]
    ws = site.workspace.root
    r = ferry(ws, "hosts", "--json")
    f = r.json[0]
    assert f["reachable"] is False
    assert server.fingerprint in f["error"]
    assert "ferry hosts trust ssh1" in f["hint"]

    wrong = ferry(ws, "hosts", "trust", "ssh1", "--fingerprint", "SHA256:not-the-one")
    assert wrong.code == 1 and "not SHA256:not-the-one" in wrong.err
    ok = ferry(ws, "hosts", "trust", "ssh1", "--fingerprint", server.fingerprint)
    assert ok.code == 0, ok.err
    assert server.fingerprint in ok.out and "trusted" in ok.out
    assert ferry(ws, "hosts", "--json").json[0]["reachable"] is True
    audit = ferry(ws, "audit", "--json").json
    assert audit[0]["action"] == "host.trust" and audit[0]["params"]["fingerprint"] == server.fingerprint

    server.regenerate_host_key()
    changed = ferry(ws, "hosts", "--json").json[0]
    assert changed["reachable"] is False and "CHANGED" in changed["error"].upper()


@pytest.mark.parametrize("host", ["lab1", "ssh1"])
def test_probe_measures_latency_and_throughput(sshd_factory, tmp_path, home, host):
    ws = sshd_factory.site(tmp_path, 1).workspace.root if host == "ssh1" else tmp_path / "ws"
    r = ferry(ws, "probe", host, "--pings", "10", "--size", "16", "--json")
    assert r.code == 0, r.err
    out = r.json
    assert out["state"] == "succeeded" and out["host"] == host
    lat = out["latency"]
    assert lat["samples"] == 10 and 0 < lat["min_ms"] <= lat["avg_ms"] <= lat["max_ms"]
    assert lat["jitter_ms"] >= 0
    assert out["upload_Bps"] > 1e6 and out["download_Bps"] > 1e6
    text = ferry(ws, "probe", host, "--pings", "3", "--size", "1")
    assert "latency min" in text.out and "throughput up" in text.out


def test_task_control_from_another_process(tmp_path):
    """A long task runs in one `ferry` process; another pauses, resumes and cancels it."""
    ws = tmp_path / "ws"
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
    proc = ferry_process(ws, "replicate", "blocks", f"local:{src}", f"lab1:{dst}", "--bwlimit", "4M",
                         "--chunk-size", "1M")
    try:
        def copying() -> dict | None:
            tasks = ferry(ws, "tasks", "--json").json if (ws / "state.db").exists() else []
            return next((t for t in tasks if t["state"] == "running"), None)
        tid = str(until_sync(lambda: running(proc) and copying(), timeout=30, every=0.1, what="the copy")["id"])
        listing = ferry(ws, "tasks")
        assert "replicate.blocks" in listing.out and "running" in listing.out
        r = ferry(ws, "task", "pause", tid)
        assert r.code == 0 and f"task {tid}: pause -> paused" in r.out, r.out + r.err
        assert ferry(ws, "task", "resume", tid, "--detach").code == 0
        _wait_state(ws, tid, "running")
        ferry(ws, "task", "cancel", tid)
        _wait_state(ws, tid, "cancelled")
        show = ferry(ws, "task", "show", tid)
        assert "cancelled" in show.out
        actions = [a["action"] for a in ferry(ws, "audit", "--json").json]
        assert {"task.pause", "task.resume", "task.cancel"} <= set(actions)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _wait_state(ws, tid: str, state: str) -> None:
    def reached() -> bool:
        r = ferry(ws, "task", "show", tid, "--json")
        assert r.code == 0, r.err
        return r.json["state"] == state
    until_sync(reached, timeout=15, every=0.1, what=f"task {tid} to become {state}")


def test_resume_of_a_task_whose_engine_died_follows_it_to_the_end(tmp_path):
    ws = tmp_path / "ws"
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    with open(src, "wb") as f:
        f.write(os.urandom(32 << 20))
    proc = ferry_process(ws, "replicate", "blocks", f"local:{src}", f"lab1:{dst}", "--bwlimit", "8M",
                         "--chunk-size", "1M")
    until_sync(lambda: running(proc) and _chunks_in_checkpoint(ws), timeout=60, every=0.1,
               what="a chunk durable in the task's checkpoint")
    os.kill(engine_pid(ws), signal.SIGKILL)      # the engine that ran it dies (kill -9, a crash)
    proc.communicate()
    tid = str(ferry(ws, "tasks", "--json").json[0]["id"])
    r = ferry(ws, "task", "resume", tid, "--json")
    assert r.code == 0, r.err
    assert r.json["state"] == "succeeded" and r.json["resumed"] is True and r.json["verified_on_arrival"] is True
    assert open(src, "rb").read() == open(dst, "rb").read()


def _chunks_in_checkpoint(ws) -> int:
    """How many chunks the checkpoint in state.db holds (written and acknowledged on the target)."""
    try:
        con = sqlite3.connect(f"file:{ws / 'state.db'}?mode=ro", uri=True)
        try:
            return con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:   # no state.db yet, or not its tables
        return 0


def test_bad_endpoint_and_unknown_host_are_one_line_errors(tmp_path):
    ws = tmp_path / "ws"
    for args, text in ((["replicate", "files", "nocolon", "local:/tmp"], "is not HOST:PATH"),
                       (["replicate", "files", "local:relative", "local:/tmp/x"], "must be absolute"),
                       (["replicate", "blocks", "mars:/x", "local:/tmp/y"], "unknown host 'mars'"),
                       (["probe", "mars"], "unknown host 'mars'"),
                       (["task", "pause", "999"], "no task 999")):
        r = ferry(ws, *args)
        assert r.code == 1, (args, r.out, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0] and "hint:" in lines[0], (args, r.err)


def test_config_for_ssh_host_shows_in_hosts(tmp_path, sshd_factory, home):
    site = sshd_factory.site(tmp_path, 2)
    r = ferry(site.workspace.root, "hosts", "--json")
    assert [f["reachable"] for f in r.json] == [True, True]
    doc = dump_config({"site": {"name": "x"}})
    assert "[site]" in doc


def test_output_cut_short_by_its_reader_is_not_a_traceback(tmp_path):
    """`ferry audit --json | head -c 10`: the reader stops early; Ferry stops quietly."""
    import subprocess
    import sys

    from harness.cli import ROOT
    from ferry.engine.store import Store
    store = Store(tmp_path / "state.db")
    for i in range(500):    # far more output than a pipe holds before head has closed it
        store.audit("vm.create", f"vm{i}", {"note": "x" * 400}, "ok")
    store.close()
    script = (f"{sys.executable} -m ferry.console.cli --workspace {tmp_path} audit --json --limit 1000 | head -c 10;"
              " exit ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.returncode == 0


def test_a_command_against_a_running_engine_loads_no_event_loop_nor_engine_internals(tmp_path):
    """Issue 11: a command adds little to its work. One that only asks the engine on this machine
    talks over a blocking socket: no asyncio, no store, no TOML, no SSH, no task runner imported."""
    from ferry.engine import api
    from ferry.engine.calls import BlockingEngine, run_now
    from ferry.engine.workspace import Workspace

    ws = tmp_path / "ws"
    assert ferry(ws, "probe", "lab1", "--pings", "2", "--size", "1").code == 0     # a task, and its audit entry
    heavy = {"asyncio", "sqlite3", "asyncssh", "tomllib", "textual", "importlib.metadata", "ferry.engine.tasks",
             "ferry.engine.store", "ferry.engine.config", "ferry.engine.service", "ferry.engine.client",
             "ferry.engine.transport", "ferry.engine.vm.model", "ferry.console.cli.vm",
             "logging", "shutil", "socket", "ferry.console.actions"}   # nothing logs; argparse's width; help lines
    # A --json the engine prints: the command decodes one string, with neither msgspec nor the records.
    records = {"msgspec", "dataclasses", "ferry.engine.taskmodel", "ferry.engine.records"}
    engine = BlockingEngine.connect(Workspace(ws))
    try:
        [task] = run_now(engine.list_tasks())
        want = {"tasks": api.dumps([task]), "audit": api.dumps(run_now(engine.audit_log())),
                "task": api.dumps({**api.to_builtins(task), "log": run_now(engine.task_log(task.id)),
                                   "files": run_now(engine.task_files(task.id))})}
    finally:
        engine.close()
    for args in (["tasks", "--json"], ["tasks"], ["audit", "--json"], ["engine", "status", "--json"],
                 ["task", "show", str(task.id), "--json"], ["tasks", "--all", "--json"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ferry.console.cli", "--workspace", str(ws), *args],
                           capture_output=True, text=True, timeout=60)
        out, err = r.stdout, r.stderr
        assert r.returncode == 0, err
        loaded = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
        assert "ferry.console.cli" in loaded and not heavy & loaded, (args, sorted(heavy & loaded))
        if "--json" in args:
            assert not records & loaded, (args, sorted(records & loaded))
            assert out.rstrip("\n") == want.get(args[0], out.rstrip("\n")), args     # api.dumps of the records
            assert json.loads(out)["running"] if args[0] == "engine" else True


def test_vm_json_has_an_agent_record_wherever_agents_were_asked(tmp_path):
    """`vm show --json` and `vm list --agents --json` say of a VM that does not run that its agent
    cannot answer (a record, as for a running one), never `"agent": null`; plain `vm list` did not ask."""
    ws = tmp_path / "ws"
    assert ferry(ws, "vm", "create", "quiet", "--host", "lab1", "--disk", "16M", "--json").code == 0
    shown = ferry(ws, "vm", "show", "quiet", "--json")
    assert shown.code == 0, shown.err
    agent = shown.json["agent"]
    assert agent["vm"] == "quiet" and agent["agent"] == "not running" and "quiet is stopped" in agent["reason"]
    [listed] = ferry(ws, "vm", "list", "--agents", "--json").json
    assert listed["agent"]["agent"] == "not running"
    assert ferry(ws, "vm", "list", "--json").json[0]["agent"] is None
    assert "guest agent" not in ferry(ws, "vm", "show", "quiet").out


def test_commands_on_this_machines_workspace_are_refused_under_engine(tmp_path):
    """`ferry --engine X init` would write this machine's config.toml while the operator means the
    engine's: it and the other commands that work on the local workspace are refused, in one line."""
    ws = tmp_path / "ws"
    for args in (["init"], ["init", "--force"], ["config", "check"], ["lab", "image", "build"]):
        r = ferry(ws, "--engine", "ops@far.example:2222", *args)
        assert r.code == 2 and r.out == "", (args, r.out)
        [line] = r.err.splitlines()
        assert "this machine's workspace, not on the engine of ops@far.example:2222" in line and "hint:" in line
    assert not (ws / "config.toml").exists()
