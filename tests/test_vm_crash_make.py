"""Ferry killed (kill -9) while it makes VMs: create, clone (of a stopped VM with data, of a running
one), a linked deploy of three, an import of an OVA. Then the same command again (or `ferry task
resume`) finishes the job, with copies equal to their source and nothing left over; or `ferry task
cancel` rolls it back, leaving none of what the task had not finished. Real QEMU and qemu-img,
through the CLI as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.chaos import helpers_of, hidden_leftovers, kill_at, workspace_id
from harness.lab import lab_workspace, ok, vms
from harness.qemu import raw_sha256

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ws():
    yield from lab_workspace('fcm-', hold=True, network=True)




def datastore(ws: Path) -> Path:
    return ws / "lab" / "lab1" / "datastore"


def record(ws: Path, name: str) -> dict | None:
    """A VM's row in state.db, read as another process reads it (no Ferry process runs meanwhile)."""
    db = ws / "state.db"
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        r = con.execute("SELECT * FROM vms WHERE name=? AND recycled IS NULL", (name,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return dict(r) if r else None


def with_data(ws: Path, name: str, *disks: tuple[str, int]) -> list[str]:
    """A stopped VM whose disks (size, MiB of random data written from offset 0) hold real data."""
    made = ok(ws, "vm", "create", name, "--host", "lab1", "--boot", "live", *[a for size, _ in disks
                                                                             for a in ("--disk", size)])
    for path, (_, data) in zip(made["disks"], disks):
        if not data:
            continue
        with tempfile.NamedTemporaryFile(dir="/var/tmp") as raw:
            raw.write(os.urandom(data * MiB))
            raw.flush()
            subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw.name, path], check=True,
                           capture_output=True)
    return made["disks"]


