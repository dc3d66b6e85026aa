"""VMs in the lab, as an operator drives them with `ferry vm ...`: real QEMU (TCG), real qcow2, real agent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.engine import api
from ferry.engine.api import AgentReport, ReconcileReport, VMView
from ferry.engine.vm.model import parse_size
from harness.cli import ferry
from harness.lab import lab_workspace, ok
from harness.qemu import image_cache, kill_all, raw_sha256

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ws():
    yield from lab_workspace('fvm-', network=True)   # its hosts over SSH, as production's



def fails(ws: Path, *args: str) -> str:
    r = ferry(ws, *args)
    assert r.code != 0, f"ferry {' '.join(args)} should fail: {r.out}"
    assert "Traceback" not in r.err
    return r.err


def task_ids(ws: Path) -> list[int]:
    return [t["id"] for t in ok(ws, "tasks", "--all")]


def refused(ws: Path, *args: str) -> str:
    """A refusal: exit code 2, one line on stderr (with a hint), no task made. Returns the line."""
    before = task_ids(ws)
    r = ferry(ws, *args)
    assert r.code == 2, f"ferry {' '.join(args)} should be refused: {r.code} {r.out} {r.err}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: ") and "(hint: " in lines[0], r.err
    assert task_ids(ws) == before, "a refusal made a task"
    return lines[0]


def vms(ws: Path, *extra: str) -> dict[str, dict]:
    return {v["name"]: v for v in ok(ws, "vm", "list", *extra)}


def _audit(ws: Path) -> list[dict]:
    """The audit log, newest first."""
    con = sqlite3.connect(ws / "state.db")
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY id DESC LIMIT 20")]
    finally:
        con.close()


def qemu_io(path: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True, capture_output=True)


def test_create_start_agent_shutdown(ws):
    made = ok(ws, "vm", "create", "alpha", "--host", "lab1", "--disk", "64M", "--memory", "192M")
    disk = made["disks"][0]
    assert Path(disk).is_file() and disk.startswith(str(ws / "lab" / "lab1" / "datastore"))
    assert vms(ws)["alpha"]["state"] == "stopped"

    out = ok(ws, "vm", "start", "alpha")
    assert out["agent"] is True and out["pid"]
    assert vms(ws)["alpha"]["state"] == "running"
    info = ok(ws, "vm", "agent", "info", "alpha")
    assert info["agent"] == "running" and info["version"]
    assert info["kernel"] == ok(ws, "lab", "image", "build")["kernel_release"]     # the live image's, cached
    assert "ferry live image" in (info["os"] or "").lower()
    assert 0 < info["mem_used"] < info["mem_total"] <= 192 * MiB
    # Its NIC got an address from the (user-mode) network, and the agent reports it.
    deadline = time.monotonic() + 20
    while not any(ip.startswith("10.0.2.") for ip in info["ips"]) and time.monotonic() < deadline:
        info = ok(ws, "vm", "agent", "info", "alpha")
    assert any(ip.startswith("10.0.2.15/") for ip in info["ips"]), info["ips"]
    text = ferry(ws, "vm", "agent", "info", "alpha").out
    assert text.startswith(f"alpha: guest agent running (version {info['version']})"), text
    assert "10.0.2.15/24" in text and "MiB used of" in text and "% busy" in text
    shown = ferry(ws, "vm", "show", "alpha").out
    assert shown.count(info["kernel"]) == 1, "the kernel is named once (the live image's OS name has it)"
    listed = ferry(ws, "vm", "list", "--agents").out.splitlines()
    assert listed[0].split()[-2:] == ["AGENT", "IPS"]
    row = next(line for line in listed if line.startswith("alpha "))
    assert re.search(r"  running  10\.0\.2\.15(,|$)", row) and "fe80::" not in row, listed   # no link-local noise
    sync = ok(ws, "vm", "agent", "timesync", "alpha")
    assert abs(sync["offset_after_s"]) < 5

    # The VM is a daemon of the host: no Ferry process runs now, and it still answers.
    assert ok(ws, "vm", "reconcile")["running"] == 1

    # What cannot apply to a running VM is refused up front, before any task (item 14), with the reason.
    assert refused(ws, "vm", "start", "alpha") == "ferry: alpha is already running (hint: nothing to do)"
    line = refused(ws, "vm", "delete", "alpha", "--confirm", "alpha")
    assert "alpha is running; a running VM is never deleted" in line and "ferry vm stop alpha" in line
    assert "must be stopped to be exported" in refused(ws, "vm", "export", "alpha", "--out", "/var/tmp/alpha.ova")
    assert "must be stopped to become a template" in refused(ws, "template", "convert", "alpha")
    # A delete that reaches the engine anyway (past the precheck) is refused by the task: nothing is removed.
    info, _, _ = run_task(ws, "vm.delete", {"vm": "alpha", "host": "lab1", "confirm": "alpha"}, direct=True)
    assert info.state == "failed" and info.error == "alpha is running; a running VM is never deleted"
    assert Path(disk).is_file() and vms(ws)["alpha"]["state"] == "running"

    ok(ws, "vm", "stop", "alpha")
    v = vms(ws)["alpha"]
    assert v["state"] == "stopped" and v["pid"] is None


def test_duplicate_name_and_bad_input_refused(ws):
    err = refused(ws, "vm", "create", "alpha", "--host", "lab1", "--disk", "16M")
    assert "already exists" in err and "alpha" in err
    assert "bad name" not in err
    err = fails(ws, "vm", "create", "beta", "--host", "lab1", "--memory", "1.5M")
    assert "memory '1.5M' is not a whole number of MiB" in err
    err = refused(ws, "vm", "create", "bad/name", "--host", "lab1")
    assert "not valid" in err and "hint" in err
    err = refused(ws, "vm", "create", "beta", "--host", "lab1", "--disk", "16M:shared:nope")
    assert "datastore 'nope' is not attached to host lab1" in err
    assert refused(ws, "vm", "start", "nobody").startswith("ferry: no VM or template named 'nobody'")
    assert "beta" not in vms(ws)
    # What a VM's files say is checked before a task too: a disk gone from the host, a disk no VHD can hold.
    gone = ok(ws, "vm", "create", "gone", "--host", "lab1", "--disk", "16M")["disks"][0]
    os.unlink(gone)
    assert f"disk disk0 of gone is missing: {gone} on lab1" in refused(ws, "vm", "start", "gone")
    huge = ok(ws, "vm", "create", "huge", "--host", "lab1", "--disk", "16M")["disks"][0]
    subprocess.run(["qemu-img", "resize", "-q", huge, "2100G"], check=True)    # sparse: nothing written
    assert "larger than a VHD can hold" in refused(ws, "vm", "export", "huge", "--out", "/var/tmp/huge.ova")
    for name in ("gone", "huge"):
        ok(ws, "vm", "delete", name, "--confirm", name)


def test_hibernate_and_resume_keeps_memory(ws):
    ok(ws, "vm", "create", "sleepy", "--host", "lab2", "--disk", "32M")
    ok(ws, "vm", "start", "sleepy")
    marker = f"in-memory-{time.time_ns()}"
    _guest(ws, "sleepy", f"echo {marker} > /tmp/marker")   # /tmp in the live image is RAM
    out = ok(ws, "vm", "hibernate", "sleepy")
    assert Path(out["state_file"]).is_file() and out["bytes"] > MiB
    v = vms(ws)["sleepy"]
    assert v["state"] == "hibernated" and v["pid"] is None
    resumed = ok(ws, "vm", "start", "sleepy")
    assert resumed["resumed"] is True
    assert not Path(out["state_file"]).exists()
    assert _guest(ws, "sleepy", "cat /tmp/marker").strip() == marker

    # Paused (QMP stop): the guest halts where it is, its QEMU and memory kept; nothing in it answers.
    pid = vms(ws)["sleepy"]["pid"]
    out = ok(ws, "vm", "pause", "sleepy")
    assert (out["state"], out["vm"], out["host"], out["was"]) == ("succeeded", "sleepy", "lab2", "running")
    v = vms(ws)["sleepy"]
    assert (v["state"], v["pid"]) == ("paused", pid)
    assert ferry(ws, "vm", "show", "sleepy").out.splitlines()[0].endswith(f"⏸ paused on lab2, pid {pid}")
    r = ferry(ws, "vm", "agent", "info", "sleepy")
    assert r.code == 1 and "does not answer" in r.out, r      # the agent is asked, and the halted guest is silent
    assert refused(ws, "vm", "start", "sleepy") == "ferry: sleepy is paused (hint: continue it: ferry vm resume sleepy)"
    assert refused(ws, "vm", "pause", "sleepy") == ("ferry: sleepy is already paused "
                                                     "(hint: continue it: ferry vm resume sleepy)")
    assert refused(ws, "vm", "stop", "sleepy").startswith("ferry: sleepy is paused: its guest agent answers once it "
                                                          "runs again (hint: continue it first (ferry vm resume sleepy)")
    # Resumed (QMP cont): running in the same QEMU, its memory as it was, the agent answers again.
    r = ferry(ws, "vm", "resume", "sleepy")
    assert r.code == 0 and r.out.strip().endswith("sleepy runs again on lab2"), r
    v = vms(ws)["sleepy"]
    assert (v["state"], v["pid"]) == ("running", pid)
    assert _guest(ws, "sleepy", "cat /tmp/marker").strip() == marker
    assert ok(ws, "vm", "agent", "info", "sleepy")["agent"] == "running"
    ok(ws, "vm", "stop", "sleepy", "--force")


def _guest(ws: Path, vm: str, script: str, timeout: float = 30) -> str:
    """Runs a shell script in the guest through its agent (guest-exec)."""
    import asyncio

    from ferry.engine.client import EngineClient
    from ferry.engine.workspace import Workspace

    async def go() -> str:
        client = EngineClient.open(Workspace.resolve(ws), adopt=False)
        try:
            from ferry.engine.vm.service import VMService
            svc = VMService.of(client.engine)
            async with await svc.agent(await svc.spec(vm)) as ga:
                r = await ga.exec("/bin/sh", ["-c", script], timeout=timeout)
                assert r.exitcode == 0, r.stderr
                return r.stdout.decode()
        finally:
            await client.close()
    return asyncio.run(go())


def test_safe_shutdown_refused_without_agent_then_force(ws):
    ok(ws, "vm", "create", "mute", "--host", "lab1", "--disk", "16M")
    ok(ws, "vm", "start", "mute")
    # Stop the real agent inside the guest: a safe shutdown must now refuse, naming the way out.
    _guest(ws, "mute", "(sleep 0.3; killall qemu-ga) >/dev/null 2>&1 &")
    deadline = time.monotonic() + 60
    while (r := ferry(ws, "vm", "agent", "info", "mute")).code == 0:
        assert time.monotonic() < deadline, "the guest agent still answers"
    assert r.code == 1 and r.out.startswith("mute: guest agent not running") and "does not answer" in r.out, r
    err = refused(ws, "vm", "stop", "mute", "--timeout", "5")
    assert "cannot shut down mute safely" in err and "--force" in err
    assert "cannot reboot mute safely" in refused(ws, "vm", "reboot", "mute")
    assert vms(ws)["mute"]["state"] == "running"
    err = fails(ws, "vm", "agent", "timesync", "mute")
    assert "the guest agent of mute does not answer" in err
    audit = _audit(ws)
    assert audit[0]["action"] == "vm.timesync" and audit[0]["target"] == "mute", audit[:2]
    assert audit[0]["result"].startswith("failed: "), "a failed operator action is audited too"
    ok(ws, "vm", "stop", "mute", "--force")
    assert vms(ws)["mute"]["state"] == "stopped"


# ---------------------------------------------------------------------------------- disks with real data

REGION = 64 * MiB
REC = 4096
REC_AT = 1024 * MiB        # where the guest writes its records, inside the random data


def fill_random(disk: str, size: int, raw: Path) -> list[str]:
    """Writes `size` bytes of random data from offset 0 of a VM's qcow2 disk (through a raw file kept
    at `raw`); returns the SHA-256 of each REGION of it."""
    hashes = []
    with open(raw, "wb") as f:
        for _ in range(size // REGION):
            block = os.urandom(REGION)
            hashes.append(hashlib.sha256(block).hexdigest())
            f.write(block)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), disk], check=True,
                   capture_output=True)
    return hashes


def as_raw(image: str, raw: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(raw)], check=True, capture_output=True)
    return raw


def region_hashes(raw: Path, count: int) -> list[str]:
    out = []
    with open(raw, "rb") as f:
        for _ in range(count):
            out.append(hashlib.sha256(f.read(REGION)).hexdigest())
    return out


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def count(text: str) -> int:
    """A counter a guest writes to a file: -1 while it is being rewritten (read empty)."""
    return int(text) if text.strip().isdigit() else -1


def guest_until(ws: Path, vm: str, script: str, cond, what: str, timeout: float = 120) -> str:
    """Runs `script` in the guest until cond(its output) holds (a state to wait for, not a time)."""
    deadline = time.monotonic() + timeout
    while True:
        out = _guest(ws, vm, script)
        if cond(out):
            return out
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last answer {out!r}"


async def _open_client(ws: Path):
    from ferry.engine.client import EngineClient
    from ferry.engine.workspace import Workspace
    client = EngineClient.open(Workspace.resolve(ws), adopt=False)
    await client.start()
    return client


async def _follow(client, tid: int, on_event=None) -> tuple[Any, list, list[str]]:
    """Follows a task of this client to its end: (its final info, its progress events, its log);
    on_event is awaited with each event of the task. The events are read as they come, apart from
    the reads of the task's state (which wait on the store): a reader that lagged would see progress
    reports merged into the newest."""
    sub = client.subscribe()
    seen: list = []
    ended = asyncio.Event()

    async def take(ev) -> None:
        if ev.task_id != tid:
            return
        if ev.type == "progress":
            seen.append(ev.data)
        elif ev.type == "state" and ev.data.state.final:
            ended.set()
        if on_event is not None:
            await on_event(ev)

    async def read() -> None:
        async for ev in sub:
            await take(ev)
    reader = asyncio.create_task(read())
    try:
        # A task that ended before the subscription has no state event in it: its state is read too.
        while not (info := await client.get_task(tid)).state.final:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), 1.0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        for ev in sub.drain():
            await take(ev)
    finally:
        reader.cancel()
        sub.close()
    log = [line.message for line in await client.task_log(tid)]
    return info, seen, log


def run_task(ws: Path, kind: str, params: dict, *, direct: bool = False, cancel_after: str | None = None,
             timeline: list | None = None) -> tuple[Any, list, list[str]]:
    """Submits a VM task through the engine's client (as the console does) and follows it. `direct`:
    straight to the engine, past the precheck (as an older client would, or a state that changed
    between the check and the task): what the task itself does. `cancel_after`: cancel it once it
    logs a line that starts so. `timeline`: gets every event of the task (.ts, .type, .data)."""
    async def go():
        client = await _open_client(ws)
        try:
            tid = await (client.submit if direct else client.vm_task)(kind, params)
            cancelled: list = []

            async def on_event(ev) -> None:
                if timeline is not None:
                    timeline.append(ev)
                if (cancel_after is not None and not cancelled and ev.type == "log"
                        and ev.data[1].startswith(cancel_after)):
                    cancelled.append(await client.cancel(tid))
            return await _follow(client, tid, on_event)
        finally:
            await client.close()
    return asyncio.run(go())


def bytes_moved(events: list) -> tuple[int, list[int]]:
    """The one bytes_total of a task's progress events (asserted fixed) and its bytes_done, in order."""
    with_bytes = [p for p in events if p.bytes_total]
    totals = {p.bytes_total for p in with_bytes}
    assert len(totals) == 1, f"the total changed during the run: {sorted(totals)}"
    done = [p.bytes_done for p in with_bytes]
    assert done == sorted(done), f"progress went back: {done}"
    return totals.pop(), done


