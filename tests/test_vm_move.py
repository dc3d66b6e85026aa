"""Moving a VM between hosts (REQUIREMENTS D1, D5; issue 12): live while it runs, over the target's
migration address, on the network lab's hosts (namespaces reached over SSH) with a shared datastore.

What a user notices: the VM answers at the same address from a VM on another host after it moved,
the state of its memory came along (an address set by hand in the guest, which a reboot would lose),
it is recorded on the new host with one QEMU there and none left on the old one, and a move killed
or cancelled half-way ends with the guest running on exactly one host.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.engine.vm.model import process_name
from ferry.engine.vm.nics import tap_name
from harness.chaos import fraction, kill_at, run_ferry
from harness.cli import ferry, ferry_process
from harness.lab import ok
from harness.netlab import guest_sh, netlab_workspace
from harness.waiting import until_sync

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                                reason="needs root (namespaces, taps) and qemu-system-x86_64")


@pytest.fixture(scope="module")
def moving():
    """The network lab (lab1, lab3, a shared datastore, the `lab` network) with two VMs running:
    `mv` on lab1 (a disk on the shared datastore) at 192.168.79.1, `peer` on lab3 at 192.168.79.2."""
    for ws, lab in netlab_workspace("fmove-"):
        ok(ws, "vm", "create", "mv", "--host", "lab1", "--network", "lab", "--memory", "128M",
           "--disk", "64M:virtio:shared", "--boot", "live")
        ok(ws, "vm", "create", "peer", "--host", "lab3", "--network", "lab", "--memory", "128M")
        procs = [ferry_process(ws, "vm", "start", n) for n in ("mv", "peer")]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        for name, ip in (("mv", 1), ("peer", 2)):
            code, out = asyncio.run(guest_sh(ws, name, f"ip addr add 192.168.79.{ip}/24 dev eth0 && ip link set eth0 up"))
            assert code == 0, out
        yield ws, lab


def host_of(ws: Path, name: str) -> str:
    return ok(ws, "vm", "show", name)["host"]


def qemus_of(ws: Path, name: str) -> dict[str, list[int]]:
    """host -> the pids of the QEMUs running the VM there (by their pid files' names on the command line)."""
    vid = ok(ws, "vm", "show", name)["id"]
    out = {}
    for h in ("lab1", "lab3"):
        pidfile = str(ws / h / "run" / f"{process_name(vid)}.pid")
        r = subprocess.run(["pgrep", "-f", "--", f"-pidfile {pidfile}"], capture_output=True, text=True)
        out[h] = [int(p) for p in r.stdout.split()]
    return out


def assert_runs_on(ws: Path, lab, name: str, host: str) -> None:
    """Recorded running on `host`, one QEMU there and none elsewhere, its tap on that host's bridge,
    and its guest still has the address set by hand before the move (its memory came along)."""
    shown = ok(ws, "vm", "show", name)
    assert (shown["host"], shown["state"]) == (host, "running"), shown
    assert {h: len(p) for h, p in qemus_of(ws, name).items()} == {h: int(h == host) for h in ("lab1", "lab3")}
    links = subprocess.run(["ip", "-n", lab.ns(host), "-o", "link", "show", "master", "br-lab"],
                           capture_output=True, text=True).stdout
    assert tap_name(shown["id"], 0) in links
    code, out = asyncio.run(guest_sh(ws, name, "ip -4 addr show dev eth0"))
    assert code == 0 and "192.168.79.1/24" in out, out


def test_a_running_vm_moves_live_keeps_its_address_and_its_memory(moving):
    ws, lab = moving
    src = host_of(ws, "mv")
    to = "lab3" if src == "lab1" else "lab1"
    r = ferry(ws, "vm", "move", "mv", "--to", to)
    assert r.code == 0, r.err
    assert f"mv moved from {src} to {to} while running" in r.out and "the guest stopped for" in r.out, r.out
    assert_runs_on(ws, lab, "mv", to)
    # the peer on lab3 reaches it at the same address (its switch learned where it went)
    code, out = asyncio.run(guest_sh(ws, "peer", "ping -c 3 -W 5 192.168.79.1"))
    assert code == 0 and "3 packets received" in out, out
    task = ok(ws, "tasks")[0]
    assert task["kind"] == "vm.move" and task["result"]["live"] and task["result"]["bytes"] > 0, task
    assert task["result"]["downtime_ms"] is not None


def test_a_move_killed_half_way_is_finished_by_the_same_command(moving):
    ws, lab = moving
    src = host_of(ws, "mv")
    to = "lab3" if src == "lab1" else "lab1"
    # 16 MiB/s: the memory takes seconds to go, and the engine is killed (kill -9) a third of the way
    k = kill_at(ws, "vm", "move", "mv", "--to", to, "--bandwidth", "16",
                when=lambda t: t["state"] == "running" and (t["progress"] or {}).get("bytes_total") and
                fraction(t["progress"]) >= 0.3)
    assert k.killed, k
    r = run_ferry(ws, "vm", "move", "mv", "--to", to)
    assert r.code == 0, r.err
    assert_runs_on(ws, lab, "mv", to)
    info = ok(ws, "task", "show", str(k.task_id))
    assert info["state"] == "succeeded", info


def test_a_cancelled_move_leaves_the_vm_running_where_it_was(moving):
    ws, lab = moving
    src = host_of(ws, "mv")
    to = "lab3" if src == "lab1" else "lab1"
    p = ferry_process(ws, "vm", "move", "mv", "--to", to, "--bandwidth", "4")
    try:
        task = until_sync(lambda: next((t for t in ok(ws, "tasks") if t["kind"] == "vm.move" and t["state"] == "running"
                                        and (t["progress"] or {}).get("bytes_done")), None),
                          timeout=120, what="the move copying memory")
        assert ferry(ws, "task", "cancel", str(task["id"])).code == 0
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    until_sync(lambda: ok(ws, "task", "show", str(task["id"]))["state"] in ("cancelled", "rolled back"),
               timeout=120, what="the cancel to end")
    assert_runs_on(ws, lab, "mv", src)


def test_a_move_is_refused_before_anything_where_the_target_lacks_a_disks_datastore(moving):
    ws, _lab = moving
    cfg = ws / "config.toml"
    cfg.write_text(cfg.read_text() + f'\n[datastores.own1]\npath = "{ws / "own1"}"\nhosts = ["lab1"]\n')
    ok(ws, "vm", "create", "local1", "--host", "lab1", "--memory", "64M", "--disk", "16M:virtio:own1")
    r = ferry(ws, "vm", "move", "local1", "--to", "lab3")
    assert r.code == 2 and "disk disk0 of local1 is on datastore" in r.err and "host lab3 does not have" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert ok(ws, "vm", "show", "local1")["host"] == "lab1"
    # a stopped VM without disks only changes host
    ok(ws, "vm", "create", "cold1", "--host", "lab1", "--memory", "64M")
    r = ferry(ws, "vm", "move", "cold1", "--to", "lab3")
    assert r.code == 0 and "cold1 is now on lab3" in r.out, r.err
    assert ok(ws, "vm", "show", "cold1")["host"] == "lab3"
