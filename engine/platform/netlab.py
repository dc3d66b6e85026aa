"""The lab as real machines: network namespaces on this machine, each with its own address and
its own OpenSSH sshd, reached over SSH exactly as a production host is (issue 12).

Layout (every name carries the lab's tag, so two workspaces' labs never meet):

    root namespace (Ferry)            ferry-TAG-sw (the lab's switch)        ferry-TAG-lab1 ...
      fmTAG 10.231.0.1/24  ──veth──▶  bridge mgmt ◀──veth── mN ──────────▶  eth0 10.231.0.11/24, sshd
                                      bridge lab  ◀──veth── lN ──────────▶  uplink ─ bridge br-lab (VM taps)
                                           ▲
                                      dhcpp ─veth─ dhcp 10.231.1.1/24, dnsmasq (DHCP only)
                                      bridge labvV ◀─veth── lNvV ────────▶  uplinkvV ─ bridge br-labvV (VLAN V)

VLANs (port groups) of the VM network: this project's kernels have neither 802.1Q nor bridge VLAN
filtering, so a VM NIC on VLAN V of br-lab joins a bridge of its own on its host, br-labvV (the
name nics.vlan_bridge gives). For each VLAN id in `vlans` the lab links those bridges between its
hosts as a segment of its own: a bridge labvV in the switch namespace, one veth per host. No DHCP
on them (dnsmasq serves the untagged `lab` segment only).

DHCP on the VM network `lab`: Debian's dnsmasq, run by the lab in its switch namespace on a veth
whose other end is a port of the `lab` bridge, hands out addresses of the lab's VM subnet (by
default the block right after the management subnet; never routed, no address of it on this
machine). DHCP only: no DNS (port 0), no router (option 3 empty): the lab has no way out. The
upper half of the VM subnet is the dynamic pool; static leases (`reserve`: a MAC and an address
of the lower half) live in the lab folder's dhcp/hosts, so a VM keeps its address wherever it
runs: the lease follows its MAC. The lease file is dhcp/leases.

Isolation: the namespaces have no default route and no uplink; the only link out of the lab is
the management veth of the root namespace, whose subnet is the lab's own (refused when it
overlaps a route of this machine), fenced by an nftables table that lets in only replies to what
Ferry opened and forwards nothing. Nothing in a lab host can reach an address outside the lab,
nor a service of this machine.

Every step checks what is already there before doing it, so `up` after a kill midway repairs a
half-made lab and `up` of a running lab changes nothing (re-adopted, not rebuilt). `down` kills
every process of the lab's namespaces (sshd, QEMU) and deletes the namespaces: their veths go with
them.

Needs root (CAP_NET_ADMIN and sshd's privilege separation). Private keys are throw-away lab keys
written 0600 into the workspace's lab folder; only their paths are ever logged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FerryError
from ..logs import logger
from ..vm.nics import vlan_bridge

log = logger("ferry.netlab")

SSHD = "/usr/sbin/sshd"
DNSMASQ = "/usr/sbin/dnsmasq"
DEFAULT_SUBNET = "10.231.0.0/24"
FIRST_HOST = 11            # lab1 is .11, lab2 .12, ...
VM_BRIDGE = "br-lab"       # the VM network's bridge on each lab host


class NetLabError(FerryError):
    """The network lab cannot be built or reached (one line, with a hint)."""


@dataclass(frozen=True)
class NetLab:
    root: Path                                  # the workspace's lab folder
    hosts: tuple[str, ...] = ("lab1", "lab2", "lab3")
    subnet: str = DEFAULT_SUBNET
    vm_subnet: str | None = None                # the VM network's addresses; None: the block after `subnet`
    vlans: tuple[int, ...] = ()                 # VLAN ids of br-lab whose per-VLAN bridges the lab links

    # ------------------------------------------------------------------ names and addresses

    @property
    def tag(self) -> str:
        """Six hex digits naming this lab (from its folder): namespaces and links carry it."""
        return hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:6]

    @property
    def switch(self) -> str:
        return f"ferry-{self.tag}-sw"

    def ns(self, host: str) -> str:
        return f"ferry-{self.tag}-{host}"

    @property
    def namespaces(self) -> list[str]:
        return [self.switch] + [self.ns(h) for h in self.hosts]

    @property
    def root_link(self) -> str:
        return f"fm{self.tag}"                  # <= 15 characters, as Linux wants

    def vlan_links(self, host: str, vlan: int) -> tuple[str, str, str, str]:
        """VLAN `vlan` between the switch and `host`: the switch's bridge, its veth end, the host's
        veth end and the host's per-VLAN bridge (each <= 15 characters)."""
        return f"labv{vlan}", f"l{self.hosts.index(host) + 1}v{vlan}", f"uplinkv{vlan}", vlan_bridge(VM_BRIDGE, vlan)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        """The root namespace's address on the lab segment (Ferry's side; it routes nothing)."""
        return str(self.network[1])

    def address(self, host: str) -> str:
        return str(self.network[FIRST_HOST + self.hosts.index(host)])

    @property
    def prefix(self) -> int:
        return self.network.prefixlen

    @property
    def vm_network(self) -> ipaddress.IPv4Network:
        """The addresses VMs on the `lab` network get (DHCP): the same size as the management
        subnet, right after it, unless set."""
        if self.vm_subnet:
            return ipaddress.IPv4Network(self.vm_subnet)
        mgmt = self.network
        return ipaddress.IPv4Network(f"{mgmt.network_address + mgmt.num_addresses}/{mgmt.prefixlen}")

    @property
    def dhcp_server(self) -> str:
        """dnsmasq's address on the VM network (in the switch namespace)."""
        return str(self.vm_network[1])

    @property
    def dhcp_pool(self) -> tuple[str, str]:
        """The dynamic range: the upper half of the VM subnet (the lower half is for static leases)."""
        net = self.vm_network
        return str(net[net.num_addresses // 2]), str(net[-2])

    @property
    def static_pool(self) -> tuple[str, str]:
        """Where `reserve` takes addresses from: the lower half, after dnsmasq's own, below the
        addresses of this machine and the lab hosts on the VM network (the top of that half)."""
        net = self.vm_network
        return str(net[2]), str(net[net.num_addresses // 2 - 2 - len(self.hosts)])

    @property
    def vm_leg(self) -> str:
        """This machine's link onto the VM network (a veth into the switch's `lab` bridge)."""
        return f"fv{self.tag}"

    @property
    def vm_leg_address(self) -> str:
        """This machine's address on the VM network: it reaches the lab's VMs (a server to migrate,
        a receiver), fenced as on the management segment: only replies come in."""
        net = self.vm_network
        return str(net[net.num_addresses // 2 - 1])

    def vm_address(self, host: str) -> str:
        """A lab host's address on the VM network (on its `br-lab`): where it meets the VMs, e.g. as
        a migration address or the end of a network check."""
        net = self.vm_network
        return str(net[net.num_addresses // 2 - 2 - self.hosts.index(host)])

    @property
    def dhcp_dir(self) -> Path:
        return self.root / "dhcp"

    @property
    def leases_file(self) -> Path:
        return self.dhcp_dir / "leases"

    @property
    def hosts_file(self) -> Path:
        """The static leases, one `MAC,ADDRESS` a line (dnsmasq's dhcp-hostsfile)."""
        return self.dhcp_dir / "hosts"

    def host_dir(self, host: str) -> Path:
        return self.root / host / "sshd"

    @property
    def identity(self) -> Path:
        """The lab's throw-away client key (private; 0600)."""
        return self.root / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "ssh" / "known_hosts"

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, dict]:
        """Per host: its namespace, address, sshd pid (None: not running), whether sshd answers, and
        the VLANs (of `vlans`) whose bridge on the host is linked to the switch."""
        present = set(_netns_list())
        switch = _masters(self.switch) if self.vlans and self.switch in present else {}
        out: dict[str, dict] = {}
        for h in self.hosts:
            pid = _pidfile(self.host_dir(h) / "sshd.pid")
            host = _masters(self.ns(h)) if self.vlans and self.ns(h) in present else {}
            links = [(v, *self.vlan_links(h, v)) for v in self.vlans]
            linked = [v for v, sw_br, sw_end, host_end, host_br in links
                      if switch.get(sw_end) == sw_br and host.get(host_end) == host_br]
            out[h] = {"namespace": self.ns(h), "present": self.ns(h) in present, "address": self.address(h),
                      "sshd": pid, "answers": bool(pid) and _banner(self.address(h)), "vlans": linked}
        return out

    def is_up(self) -> bool:
        return (all(s["answers"] and len(s["vlans"]) == len(self.vlans) for s in self.status().values())
                and self.dhcp_status()["running"])

    def dhcp_status(self) -> dict:
        """The VM network's DHCP server: its pid (None: not running), address, pool and leases."""
        pid = self._dnsmasq_pid()
        return {"running": pid is not None, "pid": pid, "address": self.dhcp_server,
                "subnet": str(self.vm_network), "pool": list(self.dhcp_pool),
                "static": self.reservations(), "leases": self.leases()}

    def leases(self) -> list[dict]:
        """dnsmasq's current leases: mac, address, expiry (epoch seconds), client hostname."""
        try:
            lines = self.leases_file.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            f = line.split()
            if len(f) >= 4 and f[0] != "duid":
                out.append({"mac": f[1].lower(), "address": f[2], "expires": int(f[0]),
                            "hostname": None if f[3] == "*" else f[3]})
        return out

    # ------------------------------------------------------------------ static leases

    def reservations(self) -> dict[str, str]:
        """The static leases: MAC -> address."""
        try:
            lines = self.hosts_file.read_text().splitlines()
        except OSError:
            return {}
        out = {}
        for line in lines:
            mac, _, addr = line.strip().partition(",")
            if mac and addr:
                out[mac.lower()] = addr
        return out

    def reserve(self, mac: str, address: str | None = None) -> str:
        """A static lease: the NIC with `mac` always gets `address` (a free one of the static pool
        when None; the same one again when the MAC has one). Takes effect at its next DHCP request."""
        mac = mac.lower()
        have = self.reservations()
        lo, hi = (ipaddress.IPv4Address(a) for a in self.static_pool)
        if address is None:
            if mac in have:
                return have[mac]
            taken = set(have.values())
            address = next((str(a) for a in _hosts_between(lo, hi) if str(a) not in taken), None)
            if address is None:
                raise NetLabError(f"the lab's static DHCP pool {lo}-{hi} is full",
                                  "release a static lease (NetLab.release) or choose a larger vm subnet")
        ip = ipaddress.IPv4Address(address)
        if not lo <= ip <= hi:
            raise NetLabError(f"{address} is not in the lab's static DHCP pool {lo}-{hi}",
                              f"choose an address between {lo} and {hi}")
        other = next((m for m, a in have.items() if a == str(ip) and m != mac), None)
        if other:
            raise NetLabError(f"{address} is the static lease of {other} already",
                              "choose another address, or release that MAC's lease first")
        have[mac] = str(ip)
        self._write_hosts(have)
        return str(ip)

    def release(self, mac: str) -> bool:
        """Drops the static lease of `mac` (True: it had one)."""
        have = self.reservations()
        if have.pop(mac.lower(), None) is None:
            return False
        self._write_hosts(have)
        return True

    def _write_hosts(self, table: dict[str, str]) -> None:
        self.dhcp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{m},{a}\n" for m, a in sorted(table.items())))
        tmp.replace(self.hosts_file)
        pid = self._dnsmasq_pid()
        if pid:
            os.kill(pid, signal.SIGHUP)            # dnsmasq reads its dhcp-hostsfile again

    # ------------------------------------------------------------------ up

    def up(self, timeout: float = 15.0) -> None:
        """Build what is missing of the lab, start what is not running; raises NetLabError."""
        if os.geteuid() != 0:
            raise NetLabError("the network lab needs root (network namespaces, bridges, sshd)",
                              "run Ferry as root, or use the folder lab (transport = \"local\")")
        for tool in ("ip", "nft", "ssh-keygen", SSHD, DNSMASQ):
            if not _which(tool):
                raise NetLabError(f"the network lab needs {tool}, which this machine lacks",
                                  "scripts/bootstrap.sh install")
        self._check_subnet()
        self._keys()
        present = set(_netns_list())
        sw = self.switch
        if sw not in present:
            _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        for br in ("mgmt", "lab", *(f"labv{v}" for v in self.vlans)):
            _ensure_bridge(br, sw)
        if not _link_exists(self.root_link):
            _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", sw)
        _ip("-n", sw, "link", "set", "root", "master", "mgmt", "up")
        if not _link_exists(self.vm_leg):
            _ip("link", "add", self.vm_leg, "type", "veth", "peer", "name", "vmleg", "netns", sw)
        _ip("-n", sw, "link", "set", "vmleg", "master", "lab", "up")
        self._fence()
        _ensure_addr(self.root_link, f"{self.gateway}/{self.prefix}")
        _ip("link", "set", self.root_link, "up")
        _ensure_addr(self.vm_leg, f"{self.vm_leg_address}/{self.vm_network.prefixlen}")
        _ip("link", "set", self.vm_leg, "up")
        self._dhcp_up()
        for i, h in enumerate(self.hosts, 1):
            self._host_up(h, i, present)
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            while not _banner(self.address(h)):
                if time.monotonic() > deadline:
                    raise NetLabError(f"lab host {h} ({self.address(h)}): sshd does not answer",
                                      f"see {self.host_dir(h) / 'sshd.log'}")
                time.sleep(0.05)
        self._record_host_keys()

    def _check_subnet(self) -> None:
        mgmt, vms = self.network, self.vm_network
        if mgmt.overlaps(vms) or not vms.is_private:
            raise NetLabError(f"the lab's VM subnet {vms} overlaps its management subnet {mgmt} or is not private",
                              "set the VM subnet to another private range next to the management subnet")
        for mine in (mgmt, vms):
            self._check_route_overlap(mine)

    def _check_route_overlap(self, mine: ipaddress.IPv4Network) -> None:
        for other, dev in route_networks(json.loads(_run(["ip", "-j", "route", "show"]) or "[]")):
            if dev not in (self.root_link, self.vm_leg) and other.overlaps(mine):
                raise NetLabError(f"the lab subnet {mine} overlaps this machine's route to {other} (dev {dev})",
                                  "choose another lab subnet: [lab] subnet = \"10.232.0.0/24\" in config.toml")

    @property
    def fence_table(self) -> str:
        return f"ferry_lab_{self.tag}"

    def _fence(self) -> None:
        """This machine answers nothing that comes from the lab: a lab host reaches Ferry's side
        of the segment only with replies to connections Ferry opened (nftables, in and forward)."""
        links = f'{{ "{self.root_link}", "{self.vm_leg}" }}'
        rules = "\n".join([
            f"table inet {self.fence_table} {{",
            "  chain input { type filter hook input priority 0; policy accept;",
            f'    iifname {links} ct state established,related accept',
            f'    iifname {links} drop',
            "  }",
            "  chain forward { type filter hook forward priority 0; policy accept;",
            f'    iifname {links} drop',
            f'    oifname {links} drop',
            "  }",
            "}", ""])
        _run(["nft", "delete", "table", "inet", self.fence_table], check=False)
        p = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise NetLabError(f"nft: the lab's fence did not load: {p.stderr.strip()}",
                              "the kernel needs nf_tables with conntrack")

    def _dnsmasq_pid(self) -> int | None:
        pid = _pidfile(self.dhcp_dir / "dnsmasq.pid")
        return pid if pid and _netns_of(pid) == self.switch else None

    def _dhcp_up(self) -> None:
        """dnsmasq on the `lab` bridge of the switch: adopted when it runs, started when it does not."""
        sw = self.switch
        if not _link_exists("dhcp", sw):
            _ip("-n", sw, "link", "add", "dhcpp", "type", "veth", "peer", "name", "dhcp")
        _ip("-n", sw, "link", "set", "dhcpp", "master", "lab", "up")
        _ensure_addr("dhcp", f"{self.dhcp_server}/{self.vm_network.prefixlen}", sw)
        _ip("-n", sw, "link", "set", "dhcp", "up")
        self.dhcp_dir.mkdir(parents=True, exist_ok=True)
        if not self.hosts_file.exists():
            self.hosts_file.write_text("")
        pid = _pidfile(self.dhcp_dir / "dnsmasq.pid")
        if pid and _netns_of(pid) == sw:
            return
        if pid and _is_dnsmasq(pid):
            _kill_all([pid])                    # left in a namespace that lost its name: not ours any more
        lo, hi = self.dhcp_pool
        d = self.dhcp_dir
        argv = ["ip", "netns", "exec", sw, DNSMASQ,
                "--conf-file=/dev/null",         # nothing of this machine's dnsmasq configuration
                "--port=0",                      # DHCP only: no DNS, so no DNS server is handed out either
                "--interface=dhcp", "--bind-interfaces", "--except-interface=lo",
                f"--dhcp-range={lo},{hi},{self.vm_network.netmask},1h",
                "--dhcp-option=3",               # no router: the lab has no way out
                f"--dhcp-hostsfile={self.hosts_file}", f"--dhcp-leasefile={self.leases_file}",
                "--dhcp-authoritative", "--no-ping",  # no ping of an address before offering it: 3 s saved
                "--log-dhcp", f"--log-facility={d / 'dnsmasq.log'}",
                f"--pid-file={d / 'dnsmasq.pid'}",
                # root: the lab folder may be 0700 (dnsmasq re-reads the hosts file on SIGHUP)
                "--user=root", "--group=root"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise NetLabError(f"dnsmasq did not start on the lab network: {p.stderr.strip() or p.returncode}",
                              f"see {d / 'dnsmasq.log'}")
        log.info("lab network: dnsmasq serves %s-%s from %s in %s", lo, hi, self.dhcp_server, sw)

    def _keys(self) -> None:
        self.identity.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.identity.exists():
            _keygen(self.identity, "ferry-lab-client")
        for h in self.hosts:
            d = self.host_dir(h)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not (d / "ssh_host_ed25519_key").exists():
                _keygen(d / "ssh_host_ed25519_key", f"ferry-lab-{h}")
            (d / "authorized_keys").write_text(self.identity.with_suffix(".pub").read_text())

    def _host_up(self, host: str, index: int, present: set[str]) -> None:
        ns, sw = self.ns(host), self.switch
        if ns not in present:
            _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        vlans = [self.vlan_links(host, v) for v in self.vlans]
        for sw_end, host_end, bridge in ((f"m{index}", "eth0", "mgmt"), (f"l{index}", "uplink", "lab"),
                                         *((s, h, b) for b, s, h, _ in vlans)):
            if not _link_exists(host_end, ns):
                if _link_exists(sw_end, sw):        # its other end went with a deleted namespace: redo
                    _ip("-n", sw, "link", "del", sw_end)
                _ip("-n", sw, "link", "add", sw_end, "type", "veth", "peer", "name", host_end, "netns", ns)
            _ip("-n", sw, "link", "set", sw_end, "master", bridge, "up")
        _ensure_addr("eth0", f"{self.address(host)}/{self.prefix}", ns)
        _ip("-n", ns, "link", "set", "eth0", "up")
        # The VM network: a bridge for the VMs' taps, its uplink to the lab switch. (This machine's
        # kernel has neither 802.1Q nor bridge VLAN filtering: VLANs come as segments of their own,
        # each a bridge made as a VM start would make it, so that a VM start finds it and only
        # attaches its tap.)
        for host_end, bridge in (("uplink", VM_BRIDGE), *((h, b) for _, _, h, b in vlans)):
            _ensure_bridge(bridge, ns)
            _ip("-n", ns, "link", "set", host_end, "master", bridge, "up")
        _ensure_addr(VM_BRIDGE, f"{self.vm_address(host)}/{self.vm_network.prefixlen}", ns)
        d = self.host_dir(host)
        pid = _pidfile(d / "sshd.pid")
        if pid and _netns_of(pid) != ns:
            _kill_all([pid])        # the lab's sshd, left in a namespace that lost its name: not ours any more
            pid = None
        if not pid:
            # this machine may remember the host's old link address: forget it
            _run(["ip", "neigh", "flush", "to", self.address(host), "dev", self.root_link], check=False)
            self._start_sshd(host)

    def _start_sshd(self, host: str) -> None:
        d = self.host_dir(host)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        cfg = d / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {self.address(host)}",
            "Port 22",
            f"HostKey {d / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"PidFile {d / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "Subsystem sftp internal-sftp",
            "AllowStreamLocalForwarding yes", "AllowTcpForwarding yes", "MaxSessions 64",
            "MaxStartups 64:30:128", "PrintMotd no", "PermitUserRC no", "UseDNS no", "SetEnv SHLVL=1",
            "LogLevel INFO", ""]))
        with open(d / "sshd.log", "ab") as logf:
            # sshd daemonises (its pid goes to PidFile); -E appends its log to the file.
            subprocess.run(["ip", "netns", "exec", self.ns(host), SSHD, "-f", str(cfg), "-E", str(d / "sshd.log")],
                           stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, check=False, timeout=30)
        log.info("lab host %s: sshd started in %s at %s", host, self.ns(host), self.address(host))

    def _record_host_keys(self) -> None:
        lines = []
        for h in self.hosts:
            pub = (self.host_dir(h) / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{self.address(h)} {pub[0]} {pub[1]}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ down

    def down(self) -> list[str]:
        """Stop every process of the lab's namespaces and delete them; returns what was removed."""
        removed: list[str] = []
        dnsmasq = _pidfile(self.dhcp_dir / "dnsmasq.pid")
        # a host's sshd left in a namespace that lost its name (`ip netns del` by hand) is ours too
        strays = [pid for h in self.hosts if (pid := _pidfile(self.host_dir(h) / "sshd.pid"))
                  and _runs_config(pid, self.host_dir(h) / "sshd_config")]
        present = set(_netns_list())
        for ns in self.namespaces:
            if ns not in present:
                continue
            _kill_all(_netns_pids(ns))
            _ip("netns", "del", ns)
            removed.append(ns)
        _kill_all([p for p in strays if _pidfile_state(p) not in ("gone", "Z")])
        for h in self.hosts:
            (self.host_dir(h) / "sshd.pid").unlink(missing_ok=True)
        if dnsmasq and _is_dnsmasq(dnsmasq):    # also one whose namespace lost its name
            _kill_all([dnsmasq])
            removed.append(f"dnsmasq {dnsmasq}")
        (self.dhcp_dir / "dnsmasq.pid").unlink(missing_ok=True)
        for link in (self.root_link, self.vm_leg):     # (gone with the switch's namespace, normally)
            if _link_exists(link):
                _ip("link", "del", link)
                removed.append(link)
        if subprocess.run(["nft", "delete", "table", "inet", self.fence_table], capture_output=True,
                          timeout=30).returncode == 0:
            removed.append(f"nft table {self.fence_table}")
        return removed


# ---------------------------------------------------------------------- helpers


def route_networks(routes: list[dict]) -> list[tuple[ipaddress.IPv4Network, str | None]]:
    """(destination, device) of each route `ip -j route` lists, but the default route."""
    out = []
    for route in routes:
        dst = route.get("dst", "")
        if not dst or dst == "default":
            continue
        try:
            out.append((ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False), route.get("dev")))
        except ValueError:
            continue
    return out


def _run(argv: list[str], *, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetLabError(f"{' '.join(argv)}: {p.stderr.strip() or 'exit ' + str(p.returncode)}",
                          "`ferry lab down` then `ferry lab up` rebuilds the lab")
    return p.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


def _which(tool: str) -> bool:
    from shutil import which
    return bool(which(tool)) or Path(tool).exists()


def _netns_list() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).strip()
    return [n["name"] for n in json.loads(out)] if out else []


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]


def _netns_of(pid: int) -> str | None:
    """The named namespace a process lives in (None: none of them, or gone)."""
    out = _run(["ip", "netns", "identify", str(pid)], check=False).strip()
    return out or None


def _link_exists(name: str, ns: str | None = None) -> bool:
    argv = ["ip", *(["-n", ns] if ns else []), "-j", "link", "show", "dev", name]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def _ensure_bridge(name: str, ns: str) -> None:
    """A bridge `name` in `ns`, up (made, stp off, when absent; a VM start may make it at the same moment)."""
    if not _link_exists(name, ns):
        made = subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "bridge", "stp_state", "0"],
                              capture_output=True, text=True, timeout=30)
        if made.returncode != 0 and not _link_exists(name, ns):
            raise NetLabError(f"ip -n {ns} link add {name} type bridge: {made.stderr.strip()}",
                              "`ferry lab down` then `ferry lab up` rebuilds the lab")
    _ip("-n", ns, "link", "set", name, "up")


def _masters(ns: str) -> dict[str, str]:
    """Each link of `ns` that is a port of a bridge: link -> bridge."""
    links = json.loads(_run(["ip", "-n", ns, "-j", "link", "show"], check=False) or "[]")
    return {i["ifname"]: i["master"] for i in links if i.get("master")}


def _ensure_addr(dev: str, cidr: str, ns: str | None = None) -> None:
    pre = ["-n", ns] if ns else []
    info = json.loads(_run(["ip", *pre, "-j", "addr", "show", "dev", dev]) or "[]")
    have = {f"{a['local']}/{a['prefixlen']}" for i in info for a in i.get("addr_info", [])}
    if cidr not in have:
        _ip(*pre, "addr", "add", cidr, "dev", dev)


def _keygen(path: Path, comment: str) -> None:
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)


def _pidfile(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return None if f.read().rsplit(")", 1)[1].split()[0] == "Z" else pid
    except OSError:
        return None


def _banner(address: str, port: int = 22) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _kill_all(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and _pidfile_state(p) != "Z"]
            time.sleep(0.02)
        pids = alive
        if not pids:
            return


def _is_dnsmasq(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "dnsmasq"
    except OSError:
        return False


def _hosts_between(lo: ipaddress.IPv4Address, hi: ipaddress.IPv4Address):
    a = lo
    while a <= hi:
        yield a
        a += 1


def _pidfile_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _runs_config(pid: int, config: Path) -> bool:
    """Is `pid` an sshd started with this config file (not some other process that took the pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # sshd rewrites its argv into one title ("sshd: /usr/sbin/sshd -f CONFIG … [listener]")
    return f" -f {config} ".encode() in cmdline.replace(b"\0", b" ") + b" "
