"""A VM's NICs on the site's networks: MAC addresses, tap devices and the bridges they join.

A NIC on a network in bridge mode (config.toml `[networks.NAME]`) is a tap device on that
host's bridge, carrying the VM's MAC; a NIC on a user-mode network (the default) is QEMU's
user-mode networking, isolated to its guest.

- MACs are stable per NIC (derived from the VM's id and the NIC's place, or as recorded) and
  unique in the site: clones, deploys and imports get a new id, so new MACs. The first octet 52
  (as QEMU's 52:54:00) is unicast and locally administered; 40 bits of hash follow, and
  `unique_macs` steps past a clash with a MAC the site already has.
- The tap is made by QEMU itself (`-netdev tap,ifname=…,script=no`, it goes when QEMU exits) and
  joined to the bridge right after QEMU starts (`attach_script`).
- A bridge that is absent is created when the network allows it (create = true, the default),
  with its MTU and its uplink; otherwise the start is refused, naming the network, bridge and host.
- A VLAN (a port group) is a VLAN of a VLAN-aware bridge where the kernel has bridge VLAN
  filtering; where it has not (no 802.1Q in the kernel, as on this project's test machines), the
  VLAN is its own bridge `<bridge>v<vlan>` (each its own segment), which the site (or the lab)
  links between hosts.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from typing import Iterable

from ..config import NetworkSpec, SiteConfig
from ..errors import Refused


def mac_for(vm_id: str, index: int, salt: int = 0) -> str:
    """The MAC of a VM's NIC `index` (stable: the same VM id gives the same MAC)."""
    h = hashlib.sha256(f"{vm_id}/{index}/{salt}".encode()).digest()
    return "52:" + ":".join(f"{b:02x}" for b in h[:5])


def unique_macs(vm_id: str, count: int, taken: Iterable[str]) -> list[str]:
    """`count` MACs for a new VM, none of them in `taken` (the site's MACs)."""
    used = {m.lower() for m in taken if m}
    out = []
    for i in range(count):
        salt = 0
        while (mac := mac_for(vm_id, i, salt)) in used:
            salt += 1
        used.add(mac)
        out.append(mac)
    return out


def tap_name(vm_id: str, index: int) -> str:
    """The tap device of a VM's NIC on its host: 'ft' + 9 hex of the VM id + the NIC's place (<= 15)."""
    return f"ft{hashlib.sha256(vm_id.encode()).hexdigest()[:9]}{index}"


@dataclass(frozen=True)
class NicPlan:
    index: int
    network: NetworkSpec
    mac: str
    tap: str | None                  # None: user-mode networking

    @property
    def bridge(self) -> str:
        return self.network.bridge


def plan(site: SiteConfig, host: str, vm_id: str, nics: Iterable) -> list[NicPlan]:
    """How each NIC of a VM joins its network on `host`; Refused for a network not on the host."""
    out = []
    networks = site.networks_of(host) if host in site.hosts else ["default"]
    for i, nic in enumerate(nics):
        if nic.network not in networks:
            raise Refused(f"network {nic.network!r} is not on host {host}",
                          f"use one of: {', '.join(networks)}; or add {host!r} to networks.{nic.network}.hosts")
        spec = site.network(nic.network)
        mac = nic.mac or mac_for(vm_id, i)
        out.append(NicPlan(i, spec, mac, tap_name(vm_id, i) if spec.mode == "bridge" else None))
    return out


def bridges_script(host: str, plans: list[NicPlan]) -> str:
    """A POSIX shell script run on the host before QEMU starts: each bridge the NICs need is there
    (made when the network allows: MTU, uplink, VLAN filtering where the kernel has it). Exit 3
    and one line on stderr for a bridge that is missing and may not be made."""
    lines = ["set -e"]
    done: set[str] = set()
    for p in plans:
        if p.tap is None or p.bridge in done:
            continue
        done.add(p.bridge)
        net, br = p.network, shlex.quote(p.bridge)
        # made by another VM's start at the same moment: as good as made here
        make = [f"{{ ip link add {br} type bridge stp_state 0 || [ -d /sys/class/net/{br}/bridge ]; }}"]
        if net.mtu:
            make.append(f"ip link set {br} mtu {int(net.mtu)}")
        uplink = net.uplinks.get(host)
        if uplink:
            make.append(f"ip link set {shlex.quote(uplink)} master {br} up")
        make.append(f"ip link set {br} up")
        if net.create:
            lines.append(f"ip link show dev {br} >/dev/null 2>&1 || {{ {'; '.join(make)}; }}")
        else:
            lines.append(f"ip link show dev {br} >/dev/null 2>&1 || {{ echo 'network {net.name}: bridge "
                         f"{p.bridge} is missing on host {host} and create = false' >&2; exit 3; }}")
        if net.vlan:
            vbr = shlex.quote(vlan_bridge(p.bridge, net.vlan))
            lines.append(f"if [ \"$(cat /sys/class/net/{br}/bridge/vlan_filtering 2>/dev/null)\" != 1 ] && "
                         f"! ip link set {br} type bridge vlan_filtering 1 2>/dev/null; then "
                         f"ip link show dev {vbr} >/dev/null 2>&1 || "
                         f"{{ {{ ip link add {vbr} type bridge stp_state 0 || [ -d /sys/class/net/{vbr}/bridge ]; }}"
                         f" && ip link set {vbr} up; }}; fi")
    return "\n".join(lines) + "\n"


def vlan_bridge(bridge: str, vlan: int) -> str:
    """The bridge that is VLAN `vlan` of `bridge` on a kernel without bridge VLAN filtering."""
    return f"{bridge}v{vlan}"[:15]


def attach_script(plans: list[NicPlan]) -> str:
    """Run on the host right after QEMU made its taps: each tap joins its bridge (or its VLAN)."""
    lines = ["set -e"]
    for p in plans:
        if p.tap is None:
            continue
        tap, br, net = shlex.quote(p.tap), shlex.quote(p.bridge), p.network
        if net.mtu:
            lines.append(f"ip link set {tap} mtu {int(net.mtu)}")
        if net.vlan:
            vbr = shlex.quote(vlan_bridge(p.bridge, net.vlan))
            lines.append(f"if [ \"$(cat /sys/class/net/{br}/bridge/vlan_filtering 2>/dev/null)\" = 1 ]; then "
                         f"ip link set {tap} master {br} && bridge vlan add dev {tap} vid {int(net.vlan)} pvid untagged"
                         f" && bridge vlan del dev {tap} vid 1; else ip link set {tap} master {vbr}; fi")
        else:
            lines.append(f"ip link set {tap} master {br}")
        lines.append(f"ip link set {tap} up")
    return "\n".join(lines) + "\n"


# QEMU's announce-self (QMP, QEMU 4.0+): a RARP from each NIC's MAC for the switches, and on virtio-net
# the guest asked (VIRTIO_NET_F_GUEST_ANNOUNCE) to send gratuitous ARP for its own addresses, so the
# neighbours' caches learn the MAC that now holds an address. Rounds 50 ms apart, then 150, 250 ms.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 3, "step": 100}


async def announce(qmp) -> None:
    """Ask a running VM's NICs (through its QMP `qmp`) to announce themselves: after an address moved
    to it (a cutover's target taking the source's address) nothing else tells the neighbours at once,
    and a router may hold the old MAC for hours. Needs no tool inside the guest."""
    await qmp.execute("announce-self", dict(ANNOUNCE))
