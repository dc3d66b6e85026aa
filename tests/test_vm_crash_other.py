"""Issue 10: Ferry killed (`kill -9`) in the middle of a delete, start (of a hibernated VM too), shutdown,
hibernate, restore or purge (the recycle bin) or export, then the same command again (or `ferry task
resume`, or `ferry task cancel`): the job ends done, or undone, and nothing is left half-way. Real QEMU
(TCG), real qcow2, real files; Ferry runs as a child process that is killed at a point read from its
task's row in state.db, or from the files it works on (tests/harness/chaos.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from ferry.engine.vm.hostops import RECYCLE_DIR
from ferry.engine.vm.model import process_name
from harness.chaos import Kill, at_fraction, fraction, hidden_leftovers, kill_at
from harness.cli import ferry
from harness.lab import lab_workspace, ok, vms
from harness.qemu import sha256

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ws():
    yield from lab_workspace('fcr-', hold=True, network=True)


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="fcrs-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)



def refused(ws: Path, *args: str) -> str:
    """A refusal: exit status 2 and one line (with its hint). Returns the line."""
    r = ferry(ws, *args)
    assert r.code == 2, f"ferry {' '.join(args)} should be refused: {r.code} {r.out} {r.err}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "(hint: " in lines[0], r.err
    return lines[0]



def task(ws: Path, tid: int) -> dict:
    return next(t for t in ok(ws, "tasks", "--all") if t["id"] == tid)


def qemu_io(path: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True, capture_output=True)


def qemus_of(vm_id: str) -> list[int]:
    """Pids of the QEMU processes of a VM (by the pid file in their command line), wherever they came from."""
    name = process_name(vm_id)
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and any(a.endswith(f"/{name}.pid".encode()) for a in argv):
                out.append(int(p))
    return out


def qmp_status(ws: Path, vm_id: str) -> str:
    """The VM's run state as its QEMU reports it (running, paused, postmigrate, ...)."""
    sock = next(ws.glob(f"lab/*/run/{process_name(vm_id)}.qmp"))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rw")
        f.readline()
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())):
                pass
        return reply["return"]["status"]


def killed(k: Kill) -> int:
    assert k.killed, f"the command ended before the kill point: {k.code} {k.out} {k.err}"
    return k.task_id


def item_at(item: str, f: float = 0.0):
    """A point: the task says it is doing `item`, at fraction f of its work or more."""
    return lambda t: (t["state"] == "running" and (t["progress"] or {}).get("item", "").startswith(item)
                      and fraction(t["progress"]) >= f)


# ------------------------------------------------------------------ delete

def test_secure_delete_killed_mid_wipe_shows_deleting_and_the_rerun_finishes_it(ws):
    made = ok(ws, "vm", "create", "sec", "--host", "lab1", "--disk", "320M")
    disk = Path(made["disks"][0])
    qemu_io(str(disk), "write -P 0x5a 0 288M")

    tid = killed(kill_at(ws, "vm", "delete", "sec", "--secure", "--confirm", "sec", when=item_at("overwriting")))
    assert task(ws, tid)["state"] == "interrupted"
    v = vms(ws)["sec"]
    assert v["state"] == "deleting" and v["busy"] == tid, "a VM half-wiped is shown as what it is"
    line = refused(ws, "vm", "start", "sec")
    assert f"task {tid}" in line and f"ferry task resume {tid}" in line and f"ferry task cancel {tid}" in line

    again = ok(ws, "vm", "delete", "sec", "--secure", "--confirm", "sec")
    assert again["task"] == tid, "the same command goes on with the task it had begun"
    assert "sec" not in vms(ws) and not disk.exists() and not disk.parent.exists()


