"""`ferry migration sync NAME` end to end (issue 13, E4-E6): the Debian source server (a real Debian 12 in a
lab VM on lab1, tests/harness/debsource.py) migrated file-level to a target on lab3: assessed, prepared
(the receiver at a temporary address on the lab's VM network), then sync rounds, the receiver pulling
from the source with dbclient and GNU tar on both ends; the data goes source -> receiver directly
(this machine's leg on the VM network carries control only).

One lab for the module, its rounds in order: refused before prepare; a first round cancelled mid-pull
(the migration back to target_prepared, the pull gone); a first round with the engine killed mid-pull
and finished by the same command (the pull adopted, not started again); data changed on the source; an
incremental round. Then the target's partition, mounted read-only in the receiver, is compared with the
source: contents, owners, modes, links, the deletion and the rename.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sqlite3
import textwrap
from pathlib import Path

import asyncssh
import pytest

from harness.chaos import kill_at
from harness.cli import ferry
from harness.debsource import ALICE_FILES, ALICE_UID, PAGE_PATH
from harness.lab import ok
from harness.migrationlab import migration_lab
from harness.netlab import leg_bytes
from harness.waiting import until_sync

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("qemu-system-x86_64", "mmdebstrap", "dnsmasq")),
    reason="needs root (mmdebstrap's chroot, namespaces, taps), qemu-system-x86_64, mmdebstrap and dnsmasq")

NAME = "web01"
SNAR_NEXT = f"/var/lib/ferry-migration/{NAME}/p0.snar.next"
# What the tree comparison covers on both ends: regular files (owner, group, mode, SHA-256) and links.
TREES = ("./etc", "./home", "./var/www", "./usr/sbin")
# Batched (a process per file costs much in a TCG guest): "S name|uid gid mode" (stat), "HASH  name"
# (sha256sum), then "L name|target" per link.
LISTING = r"""
cd "$1"; shift
find "$@" -type f -print0 | xargs -0 stat -c 'S %n|%u %g %a'
find "$@" -type f -print0 | xargs -0 sha256sum
find "$@" -type l | while read -r f; do echo "L $f|$(readlink "$f")"; done
"""


def listing(text: str) -> dict[str, str]:
    """LISTING's output: each file's "uid gid mode sha256", each link's "-> target", by path."""
    out: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for ln in text.splitlines():
        if ln.startswith("S "):
            path, _, rest = ln[2:].partition("|")
            out[path] = rest
        elif ln.startswith("L "):
            path, _, target = ln[2:].partition("|")
            out[path] = f"-> {target}"
        elif ln:
            digest, _, path = ln.partition("  ")
            hashes[path] = digest
    return {p: f"{v} {hashes[p]}" if not v.startswith("->") else v for p, v in out.items()}


# In the receiver: the target's first partition (unmounted where the rounds left it) mounted read-only at
# /mnt/check for `sh -c $1 ... /mnt/check ARGS`, then unmounted.
READ_ONLY = """
for m in $(awk '$1 == "/dev/vda1" { print $2 }' /proc/mounts); do umount "$m" || exit 1; done
mkdir -p /mnt/check && mount -o ro /dev/vda1 /mnt/check || exit 1
s=$1; shift
sh -c "$s" check /mnt/check "$@"; r=$?
umount /mnt/check
exit $r
"""


@pytest.fixture(scope="module")
def lab():
    # the system's bulk left out (it would take minutes between two TCG guests): ~40 MB remain
    with migration_lab("fsync-", "fsync", NAME, memory="256M", disk="1G", hold=True, excludes=[
            "/var/cache/apt/*", "/tmp/*", "/usr/lib/*", "/usr/share/*", "/usr/bin/*", "/boot/*"]) as (source, _):
        yield source


def on_source(source, command: str) -> str:
    r = source.ssh(command, timeout=300)
    assert r.returncode == 0, f"{command}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode()


async def _receiver(ws: Path, target: dict, command: str, *args: str) -> str:
    """`sh -c command args` in the receiver over a real SSH connection from this machine, trusting only the
    recorded host key, logging in with the workspace's receiver key."""
    known = asyncssh.import_known_hosts(f"{target['address']} {target['host_key']}\n")
    key = asyncssh.read_private_key(str(ws / "keys" / "receiver_ed25519"))
    async with asyncssh.connect(target["address"], 22, username="root", client_keys=[key], known_hosts=known,
                                connect_timeout=10) as c:
        argv = " ".join(shlex.quote(a) for a in ("sh", "-c", command, "sh", *args))
        r = await c.run(argv, timeout=600)
        assert r.exit_status == 0, f"{command}: {r.stderr}"
        return r.stdout


