"""The built-in lab as Ferry opens it with no configuration (issue 12): as root, three network
namespaces reached over SSH at addresses of the workspace's own subnet (two workspaces' labs stand
side by side), brought up by the engine as it starts; without root (or with FERRY_LAB=folders), the
folder lab, saying why in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ferry.engine.config import lab_config
from ferry.engine.platform import labops
from harness.cli import ferry, kill_engines
from harness.lab import ok

_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
needs = pytest.mark.skipif(os.geteuid() != 0 or any(shutil.which(t, path=_PATH) is None for t in labops.NETWORK_LAB_TOOLS),
                           reason="needs root and the network lab's tools (ip, nft, sshd, dnsmasq)")


@pytest.fixture
def two_workspaces(monkeypatch):
    monkeypatch.setenv("FERRY_LAB", "")      # the product's default, not the suite's folder lab
    roots = [Path(tempfile.mkdtemp(prefix="fdl-", dir="/tmp")) for _ in range(2)]
    try:
        yield roots
    finally:
        for root in roots:
            ferry(root, "lab", "down")
            kill_engines(root)
            shutil.rmtree(root, ignore_errors=True)


@needs
def test_with_no_configuration_the_lab_is_three_namespaces_reached_over_ssh(two_workspaces):
    statuses = []
    for root in two_workspaces:
        facts = {f["host"]: f for f in ok(root, "hosts")}
        assert set(facts) == {"lab1", "lab2", "lab3"} and all(f["reachable"] for f in facts.values()), facts
        st = ok(root, "lab", "status")
        assert st["up"] and st["configured"], st
        assert st["subnet"] == (root / "lab" / "subnet").read_text().strip()
        statuses.append(st)
        # each host answers at its own address in the workspace's subnet, over SSH with the lab's key
        prefix = st["subnet"].rsplit(".", 1)[0] + "."
        assert all(h["address"].startswith(prefix) and h["sshd"] and h["answers"] for h in st["hosts"]), st
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(h["namespace"] in ns for h in st["hosts"])
    # two workspaces, two labs side by side in subnets of their own
    assert statuses[0]["subnet"] != statuses[1]["subnet"]
    assert all(s["up"] for s in (ok(r, "lab", "status") for r in two_workspaces))


def test_the_folder_lab_says_why_in_one_line(tmp_path, monkeypatch):
    """Without root (a test double for the uid: the suite runs as root) or with FERRY_LAB=folders, the
    built-in lab is folders reached locally, and the reason is one line, which also says that its VMs'
    NICs are QEMU's user-mode networking (no network spans the hosts)."""
    monkeypatch.setenv("FERRY_LAB", "")
    monkeypatch.setattr(labops.os, "geteuid", lambda: 1000)
    why = labops.network_lab_default()
    assert why is not None and "not root" in why and "\n" not in why
    assert "VM NICs use QEMU's user-mode networking" in why
    site = lab_config(tmp_path)
    assert {h.transport for h in site.hosts.values()} == {"local"} and not site.lab.network
    monkeypatch.undo()
    monkeypatch.setenv("FERRY_LAB", "folders")
    why = labops.network_lab_default()
    assert "FERRY_LAB=folders" in why and "VM NICs use QEMU's user-mode networking" in why and "\n" not in why
    assert not lab_config(tmp_path).lab.network
