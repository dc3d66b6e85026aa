"""The cutover's way back, step by step (issue 13, E8): the Debian source server (tests/harness/debsource.py)
migrated file-level to lab3 (tests/harness/migrationlab.py), ready for cutover, then, for every step
before go-live:

- Ferry (the engine) killed with SIGKILL the moment that step begins; `ferry task resume` goes on AT
  that step (the steps before it are not run again) and stops before the next one, as the operator asked
  with `--pause-before`;
- `ferry migration rollback` then: the source serves its page at its own address again, nginx active,
  the target stopped, the migration rolled_back;
- `ferry migration sync` (a full round when the target had run from its own disk) and `ferry migration
  test` make it ready again for the next step's trial.

And the go-live timer: the engine killed while the cutover waits after parking the source: the source
comes back by itself when the timer runs out (no Ferry process is alive), and the resumed cutover then
rolls back instead of going on.

About three minutes per step in TCG guests: marked e2e, run by bench/migration.py
(FERRY_ROLLBACK_STEPS=park,start_target picks steps for a shorter run).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from ferry.engine.migration.cutover import STEP_NAMES

from harness.chaos import kill_at, task_rows
from harness.cli import ferry, ferry_process
from harness.debsource import PAGE_SHA256
from harness.lab import ok
from harness.migrationlab import migration_lab, prepare
from harness.waiting import until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500), pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("qemu-system-x86_64", "mmdebstrap", "dnsmasq")),
    reason="needs root (mmdebstrap's chroot, namespaces, taps), qemu-system-x86_64, mmdebstrap and dnsmasq")]

NAME = "web02"
SOURCE_MACS: list[str] = []      # the source's own NICs (the target at its address has another MAC)
TRIED = [s for s in STEP_NAMES[:-1]
         if not os.environ.get("FERRY_ROLLBACK_STEPS") or s in os.environ["FERRY_ROLLBACK_STEPS"].split(",")]


@pytest.fixture(scope="module")
def lab():
    with migration_lab("frb-", "frb", NAME, confirm_within="2m", hold=True) as (source, park):
        prepare(source, NAME)
        assert ferry(source.ws, "migration", "sync", NAME).code == 0
        SOURCE_MACS[:] = source.ssh("cat /sys/class/net/*/address").stdout.decode().split()
        yield source, park


def ready(source) -> None:
    """The migration ready for a cutover: synced since its last rollback, and a test launch passed."""
    ws = source.ws
    if ok(ws, "migration", "show", NAME)["state"] == "rolled_back":
        r = ferry(ws, "migration", "sync", NAME)
        assert r.code == 0, r.err
    if ok(ws, "migration", "show", NAME)["state"] != "ready":
        r = ferry(ws, "migration", "test", NAME)
        assert r.code == 0 and "test launch passed" in r.out, r.out + r.err
    assert ok(ws, "migration", "show", NAME)["state"] == "ready"


def serves_again(source, timeout: float = 120) -> None:
    """The source, at its own address, is the source again (its MAC), nginx active, the page served."""
    def answers() -> bool:
        r = source.ssh("cat /sys/class/net/*/address; systemctl is-active nginx", timeout=30)
        return r.returncode == 0 and set(SOURCE_MACS) <= set(r.stdout.decode().split()) \
            and r.stdout.decode().split()[-1] == "active"
    until_sync(answers, timeout=timeout, every=1.0, what="the source at its address with nginx active")
    assert hashlib.sha256(source.fetch("/")).hexdigest() == PAGE_SHA256


def cutover_task(ws, tid: int) -> dict:
    return next(r for r in task_rows(ws, tid - 1) if r["id"] == tid)


def told(ws, tid: int) -> str:
    """The task's details and log, for an assertion's message."""
    r = ferry(ws, "task", "show", str(tid))
    return r.out + r.err


@pytest.mark.parametrize("step", TRIED)
def test_killed_as_a_step_begins_the_cutover_resumes_at_it_and_a_rollback_restores_the_source(lab, step):
    source, park = lab
    ws = source.ws
    ready(source)
    after = STEP_NAMES[STEP_NAMES.index(step) + 1]
    k = kill_at(ws, "migration", "cutover", NAME, "--confirm", NAME, "--pause-before", after,
                when=lambda row: step in ((row["checkpoint"] or {}).get("started") or {}), timeout=900)
    assert k.killed, k.out + k.err
    cp = cutover_task(ws, k.task_id)["checkpoint"]
    assert cp["done"] == list(STEP_NAMES[:STEP_NAMES.index(step)]), cp["done"]
    before = dict(cp["started"])
    assert ok(ws, "migration", "show", NAME)["state"] == "cutting_over"

    # Resumed: the step is done from its start, none before it again, and it stops before the next one.
    resumed = ferry_process(ws, "task", "resume", str(k.task_id))
    try:
        row = until_sync(lambda: (r := cutover_task(ws, k.task_id))["state"] in ("waiting", "failed", "cancelled")
                         and r, timeout=600, every=0.5, what=f"the resumed cutover to stop before {after}")
        assert row["state"] == "waiting", (row["state"], row["error"])
        cp = row["checkpoint"]
        assert cp["done"] == list(STEP_NAMES[:STEP_NAMES.index(after)]), cp["done"]
        assert cp["started"][step] > before[step]
        assert {s: cp["started"][s] for s in before if s != step} == {s: t for s, t in before.items() if s != step}

        r = ferry(ws, "migration", "rollback", NAME)
        assert r.code == 0, r.err
        resumed.communicate(timeout=600)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.communicate()
    until_sync(lambda: cutover_task(ws, k.task_id)["state"] == "cancelled", timeout=300, every=0.5,
               what="the cutover's rollback")
    m = ok(ws, "migration", "show", NAME)
    assert m["state"] == "rolled_back", told(ws, k.task_id)
    serves_again(source)
    assert ok(ws, "vm", "show", f"{NAME}-target")["state"] == "stopped"


def test_the_source_comes_back_by_itself_when_the_engine_dies_after_parking_it(lab):
    source, park = lab
    ws = source.ws
    ready(source)
    k = kill_at(ws, "migration", "cutover", NAME, "--confirm", NAME, "--pause-before", "switch_boot",
                when=lambda row: row["state"] == "waiting", timeout=900)
    assert k.killed, k.out + k.err
    assert source.ssh("true", timeout=15).returncode != 0       # parked: not at its address
    # No Ferry process runs now. The timer on the source (2 minutes since it was armed) brings it back.
    serves_again(source, timeout=300)
    # The cutover, resumed and told to go on, finds the timer ran out: it rolls back, it does not go on.
    # (Its row says "waiting" still, as the killed engine left it: the resumed run is a new attempt.)
    attempts = cutover_task(ws, k.task_id)["attempts"]
    resumed = ferry_process(ws, "task", "resume", str(k.task_id))
    try:
        until_sync(lambda: (r := cutover_task(ws, k.task_id))["state"] == "waiting" and r["attempts"] > attempts,
                   timeout=120, every=0.5, what="the resumed cutover to wait before switch_boot again")
        assert ferry(ws, "task", "confirm", str(k.task_id), NAME).code == 0
        out, err = resumed.communicate(timeout=600)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.communicate()
    row = cutover_task(ws, k.task_id)
    assert row["state"] == "failed" and "timer" in (row["error"] or ""), told(ws, k.task_id)
    assert ok(ws, "migration", "show", NAME)["state"] == "rolled_back", told(ws, k.task_id)
    serves_again(source)
