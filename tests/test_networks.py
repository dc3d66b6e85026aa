"""VM NICs on shared L2 segments (issue 12): VMs on different lab hosts — network namespaces
reached over SSH — talk over the `lab` network; VMs on different VLANs of one network do not.
Real QEMU (TCG), real taps and bridges, the guests' own busybox `ping` run through the agent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.engine.vm.nics import mac_for, tap_name, unique_macs
from harness.cli import ferry, ferry_process
from harness.lab import ok
from harness.netlab import guest_sh, netlab_workspace

needs = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                           reason="needs root (namespaces, taps) and qemu-system-x86_64")


def test_macs_are_stable_unique_and_locally_administered():
    assert mac_for("vm-1", 0) == mac_for("vm-1", 0) != mac_for("vm-1", 1) != mac_for("vm-2", 0)
    first = int(mac_for("vm-1", 0).split(":")[0], 16)
    assert first & 0b10 and not first & 0b1                  # locally administered, unicast
    taken = {mac_for("vm-3", 0)}
    macs = unique_macs("vm-3", 2, taken)
    assert macs[0] not in taken and len(set(macs)) == 2
    assert len(tap_name("0123456789abcdef", 3)) <= 15


@pytest.fixture(scope="module")
def netws():
    yield from netlab_workspace("fnet-", networks="""
        [networks.v10]
        bridge = "br-lab"
        vlan = 10
        hosts = ["lab1", "lab3"]
        [networks.v20]
        bridge = "br-lab"
        vlan = 20
        hosts = ["lab1", "lab3"]
        """)


def _start_all(ws: Path, vms: tuple[tuple[str, str, str], ...]) -> None:
    """Create each (name, host, network) VM, then start them all at once (their boots overlap)."""
    for name, host, network in vms:
        ok(ws, "vm", "create", name, "--host", host, "--network", network, "--memory", "128M")
    procs = [ferry_process(ws, "vm", "start", name) for name, _, _ in vms]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@needs
async def test_vms_on_two_lab_hosts_talk_over_the_lab_network(netws):
    ws, lab = netws
    await asyncio.to_thread(_start_all, ws, (("na", "lab1", "lab"), ("nb", "lab3", "lab")))
    shown = {v["name"]: v for v in await asyncio.to_thread(ok, ws, "vm", "list")}
    assert shown["na"]["state"] == "running" and shown["nb"]["state"] == "running"
    # the tap is on the lab host's bridge, in its namespace (not on this machine)
    nb = await asyncio.to_thread(ok, ws, "vm", "show", "nb")
    links = subprocess.run(["ip", "-n", lab.ns("lab3"), "-o", "link", "show", "master", "br-lab"],
                           capture_output=True, text=True).stdout
    assert tap_name(nb["id"], 0) in links
    assert tap_name(nb["id"], 0) not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    code, out = await guest_sh(ws, "na", "ip addr add 192.168.77.1/24 dev eth0 && ip link set eth0 up")
    assert code == 0, out
    code, out = await guest_sh(ws, "nb", "ip addr add 192.168.77.2/24 dev eth0 && ip link set eth0 up")
    assert code == 0, out
    code, out = await guest_sh(ws, "na", "ping -c 3 -W 5 192.168.77.2")
    assert code == 0 and "3 packets received" in out, out


@needs
async def test_vms_on_different_vlans_of_one_network_cannot_talk(netws):
    ws, lab = netws
    vms = (("va", "lab1", "v10"), ("vb", "lab3", "v10"), ("vc", "lab3", "v20"))
    await asyncio.to_thread(_start_all, ws, vms)
    for (name, host, _), ip in zip(vms, (1, 2, 3)):
        code, out = await guest_sh(ws, name, f"ip addr add 192.168.88.{ip}/24 dev eth0 && ip link set eth0 up")
        assert code == 0, out

    async def from_va() -> list[tuple[int, str]]:
        return [await guest_sh(ws, "va", "ping -c 2 -W 3 192.168.88.2"),
                await guest_sh(ws, "va", "ping -c 2 -W 2 192.168.88.3")]
    (same, other), beside = await asyncio.gather(from_va(), guest_sh(ws, "vb", "ping -c 2 -W 2 192.168.88.3"))
    assert same[0] == 0 and "2 packets received" in same[1], same          # the same VLAN, across lab hosts
    assert other[0] != 0 and "0 packets received" in other[1], other       # another VLAN: nothing arrives,
    assert beside[0] != 0 and "0 packets received" in beside[1], beside    # not even on the VM's own host


def test_a_network_whose_bridge_is_missing_refuses_the_start(netws):
    ws, lab = netws
    cfg = (ws / "config.toml").read_text()
    try:
        (ws / "config.toml").write_text(cfg + '[networks.gone]\nbridge = "br-gone"\ncreate = false\n')
        # made while the bridge is there (a create onto a missing bridge is refused: test_host_networks.py)
        subprocess.run(["ip", "-n", lab.ns("lab1"), "link", "add", "br-gone", "type", "bridge"], check=True)
        try:
            ok(ws, "vm", "create", "ng", "--host", "lab1", "--network", "gone", "--memory", "128M")
        finally:
            subprocess.run(["ip", "-n", lab.ns("lab1"), "link", "del", "br-gone"], check=True)
        r = ferry(ws, "vm", "start", "ng")
        assert r.code != 0
        assert "bridge br-gone is missing on host lab1" in r.err and "create = true" in r.err
        assert {v["name"]: v for v in ok(ws, "vm", "list")}["ng"]["state"] == "stopped"
    finally:
        (ws / "config.toml").write_text(cfg)


@needs
async def test_a_vm_announces_its_address_so_neighbours_drop_a_stale_mac(netws):
    """What a cutover's target does once it holds the source's address (engine/vm/nics.py announce):
    the neighbours' ARP caches learn its MAC at once, not when their entries expire. The neighbour is
    this machine's leg on the VM network, holding another MAC for the address, as after a move."""
    from ferry.engine.platform.qmp import QMPClient
    from ferry.engine.transport.local import LocalTransport
    from ferry.engine.vm.model import process_name
    from ferry.engine.vm.nics import announce

    ws, lab = netws
    await asyncio.to_thread(_start_all, ws, (("an", "lab1", "lab"),))
    addr = str(lab.vm_network[41])
    code, out = await guest_sh(ws, "an", f"ip addr add {addr}/{lab.vm_network.prefixlen} dev eth0 && "
                                         "ip link set eth0 up && cat /sys/class/net/eth0/address")
    assert code == 0, out
    mac = out.split()[-1]
    old = "02:00:00:00:00:99"

    def neighbour() -> str:
        return subprocess.run(["ip", "neigh", "show", addr, "dev", lab.vm_leg], capture_output=True,
                              text=True).stdout

    subprocess.run(["ip", "neigh", "replace", addr, "lladdr", old, "dev", lab.vm_leg, "nud", "stale"], check=True)
    try:
        await asyncio.sleep(2)
        assert old in neighbour()                       # nothing else corrects it
        shown = await asyncio.to_thread(ok, ws, "vm", "show", "an")
        sock = ws / shown["host"] / "run" / f"{process_name(shown['id'])}.qmp"
        async with await QMPClient.open(LocalTransport(), str(sock), name="an", timeout=10) as q:
            await announce(q)
        for _ in range(50):
            if mac in neighbour():
                break
            await asyncio.sleep(0.2)
        assert mac in neighbour(), neighbour()
    finally:
        subprocess.run(["ip", "neigh", "del", addr, "dev", lab.vm_leg], capture_output=True)