@pytest.fixture
def scratch():
    """A folder for disk-sized files (raw images of GiBs), removed after the test rather than kept
    with pytest's last temporary folders."""
    d = Path(tempfile.mkdtemp(prefix="fscratch-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def big(ws):
    """A VM with 1.5 GiB of random data on disk0 (what its guest sees), and an empty 64 MiB disk1 for an
    ext4 filesystem the guest mounts; stopped. Yields (name, its raw data file, hashes of each REGION)."""
    size = 1536 * MiB
    made = ok(ws, "vm", "create", "big01", "--host", "lab1", "--disk", str(size), "--disk", "64M",
              "--boot", "live")
    data = Path(tempfile.mkdtemp(prefix="fbig-", dir="/var/tmp"))
    try:
        hashes = fill_random(made["disks"][0], size, data / "disk0.raw")
        yield "big01", data / "disk0.raw", hashes
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_clone_of_a_running_vm_with_data_is_point_in_time(ws, big, scratch):
    """Item 11: a running VM whose disk holds gigabytes, written by its guest during the copy. The copy is
    the disk at one instant (records the guest wrote before it, none after; the rest byte for byte), its
    filesystem frozen for that instant and thawed after, and the progress moves with the bytes."""
    name, data, hashes = big
    rec_at = REC_AT
    ok(ws, "vm", "start", name)
    try:
        _guest(ws, name, "mkfs.ext4 -q -F /dev/vdb && mkdir -p /mnt/data && mount /dev/vdb /mnt/data && "
                         "echo before > /mnt/data/before && sync")
        # Numbered 4 KiB records written one after the other with O_DIRECT (each reaches the disk before
        # the next starts), and files written in the filesystem, until told to stop.
        _guest(ws, name, f"(i=0; while [ ! -e /tmp/stop ]; do printf 'REC%08d' $i | "
                         f"dd of=/dev/vda bs={REC} seek=$(({rec_at // REC} + i)) conv=notrunc oflag=direct "
                         "2>/dev/null; echo $i > /mnt/data/f$((i % 20)); i=$((i+1)); echo $i > /tmp/n; done; "
                         "echo done > /tmp/stopped) >/dev/null 2>&1 &")
        guest_until(ws, name, "cat /tmp/n 2>/dev/null", lambda out: count(out) >= 20, "the guest writing")

        # Cancelled mid-copy (as soon as its jobs run: a copy of data the host has cached takes a second or
        # two): the copy is given up and removed, and the log says the guest was thawed.
        info, _, log = run_task(ws, "vm.clone", {"src": name, "names": ["big02"]},
                                cancel_after=f"point-in-time copy of {name} started")
        assert info.state == "cancelled", (info.error, log)
        assert any(line.startswith(f"thawed 1 filesystem of {name}") for line in log), log
        assert "big02" not in vms(ws) and not (ws / "lab" / "lab1" / "datastore" / "big02").exists()

        timeline: list = []
        info, events, log = run_task(ws, "vm.clone", {"src": name, "names": ["big02"]}, timeline=timeline)
        assert info.state == "succeeded", (info.error, log)
        assert info.result["from_running"] is True

        # The guest goes on; stop it once it has written beyond what the copy holds.
        copy = as_raw((ws / "lab" / "lab1" / "datastore" / "big02" / "disk0.qcow2").as_posix(), scratch / "c0.raw")
        records = read_at(copy, rec_at, 20000 * REC)
        k = next(i for i in range(20000) if records[i * REC:i * REC + 11] != b"REC%08d" % i)
        guest_until(ws, name, "cat /tmp/n", lambda out: count(out) > k + 5, "the guest writing past the copy")
        _guest(ws, name, "touch /tmp/stop")
        n = int(guest_until(ws, name, "cat /tmp/stopped 2>/dev/null && cat /tmp/n || echo -1",
                            lambda out: out.split()[-1] != "-1", "the writer to stop").split()[-1])
        # the guest's filesystem is thawed: it still takes writes (a frozen one would block this)
        assert _guest(ws, name, "echo after > /mnt/data/after && sync && cat /mnt/data/after").strip() == "after"
    finally:
        ok(ws, "vm", "stop", name, "--force")

    # Point in time: records 0..k-1 are in the copy, and where the guest wrote later (k..n-1) the copy
    # holds the data from before; every other byte is the source's.
    print(f"records in the copy: {k} of the {n} the guest wrote")
    assert 20 <= k < n and n * REC < REGION
    original = read_at(data, rec_at, n * REC)
    for i in range(k, n):
        assert records[i * REC:(i + 1) * REC] == original[i * REC:(i + 1) * REC], f"record {i} is from after the copy"
    got = region_hashes(copy, len(hashes))
    assert [h for i, h in enumerate(got) if i != rec_at // REGION] == \
        [h for i, h in enumerate(hashes) if i != rec_at // REGION]

    # The filesystem was frozen for the copy: ext4 clears its needs_recovery flag when frozen, and the copy is clean.
    fs = as_raw((ws / "lab" / "lab1" / "datastore" / "big02" / "disk1.qcow2").as_posix(), scratch / "c1.raw")
    features = subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True).stdout
    assert "Filesystem features:" in features and "needs_recovery" not in features
    assert subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True).returncode == 0
    froze = next(i for i, line in enumerate(log) if line.startswith(f"froze 1 filesystem of {name}"))
    thawed = next(i for i, line in enumerate(log) if line.startswith(f"thawed 1 filesystem of {name}"))
    assert froze < thawed < next(i for i, line in enumerate(log) if "point-in-time copy" in line)

    # Item 12: bytes done grow towards a total fixed from the start (all of both disks), not only at the end:
    # the bar moves at least once in every two seconds of the copy. (Every report the engine made, read
    # as it came; how often QEMU answers how far its jobs are, and how fast the host copies, vary.)
    total, done = bytes_moved(events)
    assert total == 1600 * MiB
    began = next(ev.ts for ev in timeline if ev.type == "log" and "point-in-time copy" in ev.data[1])
    ended = next((ev.ts for ev in timeline if ev.type == "progress" and ev.data.bytes_done == total), None)
    assert ended is not None, f"the copy never showed all its bytes done: {done}"
    moves = len({d for d in done if 0 < d < total})
    assert moves >= max(1, int((ended - began) / 2)), f"{moves} moves in {ended - began:.1f} s: {done}"


def test_clone_of_a_stopped_vm_with_data_reports_bytes(ws, big, scratch):
    """Item 12: an offline clone (qemu-img convert) shows bytes done growing towards a fixed total."""
    name, data, hashes = big
    info, events, _ = run_task(ws, "vm.clone", {"src": name, "names": ["big03"]})
    assert info.state == "succeeded", info.error
    total, done = bytes_moved(events)
    assert total == 1600 * MiB
    assert len({d for d in done if 0 < d < total}) >= 3, done
    copy = as_raw((ws / "lab" / "lab1" / "datastore" / "big03" / "disk0.qcow2").as_posix(), scratch / "c0.raw")
    got = region_hashes(copy, len(hashes))      # the region of the guest's records aside, the source's data
    assert [h for i, h in enumerate(got) if i != REC_AT // REGION] == \
        [h for i, h in enumerate(hashes) if i != REC_AT // REGION]


def test_templates_linked_deploy_and_refusals(ws):
    ok(ws, "vm", "create", "base", "--host", "lab1", "--disk", "32M")
    qemu_io(vms(ws)["base"]["disks"][0]["path"], "write -P 0x42 0 1M")
    ok(ws, "template", "convert", "base")
    assert refused(ws, "vm", "start", "base") == ("ferry: base is a template, and a template never starts "
                                                   "(hint: deploy a VM from it: ferry template deploy base NEW-NAME)")
    assert "already a template" in refused(ws, "template", "convert", "base")
    out = ok(ws, "template", "deploy", "base", "web-##", "--count", "3")
    names = [m["vm"] for m in out["made"]]
    assert names == ["web-01", "web-02", "web-03"] and out["linked"] is True
    all_vms = vms(ws)
    base_disk = all_vms["base"]["disks"][0]["path"]
    for n in names:
        d = all_vms[n]["disks"][0]
        assert d["backing"] == base_disk
        info = subprocess.run(["qemu-img", "info", "-U", d["path"]], capture_output=True, text=True).stdout
        assert base_disk in info
        assert raw_sha256(d["path"]) == raw_sha256(base_disk)
    err = refused(ws, "template", "delete", "base", "--confirm", "base")
    assert "linked clones" in err and "web-01, web-02, web-03" in err
    err = refused(ws, "template", "to-vm", "base")
    assert "linked clones" in err
    assert "is a VM, and VMs are deployed from templates" in refused(ws, "template", "deploy", "web-01", "w9")
    # A linked clone boots.
    assert ok(ws, "vm", "start", "web-02")["agent"] is True
    ok(ws, "vm", "stop", "web-02", "--force")
    # Template -> template with other hardware; a full deploy has no backing file.
    ok(ws, "template", "clone", "base", "base-big", "--cpus", "2", "--memory", "384")
    big = vms(ws)["base-big"]
    assert big["kind"] == "template" and big["cpus"] == 2 and big["memory_mb"] == 384
    full = ok(ws, "template", "deploy", "base-big", "solo", "--full", "--disk-size", "48M")
    solo = vms(ws)["solo"]
    assert solo["disks"][0]["backing"] is None and solo["disks"][0]["size"] == 48 * MiB
    assert "backing" not in subprocess.run(["qemu-img", "info", "-U", solo["disks"][0]["path"]],
                                           capture_output=True, text=True).stdout
    assert full["linked"] is False


def test_export_import_round_trip(ws, tmp_path):
    ok(ws, "vm", "create", "pkg", "--host", "lab1", "--disk", "32M", "--cpus", "2")
    src_disk = vms(ws)["pkg"]["disks"][0]["path"]
    qemu_io(src_disk, "write -P 0x7e 4M 2M")
    for fmt_, out in (("ova", str(tmp_path / "pkg.ova")), ("ovf", str(tmp_path / "pkg-ovf"))):
        ok(ws, "vm", "export", "pkg", "--out", out)
        name = f"pkg-{fmt_}"
        ok(ws, "vm", "import", out if fmt_ == "ova" else str(tmp_path / "pkg-ovf" / "pkg.ovf"),
           "--host", "lab2", "--name", name)
        v = vms(ws)[name]
        assert v["cpus"] == 2 and v["host"] == "lab2"
        assert raw_sha256(v["disks"][0]["path"]) == raw_sha256(src_disk)
    # An import whose name is taken is refused before it starts: by --name, or by the name in the package.
    err = refused(ws, "vm", "import", str(tmp_path / "pkg.ova"), "--host", "lab2", "--name", "pkg-ova")
    assert "a VM or template named 'pkg-ova' already exists" in err
    assert "named 'pkg' already exists" in refused(ws, "vm", "import", str(tmp_path / "pkg.ova"), "--host", "lab2")
    assert ok(ws, "vm", "start", "pkg-ova")["agent"] is True
    ok(ws, "vm", "stop", "pkg-ova", "--force")


def test_export_paused_and_resumed_goes_on_from_where_it_was(ws, scratch):
    """Item 13: an export paused mid-way keeps what it made; resumed, it goes on from there (the disk is
    not converted again), its progress never goes back, its total never changes, and the package it
    writes verifies against its manifest and holds the disk byte for byte."""
    from ferry.engine.taskmodel import TaskState
    size = 384 * MiB
    made = ok(ws, "vm", "create", "exp01", "--host", "lab1", "--disk", str(size), "--boot", "live")
    hashes = fill_random(made["disks"][0], size, scratch / "data.raw")
    out = scratch / "exp01.ova"

    async def go():
        client = await _open_client(ws)
        try:
            tid = await client.vm_task("vm.export", {"vm": "exp01", "out": str(out), "ova": True})

            async def pause_once_converted(p) -> None:
                if p.item.startswith(("converted", "hashing", "writing")) and not asked:
                    asked.append(p)
                    await client.pause(tid)
            asked: list = []
            sub = client.subscribe()
            before: list = []
            while (await client.get_task(tid)).state != TaskState.PAUSED:
                for ev in await sub.wait(timeout=1.0):
                    if ev.type == "progress" and ev.task_id == tid:
                        before.append(ev.data)
                        await pause_once_converted(ev.data)
                assert not (await client.get_task(tid)).state.final, "the export ended before it was paused"
            sub.close()
            kept = sorted(p.name for stage in scratch.glob(".exp01.ova.ferry-*") for p in stage.iterdir())
            await client.resume(tid)
            info, after, log = await _follow(client, tid)
            return info, before, after, log, kept
        finally:
            await client.close()

    info, before, after, log, kept = asyncio.run(go())
    assert info.state == "succeeded", (info.error, log)
    assert "exp01-disk0.vhd" in kept, "the converted disk was kept over the pause"
    assert not list(scratch.glob(".exp01.ova.ferry-*")), "the staging folder is gone"
    assert any(line.startswith("going on with the export of exp01") for line in log)
    assert any(p.item.endswith("done before") for p in after), "the disk was converted again"
    assert after and after[0].bytes_done >= before[-1].bytes_done
    total, done = bytes_moved(before + after)
    assert total == 3 * size

    ok(ws, "vm", "import", str(out), "--host", "lab2", "--name", "exp02")    # verifies the manifest first
    copy = as_raw(vms(ws)["exp02"]["disks"][0]["path"], scratch / "copy.raw")
    assert region_hashes(copy, len(hashes)) == hashes


def test_tampered_ova_refused_and_nothing_left(ws, tmp_path):
    import tarfile
    ok(ws, "vm", "create", "tamper", "--host", "lab1", "--disk", "16M")
    qemu_io(vms(ws)["tamper"]["disks"][0]["path"], "write -P 0x11 0 1M")
    good = tmp_path / "t.ova"
    ok(ws, "vm", "export", "tamper", "--out", str(good))
    bad = tmp_path / "bad.ova"
    with tarfile.open(good) as src, tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".vhd"):
                data = bytearray(data)
                data[len(data) // 3] ^= 0xFF
                data = bytes(data)
            import io
            dst.addfile(m, io.BytesIO(data))
    err = fails(ws, "vm", "import", str(bad), "--host", "lab1", "--name", "tampered")
    assert "tamper-disk0.vhd" in err and "SHA256" in err
    assert "tampered" not in vms(ws)
    assert not (ws / "lab" / "lab1" / "datastore" / "tampered").exists()


# What `ferry vm list --json` has printed for a VM since issue 9: scripts and the chaos harness read these.
VM_JSON_KEYS = {"id", "name", "host", "state", "kind", "cpus", "max_cpus", "memory_mb", "disks", "nics", "boot",
                "passthrough", "origin", "hibernate_file", "recycled", "purge_at", "pid", "busy", "agent"}


def test_vm_json_is_the_engines_typed_records(tmp_path):
    """Every `--json` of a VM command prints the engine's typed records with the API's one codec: the
    output decodes into them and api.dumps of those is the output again, byte for byte; a VM keeps the
    keys and values scripts read."""
    ws = tmp_path
    ok(ws, "vm", "create", "j1", "--host", "lab1", "--disk", "16M", "--cpus", "2", "--memory", "128")
    ok(ws, "vm", "create", "jt", "--host", "lab2", "--disk", "16M")
    ok(ws, "template", "convert", "jt")
    ok(ws, "template", "deploy", "jt", "jw")
    ok(ws, "vm", "create", "jz", "--host", "lab3", "--disk", "16M")
    ok(ws, "vm", "delete", "jz", "--delayed", "--confirm", "jz")
    for args, shape in ((("vm", "list"), list[VMView]), (("vm", "list", "--recycled"), list[VMView]),
                        (("vm", "list", "--agents"), list[VMView]), (("template", "list"), list[VMView]),
                        (("vm", "show", "jw"), VMView), (("vm", "reconcile"), ReconcileReport),
                        (("vm", "agent", "info", "j1"), AgentReport)):
        r = ferry(ws, *args, "--json")
        assert r.code in (0, 1) and "Traceback" not in r.err, (args, r.err)
        records = api.decode(r.out.encode(), shape)
        assert r.out.rstrip("\n") == api.dumps(records), args

    listed = {v["name"]: v for v in ok(ws, "vm", "list")}
    assert set(listed) == {"j1", "jt", "jw"} and all(set(v) == VM_JSON_KEYS for v in listed.values())
    j1, jt, jw = listed["j1"], listed["jt"], listed["jw"]
    assert (j1["state"], j1["kind"], j1["host"], j1["cpus"], j1["max_cpus"], j1["memory_mb"]) == \
        ("stopped", "vm", "lab1", 2, 4, 128)
    assert j1["disks"] == [{"name": "disk0", "datastore": "lab1-local", "path": j1["disks"][0]["path"],
                            "size": 16 * MiB, "bus": "virtio", "shared": False, "backing": None}]
    [nic] = j1["nics"]
    assert nic["network"] == "default" and re.fullmatch(r"52(:[0-9a-f]{2}){5}", nic["mac"]) and \
        j1["boot"] == ["disk", "live"]                 # a MAC of its own, recorded (issue 12)
    assert jw["nics"][0]["mac"] != jt["nics"][0]["mac"]  # a copy gets new MACs
    assert (j1["recycled"], j1["purge_at"], j1["pid"], j1["busy"], j1["agent"]) == (None, None, None, None, None)
    assert (jt["state"], jt["kind"]) == ("template", "template")
    assert jw["origin"] == "jt" and jw["disks"][0]["backing"] == jt["disks"][0]["path"]
    [jz] = ok(ws, "vm", "list", "--recycled")
    assert jz["name"] == "jz" and jz["recycled"] <= time.time() < jz["purge_at"]
    agent = ferry(ws, "vm", "agent", "info", "j1", "--json").json
    assert agent["agent"] == "not running" and "not running" in agent["reason"]


def test_secure_delete_leaves_none_of_the_data_on_the_device(tmp_path):
    """Secure delete overwrites the blocks the disk used: after it, the datastore's device holds none of
    the VM's data. (A delete that only removed or truncated the file would leave all of it there.)"""
    with small_site(tmp_path, secure="ext4:48m") as site:
        root = site.root
        disk = ok(root, "vm", "create", "secret", "--host", "h1", "--disk", "16M:secure")["disks"][0]
        marker = b"FERRY-SECRET-" + os.urandom(8).hex().encode() + b"\n"
        raw = tmp_path / "secret.raw"                   # not on the device: the marker is there only in the disk
        raw.write_bytes((marker * (8 * MiB // len(marker) + 1))[:8 * MiB])
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), disk], check=True,
                       capture_output=True)
        device = site.images["secure"]
        subprocess.run(["sync", "-f", disk], check=True)
        assert device.read_bytes().count(marker) >= 8 * MiB // len(marker) - 2, "the data is on the device"

        err = fails(root, "vm", "delete", "secret", "--secure", "--confirm", "wrong")
        assert "typed" in err or "confirm" in err
        ok(root, "vm", "delete", "secret", "--secure", "--confirm", "secret")
        assert not Path(disk).exists() and "secret" not in vms(root)
        site.unmount("secure")                          # everything written is on the device now
        assert device.read_bytes().count(marker[:16]) == 0, "the VM's data is still on the device"


def test_delayed_delete_restore_and_purge(ws):
    ok(ws, "vm", "create", "bin", "--host", "lab2", "--disk", "16M")
    disk = vms(ws)["bin"]["disks"][0]["path"]
    qemu_io(disk, "write -P 0x33 0 1M")
    before = raw_sha256(disk)
    ok(ws, "vm", "delete", "bin", "--delayed", "--keep-days", "3", "--confirm", "bin")
    assert "bin" not in vms(ws) and not Path(disk).exists()
    rec = vms(ws, "--recycled")["bin"]
    assert rec["state"] == "recycled" and 2.9 * 86400 < rec["purge_at"] - rec["recycled"] < 3.1 * 86400
    ok(ws, "vm", "restore", "bin")
    assert vms(ws)["bin"]["state"] == "stopped" and raw_sha256(disk) == before
    ok(ws, "vm", "delete", "bin", "--delayed", "--keep-days", "0", "--confirm", "bin")
    purged = ok(ws, "vm", "purge", "--expired")
    assert "bin" in purged["purged"] and "bin" not in vms(ws, "--recycled")
    assert not list((ws / "lab" / "lab2" / "datastore" / ".recycle").glob("*/*"))


@dataclass
class SmallSite:
    root: Path                                               # its workspace
    images: dict[str, Path] = field(default_factory=dict)    # ext4 datastore -> its image file
    mounts: list[Path] = field(default_factory=list)

    def unmount(self, name: str) -> None:
        """Unmounts a datastore before the end, so that all that was written is on its device."""
        path = self.root / name
        subprocess.run(["umount", str(path)], check=True)
        self.mounts.remove(path)


@contextlib.contextmanager
def small_site(tmp_path: Path, **datastores: str):
    """A one-host site (h1, local transport) whose datastores are folders (value "") or file systems made
    for the test: "tmpfs:8m" (a small tmpfs) or "ext4:48m" (an ext4 image file on a loop device, whose
    bytes the test can read back)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a loop device needs root")
    site = SmallSite(Path(tempfile.mkdtemp(prefix="fds-", dir="/tmp")))
    config = f"""
[site]
name = "t"
[clusters.c]
[hosts.h1]
cluster = "c"
transport = "local"
runtime = "{site.root}/run"
"""
    try:
        for name, what in datastores.items():
            path = site.root / name
            path.mkdir()
            if what.startswith("tmpfs:"):
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={what[6:]}", "tmpfs", str(path)], check=True)
                site.mounts.append(path)
            elif what.startswith("ext4:"):
                image = tmp_path / f"{name}.ext4"
                with open(image, "wb") as f:
                    f.truncate(parse_size(what[5:]))
                subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
                subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
                site.mounts.append(path)
                site.images[name] = image
            config += f'[datastores.{name}]\npath = "{path}"\nhosts = ["h1"]\n'
        (site.root / "config.toml").write_text(config)
        yield site
    finally:
        kill_all(site.root)
        for path in site.mounts:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(site.root, ignore_errors=True)


def test_datastore_full_refused_and_nothing_left(tmp_path):
    with small_site(tmp_path, tiny="tmpfs:8m") as site:
        root, tiny = site.root, site.root / "tiny"
        err = refused(root, "vm", "create", "big", "--host", "h1", "--disk", "64M")
        assert "datastore tiny on h1 has" in err and "needs 64 MiB" in err
        assert list(tiny.iterdir()) == [] and "big" not in vms(root)
        ok(root, "vm", "create", "small", "--host", "h1", "--disk", "4M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", str(tiny / "small" / "disk0.qcow2")],
                       check=True, capture_output=True)
        err = refused(root, "vm", "clone", "small", "small-copy")
        assert "datastore tiny on h1 has" in err
        assert not (tiny / "small-copy").exists() and "small-copy" not in vms(root)


def test_import_refused_when_the_datastore_is_too_small(tmp_path):
    """The free-space check before an import counts what the import writes (the disks' data, and an OVA's
    disks extracted next to them): too little room is refused before anything is written, naming the
    datastore and both sizes."""
    with small_site(tmp_path, roomy="", tiny="tmpfs:12m") as site:
        root = site.root
        ok(root, "vm", "create", "pkg", "--host", "h1", "--disk", "32M:roomy")
        qemu_io(vms(root)["pkg"]["disks"][0]["path"], "write -P 0x5a 0 16M")
        ova = root / "pkg.ova"
        ok(root, "vm", "export", "pkg", "--out", str(ova))
        err = refused(root, "vm", "import", str(ova), "--host", "h1", "--name", "pkg2", "--datastore", "tiny")
        assert re.search(r"datastore tiny on h1 has \d+ MiB free, importing pkg2 from pkg.ova needs (\d+) MiB", err), err
        assert int(re.search(r"needs (\d+) MiB", err).group(1)) >= 32     # 16 MiB of data, twice: extracted and converted
        assert list((root / "tiny").iterdir()) == [] and "pkg2" not in vms(root)
        ok(root, "vm", "import", str(ova), "--host", "h1", "--name", "pkg2", "--datastore", "roomy")
        assert raw_sha256(vms(root)["pkg2"]["disks"][0]["path"]) == raw_sha256(vms(root)["pkg"]["disks"][0]["path"])


def test_reboot_cpu_hotadd_and_reconcile(ws):
    ok(ws, "vm", "create", "grow", "--host", "lab3", "--disk", "16M", "--cpus", "1", "--max-cpus", "3")
    pid = ok(ws, "vm", "start", "grow")["pid"]
    _guest(ws, "grow", "echo before-reboot > /tmp/flag")
    assert ok(ws, "vm", "reboot", "grow")["agent"] is True
    assert vms(ws)["grow"]["pid"] == pid, "a reboot keeps the QEMU process"
    assert _guest(ws, "grow", "cat /tmp/flag 2>/dev/null || echo fresh").strip() == "fresh"

    out = ok(ws, "vm", "agent", "cpus", "grow", "--cpus", "3")
    assert out["online_in_guest"] == 3
    assert _guest(ws, "grow", "cat /sys/devices/system/cpu/online").strip() == "0-2"
    err = fails(ws, "vm", "agent", "cpus", "grow", "--cpus", "4")
    assert "can grow to 3 vCPUs" in err
    assert vms(ws)["grow"]["cpus"] == 3

    # Its QEMU dies behind Ferry's back: reconcile reports it missing; a stray QEMU is an orphan.
    os.kill(pid, signal.SIGKILL)
    stray = ws / "lab" / "lab3" / "run" / "vm-deadbeef.pid"
    subprocess.run(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
                    "-daemonize", "-pidfile", str(stray)], check=True)
    try:
        r = ok(ws, "vm", "reconcile")
        assert {"host": "lab3", "vm": "grow"} in r["missing"]
        assert [o["process"] for o in r["orphans"]] == ["vm-deadbeef"]
        assert vms(ws)["grow"]["state"] == "missing"
    finally:
        os.kill(int(stray.read_text()), signal.SIGKILL)
        stray.unlink(missing_ok=True)
    assert ok(ws, "vm", "start", "grow")["agent"] is True
    ok(ws, "vm", "stop", "grow", "--force")


def test_vm_on_an_ssh_host(sshd_factory, tmp_path, monkeypatch):
    """A host reached over real SSH: the live image is copied to it, QEMU runs there as a daemon,
    QMP and the guest agent are reached through stream-local forwarding; nothing listens on TCP."""
    from harness.cli import isolate_ssh
    monkeypatch.setenv("FERRY_IMAGE_CACHE", str(image_cache()))   # before ~ moves: the machine's cache
    isolate_ssh(monkeypatch, tmp_path / "home")
    site = sshd_factory.site(Path(tempfile.mkdtemp(prefix="fssh-", dir="/tmp")), 1, names=["remote"])
    ws = site.workspace.root
    try:
        ok(ws, "vm", "create", "far", "--host", "remote", "--disk", "16M")
        out = ok(ws, "vm", "start", "far")
        assert out["agent"] is True
        info = ok(ws, "vm", "agent", "info", "far")
        assert info["agent"] == "running" and info["kernel"]
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        assert f"pid={out['pid']}," not in listening
        runtime = site.servers["remote"].root / "run"
        assert any(p.name.startswith("live-") for p in runtime.iterdir()), "the live image was copied to the host"
        ok(ws, "vm", "stop", "far")
        assert vms(ws)["far"]["state"] == "stopped"
    finally:
        kill_all(site.servers["remote"].root)
