"""`ferry migration prepare NAME` end to end (issue 13, E7): a plan whose source is a real Linux server
(a network-lab host reached over SSH), assessed for real; the target VM made on lab3 and booted on the
live image as the receiver on the lab's VM network (DHCP from the lab's dnsmasq, or a static address),
its SSH host key read from the serial console and pinned. File-level: one ext4 partition per disk.
Block-level: the source's disk 1:1 (its real size: a datastore on a tmpfs big enough to hold the
virtual size). Ferry killed mid-prepare: the same command adopts the VM and its QEMU; a cancel leaves
no VM and the migration assessed.

Ferry reaches the receiver on the lab's VM network through the lab's own leg on it for this machine
(NetLab.vm_leg: a veth into the lab switch's `lab` bridge, fenced like the management link: replies only).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
from pathlib import Path

import asyncssh
import pytest

from harness.chaos import kill_at
from harness.cli import ferry
from harness.lab import ok
from harness.netlab import netlab_workspace
from harness.waiting import until_sync

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                or shutil.which("dnsmasq") is None,
                                reason="needs root (namespaces, taps), qemu-system-x86_64 and dnsmasq")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def prep():
    """lab3 the site's host (datastores `shared`, and `big`: a tmpfs of 1 TiB mounted before the lab is up,
    so that its hosts see it); three migrations from lab1: web01 file-level (two small disks), db01
    block-level on `big`, slow01 whose network bars no network meets."""
    big = Path(tempfile.mkdtemp(prefix="fbig-", dir="/tmp"))
    _sh("mount", "-t", "tmpfs", "-o", "size=1T", "tmpfs", str(big))
    old_hold = os.environ.get("FERRY_ENGINE_HOLD")
    os.environ["FERRY_ENGINE_HOLD"] = "1"      # a killed task waits for the command, not for the next engine
    extra = f"""
        [datastores.big]
        path = "{big}"
        hosts = ["lab3"]
        """
    try:
        for ws, lab in netlab_workspace("fprep-", hosts=("lab3",), site="prepsite", networks=extra):
            leg = lab.vm_leg_address       # this machine on the VM network (the lab gives it one)
            src = f'{{ address = "{lab.address("lab1")}", identity = "{lab.identity}" }}'
            plan = ws / "wave1.toml"
            plan.write_text(textwrap.dedent(f"""
                [wave]
                name = "wave1"
                [defaults]
                thresholds = {{ max_jitter_ms = 5 }}
                [migrations.web01]
                method = "file"
                source = {src}
                [migrations.web01.target]
                host = "lab3"
                datastore = "shared"
                network = "lab"
                cpus = 1
                memory = "256M"
                disks = ["64M", "32M"]
                [migrations.db01]
                method = "block"
                source = {src}
                target = {{ host = "lab3", datastore = "big", network = "lab", cpus = 1, memory = "256M" }}
                [migrations.slow01]
                method = "file"
                source = {src}
                thresholds = {{ min_bandwidth_mbit = 1000000 }}
                [migrations.slow01.target]
                host = "lab3"
                datastore = "shared"
                network = "lab"
                cpus = 1
                memory = "256M"
                disks = ["64M"]
                """))
            assert ferry(ws, "plan", "apply", str(plan)).code == 0
            yield ws, lab, leg
    finally:
        if old_hold is None:
            os.environ.pop("FERRY_ENGINE_HOLD", None)
        else:
            os.environ["FERRY_ENGINE_HOLD"] = old_hold
        subprocess.run(["umount", "-l", str(big)], capture_output=True)
        shutil.rmtree(big, ignore_errors=True)


def assessed(ws: Path, name: str) -> dict:
    """The migration assessed for real; a network below its bars on this busy machine overridden."""
    r = ferry(ws, "migration", "assess", name)
    assert r.code == 0, r.err
    m = ok(ws, "migration", "show", name)
    if any(b["name"] == "network" for b in m["blockers"]):
        assert ferry(ws, "migration", "netcheck", name, "--override", "lab veths on a busy machine").code == 0
        m = ok(ws, "migration", "show", name)
    assert m["state"] == "assessed" and not m["blockers"], m["blockers"]
    return m


def vm_row(ws: Path, name: str) -> dict | None:
    con = sqlite3.connect(f"file:{ws / 'state.db'}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        r = con.execute("SELECT * FROM vms WHERE name=? AND recycled IS NULL", (name,)).fetchone()
    finally:
        con.close()
    return {**dict(r), "spec": json.loads(r["spec"])} if r else None


def pidfile(ws: Path, row: dict) -> Path:
    return ws / "lab3" / "run" / f"vm-{row['id'][:8]}.pid"


def qemus(pf: Path) -> list[int]:
    """The QEMU processes started with this pid file."""
    r = subprocess.run(["pgrep", "-f", "--", f"-pidfile {pf}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def launched(ws: Path, vm: str):
    """A kill point: the VM's QEMU has written its pid file."""
    def when(task: dict) -> bool:
        row = vm_row(ws, vm)
        return row is not None and pidfile(ws, row).exists()
    return when


