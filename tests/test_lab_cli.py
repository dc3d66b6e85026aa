"""The network lab from Ferry's command line (issue 12): `ferry lab up|down|status`, `ferry init
--network-lab` (a site whose three hosts are the lab's namespaces, reached over SSH), a VM on the
`lab` network running inside its host's namespace, repair of a half-made lab, and a down that leaves
nothing. One lab for the module; the tests run in order, each on what the one before left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ferry.engine.platform.labops import lab_of
from ferry.engine.vm.nics import tap_name
from harness.netlab import random_subnet
from harness.cli import engine_pid, ferry, ferry_process
from harness.lab import lab_workspace, ok
from harness.waiting import until_sync

needs = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                           reason="needs root (namespaces, bridges, sshd) and qemu-system-x86_64")


def test_lab_network_is_checked_like_every_key(tmp_path):
    assert ferry(tmp_path, "init").code == 0
    with open(tmp_path / "config.toml", "a") as f:
        f.write('\n[lab]\nnetwork = "yes"\n')
    r = ferry(tmp_path, "config", "check")
    assert r.code == 2
    assert [line for line in r.err.splitlines() if "lab.network" in line] == [
        f"{tmp_path / 'config.toml'}:{len((tmp_path / 'config.toml').read_text().splitlines())}: lab.network: "
        "must be true or false, got 'yes' (hint: for example: network = true)"]


@pytest.fixture(scope="module")
def labws():
    gen = lab_workspace("flc-")
    ws = next(gen)
    # a subnet of its own: a lab of another run on this machine never collides with this one
    subnet = random_subnet()
    try:
        assert ferry(ws, "init").code == 0
        with open(ws / "config.toml", "a") as f:
            f.write(f'\n[lab]\nsubnet = "{subnet}"\n')
        yield ws, lab_of(ws, subnet)
    finally:
        lab_of(ws, subnet).down()          # whatever a failed test left
        gen.close()


def _answering(st: dict) -> dict[str, str]:
    return {h["name"]: h["address"] for h in st["hosts"] if h["present"] and h["answers"] and h["sshd"]}


@needs
def test_lab_up_then_status_shows_three_answering_hosts(labws):
    ws, lab = labws
    up = ok(ws, "lab", "up")
    assert {f"namespace {lab.ns(h)}" for h in lab.hosts} <= set(up["changed"])
    st = ok(ws, "lab", "status")
    assert _answering(st) == {h: lab.address(h) for h in ("lab1", "lab2", "lab3")}
    assert st["up"] and not st["configured"]
    assert st["dhcp"]["running"] and st["dhcp"]["pid"] and st["dhcp"]["address"] == lab.dhcp_server
    assert any(c.startswith("dhcp server (dnsmasq pid") for c in up["changed"])
    for h in st["hosts"]:
        assert h["namespace"] in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = ferry(ws, "lab", "status")
    assert r.code == 0 and "lab up" in r.out and lab.address("lab2") in r.out
    assert f"DHCP by dnsmasq (pid {st['dhcp']['pid']}) at {lab.dhcp_server}" in r.out


@needs
def test_init_network_lab_reaches_the_three_hosts_over_ssh(labws):
    ws, lab = labws
    r = ferry(ws, "init", "--network-lab", "--force")
    assert r.code == 0, r.err
    assert ferry(ws, "config", "check").code == 0
    # the lab's host keys are trusted in the workspace's known_hosts: the transport verifies them
    known = (ws / "known_hosts").read_text()
    for h in lab.hosts:
        assert (lab.host_dir(h) / "ssh_host_ed25519_key.pub").read_text().split()[1] in known
    facts = {f["host"]: f for f in ok(ws, "hosts")}
    assert set(facts) == {"lab1", "lab2", "lab3"}
    for h, f in facts.items():
        assert f["reachable"], f
        assert f["kernel"] and f["cpus"]
    site = (ws / "config.toml").read_text()
    assert 'transport = "ssh"' in site and f'address = "{lab.address("lab3")}"' in site
    assert ok(ws, "lab", "status")["configured"]


@needs
def test_a_vm_on_the_lab_network_runs_inside_its_hosts_namespace(labws):
    ws, lab = labws
    ok(ws, "vm", "create", "x", "--host", "lab2", "--network", "lab", "--memory", "128M")
    started = ok(ws, "vm", "start", "x")
    pid = ok(ws, "vm", "show", "x")["pid"]
    assert started["host"] == "lab2" and pid
    ns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()
    assert ns == lab.ns("lab2")


@needs
def test_a_half_made_lab_is_repaired_by_the_next_lab_up(labws):
    ws, lab = labws
    sshd1 = ok(ws, "lab", "status")["hosts"][0]["sshd"]
    os.kill(sshd1, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", lab.ns("lab3")], check=True)
    r = ferry(ws, "lab", "status", "--json")
    assert r.code == 1 and not r.json["up"] and len(_answering(r.json)) == 1     # only lab2 is whole
    up = ok(ws, "lab", "up")
    assert f"namespace {lab.ns('lab3')}" in up["changed"]
    assert any(c.startswith("sshd of lab1") for c in up["changed"])
    assert len(_answering(up)) == 3
    assert all(f["reachable"] for f in ok(ws, "hosts"))        # over new connections to the new sshds


@needs
def test_lab_up_after_a_kill_9_midway_repairs_the_lab(labws):
    ws, lab = labws
    ok(ws, "lab", "down")
    proc = ferry_process(ws, "lab", "up", "--json")
    # kill the engine (which builds the lab) and the command as soon as the build has begun
    until_sync(lambda: lab.switch in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout,
               timeout=30, what="the lab's switch namespace")
    pid = engine_pid(ws)
    if pid:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()
    up = ok(ws, "lab", "up")             # a new engine; it adopts what is there and makes the rest
    assert len(_answering(up)) == 3, up
    assert all(f["reachable"] for f in ok(ws, "hosts"))


@needs
def test_the_engine_adopts_the_lab_as_it_starts(labws):
    ws, lab = labws
    before = {h["name"]: h["sshd"] for h in ok(ws, "lab", "status")["hosts"]}
    assert ferry(ws, "engine", "stop").code == 0
    os.kill(before["lab1"], signal.SIGKILL)                   # meanwhile a lab host's sshd died
    assert all(f["reachable"] for f in ok(ws, "hosts"))        # the new engine repaired it first
    after = {h["name"]: h["sshd"] for h in ok(ws, "lab", "status")["hosts"]}
    assert after["lab2"] == before["lab2"] and after["lab3"] == before["lab3"]    # adopted, not rebuilt
    assert after["lab1"] != before["lab1"]


def _live(pid: int) -> bool:
    """The process runs (a zombie waiting for its parent's wait() does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs
def test_lab_down_leaves_nothing(labws):
    ws, lab = labws
    # a VM running on the lab network: its QEMU in lab2's namespace, its tap on lab2's br-lab
    if ok(ws, "vm", "show", "x")["state"] != "running":      # (lab down in an earlier test stopped it)
        ok(ws, "vm", "start", "x")
    x = ok(ws, "vm", "show", "x")
    tap = tap_name(x["id"], 0)
    assert _live(x["pid"]) and "qemu" in Path(f"/proc/{x['pid']}/cmdline").read_text()
    assert tap in subprocess.run(["ip", "-n", lab.ns("lab2"), "-o", "link", "show", "master", "br-lab"],
                                 capture_output=True, text=True).stdout
    pids = [h["sshd"] for h in ok(ws, "lab", "status")["hosts"]]
    down = ok(ws, "lab", "down")
    assert set(lab.namespaces) <= set(down["changed"])
    assert lab.tag not in subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    links = [link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                                  text=True).stdout)]
    assert not [name for name in links if name in (lab.root_link, lab.vm_leg, tap)]
    assert lab.fence_table not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert not [pid for pid in (x["pid"], *pids) if _live(pid)]
    qemus = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(ws).encode() in _read(p) and b"qemu" in _read(p)]
    assert not [p for p in qemus if _live(int(p.parent.name))], qemus
    assert ferry(ws, "engine", "stop").code == 0
    st = ferry(ws, "lab", "status", "--json")          # a new engine: what was taken down stays down
    assert st.code == 1 and not _answering(st.json)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
