"""Host facts over the local transport and real sshd; dead hosts answer fast and delay no one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from ferry.engine.config import DatastoreSpec, HostSpec
from ferry.engine.hostfacts import gather_all, gather_facts, parse_facts
from ferry.engine.transport import LocalTransport
from harness.sshd import free_port


def _pretty_name() -> str | None:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        return None
    return None


def _qemu_version() -> str | None:
    if not shutil.which("qemu-system-x86_64"):
        return None
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return out.split("version", 1)[1].split()[0]


def _check_this_machine(facts) -> None:
    assert facts.reachable and facts.error is None
    assert facts.kernel == os.uname().release
    assert facts.os_name == _pretty_name()
    assert facts.cpus == len(os.sched_getaffinity(0))
    assert 0 < facts.mem_available <= facts.mem_total
    assert facts.mem_total == pytest.approx(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), rel=0.1)
    assert facts.load1 >= 0 and facts.load5 >= 0 and facts.load15 >= 0
    assert facts.qemu_version == _qemu_version()


async def test_local_host_facts(tmp_path):
    store = tmp_path / "ds one"   # a space in the path on purpose
    store.mkdir()
    stores = [DatastoreSpec("one", str(store), ("lab1",)),
              DatastoreSpec("gone", str(tmp_path / "missing"), ("lab1",))]
    spec = HostSpec("lab1", "lab", "local")
    facts = await gather_facts(LocalTransport("lab1"), spec, stores)
    _check_this_machine(facts)
    one, gone = facts.datastores
    vfs = os.statvfs(store)
    assert one.name == "one" and one.error is None
    assert one.total == pytest.approx(vfs.f_blocks * vfs.f_frsize, rel=0.01)
    assert 0 <= one.used <= one.total and 0 < one.free <= one.total
    assert gone.total is None and "does not exist" in gone.error and "lab1" in gone.error
    assert facts.to_dict()["datastores"][0]["name"] == "one"


async def test_ssh_hosts_facts_in_parallel(ssh_site):
    pool = ssh_site.pool()
    try:
        facts = await gather_all(pool, ssh_site.config(), timeout=10)
    finally:
        await pool.close()
    assert set(facts) == {"ssh1", "ssh2"}
    for name, f in facts.items():
        _check_this_machine(f)
        [ds] = f.datastores
        assert ds.name == f"{name}-local" and ds.path == str(ssh_site.datastores[ds.name]) and ds.total > 0


async def test_dead_hosts_answer_fast_and_delay_no_one(sshd_factory, tmp_path):
    # "silent" accepts TCP but never speaks SSH: only the timeout can end it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    key = str(sshd_factory.user_key)
    extra = {"closed": {"cluster": "lab", "transport": "ssh", "address": "127.0.0.1", "port": free_port(),
                        "user": "root", "identity": key},
             "silent": {"cluster": "lab", "transport": "ssh", "address": "127.0.0.1",
                        "port": silent.getsockname()[1], "user": "root", "identity": key}}
    site = sshd_factory.site(tmp_path, 1, extra_hosts=extra)
    pool = site.pool()
    t0 = time.monotonic()
    try:
        facts = await gather_all(pool, site.config(), timeout=1.5)
    finally:
        await pool.close()
        silent.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 3.5, "bounded by the timeout, not by the sum of hosts"

    assert facts["ssh1"].reachable and facts["ssh1"].elapsed_s < 1.5 and facts["ssh1"].kernel
    closed = facts["closed"]
    assert not closed.reachable and "refused" in closed.error and "closed" in closed.error
    assert "sshd running" in closed.hint and closed.elapsed_s < 1
    silent_facts = facts["silent"]
    assert not silent_facts.reachable and "within 1.5 s" in silent_facts.error
    assert silent_facts.kernel is None and silent_facts.datastores == []


def test_parse_tolerates_odd_output():
    stores = [DatastoreSpec("a", "/a", ("h",)), DatastoreSpec("b", "/b", ("h",)), DatastoreSpec("c", "/c", ("h",))]
    text = "\n".join([
        "@@os", "", "@@kernel", "6.1.0", "@@cpus", "lots", "@@meminfo", "MemTotal: 1000 kB",
        "@@loadavg", "0.5 oops", "@@qemu",
        "@@ds a", "/dev/mapper/vg-root with space 1000 400 600 40% /a",
        "@@ds b", "@@missing",
        "@@end",
    ])
    f = parse_facts("h", text, stores)
    assert f["os_name"] is None and f["kernel"] == "6.1.0" and f["cpus"] is None
    assert f["mem_total"] == 1024000 and "mem_available" not in f and "load1" not in f
    assert "qemu_version" not in f
    a, b, c = f["datastores"]
    assert (a.total, a.used, a.free, a.error) == (1000, 400, 600, None)
    assert b.error == "/b does not exist on h"
    assert c.error == "no answer for this datastore"
