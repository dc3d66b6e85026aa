"""Networks in host facts, in the console's host detail, and as a named precheck blocker (issue 12).

A netns lab host reached over SSH (engine/platform/netlab.py): its facts name br-lab with its uplink and,
once a VM runs on the `lab` network, that VM's tap under the VM's name. A network whose bridge is
missing where Ferry may not make it refuses a create, start or clone before any task exists. The
console's host detail (folder lab hosts, Pilot) shows such a network as a problem, counted on the site page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.console.app import FerryApp
from ferry.engine.client import EngineClient
from ferry.engine.config import NetworkSpec, lab_config
from ferry.engine.hostfacts import parse_facts, tap_owners
from ferry.engine.vm.model import NicSpec, VMSpec
from ferry.engine.vm.nics import tap_name
from ferry.engine.workspace import Workspace
from harness.cli import ferry
from harness.lab import ok
from harness.netlab import netlab_workspace
from harness.pilot import text_of, until

needs = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                           reason="needs root (namespaces, taps) and qemu-system-x86_64")


def test_facts_parse_bridges_members_taps_and_vlans():
    """`bridge -j vlan show` in both shapes iproute2 has had (this machine's kernel has no VLAN filtering)."""
    vm = VMSpec(id="0123456789abcdef", name="web1", host="h1", nics=(NicSpec("prod"), NicSpec("prod")))
    t0, t1 = tap_name(vm.id, 0), tap_name(vm.id, 1)
    stray = "ftabcdef1230"
    out = textwrap.dedent(f"""\
        @@bridges
        br br-prod 9000 up 1 eno1 {t0} {t1}
        br br-lab 1500 down 0 {stray}
        @@vlans
        [{{"ifname":"br-prod","vlans":[{{"vlan":1,"flags":["PVID"]}}]}},
         {{"ifname":"{t0}","vlans":[{{"vlan":10,"vlanEnd":12}}]}},{{"ifname":"other","vlans":[{{"vlan":99}}]}}]
        @@end
        """)
    facts = parse_facts("h1", out, [], tap_owners([vm]))
    prod, lab = facts["bridges"]
    assert (prod.name, prod.mtu, prod.state, prod.vlan_filtering) == ("br-prod", 9000, "up", True)
    assert prod.vlans == [1, 10, 11, 12] and prod.members == ["eno1"]
    assert prod.taps == [t0, t1] and prod.vms == ["web1"]
    assert lab.vlan_filtering is False and lab.vlans is None and lab.taps == [stray] and lab.vms == []
    old = out.replace(out[out.index("[{"):out.index("@@end")],
                      '{"br-prod": [{"vlan": 1}], "eno1": [{"vlan": 20}]}\n')
    assert parse_facts("h1", old, [], {})["bridges"][0].vlans == [1, 20]


# ------------------------------------------------------------------------------ the console


async def test_host_detail_shows_a_missing_bridge_as_a_problem(tmp_path):
    ws = Workspace(tmp_path / "ws")
    site = lab_config(ws.root)
    nets = {"stor": NetworkSpec("stor", bridge="br-fnmiss0", create=False, vlan=30, hosts=("lab1",)),
            "made": NetworkSpec("made", bridge="br-fnmade0", hosts=("lab1",))}
    client = EngineClient(ws, replace(site, networks=nets), adopt=False)
    await client.start()
    try:
        app = FerryApp(client, first_view="inventory")
        async with app.run_test(size=(110, 50)) as pilot:
            site_page = await until(pilot, lambda: "network missing" in text_of(app, "#detail-body")
                                    and text_of(app, "#detail-body"), what="the site's problems")
            assert "1 network missing" in site_page
            assert "stor (bridge br-fnmiss0) missing on lab1" in site_page
            await pilot.press("down", "down")            # site -> cluster lab -> lab1
            assert app.inventory.selected.name == "lab1"
            detail = await until(pilot, lambda: "Networks" in text_of(app, "#detail-body")
                                 and text_of(app, "#detail-body"), what="lab1's networks")
            flat = " ".join(detail.split())
            assert "br-fnmiss0 ▲ missing: network stor (VLAN 30), and Ferry may not create it (create = false)" in flat
            assert "hint: create br-fnmiss0 on lab1" in flat
            assert "br-fnmade0 not there yet: network made; Ferry makes it at the first start" in flat
            assert "Migration 127.0.0.1 (the management address)" in flat
            await pilot.press("down")                    # lab2: the network is not on it
            detail = await until(pilot, lambda: "Kernel" in text_of(app, "#detail-body")
                                 and "lab2" in text_of(app, "#detail-body") and text_of(app, "#detail-body"),
                                 what="lab2's facts")
            assert "br-fnmiss0" not in detail
    finally:
        await client.close()


# ------------------------------------------------------------------------------ a netns lab host


@pytest.fixture(scope="module")
def netws():
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs root (namespaces, taps) and qemu-system-x86_64")
    yield from netlab_workspace("fhn-", hosts=("lab1",), site="hostnets",
                                networks='[networks.gone]\nbridge = "br-gone"\ncreate = false\n')


def _facts(ws: Path) -> dict:
    [f] = ok(ws, "hosts")
    assert f["reachable"], f
    return f


@needs
def test_facts_of_a_lab_host_name_its_bridge_uplink_and_vm_taps(netws):
    ws, lab = netws
    f = _facts(ws)
    br = {b["name"]: b for b in f["bridges"]}["br-lab"]
    assert br["members"] == ["uplink"] and br["taps"] == [] and br["mtu"] == 1500
    assert br["networks"] == ["lab"]
    assert f["migration_address"] == lab.address("lab1") and f["migration_default"] is True
    ok(ws, "vm", "create", "tn", "--host", "lab1", "--network", "lab", "--memory", "128M")
    tn = ok(ws, "vm", "start", "tn")
    vid = ok(ws, "vm", "show", "tn")["id"]
    br = {b["name"]: b for b in _facts(ws)["bridges"]}["br-lab"]
    assert br["taps"] == [tap_name(vid, 0)] and br["vms"] == ["tn"] and br["members"] == ["uplink"], (tn, br)


@needs
def test_a_bridge_missing_where_it_may_not_be_made_is_refused_before_any_task(netws):
    ws, lab = netws
    gone = {n["name"]: n for n in _facts(ws)["networks"]}["gone"]
    assert gone["present"] is False and "bridge br-gone is missing on host lab1" in gone["problem"]
    table = ferry(ws, "hosts")           # the text table names the networks; the problem on stderr
    assert table.code == 0 and "NETWORKS" in table.out and "gone (missing)" in table.out, table.out
    assert "lab1: network gone: bridge br-gone is missing on host lab1" in table.err, table.err
    line = refused(ws, "vm", "create", "ng", "--host", "lab1", "--network", "gone", "--memory", "128M")
    assert "network gone: bridge br-gone is missing on host lab1" in line and "create = true" in line, line
    # a VM made while the bridge was there, which has gone since: its start is refused by name
    subprocess.run(["ip", "-n", lab.ns("lab1"), "link", "add", "br-gone", "type", "bridge"], check=True)
    try:
        ok(ws, "vm", "create", "ng", "--host", "lab1", "--network", "gone", "--memory", "128M")
    finally:
        subprocess.run(["ip", "-n", lab.ns("lab1"), "link", "del", "br-gone"], check=True)
    line = refused(ws, "vm", "start", "ng")
    assert "network gone: bridge br-gone is missing on host lab1" in line, line
    line = refused(ws, "vm", "clone", "ng", "ng2")
    assert "network gone: bridge br-gone is missing on host lab1" in line, line
    assert {v["name"]: v for v in ok(ws, "vm", "list")}["ng"]["state"] == "stopped"


def refused(ws: Path, *args: str) -> str:
    """A refusal: exit code 2, one line on stderr (with a hint), no task made (as tests/test_vm.py's)."""
    before = [t["id"] for t in ok(ws, "tasks", "--all")]
    r = ferry(ws, *args)
    assert r.code == 2, f"ferry {' '.join(args)} should be refused: {r.code} {r.out} {r.err}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: ") and "(hint: " in lines[0], r.err
    assert [t["id"] for t in ok(ws, "tasks", "--all")] == before, "a refusal made a task"
    return lines[0]
