"""A lab workspace whose hosts are the network lab's namespaces, reached over SSH (issue 12)."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import tomllib
from pathlib import Path
from typing import Iterator

from ferry.engine.platform.netlab import VM_BRIDGE, NetLab

from .lab import lab_workspace, ok


def random_subnet() -> str:
    """A management subnet of its own (its VM subnet is the next /24), neither in use by this machine
    (another lab of the suite, running in another worker, or one a killed run left): tried at random."""
    import ipaddress

    from ferry.engine.platform.labops import lab_subnet_free, routed_networks
    used = routed_networks()
    for _ in range(1000):
        mgmt = ipaddress.IPv4Network(f"10.{random.randint(232, 250)}.{random.randrange(0, 254, 2)}.0/24")
        if lab_subnet_free(mgmt, used):
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


async def guest_sh(ws: Path, name: str, script: str, timeout: float = 60) -> tuple[int, str]:
    """(exit code, output) of a busybox shell script run in a lab VM's guest through its agent (the
    agent's socket is in its host's runtime folder, W/HOST/run, on this machine's disk)."""
    from ferry.engine.platform.qga import GuestAgent
    from ferry.engine.transport.local import LocalTransport
    from ferry.engine.vm.model import process_name

    shown = await asyncio.to_thread(ok, ws, "vm", "show", name)
    sock = ws / shown["host"] / "run" / f"{process_name(shown['id'])}.qga"
    async with await GuestAgent.open(LocalTransport(), str(sock), name=name, timeout=10) as ga:
        r = await ga.exec("/bin/sh", ["-c", script], timeout=timeout)
    return r.exitcode, (r.stdout + r.stderr).decode(errors="replace")


def leg_bytes(lab: NetLab) -> int:
    """Bytes this machine's leg on the lab's VM network carried, both ways: what crossed the machine
    running Ferry (control traffic, when the data goes host to host on the lab's switch)."""
    stats = Path("/sys/class/net") / lab.vm_leg / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())
