"""Performance history (engine/ops/metrics.py, metricsdb.py, exposition.py; issue 14, F3): samples of the
lab's real hosts (this machine's /proc over the local transport) and of a real QEMU, downsampling over a
simulated day with an injected clock, Prometheus' /metrics scraped from a running engine service and
parsed with prometheus_client's parser, and the `ferry metrics` commands."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.engine.client import EngineClient
from ferry.engine.config import ConfigError, dump_config, lab_document, parse_config
from ferry.engine.ops import alarms as al
from ferry.engine.ops.health import Found, record
from ferry.engine.ops.metricsdb import TIERS, MetricsDB
from ferry.engine.ops.nagios import CheckResult, CheckState
from ferry.engine.store import Store
from ferry.engine.taskstate import TaskState
from ferry.engine.workspace import Workspace
from harness.cli import ferry, kill_engines
from harness.sshd import free_port
from harness.waiting import until, until_sync

MiB = 1 << 20


def mem_total() -> int:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


class FakeClock:
    """Time that moves only when the sampler sleeps: no test waits for an interval."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t, self.slept = t, []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def lab_ws(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "config.toml").write_text(dump_config(lab_document(root)) + extra)
    return root


# ------------------------------------------------------------------------------ real samples

async def test_lab_hosts_and_a_running_vm_sampled_give_plausible_numbers(tmp_path):
    ws = lab_ws(tmp_path / "ws")
    c = EngineClient.open(Workspace(ws))
    await c.start()
    qemu = None
    try:
        tid = await c.vm_task("vm.create", {"name": "web1", "host": "lab1", "cpus": 1, "memory_mb": 128, "disks": [],
                                            "nics": []})
        assert (await c.wait_task(tid, timeout=30)).state == TaskState.SUCCEEDED
        # A real QEMU under web1's process name (its pid file in lab1's runtime folder, as vm.start writes
        # it), started here: vm.start would first put the live image on the lab host (~20 s).
        vm = await c.vm_get("web1")
        runtime = Path(c.site.hosts["lab1"].runtime)
        runtime.mkdir(parents=True, exist_ok=True)
        pidfile = runtime / f"vm-{vm.id[:8]}.pid"
        qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "128", "-nodefaults",
                                 "-display", "none", "-pidfile", str(pidfile)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await until(lambda: pidfile.exists() and pidfile.read_text().strip() == str(qemu.pid), what="QEMU's pid file")
        # Rates need two samples whose counters moved: sample until they have.
        vals = await until(lambda: _rated(c), what="a second sample with rates", timeout=20)
        host, vmv = vals["host:lab1"], vals["vm:web1"]
        assert host["mem_total_bytes"] == mem_total()
        assert 0 < host["mem_used_bytes"] < host["mem_total_bytes"] and 0 < host["mem_pct"] < 100
        assert 0 <= host["cpu_pct"] <= 100 and host["load1"] >= 0
        assert all(host[k] >= 0 for k in ("net_rx_bps", "net_tx_bps", "disk_read_bps", "disk_write_bps"))
        assert set(vals) == {"host:lab1", "host:lab2", "host:lab3", "vm:web1"}
        rss = int(next(ln for ln in Path(f"/proc/{qemu.pid}/status").read_text().splitlines()
                       if ln.startswith("VmRSS:")).split()[1]) * 1024
        assert vmv["mem_total_bytes"] == 128 * MiB and abs(vmv["mem_rss_bytes"] - rss) < 64 * MiB
        assert 0 <= vmv["cpu_pct"] <= 100
        # What was sampled is kept: the series of the last hour, 10 s buckets.
        [cpu] = await c.metrics("web1", "cpu_pct", 3600)
        assert cpu.object == "vm:web1" and cpu.step == 10 and cpu.unit == "%" and cpu.points
        assert all(p.min <= p.avg <= p.max for p in cpu.points)
        # QEMU gone: the VM is no longer sampled
        qemu.kill()
        qemu.wait()
        assert "vm:web1" not in await c.sampler.sample()
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        await c.close()