def same_image(a: str, b: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    assert r.returncode == 0, f"{b} differs from {a}: {r.stdout} {r.stderr}"
    r = subprocess.run(["qemu-img", "check", "-U", b], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img check {b}: {r.stdout} {r.stderr}"


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def task_state(ws: Path, tid: int) -> str:
    return next(t for t in ok(ws, "tasks", "--all") if t["id"] == tid)["state"]


def interrupted(ws: Path, tid: int, names: list[str]) -> dict:
    """What a user sees of a killed task: the task interrupted (never running), the VMs it had not
    finished listed as incomplete with its id; its helper processes gone. The task's row."""
    task = next(t for t in ok(ws, "tasks", "--all") if t["id"] == tid)
    assert task["state"] == "interrupted", task
    listed = vms(ws)
    for n in names:
        if n in listed and listed[n]["state"] == "incomplete":
            assert listed[n]["busy"] == tid, listed[n]
    assert not helpers_of(workspace_id(ws), tid), "helper processes outlived their task"
    return task


def settled(ws: Path, *, left: set[str]) -> None:
    """Nothing half-made: no task unfinished, no Ferry temporary file, every VM complete with its disks,
    no VM folder without its VM; the VMs are exactly `left`."""
    tasks = ok(ws, "tasks", "--all")
    assert all(t["state"] in ("succeeded", "cancelled") for t in tasks), [(t["id"], t["state"]) for t in tasks]
    assert hidden_leftovers(datastore(ws)) == []
    listed = vms(ws)
    assert set(listed) == left, sorted(listed)
    for v in listed.values():
        assert v["state"] in ("stopped", "template", "running") and v["busy"] is None, v
        for d in v["disks"]:
            assert exists(d["path"]), d
    folders = {p.name for p in datastore(ws).iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders <= left, f"folders without a VM: {folders - left}"


def cleanup(ws: Path, *names: str) -> None:
    for n in names:
        if n in vms(ws):
            ok(ws, "vm", "delete", n, "--confirm", n)


# ------------------------------------------------------------------ create


@pytest.mark.parametrize("then", ["rerun", "cancel"])
def test_create_killed_after_its_name_is_reserved(ws, then):
    """Killed once its record exists (reserved, before its disks are all made): the name is held by
    the task; the same command finishes it, or cancel removes the record and every file."""
    base = set(vms(ws))      # VMs of other tests of the module
    cmd = ("vm", "create", "n0", "--host", "lab1", "--disk", "16M", "--disk", "8M", "--boot", "live")
    k = kill_at(ws, *cmd, when=lambda task: record(ws, "n0") is not None)
    assert k.killed, k
    rec = record(ws, "n0")
    if rec["state"] == "incomplete":
        interrupted(ws, k.task_id, ["n0"])
        assert vms(ws)["n0"]["state"] == "incomplete"
    if then == "rerun":
        out = ok(ws, *cmd)
        assert out["id"] == rec["id"], "the resume made another VM"
        disks = [d["path"] for d in vms(ws)["n0"]["disks"]]
        assert [json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", d], capture_output=True,
                                          check=True).stdout)["virtual-size"] for d in disks] == [16 * MiB, 8 * MiB]
        settled(ws, left=base | {"n0"})
        cleanup(ws, "n0")
    else:
        ok(ws, "task", "cancel", str(k.task_id))
        settled(ws, left=base)
        assert not (datastore(ws) / "n0").exists()


# ------------------------------------------------------------------ clone of a stopped VM with data


def disk_placed(ws: Path, vm: str, disk: str):
    return lambda task: exists(datastore(ws) / vm / f"{disk}.qcow2")


def disk_writing(ws: Path, vm: str, disk: str, *, above: int = MiB):
    """A point: the copy of the disk is being written (its temporary file holds more than `above` bytes)."""
    def when(task) -> bool:
        for part in (datastore(ws) / vm).glob(f"{disk}.qcow2.ferry-task*.part"):
            try:
                return part.stat().st_size >= above
            except FileNotFoundError:
                return False
        return False
    return when


@pytest.mark.parametrize("point,then", [("writing disk0", "rerun"), ("disk0 placed", "resume"),
                                        ("writing disk0", "cancel"), ("disk0 placed", "cancel")])
def test_clone_killed_then_finished_or_rolled_back(ws, point, then):
    """A clone of a stopped VM with data (two disks), killed while it writes its first disk or once that
    one is in place. While interrupted, the copy is listed as incomplete with its task. The same command
    (or task resume) finishes it: each disk equal to the source's, a disk already in place not written
    again. Cancel leaves no record and no file of the copy. The source never changes."""
    base = set(vms(ws))      # VMs of other tests of the module
    src = with_data(ws, "s0", ("48M", 24), ("16M", 8))
    before = [raw_sha256(p) for p in src]
    when = disk_writing(ws, "c0", "disk0") if point == "writing disk0" else disk_placed(ws, "c0", "disk0")
    k = kill_at(ws, "vm", "clone", "s0", "c0", when=when)
    assert k.killed, k
    interrupted(ws, k.task_id, ["c0"])
    assert vms(ws)["c0"]["state"] == "incomplete"
    placed = datastore(ws) / "c0" / "disk0.qcow2"
    inode = placed.stat().st_ino if placed.exists() else None
    assert (inode is not None) == (point == "disk0 placed")

    if then == "cancel":
        ok(ws, "task", "cancel", str(k.task_id))
        settled(ws, left=base | {"s0"})
        assert not (datastore(ws) / "c0").exists()
    else:
        if then == "rerun":
            out = ok(ws, "vm", "clone", "s0", "c0")
            assert out["task"] == k.task_id, "the same command did not go on with its task"
        else:
            assert ok(ws, "task", "resume", str(k.task_id))["state"] == "succeeded"    # runs in the foreground
        c0 = vms(ws)["c0"]
        for s, d in zip(src, c0["disks"]):
            same_image(s, d["path"])
        if inode is not None:
            assert placed.stat().st_ino == inode, "a disk already in place was written again"
        settled(ws, left=base | {"s0", "c0"})
    assert [raw_sha256(p) for p in src] == before, "the source changed"
    assert vms(ws)["s0"]["busy"] is None
    cleanup(ws, "c0", "s0")


# ------------------------------------------------------------------ linked deploy of three


@pytest.mark.parametrize("point,then", [("first placed", "rerun"), ("second placed", "resume"),
                                        ("first placed", "cancel"), ("reserved", "cancel"), ("committed", "rerun")])
def test_linked_deploy_of_three_killed(ws, point, then):
    """A linked deploy of three killed once its names are reserved, once the disk of its first (or
    second) VM is in place, or once all are in place and it is making them usable (committed). Until
    all three are made they are listed as incomplete with the task. The same command (or task resume)
    makes the others and never one twice, and leaves the template free; cancel leaves none of them."""
    base = set(vms(ws))      # VMs of other tests of the module
    ok(ws, "vm", "create", "tpl", "--host", "lab1", "--disk", "16M", "--boot", "live")
    tpl_disk = vms(ws)["tpl"]["disks"][0]["path"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 2M", tpl_disk], check=True, capture_output=True)
    ok(ws, "template", "convert", "tpl")
    before = raw_sha256(tpl_disk)
    names = ["d-01", "d-02", "d-03"]
    when = {"reserved": lambda task: record(ws, "d-03") is not None,
            "first placed": disk_placed(ws, "d-01", "disk0"),
            "second placed": disk_placed(ws, "d-02", "disk0"),
            "committed": lambda task: (task["checkpoint"] or {}).get("committed")}[point]
    for _ in range(5):
        k = kill_at(ws, "template", "deploy", "tpl", "d-##", "--count", "3", when=when)
        assert k.killed, k
        # "committed" leaves a few milliseconds of work: a kill seen there may land after the task ended
        # (then nothing was tested: the VMs go and the deploy is killed again)
        if point != "committed" or task_state(ws, k.task_id) != "succeeded":
            break
        cleanup(ws, *names)
    interrupted(ws, k.task_id, names)
    listed = vms(ws)
    if point != "committed":
        assert all(listed[n]["state"] == "incomplete" for n in names), [listed[n]["state"] for n in names]
    ids = {n: listed[n]["id"] for n in names}
    placed = {n: os.stat(listed[n]["disks"][0]["path"]).st_ino for n in names if exists(listed[n]["disks"][0]["path"])}
    assert len(placed) >= {"reserved": 0, "first placed": 1, "second placed": 2, "committed": 3}[point]
    if then == "cancel":
        ok(ws, "task", "cancel", str(k.task_id))
        settled(ws, left=base | {"tpl"})
    else:
        if then == "rerun":
            assert ok(ws, "template", "deploy", "tpl", "d-##", "--count", "3")["task"] == k.task_id
        else:
            assert ok(ws, "task", "resume", str(k.task_id))["state"] == "succeeded"
        listed = vms(ws)
        assert {n: listed[n]["id"] for n in names} == ids, "a VM was made again"
        for n in names:
            d = listed[n]["disks"][0]
            assert d["backing"] == tpl_disk
            same_image(tpl_disk, d["path"])
            if n in placed:
                assert os.stat(d["path"]).st_ino == placed[n], f"the disk of {n} was made again"
        settled(ws, left=base | {"tpl", *names})
    assert raw_sha256(tpl_disk) == before
    cleanup(ws, *names)
    ok(ws, "template", "delete", "tpl", "--confirm", "tpl")


# ------------------------------------------------------------------ import of an OVA


@pytest.fixture(scope="module")
def ova(ws):
    """An OVA of a VM with two disks holding random data; yields (its path, the source's disks)."""
    src = with_data(ws, "pkg", ("32M", 16), ("16M", 6))
    out = Path(tempfile.mkdtemp(prefix="fova-", dir="/var/tmp"))
    ok(ws, "vm", "export", "pkg", "--out", str(out / "pkg.ova"))
    yield out / "pkg.ova", src
    shutil.rmtree(out, ignore_errors=True)


def staging(ws: Path):
    """A point: the OVA is being extracted or checked (its extraction folder exists, no disk is written yet)."""
    def when(task) -> bool:
        folder = datastore(ws) / "imp"
        return any(folder.glob(".imp.ferry-task*")) and not any(folder.glob("*.part"))
    return when


@pytest.mark.parametrize("point,then", [("staging", "rerun"), ("writing disk0", "rerun"), ("disk0 placed", "rerun"),
                                        ("writing disk0", "cancel")])
def test_import_of_an_ova_killed(ws, ova, point, then):
    """An import killed while it extracts and checks the package, while it writes a disk, or once the
    first disk is in place: the same command finishes it (each disk equal to the exported VM's, no
    extraction folder or temporary file left); cancel leaves no record and no file. The package is
    unchanged."""
    base = set(vms(ws))      # VMs of other tests of the module
    path, src = ova
    before = path.stat().st_mtime_ns, path.stat().st_size
    when = {"staging": staging(ws), "writing disk0": disk_writing(ws, "imp", "disk0"),
            "disk0 placed": disk_placed(ws, "imp", "disk0")}[point]
    cmd = ("vm", "import", str(path), "--host", "lab1", "--name", "imp")
    k = kill_at(ws, *cmd, when=when)
    assert k.killed, k
    interrupted(ws, k.task_id, ["imp"])
    assert vms(ws)["imp"]["state"] == "incomplete"
    if then == "rerun":
        out = ok(ws, *cmd)
        assert out["task"] == k.task_id
        for s, d in zip(src, vms(ws)["imp"]["disks"]):
            same_image(s, d["path"])
        settled(ws, left=base | {"pkg", "imp"})
    else:
        ok(ws, "task", "cancel", str(k.task_id))
        settled(ws, left=base | {"pkg"})
        assert not (datastore(ws) / "imp").exists()
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
    cleanup(ws, "imp")


# ------------------------------------------------------------------ clone of a running VM


def qmp(ws: Path, vm: dict, *commands: dict) -> list:
    """Commands to a VM's QEMU over its QMP socket, straight from the test (fast: right after a kill).
    Replies are matched by id: QEMU may still send a killed client's replies to the next one."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(ws / "lab" / vm["host"] / "run" / f"vm-{vm['id'][:8]}.qmp"))
    f = sock.makefile("rwb")
    try:
        while "QMP" not in json.loads(f.readline()):
            pass
        out = []
        for i, cmd in enumerate(({"execute": "qmp_capabilities"}, *commands)):
            f.write(json.dumps({**cmd, "id": f"test-{i}"}).encode() + b"\n")
            f.flush()
            while (reply := json.loads(f.readline())).get("id") != f"test-{i}":
                pass
            out.append(reply.get("return", reply.get("error")))
        return out[1:]
    finally:
        f.close()
        sock.close()


def agent(ws: Path, vm: str, command: str, *args: str):
    """A guest-agent command (or, with args, a program run in the guest), through Ferry's client here."""
    from ferry.engine.client import EngineClient
    from ferry.engine.vm.service import VMService
    from ferry.engine.workspace import Workspace

    async def go():
        client = EngineClient.open(Workspace.resolve(ws), adopt=False)
        try:
            svc = VMService.of(client.engine)
            async with await svc.agent(await svc.spec(vm)) as ga:
                if not args:
                    return await ga.execute(command)
                r = await ga.exec(command, list(args), timeout=30)
                assert r.exitcode == 0, r.stderr
                return r.stdout.decode()
        finally:
            await client.close()
    return asyncio.run(go())


def test_clone_of_a_running_vm_killed_mid_copy(ws):
    """The copy of a running VM is a block job in the VM's own QEMU, which outlives Ferry. Killed as the
    jobs start (they are paused here so that they are still there, and the guest's filesystems left
    frozen, as Ferry freezes them for that instant): the same command cancels the old jobs, thaws the
    guest and copies again; the copy equals the source. Cancel instead: no job, no copy, guest thawed."""
    base = set(vms(ws))      # VMs of other tests of the module
    src = with_data(ws, "r0", ("160M", 128), ("16M", 0))
    ok(ws, "vm", "start", "r0")
    try:
        r0 = vms(ws)["r0"]
        # a filesystem for the guest to freeze, on its second disk (the first one it never writes)
        agent(ws, "r0", "/bin/sh", "-c", "mkfs.ext4 -q -F /dev/vdb && mkdir -p /mnt/d && mount /dev/vdb /mnt/d")
        before = raw_sha256(src[0])
        for then in ("rerun", "cancel"):
            # killed as its jobs start: they go on in r0's QEMU; the test pauses them there at once
            for _attempt in range(4):
                k = kill_at(ws, "vm", "clone", "r0", "rc", when=disk_writing(ws, "rc", "disk0", above=0))
                assert k.killed, k
                prefix = f"clone-t{k.task_id}-{record(ws, 'rc')['id'][:8]}-"
                qmp(ws, r0, *({"execute": "block-job-pause", "arguments": {"device": prefix + str(j)}} for j in (0, 1)))
                names = sorted(j["device"] for j in qmp(ws, r0, {"execute": "query-block-jobs"})[0])
                if prefix + "0" in names:      # the copy of the 160 MiB disk, still there
                    break
                # The copy outran the kill (a warm cache): this point was missed; roll it back, try again.
                ok(ws, "task", "cancel", str(k.task_id))
            else:
                raise AssertionError("the copy jobs always ended before they could be caught after the kill")
            # killed as the jobs start, Ferry mostly leaves the guest frozen (it freezes it for that instant)
            if agent(ws, "r0", "guest-fsfreeze-status") != "frozen":
                agent(ws, "r0", "guest-fsfreeze-freeze")
            interrupted(ws, k.task_id, ["rc"])
            # First aid: the command that found the clone interrupted (`ferry tasks`) thawed the guest at
            # once; its writes do not hang until someone resumes or cancels the clone.
            assert agent(ws, "r0", "guest-fsfreeze-status") == "thawed"
            if then == "rerun":
                out = ok(ws, "vm", "clone", "r0", "rc")
                assert out["task"] == k.task_id and out["from_running"] is True
                same_image(src[0], vms(ws)["rc"]["disks"][0]["path"])
                log = [line["message"] for line in ok(ws, "task", "show", str(k.task_id))["log"]]
                assert any(f"cancelled {len(names)} copy job(s) an earlier run left" in m for m in log), log
                assert any("left frozen by an earlier run" in m for m in log), log
                settled(ws, left=base | {"r0", "rc"})
                cleanup(ws, "rc")
            else:
                ok(ws, "task", "cancel", str(k.task_id))
                settled(ws, left=base | {"r0"})
                assert not (datastore(ws) / "rc").exists()
            assert qmp(ws, r0, {"execute": "query-block-jobs"})[0] == []
            assert agent(ws, "r0", "guest-fsfreeze-status") == "thawed"
        assert raw_sha256(src[0]) == before
    finally:
        ok(ws, "vm", "stop", "r0", "--force")
        cleanup(ws, "r0")


def test_clone_resumed_after_its_source_changed_copies_it_again_whole(ws):
    """A clone of a stopped VM killed once its first disk is in place; meanwhile the source is written
    to (started and used while the clone waited). The resumed clone must not mix its disks from two
    moments: it copies them all again, and each equals the source as it is now."""
    base = set(vms(ws))
    src = with_data(ws, "s1", ("48M", 24), ("16M", 8))
    k = kill_at(ws, "vm", "clone", "s1", "c1", when=disk_placed(ws, "c1", "disk0"))
    assert k.killed, k
    interrupted(ws, k.task_id, ["c1"])
    for path in src:       # both disks change, as a guest's writes would change them
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 1M", path], check=True, capture_output=True)
    out = ok(ws, "vm", "clone", "s1", "c1")
    assert out["task"] == k.task_id
    for s, d in zip(src, vms(ws)["c1"]["disks"]):
        same_image(s, d["path"])
    log = [line["message"] for line in ok(ws, "task", "show", str(k.task_id))["log"]]
    assert any("changed while the clone was interrupted" in m for m in log), log
    settled(ws, left=base | {"s1", "c1"})
    cleanup(ws, "c1", "s1")
