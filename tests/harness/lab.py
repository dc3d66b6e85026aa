"""A lab workspace for a test module that drives VMs through the command line, and the calls they share."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from .cli import ferry, kill_engines
from .qemu import image_cache, kill_all


def lab_workspace(prefix: str, *, hold: bool = False, network: bool = False) -> Iterator[Path]:
    """One lab workspace (short path under /tmp: UNIX sockets live in it) using the shared image cache,
    its live image built; its engine and every QEMU of it killed and the folder removed afterwards.
    For a fixture: `yield from lab_workspace("fvm-")`. hold=True: its engines never resume an
    interrupted task by themselves (`ferry engine start --hold`), so a test sees what a kill left
    until it runs the same command again, or `ferry task resume`. network=True: the built-in lab as
    Ferry makes it as root with no configuration, three network namespaces reached over SSH (the
    production path), taken down afterwards."""
    old = os.environ.get("FERRY_IMAGE_CACHE")
    old_hold = os.environ.get("FERRY_ENGINE_HOLD")
    old_lab = os.environ.get("FERRY_LAB")
    os.environ["FERRY_IMAGE_CACHE"] = str(image_cache())
    if hold:
        os.environ["FERRY_ENGINE_HOLD"] = "1"
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        if network:
            # the first command decides the workspace's built-in lab, and the workspace keeps it
            # (W/lab/subnet); the suite's FERRY_LAB=folders stays for every other workspace. Where
            # there can be no network lab (not root), the folder lab it is, as Ferry itself does.
            from ferry.engine.platform.labops import network_lab_default
            os.environ["FERRY_LAB"] = ""
            try:
                if network_lab_default() is None:
                    assert ferry(root, "config", "check").code == 0
                    assert (root / "lab" / "subnet").exists()
            finally:
                os.environ["FERRY_LAB"] = old_lab or ""
                if old_lab is None:
                    os.environ.pop("FERRY_LAB")
        r = ferry(root, "lab", "image", "build", "--json")
        if r.code != 0 and "apt-get update" in r.err and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = ferry(root, "lab", "image", "build", "--json")
        assert r.code == 0, r.err
        assert Path(r.json["kernel"]).is_file() and r.json["kernel_release"]
        yield root
    finally:
        if network:
            ferry(root, "lab", "down")
        kill_engines(root)
        kill_all(root)
        if old_hold is None:
            os.environ.pop("FERRY_ENGINE_HOLD", None)
        else:
            os.environ["FERRY_ENGINE_HOLD"] = old_hold
        shutil.rmtree(root, ignore_errors=True)
        if old is None:
            os.environ.pop("FERRY_IMAGE_CACHE", None)
        else:
            os.environ["FERRY_IMAGE_CACHE"] = old


def ok(ws: Path, *args: str):
    """`ferry ARGS --json`, which must succeed: its JSON."""
    r = ferry(ws, *args, "--json")
    assert r.code == 0, f"ferry {' '.join(args)}: {r.out} {r.err}"
    return r.json


def vms(ws: Path) -> dict[str, dict]:
    """Every VM and template, by name, as `ferry vm list --json` shows them."""
    return {v["name"]: v for v in ok(ws, "vm", "list")}