def test_delete_killed_mid_way_and_cancelled_stays_deleting_and_a_delete_finishes_it(ws):
    """A cancel cannot bring back the files a delete began to remove: the VM stays 'deleting', no longer
    held by the cancelled task, and nothing but a delete may act on it; a delete finishes it."""
    made = ok(ws, "vm", "create", "nd", "--host", "lab1", "--disk", "64M", "--disk", "64M", "--disk", "64M")
    disks = [Path(d) for d in made["disks"]]
    for d in disks:
        qemu_io(str(d), "write -P 0x42 0 48M")

    tid = killed(kill_at(ws, "vm", "delete", "nd", "--confirm", "nd",
                         when=lambda t: (t["checkpoint"] or {}).get("begun") is True))
    v = vms(ws)["nd"]
    assert (v["state"], v["busy"]) == ("deleting", tid)
    ok(ws, "task", "cancel", str(tid))
    t = task(ws, tid)
    assert t["state"] == "cancelled" and "had begun" in t["error"] and "ferry vm delete nd" in t["error"]
    v = vms(ws)["nd"]
    assert (v["state"], v["busy"]) == ("deleting", None)
    line = refused(ws, "vm", "export", "nd", "--out", "/var/tmp/nd.ova")
    assert "nd was partly deleted" in line and "ferry vm delete nd" in line

    ok(ws, "vm", "delete", "nd", "--confirm", "nd")
    assert "nd" not in vms(ws) and not any(d.exists() for d in disks) and not disks[0].parent.exists()


# ------------------------------------------------------------------ start, hibernate

def test_start_killed_after_launch_is_interrupted_and_the_rerun_adopts_its_qemu(ws):
    vm_id = ok(ws, "vm", "create", "st", "--host", "lab1", "--disk", "32M", "--memory", "192M")["id"]

    # Killed once QEMU was launched, while it waits for the guest agent.
    tid = killed(kill_at(ws, "vm", "start", "st", when=item_at("waiting for the guest agent")))
    assert task(ws, tid)["state"] == "interrupted", "a start whose Ferry process died is not shown running"
    assert len(qemus_of(vm_id)) == 1

    out = ok(ws, "vm", "start", "st")
    assert out["task"] == tid and out["agent"] is True
    assert vms(ws)["st"]["state"] == "running"
    assert len(qemus_of(vm_id)) == 1, "the rerun started a second QEMU"
    ok(ws, "vm", "stop", "st", "--force")


def test_hibernate_killed_cancelled_runs_on_and_resumed_ends_hibernated(ws):
    vm_id = ok(ws, "vm", "create", "hb", "--host", "lab1", "--disk", "32M", "--memory", "256M",
               "--boot", "live")["id"]
    ok(ws, "vm", "start", "hb")
    folder = Path(vms(ws)["hb"]["disks"][0]["path"]).parent

    # Killed while it saves the memory: cancelled, the guest runs on as before and nothing is left.
    tid = killed(kill_at(ws, "vm", "hibernate", "hb", when=item_at("saving memory")))
    ok(ws, "task", "cancel", str(tid))
    assert task(ws, tid)["state"] == "cancelled"
    assert vms(ws)["hb"]["state"] == "running" and qmp_status(ws, vm_id) == "running"
    assert sorted(p.name for p in folder.iterdir()) == ["disk0.qcow2"]

    # Killed again, then resumed: hibernated, its state file complete (the start resumes from it).
    tid = killed(kill_at(ws, "vm", "hibernate", "hb", when=item_at("saving memory")))
    ok(ws, "task", "resume", str(tid))
    assert task(ws, tid)["state"] == "succeeded"
    v = vms(ws)["hb"]
    assert v["state"] == "hibernated" and not qemus_of(vm_id)
    assert sorted(p.name for p in folder.iterdir()) == ["disk0.qcow2", "hb.state"]
    out = ok(ws, "vm", "start", "hb")
    assert out.get("resumed") is True and qmp_status(ws, vm_id) == "running"
    ok(ws, "vm", "stop", "hb", "--force")


def test_shutdown_killed_as_it_asks_the_guest_ends_stopped_on_the_rerun(ws):
    vm_id = ok(ws, "vm", "create", "sd", "--host", "lab1", "--disk", "32M", "--memory", "192M")["id"]
    assert ok(ws, "vm", "start", "sd")["agent"] is True

    # Killed as it asks the guest (through its agent) to power off: asked or not, the rerun knows.
    tid = killed(kill_at(ws, "vm", "stop", "sd", when=lambda t: (t["checkpoint"] or {}).get("asked") is True))
    assert task(ws, tid)["state"] == "interrupted"
    assert vms(ws)["sd"]["busy"] == tid, "the VM stays its task's until that task is done"

    out = ok(ws, "vm", "stop", "sd")
    assert out["task"] == tid, "the same command goes on with the task it had begun"
    assert task(ws, tid)["state"] == "succeeded"
    v = vms(ws)["sd"]
    assert (v["state"], v["busy"]) == ("stopped", None) and not qemus_of(vm_id)