async def _rated(c: EngineClient):
    vals = await c.sampler.sample()
    return vals if "cpu_pct" in vals.get("host:lab1", {}) and "cpu_pct" in vals.get("vm:web1", {}) else None


async def test_the_loop_samples_every_interval_on_an_injected_clock(tmp_path):
    ws = lab_ws(tmp_path / "ws", "\n[metrics]\ninterval = 30\n")
    c = EngineClient.open(Workspace(ws))
    clock = FakeClock()
    c.sampler.clock = clock
    try:
        c.sampler.launch()
        await until(lambda: len(clock.slept) >= 6, what="six samples")
        await c.sampler.stop()
        # 30 s apart on the engine's clock: every 10 s bucket of the newest hour holds at most one sample
        assert all(29 < s <= 30 for s in clock.slept)
        [mem] = await c.metrics("lab2", "mem_total_bytes", 3600)
        assert len(mem.points) >= 6 and {p.n for p in mem.points} == {1}
        assert [b.ts - a.ts for a, b in zip(mem.points, mem.points[1:])] == [30.0] * (len(mem.points) - 1)

        # [metrics] listen edited while the engine runs: /metrics is served from the next sample on
        port = free_port()
        (ws / "config.toml").write_text((ws / "config.toml").read_text() + f'listen = "127.0.0.1:{port}"\n')
        c.sampler.launch(reload=c.reload_site)
        m = await until(lambda: asyncio.to_thread(_scrape_or_none, port), what="/metrics on the new address")
        assert m[("ferry_host_up", (("host", "lab3"),))] == 1.0
    finally:
        await c.close()


def _scrape_or_none(port: int) -> dict | None:
    try:
        return scrape(port)
    except OSError:
        return None


# ------------------------------------------------------------------------------ downsampling

def test_a_simulated_day_is_kept_in_bounded_tiers_with_exact_min_avg_max(tmp_path):
    db = MetricsDB(tmp_path / "metrics.db")
    t0 = 1_800_000_000          # a multiple of 600: buckets start with the first sample
    hours = 26
    n = hours * 360
    for i in range(n):           # one sample each 10 s; its value is its number
        db.add({"host:h1": {"cpu_pct": float(i)}}, t0 + 10 * i)
    now = t0 + 10 * (n - 1)
    # bounded: an hour of 10 s buckets, a day of minutes, 30 days of 10 minutes (26 h of them so far)
    assert db.count(10) <= 3600 // 10 + 1
    assert db.count(60) <= 86400 // 60 + 1
    assert db.count(600) == hours * 6
    assert db.count() == db.count(10) + db.count(60) + db.count(600)

    step, pts = db.series("host:h1", "cpu_pct", 3600, now)
    assert step == 10 and len(pts["cpu_pct"]) == 361 and pts["cpu_pct"][-1].avg == n - 1
    step, pts = db.series("host:h1", None, 86400, now)
    minutes = pts["cpu_pct"]
    assert step == 60 and 1440 <= len(minutes) <= 1441
    k = (minutes[5].ts - t0) // 10       # the first sample of a minute: 6 samples in it
    assert (minutes[5].min, minutes[5].avg, minutes[5].max, minutes[5].n) == (k, k + 2.5, k + 5, 6)
    step, pts = db.series("host:h1", "cpu_pct", 7 * 86400, now)
    first = pts["cpu_pct"][0]
    assert step == 600 and len(pts["cpu_pct"]) == hours * 6
    assert (first.ts, first.min, first.avg, first.max, first.n) == (t0, 0, 29.5, 59, 60)

    # a week on, the finer tiers have emptied as rings; the 10 minute tier still holds the day
    db.add({"host:h1": {"cpu_pct": 1.0}}, now + 7 * 86400)
    assert db.count(10) == db.count(60) == 1 and db.count(600) == hours * 6 + 1
    db.add({"host:h1": {"cpu_pct": 1.0}}, now + 31 * 86400)
    assert db.count(600) == 2           # the day is past 30 days: gone
    assert [s for s, _ in TIERS] == [10, 60, 600]
    db.close()


