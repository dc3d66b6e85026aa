"""The lab as real machines (issue 12, first step): network namespaces with their own sshd,
reached through Ferry's SSH transport with verified host keys, fenced off from everything else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ferry.engine.config import HostSpec
from ferry.engine.errors import PermanentError
from ferry.engine.platform.netlab import NetLab, NetLabError
from ferry.engine.transport.ssh import SshTransport
from harness.netlab import random_subnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def netlab(tmp_path):
    # a subnet of its own per test: a lab left by a killed run elsewhere never collides
    lab = NetLab(tmp_path / "lab", subnet=random_subnet(),
                 vlans=(10,))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def transport(lab: NetLab, host: str, known_hosts: Path | None = None) -> SshTransport:
    spec = HostSpec(host, "lab", "ssh", lab.address(host), 22, "root", str(lab.identity))
    return SshTransport(spec, known_hosts=[known_hosts or lab.known_hosts], ssh_config_paths=[], use_agent=False,
                        connect_timeout=5)


def _machine_addresses() -> list[str]:
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout)
    return [a["local"] for i in out for a in i.get("addr_info", [])
            if not a["local"].startswith("127.") and not i["ifname"].startswith("fm")]


async def test_lab_hosts_are_ssh_machines_at_their_own_addresses(netlab):
    for host in netlab.hosts:
        t = transport(netlab, host)
        try:
            r = await t.run(["ip", "-j", "-4", "addr"], check=True)
            ns = (await t.run(["ip", "netns", "identify"], check=True)).stdout.decode().strip()
        finally:
            await t.close()
        addrs = {a["local"] for i in json.loads(r.stdout) for a in i.get("addr_info", [])}
        # its own addresses (management, and on the VM network), nothing of this machine's
        assert addrs == {"127.0.0.1", netlab.address(host), netlab.vm_address(host)}
        assert ns == netlab.ns(host)                             # the command really ran in the namespace
    # lab hosts see each other on the management segment
    t = transport(netlab, "lab1")
    try:
        r = await t.run(["bash", "-c", f"exec 3<>/dev/tcp/{netlab.address('lab3')}/22 && head -c 4 <&3"],
                        timeout=10)
    finally:
        await t.close()
    assert r.stdout.startswith(b"SSH-")


async def test_unknown_host_key_is_refused(netlab, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    t = transport(netlab, "lab2", empty)
    with pytest.raises(PermanentError) as e:
        await t.run(["true"])
    await t.close()
    assert "lab2" in e.value.message


async def test_nothing_outside_the_lab_is_reachable_from_a_lab_host(netlab):
    # a service of this machine listening on every address: the lab must not reach it
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", 0))
        srv.listen()
        port = srv.getsockname()[1]
        # (this machine's leg on the VM network is fenced like its management link)
        targets = [netlab.gateway, netlab.vm_leg_address,
                   *(a for a in _machine_addresses() if a != netlab.vm_leg_address)]
        assert len(targets) >= 2, "this machine has an address of its own to try"
        script = " ; ".join(
            f"if timeout 2 bash -c 'exec 3<>/dev/tcp/{a}/{port}' 2>/dev/null; then echo 'REACHED {a}'; "
            f"else echo 'blocked {a}'; fi" for a in targets)
        t = transport(netlab, "lab2")
        try:
            r = await t.run(["bash", "-c", script + " ; ip route get 8.8.8.8 2>&1; ip route get 192.0.2.1 2>&1; "
                             "ip route"], timeout=30)
        finally:
            await t.close()
    out = r.stdout.decode()
    assert "REACHED" not in out, out
    assert out.count("blocked") == len(targets)
    assert out.count("Network is unreachable") == 2, out
    assert "default" not in out                        # no default route in a lab host
    # while this machine reaches a lab host on the VM network (a refused connection is an answer)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((netlab.vm_address("lab2"), 22), timeout=5).close()


async def test_up_adopts_a_running_lab_and_repairs_a_broken_one(netlab):
    before = {h: s["sshd"] for h, s in netlab.status().items()}
    dnsmasq = netlab.dhcp_status()["pid"]
    assert dnsmasq
    netlab.up()                                        # running: adopted, nothing restarted
    assert {h: s["sshd"] for h, s in netlab.status().items()} == before
    assert netlab.dhcp_status()["pid"] == dnsmasq
    os.kill(before["lab1"], signal.SIGKILL)            # a dead sshd, a dead dnsmasq, and a host gone altogether
    os.kill(dnsmasq, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", netlab.ns("lab3")], check=True)
    subprocess.run(["ip", "-n", netlab.ns("lab2"), "link", "del", "uplinkv10"], check=True)   # a VLAN's link cut
    assert not netlab.is_up()
    netlab.up()
    status = netlab.status()
    assert all(s["answers"] and s["vlans"] == [10] for s in status.values()), status
    assert status["lab2"]["sshd"] == before["lab2"]
    dhcp = netlab.dhcp_status()
    assert dhcp["running"] and dhcp["pid"] != dnsmasq and netlab.is_up()
    t = transport(netlab, "lab3")
    try:
        assert (await t.run(["true"])).ok
    finally:
        await t.close()


def _links(ns: str | None = None) -> dict[str, dict]:
    out = subprocess.run(["ip", *(["-n", ns] if ns else []), "-j", "link"], capture_output=True, text=True).stdout
    return {i["ifname"]: i for i in json.loads(out)}


def test_down_leaves_nothing(tmp_path):
    lab = NetLab(tmp_path / "lab", subnet=random_subnet(),
                 vlans=(10, 20))
    before = set(_links())
    lab.up()
    pids = [s["sshd"] for s in lab.status().values()] + [lab.dhcp_status()["pid"]]
    assert all(pids)
    # each VLAN: its bridge on every host, a port of it the peer of a port of the VLAN's bridge in the switch
    switch = _links(lab.switch)
    for host in lab.hosts:
        links = _links(lab.ns(host))
        for vlan in lab.vlans:
            sw_bridge, sw_end, host_end, bridge = lab.vlan_links(host, vlan)
            assert bridge == f"br-labv{vlan}" and links[host_end]["master"] == bridge
            assert switch[sw_end]["master"] == sw_bridge and switch[sw_end]["ifindex"] == links[host_end]["link_index"]
    assert all(s["vlans"] == [10, 20] for s in lab.status().values())
    vlan_names = {n for h in lab.hosts for v in lab.vlans for n in lab.vlan_links(h, v)}
    assert not vlan_names & set(_links())              # nothing of the VLANs in this machine's namespace
    # a namespace deleted by hand keeps its processes alive, nameless: down finds lab2's sshd anyway
    subprocess.run(["ip", "netns", "del", lab.ns("lab2")], check=True)
    removed = lab.down()
    assert set(lab.namespaces) - {lab.ns("lab2")} <= set(removed)
    netns = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.tag not in netns
    links = set(_links())
    assert lab.root_link not in links and not (links - before) & vlan_names
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert lab.fence_table not in tables
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        assert state == "Z"                            # gone (a zombie until its parent reaps it)


def test_a_subnet_that_overlaps_this_machine_is_refused(tmp_path):
    route = next(r for r in json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True, text=True).stdout)
                 if r.get("dst", "default") != "default")
    lab = NetLab(tmp_path / "lab", subnet=route["dst"] if "/" in route["dst"] else route["dst"] + "/32")
    with pytest.raises(NetLabError) as e:
        lab.up()
    assert "overlaps" in e.value.message and "subnet" in e.value.hint
    assert lab.tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