def test_start_of_a_hibernated_vm_killed_as_qemu_starts_resumes_its_guest_on_the_rerun(ws):
    vm_id = ok(ws, "vm", "create", "hr", "--host", "lab1", "--disk", "32M", "--memory", "256M",
               "--boot", "live")["id"]
    ok(ws, "vm", "start", "hr")
    state_file = Path(ok(ws, "vm", "hibernate", "hr")["state_file"])

    # Killed as QEMU starts to load the saved memory: the rerun adopts that QEMU (or starts the one
    # it did not get to), and the guest runs from its saved state, never from a fresh boot.
    tid = killed(kill_at(ws, "vm", "start", "hr", when=item_at("starting QEMU")))
    assert task(ws, tid)["state"] == "interrupted" and vms(ws)["hr"]["busy"] == tid

    out = ok(ws, "vm", "start", "hr")
    assert out["task"] == tid and out.get("resumed") is True
    assert vms(ws)["hr"]["state"] == "running" and qmp_status(ws, vm_id) == "running"
    assert len(qemus_of(vm_id)) == 1 and not state_file.exists()
    ok(ws, "vm", "stop", "hr", "--force")


# ------------------------------------------------------------------ restore, purge (the recycle bin)

def binned(ws: Path) -> dict[str, dict]:
    """The recycle bin, by name, as `ferry vm list --recycled --json` shows it."""
    return {v["name"]: v for v in ok(ws, "vm", "list", "--recycled")}


def in_bin(ws: Path, name: str, n: int) -> tuple[list[Path], dict[Path, str]]:
    """A stopped VM `name` with n small disks holding data, moved to the recycle bin: its disks' paths
    and their contents' digests."""
    made = ok(ws, "vm", "create", name, "--host", "lab1", *[a for _ in range(n) for a in ("--disk", "32M")])
    disks = [Path(d) for d in made["disks"]]
    for i, d in enumerate(disks):
        qemu_io(str(d), f"write -P {0x30 + i} 0 24M")
    sums = {d: sha256(d) for d in disks}
    ok(ws, "vm", "delete", name, "--delayed", "--confirm", name)
    assert not any(d.exists() for d in disks) and binned(ws)[name]["state"] == "recycled"
    return disks, sums


def bin_folder(disk: Path, vm_id: str) -> Path:
    """The VM's folder in the recycle bin of the datastore that holds `disk`."""
    return disk.parents[1] / RECYCLE_DIR / vm_id


def test_restore_killed_mid_way_cancelled_is_whole_in_the_bin_and_resumed_comes_back(ws):
    disks, sums = in_bin(ws, "rs", 4)
    vm_id = binned(ws)["rs"]["id"]
    moving = lambda t: disks[0].exists()      # noqa: E731  (the first disk is back in place, three to go)

    # Killed as it moves the disks out of the bin, then cancelled: back in the bin, whole.
    tid = killed(kill_at(ws, "vm", "restore", "rs", when=moving))
    assert "rs" not in vms(ws), "a VM half out of the recycle bin is not shown as a usable one"
    ok(ws, "task", "cancel", str(tid))
    assert task(ws, tid)["state"] == "cancelled"
    v = binned(ws)["rs"]
    assert (v["state"], v["busy"]) == ("recycled", None)
    assert not any(d.exists() for d in disks) and not disks[0].parent.exists()
    assert sorted(p.name for p in bin_folder(disks[0], vm_id).rglob("*.qcow2")) == sorted(d.name for d in disks)

    # Killed again, then resumed: restored, every disk as it was, nothing left in the bin.
    tid = killed(kill_at(ws, "vm", "restore", "rs", when=moving))
    ok(ws, "task", "resume", str(tid))
    assert task(ws, tid)["state"] == "succeeded"
    assert vms(ws)["rs"]["state"] == "stopped" and "rs" not in binned(ws)
    assert {d: sha256(d) for d in disks} == sums
    assert not bin_folder(disks[0], vm_id).exists()


