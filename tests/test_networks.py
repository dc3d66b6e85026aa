"""VM NICs on shared L2 segments (issue 12): VMs on different lab hosts — network namespaces
reached over SSH — talk over the `lab` network; VMs on different VLANs of one network do not.
Real QEMU (TCG), real taps and bridges, the guests' own busybox `ping` run through the agent.

A VLAN leaves its host on the network's uplink (tests/harness/vlanhosts.py): two hosts whose
uplinks are one wire, stand-ins for VM NICs on VLANs 10 and 20 of each, Ferry's own bridge and tap
scripts; on a kernel with 802.1Q and bridge VLAN filtering (this machine's, or the live image's
Debian kernel in a guest where this one has neither).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.engine.vm.nics import mac_for, tap_name, unique_macs, vlan_uplink
from harness import vlanhosts
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
    assert vlan_uplink("eth1", 4094) == "eth1.4094"
    long = vlan_uplink("enx0011223344ab", 4094)          # a 15-character uplink: the kernel's limit
    assert len(long) <= 15 and long.endswith(".4094") and long != vlan_uplink("enx0011223344ac", 4094)


# ------------------------------------------------------------------ VLANs across an uplink


@pytest.fixture(scope="module")
def vlan_runs():
    """Both ways a VLAN leaves its host, run once for the module: `made` (br-x made by Ferry: it
    filters VLANs) and `adopted` (br-x the operator's, holding the uplink, filtering off; MTU 1400)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    runs = {"made": vlanhosts.scenario(f"fvm{os.getpid()}", adopted=False),
            "adopted": vlanhosts.scenario(f"fva{os.getpid()}", adopted=True, mtu=1400)}
    if all(vlanhosts.kernel_has_vlans()):
        out = {name: vlanhosts.run_here(run) for name, run in runs.items()}
    elif shutil.which("qemu-system-x86_64") is None:
        pytest.skip("this kernel has no 802.1Q or bridge VLAN filtering, and there is no qemu-system-x86_64 "
                    "to boot one that has")
    else:
        out = vlanhosts.run_in_guest(runs)
    return {name: vlanhosts.parse(text) for name, text in out.items()}


def _crosses_and_stays_apart(run: vlanhosts.Outcome) -> None:
    assert {k: v for k, v in run.scripts.items() if v != (0, "")} == {}, run.scripts
    # each VLAN reaches its VLAN on the other host, over the only wire between them ...
    assert run.pings[("a10", "b10")] and run.pings[("a20", "b20")], run.pings
    # ... and nothing reaches another VLAN, across the wire or on its own host
    assert not run.pings[("a10", "b20")] and not run.pings[("b10", "b20")] and not run.pings[("a10", "a20")], run.pings


def test_a_vlan_crosses_the_uplink_tagged_on_a_bridge_ferry_makes(vlan_runs):
    run = vlan_runs["made"]
    _crosses_and_stays_apart(run)
    assert run.filtering == {"hA": "1", "hB": "1"}                 # made VLAN-aware
    assert run.uplink_vlans == {"hA": [1, 10, 20], "hB": [1, 10, 20]}     # the uplink carries both VLANs
    assert set(run.sub.values()) == {(0, "")}                      # no sub-interface needed


def test_an_adopted_bridge_keeps_its_filtering_off_and_vlans_leave_by_sub_interfaces(vlan_runs):
    run = vlan_runs["adopted"]
    _crosses_and_stays_apart(run)
    assert run.filtering == {"hA": "0", "hB": "0"}                 # the operator's bridge, as it was
    assert run.uplink_vlans == {"hA": [1], "hB": [1]}
    assert run.sub == {(h, v): (1400, f"br-xv{v}") for h in ("hA", "hB") for v in (10, 20)}


def test_where_the_kernel_has_no_802_1q_a_vlan_with_an_uplink_says_so_in_one_line():
    """This project's test machines: the VLAN's own bridge cannot take a sub-interface of the uplink,
    and a start that would leave the VLAN stuck on its host stops, saying why."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if any(vlanhosts.kernel_has_vlans()):
        pytest.skip("this kernel has 802.1Q or bridge VLAN filtering")
    run = vlanhosts.parse(vlanhosts.run_here(vlanhosts.scenario(f"fvn{os.getpid()}", adopted=True)))
    code, err = run.scripts[("hA", "bridges")]
    assert code == 4 and err == ("network v10: VLAN 10 cannot leave host hA by its uplink eth1 (br-x does not "
                                 "filter VLANs, so it takes eth1.10): the kernel has no 802.1Q VLAN interfaces "
                                 "(load 8021q: modprobe 8021q)"), run.scripts
    assert not any(run.pings.values())


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


def test_a_vlan_that_cannot_leave_its_host_stops_the_start_in_one_line(netws):
    """On a lab host of a kernel without 802.1Q or bridge VLAN filtering (this project's test machines),
    a VLAN network with an uplink: `ferry vm start` says why the VLAN cannot leave lab1, nothing more."""
    if any(vlanhosts.kernel_has_vlans()):
        pytest.skip("this kernel has 802.1Q or bridge VLAN filtering: the VLAN leaves (test_a_vlan_crosses_...)")
    ws, lab = netws
    cfg = (ws / "config.toml").read_text()
    try:
        (ws / "config.toml").write_text(cfg + '[networks.up30]\nbridge = "br-lab"\nvlan = 30\nhosts = ["lab1"]\n'
                                              'uplinks = { lab1 = "uplink" }\n')
        ok(ws, "vm", "create", "nu", "--host", "lab1", "--network", "up30", "--memory", "128M")
        r = ferry(ws, "vm", "start", "nu")
        assert r.code != 0
        last = r.err.strip().splitlines()[-1]           # the failed task's line, as for every task
        assert last.startswith("ferry: task ") and "network up30: VLAN 30 cannot leave host lab1 by its uplink " \
            "uplink" in last and "modprobe 8021q" in last and "(hint: " in last, r.err
        assert {v["name"]: v for v in ok(ws, "vm", "list")}["nu"]["state"] == "stopped"
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
