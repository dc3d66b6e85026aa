"""Addresses for guests on the lab's VM network (issue 12): the network lab runs Debian's dnsmasq
in its switch namespace on the `lab` bridge; a live-image guest on `lab` asks DHCP and its agent
reports the address; a static lease by MAC gives a VM exactly its address on any lab host.
Real namespaces, real dnsmasq, real QEMU (TCG), the guest's own busybox udhcpc.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.engine.config import HostSpec
from ferry.engine.platform.liveboot import LiveNic, LivePaths, LiveRole, launch, live_boot_argv, stop, wait_for_marker
from ferry.engine.platform.liveimage import build_live_image
from ferry.engine.platform.netlab import NetLab, NetLabError
from ferry.engine.platform.qga import GuestAgent
from ferry.engine.transport.local import LocalTransport
from ferry.engine.transport.ssh import SshTransport
from harness.lab import ok
from harness.netlab import netlab_workspace, random_subnet
from harness.qemu import image_cache
from harness.waiting import until_sync

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                or shutil.which("dnsmasq") is None,
                                reason="needs root (namespaces, taps), qemu-system-x86_64 and dnsmasq")


@pytest.fixture(scope="module")
def dhcpws():
    yield from netlab_workspace("fdhcp-", site="dhcplab")


def _create(ws: Path, name: str, host: str) -> str:
    """Creates a VM with one NIC on `lab`; its MAC."""
    ok(ws, "vm", "create", name, "--host", host, "--network", "lab", "--memory", "128M")
    return ok(ws, "vm", "show", name)["nics"][0]["mac"]


def _lab_ips(ws: Path, name: str, lab: NetLab) -> list[str]:
    """The addresses of the VM's agent report that are on the lab's VM subnet."""
    r = ok(ws, "vm", "agent", "info", name)
    return [ip for ip in r.get("ips") or ()
            if ipaddress.ip_interface(ip).ip in lab.vm_network] if r.get("agent") == "running" else []


def test_a_vm_on_the_lab_network_gets_its_address_from_the_labs_dhcp(dhcpws):
    ws, lab = dhcpws
    mac = _create(ws, "dyn", "lab1")
    ok(ws, "vm", "start", "dyn")
    ips = until_sync(lambda: _lab_ips(ws, "dyn", lab), timeout=45, what="dyn's agent reports a lab address")
    lo, hi = (ipaddress.IPv4Address(a) for a in lab.dhcp_pool)
    ip = ipaddress.IPv4Interface(ips[0])
    assert lo <= ip.ip <= hi and ip.network == lab.vm_network, ips
    # the lab's lease file names the VM's MAC with that address
    assert {"mac": mac, "address": str(ip.ip)} in [{k: le[k] for k in ("mac", "address")} for le in lab.leases()]


def test_a_static_lease_gives_each_vm_exactly_its_address_on_any_host(dhcpws):
    ws, lab = dhcpws
    mac_a, mac_b = _create(ws, "sta", "lab1"), _create(ws, "stb", "lab3")
    want_a = lab.reserve(mac_a, str(lab.vm_network[23]))
    want_b = lab.reserve(mac_b)                               # a free one of the static pool
    assert want_a == str(lab.vm_network[23]) and want_b != want_a
    assert lab.reserve(mac_b) == want_b                      # asked again: the same one
    for name in ("sta", "stb"):
        ok(ws, "vm", "start", name)
    for name, want in (("sta", want_a), ("stb", want_b)):
        ips = until_sync(lambda: _lab_ips(ws, name, lab), timeout=45, what=f"{name}'s agent reports a lab address")
        assert ips == [f"{want}/{lab.vm_network.prefixlen}"], (name, ips)


async def test_the_receiver_role_takes_its_address_from_the_labs_dhcp(dhcpws):
    # the live image's receiver role, booted on lab3 over SSH, asks DHCP on `lab` (no ferry.ip)
    ws, lab = dhcpws
    mac = "52:fe:00:00:00:07"
    want = lab.reserve(mac)
    image = await build_live_image(image_cache())
    paths = LivePaths(str(ws / "lab3" / "recv"), "recv")
    t = SshTransport(HostSpec("lab3", "lab", "ssh", lab.address("lab3"), 22, "root", str(lab.identity)),
                     known_hosts=[lab.known_hosts], ssh_config_paths=[], use_agent=False, connect_timeout=5)
    try:
        await launch(t, live_boot_argv(image, paths=paths, role=LiveRole.RECEIVER, memory_mb=128,
                                       nics=[LiveNic(mac=mac, tap="ftrecv0")]), paths)
        subprocess.run(["ip", "-n", lab.ns("lab3"), "link", "set", "ftrecv0", "master", "br-lab", "up"], check=True)
        ready = await wait_for_marker(t, paths, "FERRY-READY", timeout=60)
        assert "role=receiver" in ready and f"ip={want}/{lab.vm_network.prefixlen}" in ready, ready
        async with await GuestAgent.open(LocalTransport(), paths.qga, name="recv", timeout=10) as ga:
            reported = [a for i in await ga.network_interfaces() if i.name != "lo" for a in i.addresses]
        assert f"{want}/{lab.vm_network.prefixlen}" in reported, reported
    finally:
        await stop(t, paths.pidfile)
        await t.close()


def test_a_static_lease_outside_the_pool_or_taken_is_refused(tmp_path):
    lab = NetLab(tmp_path / "lab", subnet="10.240.8.0/24")
    assert str(lab.vm_network) == "10.240.9.0/24" and lab.dhcp_pool == ("10.240.9.128", "10.240.9.254")
    assert lab.reserve("52:00:00:00:00:01", "10.240.9.20") == "10.240.9.20"
    for address, words in (("10.240.9.200", "not in the lab's static DHCP pool"),
                           ("10.240.8.20", "not in the lab's static DHCP pool"),
                           ("10.240.9.20", "is the static lease of 52:00:00:00:00:01")):
        with pytest.raises(NetLabError) as e:
            lab.reserve("52:00:00:00:00:02", address)
        assert words in e.value.message and e.value.hint
    assert lab.hosts_file.read_text() == "52:00:00:00:00:01,10.240.9.20\n"
    assert lab.release("52:00:00:00:00:01") and lab.reservations() == {}


def test_down_leaves_no_dnsmasq(tmp_path):
    lab = NetLab(tmp_path / "lab", subnet=random_subnet())
    try:
        lab.up()
        pid = lab.dhcp_status()["pid"]
        assert pid and Path(f"/proc/{pid}/exe").resolve().name == "dnsmasq"
        assert subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                              text=True).stdout.strip() == lab.switch
    finally:
        lab.down()
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    assert state in ("gone", "Z")                            # a zombie until its parent reaps it
    assert not lab.dhcp_status()["running"]