# ------------------------------------------------------------------------------ /metrics and the CLI

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("metrics")
    port = free_port()
    # a fourth host, "gone", is an SSH host where nothing listens: never sampled, down in /metrics
    ws = lab_ws(base / "ws", f'\n[hosts.gone]\ncluster = "lab"\ntransport = "ssh"\naddress = "127.0.0.1"\n'
                f'port = {free_port()}\n\n[metrics]\ninterval = 1\nlisten = "127.0.0.1:{port}"\n')
    store = Store(ws / "state.db")
    al.raise_alarm(store, "host.down", "host:lab3", "critical", "lab3 is down", now=1.0)
    al.raise_alarm(store, "health.load", "host:lab2", "warning", "busy", now=1.0)
    record(store, [Found("lab1", "load", CheckResult(CheckState.WARNING, "load 3"), 1, "health.load", "host:lab1"),
                   Found("lab1", "memory", CheckResult(CheckState.OK, "fine"), 1, "health.memory", "host:lab1")], 1.0)
    store.close()
    os.environ["FERRY_METRICS"] = "on"      # (conftest turns the engines' sampling off for the other tests)
    try:
        yield ws, port
    finally:
        kill_engines(base)
        os.environ["FERRY_METRICS"] = "off"


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_are_served_to_prometheus_and_parse(served):
    ws, port = served
    assert ferry(ws, "engine", "start").code == 0

    def rated():
        try:
            m = scrape(port)
        except OSError:
            return None
        return m if ("ferry_host_cpu_percent", (("host", "lab1"),)) in m else None
    m = until_sync(rated, what="/metrics with a rated sample", timeout=30)
    assert m[("ferry_host_up", (("host", "lab1"),))] == 1.0
    assert m[("ferry_host_up", (("host", "gone"),))] == 0.0
    assert not any(k[1] == (("host", "gone"),) for k in m if k[0] != "ferry_host_up")
    assert m[("ferry_host_memory_total_bytes", (("host", "lab2"),))] == mem_total()
    assert 0 <= m[("ferry_host_cpu_percent", (("host", "lab1"),))] <= 100
    for name in ("network_receive", "network_transmit", "disk_read", "disk_write"):
        assert m[(f"ferry_host_{name}_bytes_per_second", (("host", "lab3"),))] >= 0
    assert m[("ferry_alarms_open", (("severity", "critical"),))] == 1
    assert m[("ferry_alarms_open", (("severity", "warning"),))] == 1
    assert m[("ferry_alarms_open", (("severity", "major"),))] == 0
    assert m[("ferry_health_check_state", (("check", "load"), ("host", "lab1")))] == 1
    assert m[("ferry_health_check_state", (("check", "memory"), ("host", "lab1")))] == 0
    assert ("ferry_tasks", (("state", "failed"),)) in m
    assert m[("ferry_metrics_last_sample_timestamp_seconds", ())] > 1.7e9
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)