def test_purge_killed_shows_deleting_and_the_rerun_finishes_it(ws):
    disks, _ = in_bin(ws, "pg", 4)
    vm_id = binned(ws)["pg"]["id"]
    folder = bin_folder(disks[0], vm_id)
    args = ("vm", "purge", "pg", "--confirm", "pg")

    tid = killed(kill_at(ws, *args, when=item_at("purging pg")))
    assert task(ws, tid)["state"] == "interrupted"
    v = binned(ws)["pg"]
    assert (v["state"], v["busy"]) == ("deleting", tid), "a VM half purged is shown as what it is"
    shown = ferry(ws, "vm", "list", "--recycled")
    assert shown.code == 0 and "STATE" in shown.out.splitlines()[0], shown.out
    assert f"deleting (task {tid})" in next(ln for ln in shown.out.splitlines() if ln.startswith("pg ")), shown.out
    line = refused(ws, "vm", "restore", "pg")
    assert f"task {tid}" in line and f"ferry task resume {tid}" in line

    # Cancelled: what it removed cannot come back; it stays "deleting", and a purge finishes it.
    ok(ws, "task", "cancel", str(tid))
    t = task(ws, tid)
    assert t["state"] == "cancelled" and "ferry vm purge pg --confirm pg" in t["error"]
    v = binned(ws)["pg"]
    assert (v["state"], v["busy"]) == ("deleting", None)
    line = refused(ws, "vm", "restore", "pg")
    assert "pg was partly purged" in line and "ferry vm purge pg --confirm pg" in line

    tid = killed(kill_at(ws, *args, when=item_at("purging pg")))
    again = ok(ws, *args)
    assert again["task"] == tid and again["purged"] == ["pg"]
    assert "pg" not in binned(ws) and "pg" not in vms(ws) and not folder.exists()


def test_a_purge_that_cannot_remove_the_files_keeps_the_vm_deleting_and_a_purge_finishes_it(ws):
    """A real fault: an immutable file (chattr +i) in the VM's folder in the bin, which not even root
    removes. The purge fails saying so, the record stays ('deleting'), nothing is forgotten; once the
    flag is gone the same command finishes it."""
    disks, _ = in_bin(ws, "pf", 1)
    folder = bin_folder(disks[0], binned(ws)["pf"]["id"])
    held = folder / "held"
    held.write_text("kept\n")
    if subprocess.run(["chattr", "+i", str(held)], capture_output=True).returncode != 0:
        pytest.skip(f"the filesystem of {folder} has no immutable flag (chattr +i)")
    try:
        r = ferry(ws, "vm", "purge", "pf", "--confirm", "pf")
        assert r.code != 0 and "could not remove" in r.err and "ferry vm purge pf --confirm pf" in r.err, r.err
        assert "Traceback" not in r.err
        assert binned(ws)["pf"]["state"] == "deleting"
    finally:
        subprocess.run(["chattr", "-i", str(held)], check=True)
    assert ok(ws, "vm", "purge", "pf", "--confirm", "pf")["purged"] == ["pf"]
    assert "pf" not in binned(ws) and not folder.exists()


# ------------------------------------------------------------------ export

def test_export_killed_three_times_then_rerun_finishes_one_package_and_leaves_nothing(ws, scratch):
    made = ok(ws, "vm", "create", "ex", "--host", "lab1", "--disk", "256M")
    src = made["disks"][0]
    qemu_io(src, "write -P 0x3c 0 96M")
    qemu_io(src, "write -P 0xc3 160M 64M")
    out = scratch / "ex.ova"
    args = ("vm", "export", "ex", "--out", str(out))

    tid = killed(kill_at(ws, *args, when=at_fraction(0.2)))          # converting the disk
    assert hidden_leftovers(scratch), "the staging folder is kept for the resume"
    assert killed(kill_at(ws, *args, when=item_at("hashing", 0.66))) == tid   # hashed: the OVA is next
    # Once the OVA is in place, before the task is recorded done: the package is checked, not made again.
    # The "done" step lasts a moment: the kill lands a few milliseconds after the point is read, and
    # rarely the task had ended by then (or ended before the point was seen at all).
    last = kill_at(ws, *args, when=item_at("done"))
    assert last.task_id == tid and (last.killed or last.code == 0), (last.code, last.out, last.err)
    made_at = out.stat().st_mtime_ns
    if next(t for t in ok(ws, "tasks", "--all") if t["id"] == tid)["state"] != "succeeded":
        done = ok(ws, *args)
        assert done["task"] == tid
    assert out.stat().st_mtime_ns == made_at
    assert hidden_leftovers(scratch) == [], "a staging folder was left behind"

    ok(ws, "vm", "import", str(out), "--host", "lab2", "--name", "ex-back")
    back = vms(ws)["ex-back"]["disks"][0]["path"]
    assert subprocess.run(["qemu-img", "compare", "-U", src, back], capture_output=True).returncode == 0


