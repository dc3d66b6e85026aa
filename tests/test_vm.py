"""VMs in the lab, as an operator drives them with `ferry vm ...`: real QEMU (TCG), real qcow2, real agent."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.cli import ferry
from harness.qemu import image_cache, kill_all, raw_bytes, raw_sha256

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ws():
    """One lab workspace for the module (short path: UNIX sockets live in it), the shared image cache."""
    old = os.environ.get("FERRY_IMAGE_CACHE")
    os.environ["FERRY_IMAGE_CACHE"] = str(image_cache())
    root = Path(tempfile.mkdtemp(prefix="fvm-", dir="/tmp"))
    r = ferry(root, "lab", "image", "build", "--json")
    if r.code != 0 and "apt-get update" in r.err and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        r = ferry(root, "lab", "image", "build", "--json")
    assert r.code == 0, r.err
    assert Path(r.json["kernel"]).is_file() and r.json["kernel_release"]
    yield root
    kill_all(root)
    shutil.rmtree(root, ignore_errors=True)
    if old is None:
        os.environ.pop("FERRY_IMAGE_CACHE", None)
    else:
        os.environ["FERRY_IMAGE_CACHE"] = old


def ok(ws: Path, *args: str) -> dict:
    r = ferry(ws, *args, "--json")
    assert r.code == 0, f"ferry {' '.join(args)}: {r.out} {r.err}"
    return r.json


def fails(ws: Path, *args: str) -> str:
    r = ferry(ws, *args)
    assert r.code != 0, f"ferry {' '.join(args)} should fail: {r.out}"
    assert "Traceback" not in r.err
    return r.err


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
    assert info["kernel"] and "ferry" in (info["os"] or "").lower() or info["kernel"]
    assert 0 < info["mem_used"] < info["mem_total"] <= 192 * MiB
    # Its NIC got an address from the (user-mode) network, and the agent reports it.
    deadline = time.monotonic() + 20
    while not any(ip.startswith("10.0.2.") for ip in info["ips"]) and time.monotonic() < deadline:
        time.sleep(1)
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
    assert row.split()[-2:] == ["running", "10.0.2.15"], listed
    sync = ok(ws, "vm", "agent", "timesync", "alpha")
    assert abs(sync["offset_after_s"]) < 5

    # The VM is a daemon of the host: no Ferry process runs now, and it still answers.
    assert ok(ws, "vm", "reconcile")["running"] == 1

    ok(ws, "vm", "stop", "alpha")
    v = vms(ws)["alpha"]
    assert v["state"] == "stopped" and v["pid"] is None


def test_duplicate_name_and_bad_input_refused(ws):
    err = fails(ws, "vm", "create", "alpha", "--host", "lab1", "--disk", "16M")
    assert "already exists" in err and "alpha" in err
    assert "bad name" not in err
    err = fails(ws, "vm", "create", "beta", "--host", "lab1", "--memory", "1.5M")
    assert "memory '1.5M' is not a whole number of MiB" in err
    err = fails(ws, "vm", "create", "bad/name", "--host", "lab1")
    assert "not valid" in err and "hint" in err
    err = fails(ws, "vm", "create", "beta", "--host", "lab1", "--disk", "16M:shared:nope")
    assert "datastore 'nope' is not attached to host lab1" in err
    assert "beta" not in vms(ws)


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
    ok(ws, "vm", "stop", "sleepy", "--force")


def _guest(ws: Path, vm: str, script: str, timeout: float = 30) -> str:
    """Runs a shell script in the guest through its agent (guest-exec)."""
    import asyncio

    from engine.client import EngineClient
    from engine.workspace import Workspace

    async def go() -> str:
        client = EngineClient.open(Workspace.resolve(ws), adopt=False)
        try:
            from engine.vm.service import VMService
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
    time.sleep(1.5)
    err = fails(ws, "vm", "stop", "mute", "--timeout", "5")
    assert "cannot shut down mute safely" in err and "--force" in err
    assert vms(ws)["mute"]["state"] == "running"
    err = fails(ws, "vm", "agent", "info", "mute")
    err = fails(ws, "vm", "agent", "timesync", "mute")
    audit = _audit(ws)
    assert audit[0]["action"] == "vm.timesync" and audit[0]["target"] == "mute", audit[:2]
    assert audit[0]["result"].startswith("failed: "), "a failed operator action is audited too"
    ok(ws, "vm", "stop", "mute", "--force")
    assert vms(ws)["mute"]["state"] == "stopped"


def test_clone_running_vm_is_point_in_time(ws):
    ok(ws, "vm", "create", "writer", "--host", "lab1", "--disk", "32M")
    ok(ws, "vm", "start", "writer")
    # The guest writes numbered 4 KiB records to its disk, one after the other, as fast as it can.
    _guest(ws, "writer", "(i=0; while [ $i -lt 4000 ]; do printf 'REC%08d' $i | "
                         "dd of=/dev/vda bs=4096 seek=$i conv=notrunc 2>/dev/null; i=$((i+1)); done; "
                         "sync; echo done > /tmp/writer-done) >/dev/null 2>&1 &")
    time.sleep(2.0)
    out = ok(ws, "vm", "clone", "writer", "writer-copy")
    assert out["from_running"] is True
    src_pid = vms(ws)["writer"]["pid"]
    assert src_pid, "the source kept running"
    clone_disk = out["made"][0]["disks"][0]
    data = raw_bytes(clone_disk)
    records = [data[i * 4096:i * 4096 + 11] for i in range(4000)]
    written = [r for r in records if r.startswith(b"REC")]
    # Point in time: records 0..k-1 are all there (in order), nothing after k.
    k = len(written)
    print(f"records in the copy: {k} of 4000")
    assert 0 < k < 4000, "the copy was taken while the guest was writing"
    assert all(records[i] == b"REC%08d" % i for i in range(k))
    assert all(r == bytes(11) for r in records[k:])
    ok(ws, "vm", "stop", "writer", "--force")
    assert vms(ws)["writer-copy"]["origin"] == "writer"


def test_templates_linked_deploy_and_refusals(ws):
    ok(ws, "vm", "create", "base", "--host", "lab1", "--disk", "32M")
    qemu_io(vms(ws)["base"]["disks"][0]["path"], "write -P 0x42 0 1M")
    ok(ws, "template", "convert", "base")
    err = fails(ws, "vm", "start", "base")
    assert "template never starts" in err
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
    err = fails(ws, "template", "delete", "base", "--confirm", "base")
    assert "linked clones" in err and "web-01, web-02, web-03" in err
    err = fails(ws, "template", "to-vm", "base")
    assert "linked clones" in err
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
    assert ok(ws, "vm", "start", "pkg-ova")["agent"] is True
    ok(ws, "vm", "stop", "pkg-ova", "--force")


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


def test_secure_delete_overwrites_blocks(ws, tmp_path):
    ok(ws, "vm", "create", "secret", "--host", "lab1", "--disk", "16M")
    disk = vms(ws)["secret"]["disks"][0]["path"]
    secret = b"TOP-SECRET-" + os.urandom(8).hex().encode()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x53 0 64k", disk], check=True, capture_output=True)
    raw = tmp_path / "secret.bin"
    raw.write_bytes(secret * 100)
    subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "qcow2", f"if={raw}", f"of={disk}", "bs=1100"],
                   capture_output=True)
    spy = tmp_path / "spy.qcow2"        # a second name for the same inode: it sees what delete leaves behind
    os.link(disk, spy)
    assert secret in spy.read_bytes() or b"SSSS" in spy.read_bytes()
    err = fails(ws, "vm", "delete", "secret", "--secure", "--confirm", "wrong")
    assert "typed" in err or "confirm" in err
    ok(ws, "vm", "delete", "secret", "--secure", "--confirm", "secret")
    assert not Path(disk).exists() and "secret" not in vms(ws)
    left = spy.read_bytes()
    assert secret not in left and b"SSSS" not in left and left.count(0) == len(left)


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


def test_datastore_full_refused_and_nothing_left(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = Path(tempfile.mkdtemp(prefix="ffull-", dir="/tmp"))
    tiny = root / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tiny)], check=True)
    try:
        (root / "config.toml").write_text(f"""
[site]
name = "t"
[clusters.c]
[hosts.h1]
cluster = "c"
transport = "local"
runtime = "{root}/run"
[datastores.tiny]
path = "{tiny}"
hosts = ["h1"]
""")
        err = fails(root, "vm", "create", "big", "--host", "h1", "--disk", "64M")
        assert "datastore tiny on h1 has" in err and "needs 64 MiB" in err
        assert list(tiny.iterdir()) == [] and "big" not in vms(root)
        ok(root, "vm", "create", "small", "--host", "h1", "--disk", "4M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", str(tiny / "small" / "disk0.qcow2")],
                       check=True, capture_output=True)
        err = fails(root, "vm", "clone", "small", "small-copy")
        assert "datastore tiny on h1 has" in err
        assert not (tiny / "small-copy").exists() and "small-copy" not in vms(root)
    finally:
        subprocess.run(["umount", "-l", str(tiny)])
        shutil.rmtree(root, ignore_errors=True)


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
    isolate_ssh(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("FERRY_IMAGE_CACHE", str(image_cache()))
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