def test_ferry_metrics_commands(served):
    ws, _ = served
    until_sync(lambda: {h["host"]: h for h in ferry(ws, "metrics", "compare", "--json").json}["lab1"]["cpu_pct"]
               is not None, what="a rated sample of lab1", timeout=30)
    r = ferry(ws, "metrics", "lab1", "--json")
    assert r.code == 0, r.err
    series = {s["metric"]: s for s in r.json}
    assert set(series) == {"cpu_pct", "mem_pct", "mem_used_bytes", "mem_total_bytes", "load1", "net_rx_bps",
                           "net_tx_bps", "disk_read_bps", "disk_write_bps"}
    assert series["mem_total_bytes"]["points"][-1]["max"] == mem_total() and series["cpu_pct"]["step"] == 10
    assert {"ts", "min", "avg", "max", "n"} == set(series["cpu_pct"]["points"][0])

    text = ferry(ws, "metrics", "lab1").out.splitlines()
    assert text[0].startswith("host:lab1 over 1h (a point per 10 s")
    cpu = next(ln for ln in text if ln.strip().startswith("cpu_pct"))
    assert "last " in cpu and "%" in cpu and "max " in cpu and any(ch in cpu for ch in "▁▂▃▄▅▆▇█")

    r = ferry(ws, "metrics", "lab2", "--metric", "mem_total_bytes", "--since", "1d")
    assert r.code == 0 and "a point per 60 s" in r.out.splitlines()[0]
    assert r.out.splitlines()[1].split() == ["TIME", "MIN", "AVG", "MAX", "SAMPLES"]

    r = ferry(ws, "metrics", "compare", "--sort", "mem", "--json")
    assert r.code == 0 and [h["host"] for h in r.json][-1] == "gone"
    mem = [h["mem_pct"] for h in r.json[:-1]]
    assert len(mem) == 3 and mem == sorted(mem, reverse=True)
    table = ferry(ws, "metrics", "compare").out.splitlines()
    assert table[0].split() == ["HOST", "CPU", "MEM", "NET-RX", "NET-TX", "DISK-R", "DISK-W", "LOAD1", "SAMPLED"]
    assert [ln.split()[0] for ln in table[1:]] == ["gone", "lab1", "lab2", "lab3"]
    assert table[1].split()[1:] == ["-"] * 8          # never answered: no numbers, not zeros
    r = ferry(ws, "metrics", "compare", "--sort", "cpu", "--json")
    assert [h["host"] for h in r.json][-1] == "gone" and r.json[-1]["ts"] is None

    bad = ferry(ws, "metrics", "nosuch")
    assert bad.code == 1 and bad.err.strip() == ("ferry: no host or VM named 'nosuch' (hint: ferry hosts lists the "
                                                 "hosts, ferry vm list the VMs)")
    bad = ferry(ws, "metrics", "lab1", "--metric", "bogus")
    assert bad.code == 1 and len(bad.err.splitlines()) == 1 and "cpu_pct" in bad.err
    bad = ferry(ws, "metrics", "lab1", "--since", "soon")
    assert bad.code == 2 and "is not a duration" in bad.err
    assert json.loads(ferry(ws, "metrics", "compare", "--json").out)

    # The VMs side by side: a VM that does not run has no numbers (test_lab_hosts_and_a_running_vm_...
    # samples a running one; the console's Performance view shows the same rows).
    for name in ("zz1", "aa2"):
        assert ferry(ws, "vm", "create", name, "--host", "lab2", "--memory", "128M").code == 0
    table = ferry(ws, "metrics", "compare", "--vms").out.splitlines()
    assert table[-3].split() == ["VM", "HOST", "CPU", "MEM", "RSS", "GIVEN", "SAMPLED"], table
    assert [ln.split()[:2] for ln in table[-2:]] == [["aa2", "lab2"], ["zz1", "lab2"]]
    assert table[-1].split()[2:] == ["-"] * 5
    r = ferry(ws, "metrics", "compare", "--vms", "--sort", "cpu", "--json")
    assert r.code == 0 and {v["vm"]: v["host"] for v in r.json} == {"aa2": "lab2", "zz1": "lab2"}
    bad = ferry(ws, "metrics", "compare", "--vms", "--sort", "load")
    assert bad.code == 2 and bad.err.strip().endswith("(hint: one of vm, host, cpu, mem, rss, given, age)"), bad.err
    bad = ferry(ws, "metrics", "lab1", "--vms")
    assert bad.code == 2 and "--vms goes with `ferry metrics compare`" in bad.err


def test_metrics_config_is_checked(tmp_path):
    root = tmp_path / "ws"
    doc = lab_document(root)
    doc["metrics"] = {"interval": 0, "listen": "nowhere", "colour": "red"}
    with pytest.raises(ConfigError) as e:
        parse_config(doc, file="config.toml", check_files=False)
    text = str(e.value)
    assert "metrics.interval" in text and "metrics.listen" in text and "metrics.colour" in text
    doc["metrics"] = {"interval": 5, "listen": "127.0.0.1:9464", "enabled": False}
    site = parse_config(doc, file="config.toml", check_files=False)
    assert (site.metrics.interval, site.metrics.address, site.metrics.enabled) == (5.0, ("127.0.0.1", 9464), False)
