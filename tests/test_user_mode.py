"""Ferry where it is not root (issue 12): the lab's hosts are folders on this machine and say why, and a
VM's NIC is QEMU's user-mode networking, which needs no privilege: the VM starts, its guest agent
answers, and the guest has the address user-mode networking gives it.

Run as root, the test makes a user of its own and runs Ferry as that user (with the system's
Python 3 and this checkout's packages), so that the path without root is tested on every machine.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.cli import ROOT
from harness.qemu import image_cache
from harness.waiting import until_sync

USER = "ferry-nonroot"
SYSTEM_PYTHON = "/usr/bin/python3"

needs = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def _site_packages() -> str:
    return next(p for p in sys.path if p.endswith("site-packages") and Path(p, "msgspec").exists())


@pytest.fixture
def nonroot(tmp_path):
    """(run, workspace): run(*args) runs `ferry --workspace W ARGS` without root; W is the user's own."""
    if os.geteuid() != 0:
        python, prefix, user = sys.executable, [], None
    else:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True) if Path(SYSTEM_PYTHON).exists() else None
        if probe is None or probe.stdout.strip() != str(sys.version_info[:2]):
            pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info[0]}.{sys.version_info[1]}, the "
                        "suite's: the checkout's packages cannot run as another user")
        try:
            pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                           check=True)
        python, prefix, user = SYSTEM_PYTHON, ["runuser", "-u", USER, "--"], USER
    home = Path(tempfile.mkdtemp(prefix="fnonroot-", dir="/tmp"))
    # The live image, where the user can read it (root's cache is root's own)
    cache = home / "cache"
    shutil.copytree(image_cache() / "liveimage", cache / "liveimage", symlinks=True)
    # The checkout's packages for the system's Python: its site-packages (and their .pth files)
    boot = home / "boot"
    boot.mkdir()
    # (first on sys.path: the system's own packages, older versions of some, come after them)
    (boot / "sitecustomize.py").write_text(
        "import site, sys\nbefore = list(sys.path)\n"
        f"site.addsitedir({_site_packages()!r})\n"
        "sys.path[:] = [p for p in sys.path if p not in before] + before\n")
    if user:
        subprocess.run(["chown", "-R", f"{user}:", str(home)], check=True)
    ws = home / "ws"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(boot), str(ROOT), str(ROOT / "tests")]),
           "FERRY_IMAGE_CACHE": str(cache / "liveimage"), "FERRY_ENGINE_IDLE_EXIT": "5",
           "FERRY_TASK_KINDS": "harness.kinds"}

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, python, "-m", "ferry.console.cli", "--workspace", str(ws), *args],
                              env=env, capture_output=True, text=True, timeout=timeout)
    try:
        yield run, ws
    finally:
        subprocess.run(["pkill", "-KILL", "-f", f"--workspace {ws}"], capture_output=True)
        subprocess.run(["pkill", "-KILL", "-f", str(ws)], capture_output=True)     # its QEMUs
        shutil.rmtree(home, ignore_errors=True)


@needs
def test_without_root_the_lab_is_folders_and_a_user_mode_vm_runs(nonroot):
    run, ws = nonroot
    r = run("lab", "status")
    assert r.returncode == 0 and "the lab's hosts are folders on this machine: Ferry is not root" in r.stdout, \
        r.stdout + r.stderr
    r = run("vm", "create", "u1", "--host", "lab1", "--memory", "128M", "--json")
    assert r.returncode == 0, r.stderr
    r = run("vm", "start", "u1")
    assert r.returncode == 0 and "u1 runs on lab1" in r.stdout, r.stderr

    def addressed():
        r = run("vm", "agent", "info", "u1", "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["agent"] == "running", info
        return any(ip.startswith("10.0.2.15/") for ip in info["ips"])
    # the guest's DHCP client asks user-mode networking for its address as it boots
    until_sync(addressed, timeout=60, every=0.5, what="the guest's user-mode address 10.0.2.15")
    # every process of it runs as the user, none as root
    owners = subprocess.run(["ps", "-o", "user=", "-C", "qemu-system-x86_64"], capture_output=True, text=True).stdout
    if os.geteuid() == 0:
        pids = subprocess.run(["pgrep", "-f", str(ws)], capture_output=True, text=True).stdout.split()
        users = {subprocess.run(["ps", "-o", "user=", "-p", p], capture_output=True, text=True).stdout.strip()
                 for p in pids} - {""}
        assert users == {USER}, (users, owners)
    r = run("vm", "stop", "u1", "--force")
    assert r.returncode == 0, r.stderr
