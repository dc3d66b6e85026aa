"""Cloning or deploying onto another host than the source's, as an operator does it with `ferry vm clone
--host` and `ferry template deploy --host`: allowed on a datastore both hosts share (the lab's `shared`),
refused otherwise with both hosts and the datastore named. Real qemu-img, real files; no VM boots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.cli import ferry, kill_engines
from harness.lab import ok, vms
from harness.qemu import raw_sha256

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@pytest.fixture
def ws():
    root = Path(tempfile.mkdtemp(prefix="fch-", dir="/tmp"))
    try:
        yield root
    finally:
        kill_engines(root)
        shutil.rmtree(root, ignore_errors=True)


def refused(ws: Path, *args: str) -> str:
    before = ok(ws, "tasks", "--all")
    r = ferry(ws, *args)
    assert r.code == 2, f"ferry {' '.join(args)} should be refused: {r.code} {r.out} {r.err}"
    assert ok(ws, "tasks", "--all") == before, "a refusal made a task"
    return r.err.strip()


def test_clone_and_deploy_onto_another_host_through_a_shared_datastore(ws):
    ok(ws, "vm", "create", "src", "--host", "lab1", "--disk", "16M")
    disk = vms(ws)["src"]["disks"][0]["path"]
    assert "/lab1/datastore/" in disk
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2M", disk], check=True, capture_output=True)

    # lab1's own datastore is not lab2's: refused before any task, naming both hosts and the datastore.
    err = refused(ws, "vm", "clone", "src", "c0", "--host", "lab2", "--datastore", "lab1-local")
    assert "datastore 'lab1-local' is not shared by host lab1 (of src) and host lab2" in err, err
    assert "hint: choose a datastore both hosts share (shared)" in err, err
    assert "c0" not in vms(ws)

    # The shared one is: the copy is recorded on lab2, its disk on the shared datastore, the same bytes.
    ok(ws, "vm", "clone", "src", "c1", "--host", "lab2", "--datastore", "shared")
    c1 = vms(ws)["c1"]
    assert c1["host"] == "lab2"
    path = c1["disks"][0]["path"]
    assert path.startswith(str(ws / "lab" / "shared")) and Path(path).is_file()
    assert raw_sha256(path) == raw_sha256(disk)
    # Without --datastore, a copy on another host goes to a datastore both share.
    ok(ws, "vm", "clone", "src", "c2", "--host", "lab3")
    assert vms(ws)["c2"]["host"] == "lab3" and "/lab/shared/" in vms(ws)["c2"]["disks"][0]["path"]

    # A linked clone on another host would read the template's disks on lab1's own datastore: refused.
    ok(ws, "template", "convert", "src")
    err = refused(ws, "template", "deploy", "src", "web-##", "--count", "2", "--host", "lab2")
    assert "a linked clone on host lab2 reads src's disks, and lab1-local is not attached to lab2" in err, err
    assert not {"web-01", "web-02"} & set(vms(ws))
    out = ok(ws, "template", "deploy", "src", "web-##", "--count", "2", "--host", "lab2", "--full")
    assert [m["vm"] for m in out["made"]] == ["web-01", "web-02"]
    for name in ("web-01", "web-02"):
        vm = vms(ws)[name]
        assert vm["host"] == "lab2" and vm["disks"][0]["datastore"] == "shared"
        assert raw_sha256(vm["disks"][0]["path"]) == raw_sha256(disk)
    # On the source's own host nothing changed: the default stays its host and datastore.
    ok(ws, "template", "deploy", "src", "local-1", "--full")
    assert vms(ws)["local-1"]["host"] == "lab1" and "/lab1/datastore/" in vms(ws)["local-1"]["disks"][0]["path"]