def on_receiver(ws: Path, target: dict, command: str, *args: str) -> str:
    return asyncio.run(_receiver(ws, target, command, *args))


def pulling(ws: Path, at_least: int):
    """A kill point: the task's pull has brought `at_least` bytes into the receiver."""
    def when(task: dict) -> bool:
        return (task.get("progress") or {}).get("bytes_done", 0) >= at_least and _logged(ws, task["id"], "% pulls %")
    return when


def _logged(ws: Path, task_id: int, like: str) -> bool:
    con = sqlite3.connect(f"file:{ws / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT 1 FROM task_log WHERE task_id=? AND message LIKE ?", (task_id, like)).fetchone() \
            is not None
    finally:
        con.close()


def test_sync_before_the_target_is_prepared_is_refused(lab):
    ws = lab.ws
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 2 and f"migration {NAME} is planned: it syncs once its target is prepared" in r.err, r.err
    assert f"ferry migration prepare {NAME}" in r.err and len(r.err.strip().splitlines()) == 1


def test_rounds_pull_from_the_source_into_the_target_and_survive_a_cancel_and_a_kill(lab):
    ws, source = lab.ws, lab
    r = ferry(ws, "migration", "assess", NAME)
    assert r.code == 0, r.err
    m = ok(ws, "migration", "show", NAME)
    if any(b["name"] == "network" for b in m["blockers"]):
        assert ferry(ws, "migration", "netcheck", NAME, "--override", "lab veths on a busy machine").code == 0
    r = ferry(ws, "migration", "prepare", NAME)
    assert r.code == 0, r.err
    target = ok(ws, "migration", "show", NAME)["target"]

    # 1. A first round cancelled mid-pull: back to target_prepared, no round, the pull gone on both ends.
    k = kill_at(ws, "migration", "sync", NAME, when=pulling(ws, 1 << 20))
    assert k.killed, k
    assert ok(ws, "migration", "show", NAME)["state"] == "initial_sync"
    assert ferry(ws, "task", "cancel", str(k.task_id)).code == 0
    m = ok(ws, "migration", "show", NAME)
    assert (m["state"], m["round"], m["rounds"]) == ("target_prepared", 0, [])
    # (a killed process may show a moment as a zombie, until the receiver's init reaps it)
    until_sync(lambda: not on_receiver(ws, target, "ps -o stat,args | grep -v '^Z' | grep '[d]bclient' || true"
                                       ).strip(), timeout=30, what="the receiver's dbclient to end")
    until_sync(lambda: not on_source(source, "pgrep -x tar || true").strip(), timeout=60,
               what="the source's tar to end with its pull")
    assert on_source(source, f"test -e {SNAR_NEXT} && echo left || echo gone").strip() == "gone"
    audit = [a for a in ok(ws, "audit") if a["target"] == NAME and a["action"].startswith("migration.")]
    assert [a["action"] for a in audit[:2]] == ["migration.target_prepared", "migration.initial_sync"]

    # 2. The first round again, the engine killed mid-pull: the same command adopts the pull and finishes.
    leg0 = leg_bytes(source.lab)
    k = kill_at(ws, "migration", "sync", NAME, when=pulling(ws, 8 << 20))
    assert k.killed, k
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 0, r.err
    assert f"task {k.task_id} already does this" in r.err
    assert "round 1 (initial): " in r.out and "now syncing" in r.out, r.out
    m = ok(ws, "migration", "show", NAME)
    assert (m["state"], m["round"], len(m["rounds"])) == ("syncing", 1, 1)
    first = m["rounds"][0]
    assert first["label"] == "initial" and first["task"] == k.task_id
    assert first["bytes"] > 20 << 20 and first["items"] > 1000 and first["duration_s"] > 0, first
    assert _logged(ws, k.task_id, "%followed, not started again%")
    crossed = leg_bytes(source.lab) - leg0
    assert crossed < first["bytes"] // 100, f"{crossed} bytes crossed this machine for {first['bytes']} moved"
    assert m["last_sync"] == pytest.approx(first["ended"]) and m["changed"] is not None

    # 3. Data changed on the source: a modified file, a new one of alice's, a deleted one, a renamed one.
    on_source(source, textwrap.dedent("""
        set -e
        echo 'Bob says: Tuesday 22:00.' >> /home/alice/notes.txt
        printf 'written after the first round\\n' > /home/alice/new.txt
        chown 1000:1000 /home/alice/new.txt && chmod 640 /home/alice/new.txt
        rm /home/alice/private/diary.txt
        mv /home/alice/data/blob.bin /home/alice/data/blob-renamed.bin
        echo scratch > /tmp/scratch.txt
        mkdir -p /var/cache/apt && echo cache > /var/cache/apt/ferry-test.bin
        """))
    r = ferry(ws, "migration", "sync", NAME)
    assert r.code == 0, r.err
    assert "round 2 (incremental): " in r.out and "now syncing" in r.out, r.out
    m = ok(ws, "migration", "show", NAME)
    assert (m["state"], m["round"], [x["round"] for x in m["rounds"]]) == ("syncing", 2, [1, 2])
    second = m["rounds"][1]
    assert second["label"] == "incremental" and second["deleted"] >= 2 and second["items"] >= 3, second
    # the renamed blob went again, and the journal (systemd rewrites it all the time); little else
    assert (1 << 20) < second["bytes"] < first["bytes"] // 2, second
    assert m["last_sync"] == pytest.approx(second["ended"])
    assert m["bytes_changed_since"] == m["changed"]["bytes"] and m["changed"]["at"] > second["ended"]
    assert m["predicted_final_sync_s"] is not None and m["predicted_final_sync_s"] >= 0
    shown = ferry(ws, "migration", "show", NAME).out
    assert "  round    2 incremental: " in shown and "changed    " in shown
    print(shown)        # (the rounds' figures, with -s)
    audit = [a for a in ok(ws, "audit") if a["target"] == NAME and a["action"].startswith("migration.")]
    assert audit[0]["action"] == "migration.round" and audit[0]["params"]["round"] == 2
    assert audit[1]["action"] == "migration.syncing" and audit[1]["params"]["round"] == 1

    # 4. The target as the receiver sees it, mounted read-only: what the source has, and only that.
    got = listing(on_receiver(ws, target, READ_ONLY, LISTING, *TREES))
    want = listing(on_source(source, " ".join(shlex.quote(a) for a in ("sh", "-c", LISTING, "listing", "/", *TREES))))
    assert got == want
    assert len(got) > 300 and sum(v.startswith("->") for v in got.values()) > 20
    files = {path: v.split() for path, v in got.items() if not v.startswith("->")}
    for path, f in ALICE_FILES.items():
        if path.endswith(("diary.txt", "blob.bin")):
            assert "." + path not in files, f"{path} was deleted or renamed on the source"
        elif path != "/home/alice/notes.txt":
            assert files["." + path][2:] == [f"{f.mode:o}", f.sha256], (path, files["." + path])
    renamed = ALICE_FILES["/home/alice/data/blob.bin"]
    assert files["./home/alice/data/blob-renamed.bin"] == [str(ALICE_UID), str(ALICE_UID), "640", renamed.sha256]
    assert files["./home/alice/new.txt"][:3] == [str(ALICE_UID), str(ALICE_UID), "640"]
    assert files["." + PAGE_PATH][:2] == ["0", "0"]
    notes = on_receiver(ws, target, READ_ONLY, 'cat "$1/home/alice/notes.txt"')
    assert notes.endswith("Bob says: Tuesday 22:00.\n")
    # ACLs naming a group (the journal's, group adm: gid 4) restored as the source has them
    acl = 'cd "$1" && /bin/tar -c --acls --no-recursion -f - ./var/log/journal | strings | grep "^group:"'
    assert "group:4:r-x" in on_receiver(ws, target, READ_ONLY, acl).split()
    assert "group:adm:r-x" in on_source(source, "tar -c --acls --no-recursion -f - -C / ./var/log/journal | "
                                                "grep -a -o 'group:[a-z0-9]*:[rwx-]*'").split()
    # Ferry's own folder on the source and the plan's excludes are not copied
    left = on_receiver(ws, target, READ_ONLY, 'ls -A "$1/var/lib" "$1/var/cache/apt" "$1/tmp"')
    assert "ferry-migration" not in left and "ferry-test.bin" not in left and "scratch.txt" not in left, left


