"""Health checks (engine/ops/health.py): Nagios ranges, perfdata and plugin output as plain unit tests; then
conditions produced for real on two SSH hosts of real sshds: a tmpfs datastore filled past its thresholds
(soft, soft, hard, alarm; freed: OK, alarm cleared by itself), an sshd stopped (host.down, the host's VM
alarms suppressed; started again: cleared), systemd's check where it does not run, a real plugin of
monitoring-plugins over SSH, and the `ferry health` commands."""

from __future__ import annotations

import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ferry.engine.client import EngineClient
from ferry.engine.config import ConfigError, dump_config, parse_config
from ferry.engine.ops.health import Found, advance
from ferry.engine.ops.nagios import (CheckResult, CheckState, PerfDatum, Range, RangeError, format_perfdata, judge,
                                     parse_output, parse_perfdata)
from harness.cli import ferry, isolate_ssh, kill_engines
from harness.sshd import SshdFactory, SshSite

CHECK_DISK = "/usr/lib/nagios/plugins/check_disk"


# ------------------------------------------------------------------------------ Nagios semantics

@pytest.mark.parametrize("text, alerting, quiet", [
    ("10", [-1, 10.5, 11], [0, 5, 10]),
    ("10:", [9.9, -5], [10, 11, 1e9]),
    ("~:10", [10.1, 100], [-1e9, 0, 10]),
    ("10:20", [9, 21], [10, 15, 20]),
    ("@10:20", [10, 15, 20], [9.9, 20.1]),
    ("@~:0", [-1, 0], [0.1]),
])
def test_nagios_ranges(text, alerting, quiet):
    r = Range.parse(text)
    assert [r.alerts(v) for v in alerting] == [True] * len(alerting)
    assert [r.alerts(v) for v in quiet] == [False] * len(quiet)
    assert str(r) == text


@pytest.mark.parametrize("bad", ["", "abc", "20:10", "@", "1:2:3", "10%"])
def test_what_is_not_a_range_is_refused(bad):
    with pytest.raises(RangeError, match="Nagios range|above its end"):
        Range.parse(bad)


def test_judge_critical_before_warning():
    w, c = Range.parse("80"), Range.parse("90")
    assert [judge(v, w, c) for v in (50, 85, 95)] == [CheckState.OK, CheckState.WARNING, CheckState.CRITICAL]
    assert judge(5, Range.parse("10:"), None) == CheckState.WARNING


def test_perfdata_parsed_and_written_in_the_standard_form():
    text = ("time=0.06s;1.000;2;0; 'in use'=91%;80;90;0;100 /=35275145216B;216442024755;243497277849;0;"
            "270552530944 'it''s'=U;;;; load1=1.77;;;0; bad=xyz c=12c")
    perf = parse_perfdata(text)
    assert [p.label for p in perf] == ["time", "in use", "/", "it's", "load1", "c"]
    t, use, root, its, load, counter = perf
    assert (t.value, t.uom, t.warn, t.crit, t.min, t.max) == (0.06, "s", "1.000", "2", 0, None)
    assert (use.value, use.uom, use.min, use.max) == (91, "%", 0, 100)
    assert root.value == 35275145216 and root.uom == "B" and root.max == 270552530944
    assert its.value is None and counter.uom == "c"
    out = format_perfdata(perf)
    assert out.startswith("time=0.06s;1.000;2;0 'in use'=91%;80;90;0;100 /=35275145216B;")
    assert "'it''s'=U" in out
    assert parse_perfdata(out) == perf                  # what it writes, it reads back the same
    assert str(PerfDatum("rtt", 0.0123, "s", "1", "5", 0)) == "rtt=0.0123s;1;5;0"


def test_plugin_output_with_long_output_and_more_perfdata():
    text = ("DISK WARNING - free space: / 3 MB (12%); | /=30MB;32;36;0;40\n"
            "first long line\nsecond long line | extra=1;;;; \nmore=2s\n")
    r = parse_output(1, text)
    assert r.state == CheckState.WARNING and r.summary == "DISK WARNING - free space: / 3 MB (12%);"
    assert r.details == "first long line\nsecond long line"
    assert [(p.label, p.value, p.uom) for p in r.perfdata] == [("/", 30, "MB"), ("extra", 1, ""), ("more", 2, "s")]
    weird = parse_output(7, "something odd")
    assert weird.state == CheckState.UNKNOWN and "exit status 7" in weird.summary   # never OK
    silent = parse_output(0, "")
    assert silent.state == CheckState.UNKNOWN and "printed nothing" in silent.summary
    assert [CheckState.of_exit(c) for c in (0, 1, 2, 3, -9, 127)] == [
        CheckState.OK, CheckState.WARNING, CheckState.CRITICAL, CheckState.UNKNOWN, CheckState.UNKNOWN,
        CheckState.UNKNOWN]


