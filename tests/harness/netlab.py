"""A lab workspace whose hosts are the network lab's namespaces, reached over SSH (issue 12)."""

from __future__ import annotations

import json
import random
import textwrap
import tomllib
from pathlib import Path
from typing import Iterator

from ferry.engine.platform.netlab import VM_BRIDGE, NetLab

from .lab import lab_workspace


def random_subnet() -> str:
    """A management subnet of its own (its VM subnet is the next /24), neither in use by this machine
    (another lab of the suite, running in another worker, or one a killed run left): tried at random."""
    import ipaddress
    import json
    import subprocess

    from ferry.engine.platform.netlab import route_networks
    routes = json.loads(subprocess.run(["ip", "-j", "route", "show"], capture_output=True, text=True).stdout or "[]")
    used = [net for net, _dev in route_networks(routes)]
    for _ in range(1000):
        mgmt = ipaddress.IPv4Network(f"10.{random.randint(232, 250)}.{random.randrange(0, 254, 2)}.0/24")
        vms = ipaddress.IPv4Network(f"{mgmt.network_address + 256}/24")
        if not any(mgmt.overlaps(u) or vms.overlaps(u) for u in used):
            return str(mgmt)
    raise AssertionError("no free 10.232-250.x.0/24 for a test lab")


def netlab_workspace(prefix: str, *, hosts: tuple[str, ...] = ("lab1", "lab3"), site: str = "netlab",
                     networks: str = "") -> Iterator[tuple[Path, NetLab]]:
    """For a module fixture (`yield from netlab_workspace("fnet-")`): a lab workspace, a network lab
    up, and a config.toml with `hosts` as SSH hosts at their lab addresses sharing one datastore,
    the `lab` network (br-lab, not created by Ferry) and `networks` (more TOML) on them; the lab
    links the VLANs of those on br-lab between its hosts."""
    gen = lab_workspace(prefix)
    ws = next(gen)
    more = tomllib.loads(textwrap.dedent(networks)).get("networks", {})
    vlans = tuple(sorted({n["vlan"] for n in more.values() if n.get("bridge") == VM_BRIDGE and n.get("vlan")}))
    lab = NetLab(ws / "netlab", subnet=random_subnet(), vlans=vlans)
    try:
        lab.up()
        (ws / "known_hosts").write_text(lab.known_hosts.read_text())
        entries = "".join(textwrap.dedent(f"""
            [hosts.{h}]
            cluster = "lab"
            transport = "ssh"
            address = "{lab.address(h)}"
            user = "root"
            identity = "{lab.identity}"
            runtime = "{ws / h / 'run'}"
            """) for h in hosts)
        (ws / "config.toml").write_text(textwrap.dedent(f"""
            [site]
            name = "{site}"
            [clusters.lab]
            [datastores.shared]
            path = "{ws / 'shared'}"
            hosts = {json.dumps(list(hosts))}
            [networks.lab]
            bridge = "br-lab"
            create = false
            """) + textwrap.dedent(networks) + entries)
        yield ws, lab
    finally:
        lab.down()
        gen.close()