def test_the_final_sync_is_predicted_from_the_rounds_throughput_and_the_change_rate():
    from ferry.engine.migration.model import (Change, Migration, MigrationSpec, MigrationState, SourceSpec, SyncRound,
                                              TargetSpec)
    from ferry.engine.migration.sync import predicted_final_sync_s

    def rnd(k, started, seconds, nbytes):
        return SyncRound(k, "initial" if k == 1 else "incremental", started, started + seconds, seconds, nbytes, 1)
    M = 1 << 20
    # 400 MiB in 105 s, 20 MiB in 10 s: 4 MiB/s and a 5 s walk
    rounds = (rnd(1, 1000.0, 105.0, 400 * M), rnd(2, 4600.0, 10.0, 20 * M))
    mig = Migration("m", "w", MigrationSpec(SourceSpec("10.0.0.1"), TargetSpec("h", "d", "n")), MigrationState.SYNCING,
                    0, 0, round=2, last_sync=4610.0, rounds=rounds)
    # no measure: 20 MiB came in the 3600 s between the two rounds' snapshots; an hour later as much again
    assert predicted_final_sync_s(mig, now=4600.0 + 3600) == pytest.approx(5 + 20 / 4, abs=0.1)
    # measured: 8 MiB 1800 s after the snapshot; 1800 s later 16 MiB
    measured = Migration(**{**mig.__dict__, "changed": Change(8 * M, 3, 4600.0 + 1800)})
    assert predicted_final_sync_s(measured, now=4600.0 + 3600) == pytest.approx(5 + 16 / 4, abs=0.1)
    # offline: what changes while that online round (9 s) runs, at 8 MiB / 1800 s: 5 s walk and next to no bytes
    assert predicted_final_sync_s(measured, offline=True, now=4600.0 + 3600) == pytest.approx(5.0, abs=0.1)
    # one round only, nothing measured: no change rate, no prediction
    first = Migration(**{**mig.__dict__, "rounds": rounds[:1], "round": 1, "last_sync": 1105.0})
    assert predicted_final_sync_s(first, now=2000.0) is None


