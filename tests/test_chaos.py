"""Crash safety, the short version of bench/chaos.py (issue 10): for each kind of task, Ferry killed
with `kill -9` at a few points triggered by its progress, then the same command run again, `ferry task
resume ID` or `ferry task cancel ID`; the job is then finished correctly or rolled back clean, and
nothing is left behind (see harness/chaos.py: run_trial). Real QEMU, qemu-img and files; small disks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from harness.chaos import SCENARIOS, Lab, Point, at, run_trial
from harness.cli import kill_engines
from harness.qemu import image_cache, kill_all

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
MiB = 1 << 20
DISK, DATA = 256 * MiB, 64 * MiB      # enough for the copies to take a few progress reports
FILES, TREE = 200, 32 * MiB

# Per kind: (where the kill lands, what follows it). A number is a share of the task's work done, as
# its progress in state.db says (bytes, or steps: a start is killed once QEMU is launched and while
# it waits for the guest agent). STAGE k: the kind's k-th point seen on disk (Scenario.stages), for
# work that ends within one progress report here: a copy's temporary file holding half the data, a
# linked deploy once its first or its second VM has its disk.
STAGE = ("stage 0", "stage 1")
PLAN: dict[str, list[tuple[float | str, str]]] = {
    "blocks": [(0.3, "rerun"), (0.6, "resume")],
    "files": [(0.3, "rerun"), (0.6, "cancel")],
    "clone": [(STAGE[0], "rerun"), (STAGE[0], "resume"), (STAGE[0], "cancel")],
    "deploy": [(STAGE[0], "rerun"), (STAGE[1], "resume"), (STAGE[0], "cancel")],
    "import": [(STAGE[0], "rerun"), (STAGE[0], "cancel")],
    "export": [(STAGE[0], "rerun"), (STAGE[0], "cancel")],
    "delete": [(0.3, "rerun"), (0.6, "cancel")],
    "start": [(0.3, "rerun"), (0.6, "cancel")],
}


@pytest.fixture(scope="module")
def lab():
    """One lab workspace for the module (short path: UNIX sockets live in it); inputs built in it."""
    root = Path(tempfile.mkdtemp(prefix="fchaos-", dir="/tmp"))
    data = root / "data"
    data.mkdir()
    # Its engines hold interrupted tasks (`ferry engine start --hold`): what a kill left stays to be
    # seen until the trial's follow-up (rerun, resume or cancel) acts on it.
    env = {"FERRY_IMAGE_CACHE": os.environ.get("FERRY_IMAGE_CACHE", str(image_cache())), "FERRY_ENGINE_HOLD": "1"}
    lab = Lab(root / "ws", data, env, stall=120.0)
    lab.tidy = False        # each trial makes its own names: what it made may stay
    lab.bwlimit = "96M"     # a replication of these small sources takes a few progress reports, not one
    lab.ok("lab", "image", "build")
    yield lab
    kill_engines(root)
    kill_all(root)
    shutil.rmtree(root, ignore_errors=True)


def trial(sc, i: int, point: Point, follow: str):
    """One trial; a point the work ran past before the kill is tried again earlier."""
    for _ in range(3):
        t = run_trial(sc, i, point, follow)
        if t.killed or t.left or not (point := point.earlier()):
            return t
        i += 100
    return t


@pytest.mark.parametrize("kind", list(PLAN))
def test_killed_then_finished_or_rolled_back(lab, kind):
    sc = SCENARIOS[kind](lab, disk=DISK, data=DATA, files=FILES, tree=TREE)
    sc.prepare()
    stages = sc.stages()
    trials = [trial(sc, i, stages[STAGE.index(f)] if f in STAGE else at(f), follow)
              for i, (f, follow) in enumerate(PLAN[kind])]
    report = "\n".join(t.line() for t in trials)
    assert all(t.killed for t in trials), f"a kill point was never reached (the work ended first):\n{report}"
    assert all(t.good for t in trials), report
    assert {t.outcome for t in trials if t.follow == "cancel"} <= {"rolled back", "finished"}
