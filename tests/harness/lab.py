"""A lab workspace for a test module that drives VMs through the command line, and the calls they share."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from .cli import ferry
from .qemu import image_cache, kill_all


def lab_workspace(prefix: str) -> Iterator[Path]:
    """One lab workspace (short path under /tmp: UNIX sockets live in it) using the shared image cache,
    its live image built; every QEMU of it killed and the folder removed afterwards. For a fixture:
    `yield from lab_workspace("fvm-")`."""
    old = os.environ.get("FERRY_IMAGE_CACHE")
    os.environ["FERRY_IMAGE_CACHE"] = str(image_cache())
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        r = ferry(root, "lab", "image", "build", "--json")
        if r.code != 0 and "apt-get update" in r.err and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = ferry(root, "lab", "image", "build", "--json")
        assert r.code == 0, r.err
        assert Path(r.json["kernel"]).is_file() and r.json["kernel_release"]
        yield root
    finally:
        kill_all(root)
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