def test_soft_then_hard_then_recovery():
    sev = {"critical": "critical", "warning": "warning", "unknown": "minor"}

    def found(state: CheckState) -> Found:
        return Found("h1", "load", CheckResult(state, f"load is {state}"), 3, "health.load", "host:h1",
                     {"host": "h1"}, sev)
    prev, seen = None, []
    for state in (CheckState.OK, CheckState.WARNING, CheckState.CRITICAL, CheckState.WARNING, CheckState.UNKNOWN,
                  CheckState.OK, CheckState.WARNING, CheckState.OK):
        prev, acts = advance(prev, found(state))
        seen.append((prev["state"], "HARD" if prev["hard"] else "SOFT", prev["attempt"],
                     [(a.raise_, a.severity) for a in acts]))
    assert seen == [
        ("OK", "HARD", 1, []),
        ("WARNING", "SOFT", 1, []),
        ("CRITICAL", "SOFT", 2, []),
        ("WARNING", "HARD", 3, [(True, "warning")]),        # the third attempt: hard, the alarm raised
        ("UNKNOWN", "HARD", 3, [(True, "minor")]),          # stays hard; the alarm follows the state
        ("OK", "HARD", 1, [(False, "")]),                   # recovery resolves it
        ("WARNING", "SOFT", 1, []),
        ("OK", "HARD", 1, []),                              # a soft recovery: nothing was raised
    ]


def test_health_config_errors_are_one_line_each(tmp_path):
    doc = {"site": {"name": "s"}, "clusters": {"c": {}}, "hosts": {"h": {"cluster": "c", "transport": "local"}},
           "health": {"max_attempts": 0, "thresholds": {"datastore": {"warning": "90:80"}, "qemu": {}},
                      "severity": {"unknown": "loud"}, "disabled": ["nonsense"]},
           "checks": [{"name": "disk", "command": []}, {"name": "ssh", "command": ["x"]},
                      {"name": "x", "command": ["/bin/true"], "hosts": ["nowhere"]}],
           "checklists": {"daily": {"checks": ["platform", "nothing"]}}}
    with pytest.raises(ConfigError) as e:
        parse_config(doc, file="config.toml")
    text = str(e.value)
    for said in ("health.max_attempts", "health.thresholds.datastore.warning", "health.thresholds.qemu",
                 "health.severity.unknown", "health.disabled", "checks.0.command", "checks.1.name",
                 "checks.2.hosts", "checklists.daily.checks"):
        assert said in text, said
    ok = parse_config({**doc, "health": {"thresholds": {"load": {"warning": "@1:2"}}}, "checks": [],
                       "checklists": {"monthly": {"advisories": ["QEMU: upgrade"]}}}, file="config.toml")
    assert ok.health.threshold("load").warning.inside and ok.health.threshold("datastore").critical.end == 90
    assert ok.health.checklist("monthly").checks == ("advisories",)
    assert ok.health.checklist("weekly").checks == ("environment",)


# ------------------------------------------------------------------------------ on real hosts

@dataclass
class Lab:
    site: SshSite
    ds: Path             # ssh1's datastore: a 4 MiB tmpfs
    base: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("health")
    factory = SshdFactory(base / "sshd")
    ds = None
    try:
        site = factory.site(base, 2)
        ds = site.datastores["ssh1-local"]
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "ferry-health-test", str(ds)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs datastore here ({r.stderr.strip()}): needs root")
        doc = tomllib.loads(site.workspace.config_path.read_text())
        doc["health"] = {"max_attempts": 3, "retry_interval": 0.05, "timeout": 10}
        if os.path.exists(CHECK_DISK):
            doc["checks"] = [{"name": "ds-disk", "command": [CHECK_DISK, "-w", "20%", "-c", "10%", "-p", str(ds)],
                              "hosts": ["ssh1"], "max_attempts": 1}]
        site.workspace.config_path.write_text(dump_config(doc))
        yield Lab(site, ds, base)
    finally:
        kill_engines(base)
        if ds is not None:
            subprocess.run(["umount", "-l", str(ds)], capture_output=True)
        factory.stop_all()


class Engine:
    """An in-process engine over the lab's isolated SSH settings."""

    def __init__(self, lab: Lab) -> None:
        self.client = EngineClient(lab.site.workspace, lab.site.config(), transports=lab.site.pool())

    async def __aenter__(self) -> EngineClient:
        await self.client.start()
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


async def run(c: EngineClient, **kw) -> dict:
    info = await c.wait_task(await c.health_run(**kw), timeout=60)
    assert info.state == "succeeded", (info.error, info.hint)
    return info.result


def state(checks, host: str, name: str):
    return next(c for c in checks if c.host == host and c.check == name)


