"""A BLOCK-LEVEL server migration end to end (issue 13, E5/E8): the Debian source server (a real Debian 12
in a lab VM on lab1, tests/harness/debsource.py: a 2 GiB raw disk, MBR, one ext4 partition at 1 MiB)
migrated disk for disk to a target on lab3. Prepared (the target's disk raw, the source's size), then
block rounds: the receiver pulls the chunks whose hash changed straight from the source (dd over
dbclient), the source hashing its disk in 4 MiB chunks. Round 1 killed mid-pull and finished by the same
command; the target's disk then holds the source's bytes; a change on the source, and round 2 moves a
few chunks only. Then a test launch boots an isolated copy of the target, and a cutover puts the target
at the source's address.

The source's writers are quietened for the byte comparisons (cron stopped, the journal kept in /run):
a running system's disk is never still, and a round of it is crash-consistent at best.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ferry.engine.migration.blocksync import CHUNK, RX_HASH
from harness.chaos import kill_at
from harness.cli import ferry
from harness.debsource import DISK_SIZE, PAGE_SHA256
from harness.lab import ok
from harness.migrationlab import migration_lab, prepare
from harness.netlab import leg_bytes
from harness.waiting import until_sync
from test_migration_sync import _logged, on_receiver, pulling

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500), pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("qemu-system-x86_64", "mmdebstrap", "dnsmasq")),
    reason="needs root (mmdebstrap's chroot, namespaces, taps), qemu-system-x86_64, mmdebstrap and dnsmasq")]

NAME = "blk01"
CHUNKS = DISK_SIZE // CHUNK
# The source's chunk hashes, read as the receiver reads the target's (O_DIRECT: what is on the disk)
SOURCE_HASHES = ("sync; dd if=/dev/vda bs=4194304 iflag=direct status=none | split -d -a 8 -b 4194304 "
                 "--filter='printf \"%s %s\\n\" \"$FILE\" \"$(md5sum)\"' - c")


@pytest.fixture(scope="module")
def lab():
    with migration_lab("fblk-", "fblk", NAME, method="block", memory="256M", hold=True) as up:
        yield up


def record(**figures) -> None:
    """Figures for bench/migration.py, beside the other modules' (block_ names)."""
    out = os.environ.get("FERRY_BENCH_OUT")
    if out:
        have = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        Path(out).write_text(json.dumps({**have, **figures}, indent=2))


def on(source, command: str) -> str:
    r = source.ssh(command, timeout=600)
    assert r.returncode == 0, f"{command}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode()


def chunks(text: str) -> list[str]:
    out = {}
    for ln in text.splitlines():
        w = ln.split()
        if len(w) >= 2:
            out[int(w[0].lstrip("c"))] = w[1]
    assert sorted(out) == list(range(CHUNKS)), f"{len(out)} chunk hashes"
    return [out[i] for i in range(CHUNKS)]


def same_as_the_source(source, ws: Path, target: dict) -> list[int]:
    """Asserts that the target's disk (read in the receiver) holds the source's bytes as the last round read
    them: every chunk where it differs from the source now is one the source changed since that round's
    hash pass (its committed list says so; a live ext4 writes back inode tables and its journal after a
    while, and a first read of a file since boot updates its atime). Returns those chunks (few)."""
    theirs = chunks(on_receiver(ws, target, RX_HASH, "/dev/vda", str(CHUNKS)))
    mine = chunks(on(source, SOURCE_HASHES))
    committed = chunks(on(source, f"cat /run/ferry-migration/{NAME}/vda.hashes"))
    since = [i for i, (a, b) in enumerate(zip(mine, committed)) if a != b]
    differ = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
    assert set(differ) <= set(since), f"chunks {differ} differ, of which only {since} changed since the round"
    # (5 of 512 seen on a busy machine: the superblock, inode tables and journal written back later)
    assert len(since) <= 16, f"{since} changed on a quiet source"
    return differ