def on_network(ws: Path, vm: str):
    """A kill point: the VM's QEMU runs with its NIC on the lab network (the task's log says so)."""
    def when(task: dict) -> bool:
        con = sqlite3.connect(f"file:{ws / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT 1 FROM task_log WHERE task_id=? AND message LIKE ?",
                               (task["id"], f"NIC 0 of {vm} % is on network lab%")).fetchone() is not None
        finally:
            con.close()
    return when


async def on_receiver(ws: Path, target: dict, command: str) -> str:
    """Runs a command in the receiver over a real SSH connection from this machine, to the recorded
    address, trusting only the recorded host key and logging in with the workspace's receiver key."""
    known = asyncssh.import_known_hosts(f"{target['address']} {target['host_key']}\n")
    key = asyncssh.read_private_key(str(ws / "keys" / "receiver_ed25519"))
    async with asyncssh.connect(target["address"], 22, username="root", client_keys=[key], known_hosts=known,
                                connect_timeout=10) as c:
        return (await c.run(command, check=True)).stdout


def test_refused_before_assessment_and_with_blockers(prep):
    ws, lab, _leg = prep
    r = ferry(ws, "migration", "prepare", "slow01")
    assert r.code == 2 and "slow01 is planned: its target is prepared once it is assessed" in r.err, r.err
    assert ferry(ws, "migration", "assess", "slow01").code == 0
    r = ferry(ws, "migration", "prepare", "slow01")
    assert r.code == 2 and "migration slow01 has blockers: network" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert vm_row(ws, "slow01-target") is None and ok(ws, "migration", "show", "slow01")["state"] == "assessed"


def test_file_level_killed_then_the_same_command_adopts_the_vm_and_formats_its_disks(prep):
    ws, lab, _leg = prep
    assessed(ws, "web01")
    k = kill_at(ws, "migration", "prepare", "web01", when=on_network(ws, "web01-target"))
    assert k.killed, k
    row = vm_row(ws, "web01-target")
    assert row["state"] == "incomplete" and ok(ws, "migration", "show", "web01")["state"] == "assessed"
    pf = pidfile(ws, row)
    first = until_sync(lambda: qemus(pf), timeout=30, what="the QEMU launched before the kill")

    r = ferry(ws, "migration", "prepare", "web01")
    assert r.code == 0, r.err
    assert f"task {k.task_id} already does this" in r.err
    m = ok(ws, "migration", "show", "web01")
    t = m["target"]
    assert m["state"] == "target_prepared" and t["vm"] == "web01-target" and t["host"] == "lab3"
    assert f"target web01-target runs on lab3 as receiver at {t['address']}" in r.out
    vm = ok(ws, "vm", "show", "web01-target")
    assert vm["id"] == row["id"] and vm["state"] == "running" and vm["host"] == "lab3"
    assert qemus(pf) == first, "a second QEMU was started"
    assert [v["name"] for v in ok(ws, "vm", "list")] == ["web01-target"]
    # DHCP from the lab's dnsmasq: an address of the VM subnet, leased to the VM's MAC
    assert {"mac": vm["nics"][0]["mac"], "address": t["address"]} in \
        [{k: le[k] for k in ("mac", "address")} for le in lab.leases()]

    # what the receiver's own blkid finds on its disks (no udev there: probed from the devices)
    out = asyncio.run(on_receiver(ws, t, "for p in /dev/vd?[0-9]*; do blkid -p -o export $p; echo; done"))
    found = [dict(line.split("=", 1) for line in block.splitlines()) for block in out.strip().split("\n\n")]
    assert {p["device"]: (p["fstype"], p["label"], p["uuid"]) for p in t["partitions"]} == {
        f["DEVNAME"]: (f["TYPE"], f["LABEL"], f["UUID"]) for f in found}
    assert [(p["device"], p["fstype"]) for p in t["partitions"]] == [("/dev/vda1", "ext4"), ("/dev/vdb1", "ext4")]
    # made whole at once: no inode table left for the kernel to zero in the background, behind the syncs
    for p in t["partitions"]:
        groups = asyncio.run(on_receiver(ws, t, f"dumpe2fs {p['device']} 2>/dev/null | grep '^Group [0-9]'")).splitlines()
        assert len(groups) > 1 and all("ITABLE_ZEROED" in g for g in groups), groups
    assert (t["partitions"][0]["label"], t["partitions"][0]["source"]) == ("root", "/")
    assert [d["size"] for d in t["disks"]] == [64 << 20, 32 << 20]
    audit = [a for a in ok(ws, "audit") if a["action"] == "migration.target_prepared"]
    assert audit and audit[-1]["params"]["fingerprint"] == t["fingerprint"]
    shown = ferry(ws, "migration", "show", "web01").out
    assert f"receiver   web01-target on lab3 at {t['address']}" in shown and t["fingerprint"] in shown
    assert "  part     /dev/vda1 ext4 " in shown and "label root for /" in shown