def fill(path: Path, fraction: float) -> None:
    """Fill the filesystem at `path` until `fraction` of it is used (a file 'fill' grown or shrunk)."""
    f = path / "fill"
    f.unlink(missing_ok=True)
    vfs = os.statvfs(path)
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    want = int(total * fraction) - (total - free)
    if want > 0:
        f.write_bytes(b"\xa5" * want)


async def test_a_datastore_filled_past_its_thresholds_goes_hard_raises_and_clears(lab):
    async with Engine(lab) as c:
        r = await run(c, host="ssh1")
        checks = await c.health_list("ssh1")
        ds = state(checks, "ssh1", "datastore:ssh1-local")
        assert ds.state == "OK" and ds.hard and "% used" in ds.summary and "ssh1-local_used=" in ds.perfdata
        assert state(checks, "ssh1", "ssh").state == "OK" and "rtt=" in state(checks, "ssh1", "ssh").perfdata
        assert state(checks, "ssh1", "memory").state == "OK"
        # this machine's systemd, as the check says it
        sd = state(checks, "ssh1", "systemd")
        if os.path.isdir("/run/systemd/system"):
            assert sd.state in ("OK", "WARNING") and "failed unit" in sd.summary
        else:
            assert sd.state == "UNKNOWN" and "systemd does not run on this host" in sd.summary and sd.hard
            # UNKNOWN, hard after its attempts: an alarm of severity minor (never OK)
            assert any(a.type == "health.systemd" and a.object == "host:ssh1" and a.severity == "minor"
                       for a in await c.alarms())
            # its first results: soft, re-checked within the run until hard
            first = (await c.health_history("systemd", "ssh1", limit=1000))[::-1][:3]
            assert [(h.state_type, h.attempt) for h in first] == [("SOFT", 1), ("SOFT", 2), ("HARD", 3)]

        fill(lab.ds, 0.85)
        r = await run(c, host="ssh1")
        hist = await c.health_history("datastore:ssh1-local", "ssh1")
        assert [(h.state, h.state_type, h.attempt) for h in hist[:3]][::-1] == [
            ("WARNING", "SOFT", 1), ("WARNING", "SOFT", 2), ("WARNING", "HARD", 3)]
        assert "datastore.full on datastore:ssh1-local" in r["raised"]
        alarm = next(a for a in await c.alarms() if a.object == "datastore:ssh1-local")
        assert (alarm.type, alarm.severity, alarm.details["host"]) == ("datastore.full", "warning", "ssh1")
        assert "ssh1-local_used=8" in alarm.details["perfdata"]

        fill(lab.ds, 0.95)
        await run(c, host="ssh1")
        now = state(await c.health_list("ssh1"), "ssh1", "datastore:ssh1-local")
        assert (now.state, now.hard) == ("CRITICAL", True)          # already hard: stays hard
        again = next(a for a in await c.alarms() if a.object == "datastore:ssh1-local")
        assert again.id == alarm.id and again.severity == "critical" and again.count > alarm.count

        (lab.ds / "fill").unlink()
        r = await run(c, host="ssh1")
        assert "datastore.full on datastore:ssh1-local" in r["resolved"] and r["rounds"] <= 3
        assert not any(a.object == "datastore:ssh1-local" for a in await c.alarms())
        cleared = next(a for a in await c.alarms(all=True) if a.id == alarm.id)
        assert cleared.state == "cleared" and cleared.cleared_by == "engine"
        assert state(await c.health_list("ssh1"), "ssh1", "datastore:ssh1-local").state == "OK"


@pytest.mark.skipif(not os.path.exists(CHECK_DISK),
                    reason="monitoring-plugins-basic is not installed (scripts/bootstrap.sh installs it)")
async def test_a_real_nagios_plugin_runs_over_ssh(lab):
    async with Engine(lab) as c:
        fill(lab.ds, 0.0)
        await run(c, host="ssh1")
        disk = state(await c.health_list("ssh1"), "ssh1", "ds-disk")
        assert disk.state == "OK" and disk.summary.startswith("DISK OK") and disk.hard
        perf = parse_perfdata(disk.perfdata)
        assert perf[0].label == str(lab.ds) and perf[0].max == pytest.approx(4 << 20, rel=0.01)

        fill(lab.ds, 0.95)                                  # under 10 % free: check_disk says CRITICAL
        r = await run(c, host="ssh1")
        disk = state(await c.health_list("ssh1"), "ssh1", "ds-disk")
        assert disk.state == "CRITICAL" and disk.summary.startswith("DISK CRITICAL") and disk.hard   # max_attempts 1
        assert "health.ds-disk on host:ssh1" in r["raised"]
        fill(lab.ds, 0.0)
        r = await run(c, host="ssh1")
        assert "health.ds-disk on host:ssh1" in r["resolved"]