def test_a_probe_sample_is_timed_to_its_last_byte_and_a_slow_end_of_its_stream_is_not_counted():
    from ferry.engine.migration.sync import RECORD, parse_sample, probe_fit

    def out(nbytes, files, began, piped, ended, at, src=None):
        lines = [f"@@probe {nbytes} {files} {began} {piped} {ended}"]
        lines += [f"@@src {src[0]} {src[1]}"] if src else []
        return "\n".join(lines + [f"@@at {began + t} {r}" for t, r in at]) + "\n"
    M = 1 << 20
    # 16 MiB (1638 records) at 4 MiB/s after a 1 s connection, then its stream took 15 s more to end
    big = parse_sample(out(16 * M, 9, 100.0, 120.1, 120.2, [(1.0 + k / 4, 1 + int(k * M / RECORD)) for k in range(17)],
                           src=(50.0, 54.0)))
    assert big.seconds == pytest.approx(5.0 + 0.1) and big.flush_s == pytest.approx(0.1)
    assert big.tail_s == pytest.approx(15.1) and big.reading_s == pytest.approx(4.0)
    assert "ended 15.1 s after its last byte, not counted" in big.text() and "first byte at 1.2 s" in big.text()
    dt, db = big.steady()
    assert db / dt == pytest.approx(4 * M, rel=0.01)
    assert db >= 10 * M
    small = parse_sample(out(M, 200, 10.0, 11.5, 11.5, [(1.05 + k * 0.05, 1 + k * 10) for k in range(10)]))
    none = parse_sample(out(0, 0, 5.0, 6.0, 6.0, [(0.1, 1)]))     # tar's first checkpoint, before any byte
    assert none.seconds == pytest.approx(1.0) and none.at == () and none.tail_s == 0
    c0, per_byte, per_file = probe_fit({"none": none, "big": big, "small": small})
    assert c0 == pytest.approx(1.0) and 1 / per_byte == pytest.approx(16 * M / 4.1, rel=0.05) and per_file > 0
    assert parse_sample("dbclient: connection refused\n") is None


def test_a_round_is_predicted_to_take_its_bytes_or_its_files_time_whichever_is_longer():
    from ferry.engine.migration.sync import round_seconds
    M = 1 << 20
    fit = (1.0, 1 / (4 * M), 0.002)          # a 1 s connection, 4 MiB/s, 2 ms a file
    # 280 MiB in 8,000 files: the bytes' 70 s; the files' 16 s pass behind them in the stream
    assert round_seconds(fit, 280 * M, 8000) == pytest.approx(1.0 + 70.0)
    # 40 MiB in 50,000 small files: the files' 100 s
    assert round_seconds(fit, 40 * M, 50000, units=2) == pytest.approx(2.0 + 100.0)