def test_block_level_cancelled_leaves_nothing_then_prepared_at_a_static_address(prep):
    ws, lab, _leg = prep
    m = assessed(ws, "db01")
    k = kill_at(ws, "migration", "prepare", "db01", when=launched(ws, "db01-target"))
    assert k.killed, k
    row = vm_row(ws, "db01-target")
    pf = pidfile(ws, row)
    folder = Path(row["spec"]["disks"][0]["path"]).parent
    assert folder.exists()
    assert ferry(ws, "task", "cancel", str(k.task_id)).code == 0
    assert vm_row(ws, "db01-target") is None and not folder.exists() and not qemus(pf)
    assert ok(ws, "migration", "show", "db01")["state"] == "assessed"

    address = f"{lab.vm_network[40]}/{lab.vm_network.prefixlen}"
    r = ferry(ws, "migration", "prepare", "db01", "--address", address)
    assert r.code == 0, r.err
    assert "block-level: 1 disk(s) mapped 1:1" in r.out
    t = ok(ws, "migration", "show", "db01")["target"]
    assert t["address"] == str(lab.vm_network[40]) and t["method"] == "block" and not t["partitions"]
    src = {d["name"]: d["size"] for d in m["assessment"]["report"]["facts"]["devices"] if d["type"] == "disk"}
    seen = asyncio.run(on_receiver(ws, t, "lsblk -bdno NAME,SIZE,FSTYPE /dev/vda"))
    name, size = seen.split()[:2]
    assert len(seen.split()) == 2, seen                     # raw: no filesystem on it
    assert [(d["device"], d["size"]) for d in t["disks"]] == [(f"/dev/{name}", src[t["disks"][0]["source"]])]
    assert int(size) == src[t["disks"][0]["source"]]


def test_the_targets_disks_are_planned_from_the_plan_or_the_sources_facts():
    from ferry.engine.errors import Refused
    from ferry.engine.migration.assess import BlockDevice, Filesystem, SourceFacts
    from ferry.engine.migration.model import Method, Migration, MigrationSpec, MigrationState, SourceSpec, TargetSpec
    from ferry.engine.migration.prepare import plan_disks

    G = 1 << 30
    facts = SourceFacts("src", system="Linux", devices=[
        BlockDevice("sda", "disk", 40 * G), BlockDevice("sda1", "part", 30 * G, "ext4", "/", parent="sda"),
        BlockDevice("sda2", "part", 10 * G, "ext4", "/var", parent="sda"),
        BlockDevice("sdb", "disk", 8 * G), BlockDevice("sr0", "rom", 1 * G)], filesystems=[
        Filesystem("/dev/sda2", "ext4", 10 * G, 6 * G, 4 * G, "/var"),
        Filesystem("/dev/sda1", "ext4", 30 * G, 3 * G + 1, 27 * G, "/"),
        Filesystem("/srv/nfs", "nfs4", 100 * G, 50 * G, 50 * G, "/mnt/nfs")])

    def mig(disks=()):
        return Migration("m", "w", MigrationSpec(SourceSpec("10.0.0.1"), TargetSpec("h", "d", "n", disks=disks)),
                         MigrationState.ASSESSED, 0, 0)
    # file-level, no sizes in the plan: a disk per local filesystem, "/" first, used + max(25%, 1 GiB), whole GiB
    disks, warnings = plan_disks(mig(), facts, Method.FILE)
    assert [(d.size, d.source, d.used) for d in disks] == [(5 * G, "/", 3 * G + 1), (8 * G, "/var", 6 * G)]
    assert not warnings
    # the plan's sizes: fewer disks than filesystems, the rest copied into the first one's tree, a warning
    disks, warnings = plan_disks(mig((4 * G,)), facts, Method.FILE)
    assert [(d.size, d.source, d.merged) for d in disks] == [(4 * G, "/", ("/var",))]
    assert warnings == ["disk0 (4.0 GiB) is smaller than the 9.0 GiB used on /, /var of the source: the copy does "
                        "not fit unless the plan's excludes leave most of it out"]
    # block-level: the disks the data sits on, 1:1 (sdb holds nothing: left out); larger ones allowed
    assert [(d.size, d.source) for d in plan_disks(mig(), facts, Method.BLOCK)[0]] == [(40 * G, "sda")]
    assert [d.size for d in plan_disks(mig((41 * G,)), facts, Method.BLOCK)[0]] == [41 * G]
    with pytest.raises(Refused) as e:
        plan_disks(mig((20 * G,)), facts, Method.BLOCK)
    assert "the plan's disks (20.0 GiB) do not fit the source's (sda 40.0 GiB)" in e.value.message
