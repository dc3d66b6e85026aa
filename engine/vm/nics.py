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
- A VLAN (a port group) leaves the host tagged on the network's uplink, in one of two ways (the
  ways of Proxmox's VLAN-aware and traditional bridges):
  - the bridge filters VLANs (802.1Q filtering on: Ferry made it for a VLAN network where the
    kernel can, or its operator set it): the tap joins it with the VID as its untagged PVID and
    the uplink carries the VID tagged (`bridge vlan add`);
  - it does not: the VLAN is a bridge of its own, `<bridge>v<vlan>`, whose uplink is the 802.1Q
    sub-interface `<uplink>.<vlan>` Ferry makes (the network's MTU). A kernel without 802.1Q
    cannot do this: the start fails, saying so in one line. Without an uplink the VLAN's bridge
    stays on its host, for the site (or the lab, which links them between its hosts) to connect.
  Ferry never switches VLAN filtering on for a bridge that is there already (one it adopts):
  its other ports (the host's own address, other VMs' taps, tagged traffic) would all be
  filtered from then on, with no word said; such a bridge gets the second way.
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
    uplink: str | None = None        # the network's uplink on the host (config.toml uplinks)

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
        out.append(NicPlan(i, spec, mac, tap_name(vm_id, i) if spec.mode == "bridge" else None,
                           spec.uplinks.get(host)))
    return out


def bridges_script(host: str, plans: list[NicPlan]) -> str:
    """A POSIX shell script run on the host before QEMU starts: each bridge the NICs need is there
    (made when the network allows: MTU, uplink, VLAN filtering for a VLAN network where the kernel
    has it), and each VLAN reaches the network's uplink (see the module's docstring). Exit 3 and
    one line on stderr for a bridge that is missing and may not be made; exit 4 and one line for a
    VLAN that cannot leave the host."""
    lines = ["set -e"]
    taps = [p for p in plans if p.tap is not None]
    for bridge in dict.fromkeys(p.bridge for p in taps):
        on = [p for p in taps if p.bridge == bridge]
        net, br, uplink = on[0].network, shlex.quote(bridge), on[0].uplink
        # made by another VM's start at the same moment: as good as made here. VLAN filtering is
        # asked for as the bridge is made (where the kernel has it), so no one sees it without
        add = f"ip link add {br} type bridge stp_state 0"
        tries = [add + " vlan_filtering 1 2>/dev/null", add] if any(p.network.vlan for p in on) else [add]
        make = [f"{{ {' || '.join(tries)} || [ -d /sys/class/net/{br}/bridge ]; }}"]
        if net.mtu:
            make.append(f"ip link set {br} mtu {int(net.mtu)}")
        if uplink:
            make.append(f"ip link set {shlex.quote(uplink)} master {br} up")
        make.append(f"ip link set {br} up")
        if net.create:
            lines.append(f"ip link show dev {br} >/dev/null 2>&1 || {{ {'; '.join(make)}; }}")
        else:
            lines.append(f"ip link show dev {br} >/dev/null 2>&1 || {{ echo 'network {net.name}: bridge "
                         f"{bridge} is missing on host {host} and create = false' >&2; exit 3; }}")
        done: set[tuple[int, str | None]] = set()
        for p in on:
            if p.network.vlan and (p.network.vlan, p.uplink) not in done:
                done.add((p.network.vlan, p.uplink))
                lines.append(_vlan_script(host, p))
    return "\n".join(lines) + "\n"


def _vlan_script(host: str, p: NicPlan) -> str:
    """VLAN `p.network.vlan` of `p.bridge` reaches the uplink: tagged on a filtering bridge, else by
    the sub-interface <uplink>.<vlan> on the VLAN's own bridge (each made here when absent)."""
    net, vid = p.network, int(p.network.vlan)
    br, vbr = shlex.quote(p.bridge), shlex.quote(vlan_bridge(p.bridge, vid))
    out = [f"if [ \"$(cat /sys/class/net/{br}/bridge/vlan_filtering 2>/dev/null)\" = 1 ]; then"]
    if p.uplink:
        out.append(f"  bridge vlan add dev {shlex.quote(p.uplink)} vid {vid}")
    else:
        out.append("  :")
    out += ["else",
            f"  ip link show dev {vbr} >/dev/null 2>&1 || {{ {{ ip link add {vbr} type bridge stp_state 0 || "
            f"[ -d /sys/class/net/{vbr}/bridge ]; }}; " + (f"ip link set {vbr} mtu {int(net.mtu)}; " if net.mtu else "")
            + f"ip link set {vbr} up; }}"]
    if p.uplink:
        up, name = shlex.quote(p.uplink), vlan_uplink(p.uplink, vid)
        sub = shlex.quote(name)
        said = f"network {net.name}: VLAN {vid} cannot leave host {host} by its uplink {p.uplink}"
        out += [
            f"  [ -e /sys/class/net/{up} ] || {{ echo {shlex.quote(said + ': there is no ' + p.uplink)} >&2; exit 4; }}",
            f"  if [ ! -e /sys/class/net/{sub} ]; then",
            f"    err=$(ip link add link {up} name {sub} type vlan id {vid} 2>&1) || [ -e /sys/class/net/{sub} ] || {{",
            "      [ -d /proc/net/vlan ] || err='the kernel has no 802.1Q VLAN interfaces (load 8021q: modprobe 8021q)'",
            f"      echo {shlex.quote(said + f' ({p.bridge} does not filter VLANs, so it takes {name}): ')}\"$err\" >&2",
            "      exit 4; }",
            "  fi",
            # an operator's own sub-interface, on a bridge of theirs: not taken from it
            f"  m=$(readlink /sys/class/net/{sub}/master 2>/dev/null || true)",
            f"  case \"$m\" in ''|*/{vbr}) ;; *) echo {shlex.quote(f'network {net.name}: {name} on host {host} is a port of bridge ')}"
            f"\"${{m##*/}}\"{shlex.quote(f', not of {vlan_bridge(p.bridge, vid)}')} >&2; exit 4;; esac",
            *([f"  ip link set {sub} mtu {int(net.mtu)}"] if net.mtu else []),
            f"  ip link set {up} up", f"  ip link set {sub} master {vbr}", f"  ip link set {sub} up"]
    out.append("fi")
    return "\n".join(out)


def vlan_uplink(uplink: str, vlan: int) -> str:
    """The 802.1Q sub-interface of `uplink` for VLAN `vlan`: `<uplink>.<vlan>`, or where that is
    longer than Linux's 15 characters, 'fu' + 7 hex of the uplink's name + '.<vlan>'."""
    name = f"{uplink}.{vlan}"
    return name if len(name) <= 15 else f"fu{hashlib.sha256(uplink.encode()).hexdigest()[:7]}.{vlan}"


def vlan_bridge(bridge: str, vlan: int) -> str:
    """The bridge that is VLAN `vlan` of `bridge` where `bridge` does not filter VLANs."""
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