def test_block_rounds_copy_the_disk_and_then_only_what_changed(lab):
    source, park = lab
    ws = source.ws
    prepare(source, NAME)
    m = ok(ws, "migration", "show", NAME)
    target = m["target"]
    assert target["method"] == "block" and [(d["source"], d["size"]) for d in target["disks"]] == [("vda", DISK_SIZE)]
    # Quiet writers, so the bytes can be compared: cron's ticks stop, the journal goes to /run (Ferry's own
    # chunk lists are there too).
    on(source, "systemctl stop cron && journalctl --relinquish-var && sync")

    # Round 1, the engine killed mid-pull: the same command adopts the pull and finishes it.
    leg0 = leg_bytes(source.lab)
    k = kill_at(ws, "migration", "sync", NAME, when=pulling(ws, 16 << 20))
    assert k.killed, k
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 0, r.err
    assert f"task {k.task_id} already does this" in r.err
    assert "round 1 (initial): " in r.out and "chunk(s) of 4.0 MiB" in r.out and "now syncing" in r.out, r.out
    assert _logged(ws, k.task_id, "%followed, not started again%")
    m = ok(ws, "migration", "show", NAME)
    assert (m["state"], m["round"], len(m["rounds"])) == ("syncing", 1, 1)
    first = m["rounds"][0]
    # everything but the zero chunks: the used part of the filesystem, well under the disk
    assert 100 << 20 < first["bytes"] < DISK_SIZE and first["items"] == -(-first["bytes"] // CHUNK), first
    crossed = leg_bytes(source.lab) - leg0
    assert crossed < first["bytes"] // 100, f"{crossed} bytes crossed this machine for {first['bytes']} moved"
    # The target's disk holds the source's bytes (as the round read them).
    before = same_as_the_source(source, ws, target)

    # A change on the source: round 2 moves a few chunks, not the disk.
    on(source, "head -c 1048576 /dev/urandom > /home/alice/changed.bin && echo 'Tuesday 22:00' >> "
               "/home/alice/notes.txt && sync")
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 0, r.err
    assert "round 2 (incremental): " in r.out, r.out
    m = ok(ws, "migration", "show", NAME)
    second = m["rounds"][1]
    assert (m["round"], second["label"]) == (2, "incremental")
    assert 1 << 20 <= second["bytes"] <= 16 * CHUNK and 1 <= second["items"] <= 16, second
    same_as_the_source(source, ws, target)
    print(f"chunks differing after round 1 (changed since its pass): {before}")
    record(block_disk_bytes=DISK_SIZE, block_initial_s=first["duration_s"], block_initial_bytes=first["bytes"],
           block_incremental_s=second["duration_s"], block_incremental_bytes=second["bytes"],
           block_crossed_bytes_initial=crossed)
    on(source, "systemctl start cron && journalctl --flush")


def test_a_block_target_passes_its_test_launch(lab):
    source, park = lab
    ws = source.ws
    r = ferry(ws, "migration", "test", NAME)
    assert r.code == 0, r.err
    assert "test launch passed: ready for cutover" in r.out and "nginx active" in r.out, r.out
    m = ok(ws, "migration", "show", NAME)
    assert m["state"] == "ready" and m["test"]["ports"] == {"22": True, "80": True}
    # The launch wrote the target's disk (its boot changes): the next round compares with the target's own
    # chunks and puts the source's back.
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 0, r.err
    after = ok(ws, "migration", "show", NAME)["rounds"][-1]
    assert _logged(ws, after["task"], "%base is the target's own chunks%")
    assert 1 <= after["items"] <= 32, after
    record(block_after_test_s=after["duration_s"], block_after_test_bytes=after["bytes"])


def test_a_block_cutover_puts_the_target_at_the_sources_address(lab):
    source, park = lab
    ws = source.ws
    source_mac = on(source, "cat /sys/class/net/*/address").split()
    r = ferry(ws, "migration", "cutover", NAME, "--confirm", NAME)
    assert r.code == 0, r.err + r.out
    assert f"{NAME} is live at {source.address}" in r.out, r.out
    m = ok(ws, "migration", "show", NAME)
    cut = m["cutover"]
    assert m["state"] == "cut_over" and [s["state"] for s in cut["steps"]] == ["done"] * 12
    steps = {st["name"]: round(st["ended"] - st["started"], 1) for st in cut["steps"]}
    record(block_downtime_s=cut["measured_downtime_s"], block_predicted_downtime=cut["predicted_downtime"],
           block_steps=steps)
    until_sync(lambda: source.ssh("true", timeout=30).returncode == 0, timeout=60,
               what="the target to answer at the source's address from the lab's switch")
    assert not set(source_mac) & set(on(source, "cat /sys/class/net/*/address").split()) - {"00:00:00:00:00:00"}
    assert hashlib.sha256(source.fetch("/")).hexdigest() == PAGE_SHA256
    assert on(source, "cat /home/alice/notes.txt").endswith("Tuesday 22:00\n")
    assert on(source, "findmnt -no SOURCE /").strip() == "/dev/vda1"