def test_paused_export_cancelled_leaves_no_staging_folder(ws, scratch):
    from ferry.engine.client import EngineClient
    from ferry.engine.taskmodel import TaskState
    from ferry.engine.workspace import Workspace

    made = ok(ws, "vm", "create", "pe", "--host", "lab1", "--disk", "192M")
    qemu_io(made["disks"][0], "write -P 0x77 0 128M")
    out = scratch / "pe.ova"

    async def go() -> tuple[list, list]:
        client = EngineClient.open(Workspace.resolve(ws), adopt=False)
        await client.start()
        try:
            tid = await client.vm_task("vm.export", {"vm": "pe", "out": str(out)})
            sub = client.subscribe()
            while (info := await client.get_task(tid)).state != TaskState.PAUSED:
                assert not info.state.final, "the export ended before it was paused"
                for ev in await sub.wait(timeout=1.0):
                    if ev.type == "progress" and ev.task_id == tid and ev.data.fraction and ev.data.fraction > 0.1:
                        if info.state == TaskState.RUNNING:
                            await client.pause(tid)
            sub.close()
            kept = hidden_leftovers(scratch)
            assert (await client.cancel(tid)).state == TaskState.CANCELLED
            return kept, hidden_leftovers(scratch)
        finally:
            await client.close()

    kept, left = asyncio.run(go())
    assert kept, "paused, the export keeps its staging folder"
    assert left == [] and not out.exists(), "cancelled, it removes it"


def test_a_resumed_export_makes_again_a_converted_disk_changed_after_its_task_died(ws, scratch):
    """Nothing written after the task died is trusted: a VHD converted before the kill, then changed in
    place without changing its size (as a stray helper would), is converted again; whether it had been
    hashed (read through again to its digest) or not yet (compared with its source)."""
    made = ok(ws, "vm", "create", "vx", "--host", "lab1", "--disk", "64M", "--disk", "128M")
    srcs = made["disks"]
    qemu_io(srcs[0], "write -P 0x3c 0 40M")
    qemu_io(srcs[1], "write -P 0x5d 0 96M")
    out = scratch / "vx.ova"
    args = ("vm", "export", "vx", "--out", str(out))

    def recorded(what: str):
        return lambda t: "vx-disk0.vhd" in ((t["checkpoint"] or {}).get(what) or {})

    def spoil() -> None:
        """disk0's VHD in the staging folder changed halfway through, its size kept."""
        [stage] = hidden_leftovers(scratch)
        vhd = stage / "vx-disk0.vhd"
        size = vhd.stat().st_size
        with open(vhd, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xee" * 65536)
        assert vhd.stat().st_size == size

    tid = killed(kill_at(ws, *args, when=recorded("sizes")))      # disk0 converted, disk1 is next
    spoil()
    assert killed(kill_at(ws, *args, when=recorded("digests"))) == tid     # disk0 hashed, disk1's hash next
    spoil()
    assert ok(ws, *args)["task"] == tid
    assert hidden_leftovers(scratch) == []

    ok(ws, "vm", "import", str(out), "--host", "lab2", "--name", "vx-back")
    backs = [d["path"] for d in vms(ws)["vx-back"]["disks"]]
    for src, back in zip(srcs, backs, strict=True):
        assert subprocess.run(["qemu-img", "compare", "-U", src, back], capture_output=True).returncode == 0, back