async def test_an_unreachable_host_is_down_and_suppresses_its_vms_alarms(lab):
    server = lab.site.servers["ssh2"]
    async with Engine(lab) as c:
        await run(c, host="ssh2")
        assert state(await c.health_list("ssh2"), "ssh2", "ssh").state == "OK"
        vm_alarm = await c.ops.raise_alarm("health.vm-agent", "vm:web9", "warning", "the guest agent of web9 is silent",
                                           details={"host": "ssh2"})
        server.stop()
        try:
            r = await run(c, host="ssh2")
            ssh = state(await c.health_list("ssh2"), "ssh2", "ssh")
            assert (ssh.state, ssh.hard, ssh.attempt) == ("CRITICAL", True, 3) and "unreachable" in ssh.summary
            assert r["unreachable"] == ["ssh2"] and "host.down on host:ssh2" in r["raised"]
            by = {(a.type, a.object): a for a in await c.alarms()}
            assert by["host.down", "host:ssh2"].severity == "critical"
            assert by["health.vm-agent", "vm:web9"].suppressed_by == "host.down on ssh2"
            if ("health.systemd", "host:ssh2") in by:       # the host's other alarms too
                assert by["health.systemd", "host:ssh2"].suppressed_by == "host.down on ssh2"
            assert state(await c.health_list("ssh2"), "ssh2", "load").state == "OK"   # not checked: as it was
        finally:
            server.start()
        r = await run(c, host="ssh2")
        assert "host.down on host:ssh2" in r["resolved"]
        by = {(a.type, a.object): a for a in await c.alarms()}
        vm = by["health.vm-agent", "vm:web9"]
        assert ("host.down", "host:ssh2") not in by and vm.id == vm_alarm.id and vm.suppressed_by is None


async def test_site_checks_tasks_alarms_and_advisories(lab):
    async with Engine(lab) as c:
        cfg = lab.site.workspace.config_path
        doc = tomllib.loads(cfg.read_text())
        doc["checklists"] = {"monthly": {"advisories": ["QEMU 7.2: CVE-2023-0000, upgrade qemu-system-x86"]},
                             "quick": {"checks": ["alarms", "tasks", "advisories"]}}
        cfg.write_text(dump_config(doc))
        await c.reload_site()
        await run(c, checklist="monthly")
        adv = next(x for x in await c.health_list("") if x.check.startswith("advisory:"))
        assert adv.state == "WARNING" and adv.hard and "CVE-2023-0000" in adv.summary
        alarm = next(a for a in await c.alarms() if a.type == "advisory")
        await c.alarm_ack(alarm.id, "upgraded")
        r = await run(c, checklist="monthly")
        adv = next(x for x in await c.health_list("") if x.check.startswith("advisory:"))
        assert adv.state == "OK" and "acknowledged by" in adv.summary
        assert f"advisory on {alarm.object}" in r["resolved"]
        # a schedule's run = "quick" runs that checklist as a task, to its end
        said = await c.ops.dispatch(SimpleNamespace(name="morning", run="quick"), 0.0, False)
        assert said.startswith("health quick: task ") and "checks" in said
        names = {x.check: x for x in await c.health_list("")}
        assert names["tasks"].state == "OK" and "failed=0" in names["tasks"].perfdata
        assert names["alarms"].summary          # open alarms of the other tests, or none: said either way


def test_health_commands(lab, monkeypatch):
    isolate_ssh(monkeypatch, lab.base / "home")
    ws = lab.site.workspace.root
    r = ferry(ws, "health", "run", "--host", "ssh1", "--json")
    assert r.code == 0, r.err
    assert r.json["state"] == "succeeded" and r.json["host"] == "ssh1" and r.json["checks"] >= 8
    listing = ferry(ws, "health", "list", "--host", "ssh1")
    assert listing.code == 0 and "datastore:ssh1-local" in listing.out and "✔ OK" in listing.out
    assert {"HOST", "CHECK", "STATE", "TYPE", "ATTEMPT", "LAST-CHECKED", "SUMMARY"} <= set(listing.out.split())
    rows = ferry(ws, "health", "list", "--json").json
    assert {"host", "check", "state", "hard", "attempt", "max_attempts", "summary", "last_checked"} <= set(rows[0])
    hist = ferry(ws, "health", "history", "ssh", "--host", "ssh1", "--json").json
    assert hist and all(h["check"] == "ssh" and h["host"] == "ssh1" for h in hist)
    bad = ferry(ws, "health", "run", "nightly")
    assert bad.code != 0 and "no checklist 'nightly'" in bad.err and "daily" in bad.err
    assert len(bad.err.strip().splitlines()) == 1
    nohost = ferry(ws, "health", "run", "--host", "nowhere")
    assert nohost.code != 0 and "unknown host 'nowhere'" in nohost.err
