"""The network lab as the engine serves it (`ferry lab up|down|status`): the lab of a workspace,
what `up` built or repaired and what `down` removed, as typed records (issue 12).

The lab of workspace W lives in W/lab (the folder lab's runtime and datastores stay there too):
W/lab/HOST/sshd holds each host's sshd, W/lab/ssh the throw-away client key. `up` also trusts the
lab's host keys in W/known_hosts, so the SSH transport verifies them as it does any host's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import LAB_HOSTS, SiteConfig
from ..errors import Refused
from .netlab import VM_BRIDGE, NetLab, NetLabError, _link_exists, _netns_list, route_networks


@dataclass(frozen=True)
class LabHost:
    """One host of the network lab: its namespace, address and sshd."""
    name: str
    namespace: str
    address: str
    present: bool                 # its namespace exists
    sshd: int | None              # the pid of its sshd (None: not running)
    answers: bool                 # its sshd answers on the address


@dataclass(frozen=True)
class LabDhcp:
    """The DHCP server of the lab's VM network (dnsmasq in the lab's switch namespace)."""
    running: bool
    pid: int | None
    address: str                  # the server's address on the VM network
    subnet: str                   # the VM network (never routed)
    pool: tuple[str, ...]         # first and last address handed out dynamically
    leases: int                   # leases held now
    static: int                   # static leases (by MAC)


@dataclass(frozen=True)
class LabStatus:
    """The network lab of a workspace; `changed` lists what the call built, repaired or removed."""
    folder: str
    subnet: str
    gateway: str                  # this machine's address on the lab segment
    hosts: tuple[LabHost, ...]
    up: bool                      # every host is there and answers
    configured: bool              # config.toml's site is this lab ([lab] network = true)
    changed: tuple[str, ...] = ()
    dhcp: LabDhcp | None = None
    folders: str = ""             # the site is the folder lab: why it is not the network lab, in one line


NETWORK_LAB_TOOLS = ("ip", "nft", "sshd", "dnsmasq")


def network_lab_default(workspace_root: Path | None = None) -> str | None:
    """None when the built-in lab (a workspace without config.toml) is the network lab: Ferry is root
    and has what it takes. Else why its hosts are folders on this machine, in one line.
    FERRY_LAB=folders asks for the folder lab in a workspace that has no network lab yet (one that
    has, W/lab/subnet kept, stays one: the test suite's default is folders, and its network-lab
    workspaces keep theirs)."""
    has_one = workspace_root is not None and (Path(workspace_root) / "lab" / "subnet").exists()
    if os.environ.get("FERRY_LAB", "").strip().lower() == "folders" and not has_one:
        return f"the lab's hosts are folders on this machine (FERRY_LAB=folders){FOLDER_LAB_NICS}"
    if os.geteuid() != 0:
        return ("the lab's hosts are folders on this machine: Ferry is not root, and a lab of network "
                f"namespaces reached over SSH needs root{FOLDER_LAB_NICS}")
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [t for t in NETWORK_LAB_TOOLS if shutil.which(t, path=path) is None]
    if missing:
        return (f"the lab's hosts are folders on this machine: {', '.join(missing)} missing "
                f"(scripts/bootstrap.sh installs them){FOLDER_LAB_NICS}")
    return None


# what the folder lab's VMs get instead of a network spanning the hosts (no bridges, no taps)
FOLDER_LAB_NICS = "; VM NICs use QEMU's user-mode networking, each isolated to its guest"


def workspace_subnet(workspace_root: Path) -> str:
    """The management subnet of the workspace's built-in network lab: chosen once (from the
    workspace's path, skipping any subnet this machine routes, its VM subnet the next /24 included)
    and kept in W/lab/subnet, so that two workspaces' labs stand side by side and a lab is found
    again at the same addresses."""
    kept = Path(workspace_root) / "lab" / "subnet"
    try:
        return kept.read_text().strip()
    except FileNotFoundError:
        pass
    used = routed_networks()
    seed = int(hashlib.sha256(str(Path(workspace_root).resolve()).encode()).hexdigest(), 16)
    blocks = 31 * 128                         # 10.200.0.0 - 10.230.254.0, even third octets
    for i in range(blocks):
        k = (seed + i) % blocks
        mgmt = ipaddress.IPv4Network(f"10.{200 + k // 128}.{(k % 128) * 2}.0/24")
        if lab_subnet_free(mgmt, used):
            break
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(f"{mgmt}\n")
    os.replace(tmp, kept)
    return str(mgmt)


def lab_subnet_free(mgmt: ipaddress.IPv4Network, used: list[ipaddress.IPv4Network]) -> bool:
    """Whether a lab's management subnet and its VM subnet (the next /24) are clear of `used`."""
    vms = ipaddress.IPv4Network(f"{mgmt.network_address + 256}/24")
    return not any(mgmt.overlaps(u) or vms.overlaps(u) for u in used)


def routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination this machine routes or has an address in (not the default route)."""
    def ip_json(*args: str) -> list[dict]:
        try:
            return json.loads(subprocess.run(["ip", "-j", "-4", *args], capture_output=True, text=True,
                                             timeout=10).stdout or "[]")
        except (OSError, ValueError, subprocess.SubprocessError):
            return []
    addresses = [{"dst": f"{a['local']}/{a['prefixlen']}"} for link in ip_json("addr", "show")
                 for a in link.get("addr_info", []) if a.get("family") == "inet"]
    return [net for net, _dev in route_networks(ip_json("route", "show", "table", "all") + addresses)]


def lab_of(workspace_root: Path, subnet: str, vlans: tuple[int, ...] = ()) -> NetLab:
    """The network lab of the workspace: its folder lab's hosts, in `subnet`, its switch linking
    the VLANs `vlans` of br-lab between them (lab_vlans: those of the site's networks)."""
    return NetLab(Path(workspace_root) / "lab", tuple(h for h, _ in LAB_HOSTS), subnet, vlans=vlans)


def lab_vlans(site: SiteConfig) -> tuple[int, ...]:
    """The VLAN ids of the site's networks on the lab's VM bridge (br-lab), which the lab links
    between its hosts. (A VLAN of another bridge stays on its host, as that bridge does.)"""
    return tuple(sorted({n.vlan for n in site.networks.values()
                         if n.mode == "bridge" and n.bridge == VM_BRIDGE and n.vlan}))


def status(lab: NetLab, *, configured: bool, changed: tuple[str, ...] = ()) -> LabStatus:
    """Each host of the lab as it is now (blocking: a banner read per host)."""
    hosts = tuple(LabHost(h, s["namespace"], s["address"], bool(s["present"]), s["sshd"], bool(s["answers"]))
                  for h, s in lab.status().items())
    d = lab.dhcp_status()
    dhcp = LabDhcp(d["running"], d["pid"], d["address"], d["subnet"], tuple(d["pool"]), len(d["leases"]),
                   len(d["static"]))
    whole = all(h.present and h.answers for h in hosts) and dhcp.running
    return LabStatus(str(lab.root), lab.subnet, lab.gateway, hosts, whole, configured, changed, dhcp)


def _inventory(lab: NetLab) -> set[str]:
    present = set(_netns_list())
    have = {f"namespace {ns}" for ns in lab.namespaces if ns in present}
    if _link_exists(lab.root_link):
        have.add(f"link {lab.root_link}")
    for h, s in lab.status().items():
        if s["sshd"]:
            have.add(f"sshd of {h} (pid {s['sshd']})")
    pid = lab.dhcp_status()["pid"]
    if pid:
        have.add(f"dhcp server (dnsmasq pid {pid})")
    return have


def _needs_root(e: NetLabError) -> Exception:
    """Without root the lab cannot be; said as a refusal (exit 2), nothing was done."""
    return Refused(e.message, e.hint) if os.geteuid() != 0 else e


def up(lab: NetLab, known_hosts: Path, *, configured: bool) -> LabStatus:
    """Build what is missing of the lab, start what is not running (blocking: run it in a thread)."""
    before = _inventory(lab)
    try:
        lab.up()
    except NetLabError as e:
        raise _needs_root(e) from None
    built = sorted(_inventory(lab) - before)
    from ..transport.knownhosts import record_host_key_sync
    for h in lab.hosts:
        kind, key = (lab.host_dir(h) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        record_host_key_sync(known_hosts, lab.address(h), f"{kind} {key}")
    return status(lab, configured=configured, changed=tuple(built))


def down(lab: NetLab, *, configured: bool) -> LabStatus:
    """Stop every process of the lab and remove its namespaces, links and fence (blocking)."""
    if os.geteuid() != 0:
        raise Refused("the network lab needs root (network namespaces, bridges, sshd)",
                      "run Ferry as root; without root there is no network lab to take down")
    removed = lab.down()
    return status(lab, configured=configured, changed=tuple(removed))
