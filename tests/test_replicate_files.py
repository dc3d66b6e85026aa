"""File-level replication over real sshd: every file type and piece of metadata, incremental rounds,
hostile sources, interruptions (kill -9, a killed connection), a full disk and an unreadable file."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ferry.engine.replicate import agent as W
from ferry.engine.replicate.channel import AgentChannel
from ferry.engine.replicate.hosts import AgentHost
from harness.cli import ferry, ferry_process, isolate_ssh, kill9, relay_over_asyncssh, replicate_watched
from harness.trees import describe, diff, resident, rich_tree, write
from harness.waiting import running, until_sync


@pytest.fixture
def site(sshd_factory, tmp_path, monkeypatch):
    isolate_ssh(monkeypatch, tmp_path / "home")
    return sshd_factory.site(tmp_path, 2)



def replicate(ws, src: str, dst: str, *extra: str) -> dict:
    r = ferry(ws, "replicate", "files", src, dst, "--json", *extra)
    assert r.out, r.err
    return {**r.json, "_code": r.code, "_err": r.err}


def test_full_round_preserves_every_type_and_attribute(site, tmp_path, via):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rich_tree(src)
    out = replicate(site.workspace.root, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert out["verified_on_arrival"] is True and out["resumed"] is False
    for key in ("bytes_total", "bytes_sent", "items_total", "items_changed", "duration_s"):
        assert key in out
    assert out["items_changed"] == out["items_total"] - 1   # everything but the root itself
    assert resident(dst / "dir" / "sub" / "big.bin") < (1 << 20), "large files bypass the target's page cache"
    assert diff(describe(src), describe(dst)) == []
    # The holes of the sparse file stayed holes: far fewer blocks than its size.
    assert os.stat(dst / "sparse.img").st_blocks * 512 < (2 << 20)


def test_incremental_round_changes_deletes_and_type_changes(site, tmp_path, via):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rich_tree(src, specials=False)
    ws = site.workspace.root
    assert replicate(ws, f"ssh2:{src}", f"ssh1:{dst}")["_code"] == 0

    nothing = replicate(ws, f"ssh2:{src}", f"ssh1:{dst}")
    assert nothing["_code"] == 0 and nothing["items_changed"] == 0 and nothing["bytes_sent"] == 0
    assert nothing["round"] == 2

    write(src / "small.txt", b"changed content\n")
    os.chmod(src / "dir" / "medium.bin", 0o600)            # metadata only
    (src / "dir" / "sub" / "deeper" / "note").unlink()      # deletion
    import shutil
    shutil.rmtree(src / "empty-dir")
    write(src / "empty-dir", b"now a file")                 # directory -> file
    (src / "link-dir").unlink()
    (src / "link-dir").mkdir()                              # symlink -> directory
    write(src / "link-dir" / "inside", b"x")
    write(src / "brand-new", b"new")
    extra_on_target = dst / "only-on-target"
    write(extra_on_target, b"should be deleted")
    out = replicate(ws, f"ssh2:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert out["bytes_sent"] < 100, "only the small changed files travel"
    assert out["deleted"] >= 2
    assert diff(describe(src), describe(dst)) == []


def test_excludes_and_no_delete(site, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in ("proc/1", "sys/kernel", "dev", "run/lock", "tmp", "var/lib/lost+found", "var/cache/apt", "home/u"):
        (src / d).mkdir(parents=True)
    write(src / "proc" / "1" / "status", b"p")
    write(src / "sys" / "kernel" / "x", b"s")
    write(src / "run" / "lock" / "l", b"r")
    write(src / "tmp" / "t", b"t")
    write(src / "var" / "lib" / "lost+found" / "f", b"lf")
    write(src / "var" / "cache" / "apt" / "pkg.deb", b"deb")
    write(src / "home" / "u" / "keep.txt", b"keep")
    write(src / "home" / "u" / "skip.log", b"log")
    ws = site.workspace.root
    out = replicate(ws, f"local:{src}", f"ssh1:{dst}", "--system-excludes", "--exclude", "*.log",
                    "--exclude", "/var/cache/")
    assert out["_code"] == 0, out
    assert (dst / "home" / "u" / "keep.txt").read_bytes() == b"keep"
    assert not (dst / "home" / "u" / "skip.log").exists()
    assert not (dst / "var" / "cache").exists()
    # A live root's pseudo filesystems: the directories exist, their contents do not.
    for d in ("proc", "sys", "run", "tmp"):
        assert (dst / d).is_dir() and list((dst / d).iterdir()) == []
    assert not (dst / "var" / "lib" / "lost+found").exists()

    write(dst / "home" / "u" / "target-only", b"kept with --no-delete")
    write(dst / "home" / "u" / "skip.log", b"excluded: never deleted")
    (src / "home" / "u" / "keep.txt").unlink()
    out = replicate(ws, f"local:{src}", f"ssh1:{dst}", "--system-excludes", "--exclude", "*.log",
                    "--exclude", "/var/cache/", "--no-delete")
    assert out["_code"] == 0
    assert (dst / "home" / "u" / "target-only").exists() and (dst / "home" / "u" / "keep.txt").exists()
    out = replicate(ws, f"local:{src}", f"ssh1:{dst}", "--system-excludes", "--exclude", "*.log",
                    "--exclude", "/var/cache/")
    assert not (dst / "home" / "u" / "target-only").exists() and not (dst / "home" / "u" / "keep.txt").exists()
    assert (dst / "home" / "u" / "skip.log").read_bytes() == b"excluded: never deleted"


def test_file_changing_during_copy_is_reported_then_caught(site, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(src / "steady", b"s" * 1000)
    busy = src / "busy.log"
    write(busy, os.urandom(48 << 20))
    stop = threading.Event()

    def writer() -> None:
        with open(busy, "r+b") as f:
            i = 0
            while not stop.is_set():
                f.seek((i * 4096) % (48 << 20))
                f.write(os.urandom(4096))
                f.flush()
                i += 1
                time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        out = replicate(site.workspace.root, f"local:{src}", f"ssh1:{dst}", "--streams", "1", "--bwlimit", "40M")
    finally:
        stop.set()
        t.join()
    assert out["_code"] == 1
    assert "kept changing while being copied" in out["error"] and "busy.log" in out["error"]
    assert "another round" in out["hint"]
    again = replicate(site.workspace.root, f"local:{src}", f"ssh1:{dst}")
    assert again["_code"] == 0 and again["verified_on_arrival"]
    assert diff(describe(src), describe(dst)) == []


# --------------------------------------------------------------------------- hostile sources

async def _recv_agent(root: Path) -> AgentChannel:
    return await AgentChannel.start(AgentHost.local(), "recv", root=str(root))


def _small_file(rel: bytes, data: bytes = b"evil") -> bytes:
    import struct
    import zlib
    meta = W.pack_values([rel, 0o100644, 0, 0, len(data), 0, []])
    return struct.pack("<II", len(meta), 5) + meta + zlib.crc32(data).to_bytes(4, "big") + b"\0" + data


HOSTILE = [
    (W.F_FILE, _small_file(b"../escaped")),
    (W.F_FILE, _small_file(b"/abs-escaped")),
    (W.F_FILE, _small_file(b"ok/../../escaped2")),
    (W.F_FILE, _small_file(b"evil-link/passwd")),            # parent is a symlink made "in an earlier round"
    (W.F_FILE, _small_file(b"a\0b")),
    (W.F_FILE, _small_file(b"")),
    (W.F_ENTRY, W.pack_values(["symlink", b"../up-link", b"/etc", 0, 0, 0])),
    (W.F_ENTRY, W.pack_values(["hardlink", b"stolen", b"../outside/secret"])),
    (W.F_ENTRY, W.pack_values(["hardlink", b"evil-link/x", b"good"])),
    (W.F_ENTRY, W.pack_values(["dir", b"evil-link/newdir", 0o755])),
    (W.F_ENTRY, W.pack_values(["node", b"../node", 0o10644, 0, 0, 0, 0])),
    (W.F_DELETE, W.pack_values([b"../outside"])),
    (W.F_DELETE, W.pack_values([b"evil-link/secret"])),
    (W.F_DIRMETA, W.pack_values([b"..", 0o777, 0, 0, 0, []])),
    (W.F_BEGIN, W.pack_values([b"evil-link/big", 0o100644, 0, 0, 10, 0, [], 0])),
    (W.F_DATA, b"\0" * 8 + b"0123456789"),
    (W.F_END, W.pack_values([b"evil-link/big", b"\0" * 32, False])),
]


async def test_target_refuses_entries_that_would_escape_its_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret", b"untouched")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside), root / "evil-link")
    before = describe(tmp_path / "outside")

    ch = await _recv_agent(root)
    for typ, payload in HOSTILE:
        ch.send(typ, payload)
    ch.send(W.F_FILE, _small_file(b"good", b"the rest continues"))
    ch.send(W.F_FILE, _small_file("new\nline-\udcff".encode("utf-8", "surrogateescape"), b"odd name"))
    ch.send(W.F_EOF)
    await ch.drain()
    errors, acked = [], []
    while True:
        typ, payload = await ch.recv()
        if typ == W.F_ERR:
            errors.append(W.unpack_values(payload))
        elif typ == W.F_ACK:
            acked += [a[0] for a in W.unpack_values(payload)[1]]
        elif typ == W.F_EOF:
            break
    await ch.finish()

    assert all(side == "target" for side, *_ in errors)
    refused = [e for e in errors if e[3].startswith("refused")]
    assert len(refused) == len(HOSTILE) - 2, errors   # DATA/END of a refused file produce no extra error
    assert {b"good", b"new\nline-\xff"} <= set(acked)
    assert (root / "good").read_bytes() == b"the rest continues"
    assert (root / os.fsdecode(b"new\nline-\xff")).read_bytes() == b"odd name"
    assert describe(tmp_path / "outside") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "root"]
    assert os.readlink(root / "evil-link") == str(outside)


async def test_target_flags_data_that_does_not_match_its_check(tmp_path):
    """A piece lost or garbled on the way is caught: the target's check of what it received
    differs from the source's check of what it read, and the acknowledgement says so."""
    ch = await _recv_agent(tmp_path / "root")
    good = _small_file(b"good", b"as read")
    bad = bytearray(_small_file(b"bad", b"as read"))
    bad[-1] ^= 0xFF   # one byte changed after the source computed its check
    ch.send(W.F_FILE, good)
    ch.send(W.F_FILE, bytes(bad))
    ch.send(W.F_EOF)
    await ch.drain()
    flags = {}
    while (frame := await ch.recv())[0] != W.F_EOF:
        if frame[0] == W.F_ACK:
            flags.update({rel: mismatch for rel, _d, _s, _c, mismatch in W.unpack_values(frame[1])[1]})
    await ch.finish()
    assert flags == {b"good": False, b"bad": True}


# --------------------------------------------------------------------------- interruptions

def _tree_for_interruptions(src: Path) -> int:
    src.mkdir()
    total = 0
    for i in range(300):
        size = 30_000 + i * 101
        write(src / f"small-{i:03d}", os.urandom(size))
        total += size
    for i in range(3):
        write(src / f"large-{i}.bin", os.urandom(40 << 20))
        total += 40 << 20
    return total


def _checkpoint(ws: Path, kind: str = "replicate.files") -> tuple[int, dict | None, dict | None]:
    con = sqlite3.connect(ws / "state.db")
    try:
        row = con.execute("SELECT id, checkpoint, progress FROM tasks WHERE kind=? ORDER BY id DESC LIMIT 1",
                          (kind,)).fetchone()
    except sqlite3.OperationalError:   # the child has not created its tables yet
        row = None
    finally:
        con.close()
    if row is None:
        return 0, None, None
    return row[0], json.loads(row[1]) if row[1] else None, json.loads(row[2]) if row[2] else None


def _kill_at_half(ws: Path, src: Path, dst: Path, total: int) -> None:
    """`ferry replicate files` in a child process, killed (-9) once half the data is durable."""
    proc = ferry_process(ws, "replicate", "files", f"local:{src}", f"ssh1:{dst}", "--bwlimit", "16M",
                         "--streams", "2", env={"HOME": os.environ["HOME"]})
    try:
        until_sync(lambda: running(proc) and (_checkpoint(ws)[1] or {}).get("bytes_durable", 0) >= total // 2,
                   timeout=60, what="half the data durable")
    finally:
        kill9(ws, proc)


def test_kill_9_mid_round_then_rerun_resumes_with_little_resent(site, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    total = _tree_for_interruptions(src)
    ws = site.workspace.root
    _kill_at_half(ws, src, dst, total)
    _, ckpt, _ = _checkpoint(ws)
    durable = ckpt["bytes_durable"]
    assert durable < total

    out = replicate(ws, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert out["resumed"] is True and out["verified_on_arrival"] is True
    resent = out["bytes_sent"] - (total - durable)
    assert resent < 0.01 * total, f"re-sent {resent} bytes beyond the checkpoint ({resent / total:.2%})"
    assert diff(describe(src), describe(dst)) == []


def test_killed_connection_mid_round_is_retried_automatically(site, tmp_path, via):
    src, dst = tmp_path / "src", tmp_path / "dst"
    total = _tree_for_interruptions(src)
    ws = site.workspace.root
    server = site.servers["ssh1"]
    result: dict = {}

    def run() -> None:
        result.update(replicate(ws, f"local:{src}", f"ssh1:{dst}", "--bwlimit", "25M"))

    t = threading.Thread(target=run)
    t.start()
    until_sync(lambda: running(t, result) and (_checkpoint(ws)[2] or {}).get("bytes_done", 0) >= total // 3,
               timeout=60, what="a third of the data copied")
    assert server.kill_connections() >= 1
    t.join(120)
    assert not t.is_alive()
    assert result["_code"] == 0, result
    assert result["verified_on_arrival"] is True
    assert "retrying" in ferry(ws, "task", "show", str(result["task"])).out
    assert diff(describe(src), describe(dst)) == []


def test_changed_host_key_is_refused_by_the_bulk_path_too(site, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"data")
    server = site.servers["ssh1"]
    old = server.fingerprint
    server.regenerate_host_key()
    out = replicate(site.workspace.root, f"local:{src}", f"ssh1:{tmp_path / 'dst'}")
    assert out["_code"] == 1
    assert server.fingerprint in out["error"] and old in out["error"], out
    assert "ferry hosts trust ssh1" in out["hint"]
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------- causes an operator fixes

@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs mounted by the test: a target that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_target_disk_full_then_resume_after_space_is_freed(site, tmp_path, small_fs):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        write(src / f"part-{i}.bin", os.urandom(10 << 20))
    ws = site.workspace.root
    out = replicate(ws, f"local:{src}", f"ssh1:{small_fs}/copy")
    assert out["_code"] == 1
    assert "No space left on device" in out["error"] and "ssh1" in out["error"]
    assert "free space" in out["hint"]
    task_id, ckpt, _ = _checkpoint(ws)
    state = json.loads(ferry(ws, "task", "show", str(task_id), "--json").out)["state"]
    assert state == "failed"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = replicate(ws, f"local:{src}", f"ssh1:{small_fs}/copy")
    assert again["_code"] == 0 and again["verified_on_arrival"] and again["resumed"] is True
    assert again["task"] == task_id
    assert diff(describe(src), describe(small_fs / "copy")) == []


def test_unreadable_source_file_fails_clearly_then_resumes(site, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(src / "readable", b"fine")
    write(src / "locked", b"secret", mode=0o000)
    ws = site.workspace.root
    # Root reads anything; drop the capabilities that allow it, as an ordinary account would be.
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    proc = ferry_process(ws, "replicate", "files", f"local:{src}", f"ssh1:{dst}", "--json", prefix=drop,
                         env={"HOME": os.environ["HOME"]})
    out_text, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out_text, err_text)
    out = json.loads(out_text)
    assert f"local:{src}" in out["error"] and "locked" in out["error"] and "Permission denied" in out["error"]
    assert (dst / "readable").read_bytes() == b"fine"
    os.chmod(src / "locked", 0o644)
    again = replicate(ws, f"local:{src}", f"ssh1:{dst}")
    assert again["_code"] == 0 and again["verified_on_arrival"]
    assert (dst / "locked").read_bytes() == b"secret"


# --------------------------------------------------------------------------- the round API directly

async def _round(src: Path, dst: Path, *, checkpoint: dict | None = None, round_no: int = 1):
    from ferry.engine.replicate.files import FileOptions, FileRound
    saved: list[dict] = []

    async def save(c: dict) -> None:
        saved.append(dict(c))

    rnd = FileRound(AgentHost.local(), str(src), AgentHost.local(), str(dst), FileOptions(streams=2),
                    round_no=round_no, checkpoint=checkpoint, progress=lambda **k: None, save_checkpoint=save,
                    log=lambda m, l: None)
    return await rnd.run(), saved


async def test_partial_large_file_resumes_after_a_prefix_verified_on_both_sides(tmp_path):
    import base64
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    big, other = os.urandom(20 << 20), os.urandom(20 << 20)
    write(src / "big.bin", big)
    write(src / "other.bin", other)
    # What an interrupted round left: big.bin's first 8 MiB are right but its last 3 MiB are torn;
    # other.bin's kept copy is wrong from the start.
    write(dst / ".ferry-part.big.bin", big[: 8 << 20] + os.urandom(3 << 20))
    write(dst / ".ferry-part.other.bin", os.urandom(6 << 20))
    ckpt = {"round": 1, "verified_before_ns": time.time_ns(),
            "partials": {base64.b64encode(b"big.bin").decode(): 8 << 20,
                         base64.b64encode(b"other.bin").decode(): 4 << 20}}
    stats, _ = await _round(src, dst, checkpoint=ckpt)
    assert stats.verified_on_arrival, stats
    assert stats.resumed_bytes == 8 << 20            # the torn end was not trusted; the rest was
    assert stats.bytes_sent == (40 << 20) - (8 << 20)
    assert (dst / "big.bin").read_bytes() == big and (dst / "other.bin").read_bytes() == other
    assert sorted(p.name for p in dst.iterdir()) == ["big.bin", "other.bin"]


async def test_source_file_vanishing_mid_round_is_reported_then_the_next_round_finishes(tmp_path, monkeypatch):
    import ferry.engine.replicate.files as files
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(5):
        write(src / f"f{i}", os.urandom(100_000))
    real_walk = files.walk

    async def walk_then_delete(where, root, opts, **kw):
        m = await real_walk(where, root, opts, **kw)
        if root == str(src) and (src / "f3").exists():
            (src / "f3").unlink()   # deleted by someone between the listing and the copy (for real)
        return m

    monkeypatch.setattr(files, "walk", walk_then_delete)
    stats, _ = await _round(src, dst)
    assert not stats.verified_on_arrival
    assert any("f3 vanished during the copy" in e and f"local:{src}" in e for e in stats.errors), stats.errors
    assert sorted(p.name for p in dst.iterdir()) == ["f0", "f1", "f2", "f4"]
    again, _ = await _round(src, dst, round_no=2)
    assert again.verified_on_arrival and again.items_changed == 0


# --------------------------------------------------------------------------- what the README promises

async def test_a_resumed_round_keeps_its_total_and_never_goes_back(site, tmp_path):
    """After a kill -9, the resumed round's bar starts where the durable work left it, its total
    is the round's first total, and it only moves forward."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    total = _tree_for_interruptions(src)
    ws = site.workspace.root
    await asyncio.to_thread(_kill_at_half, ws, src, dst, total)
    _, ckpt, _ = _checkpoint(ws)
    info, seen = await replicate_watched(site.workspace, "files", {"src": f"local:{src}", "dst": f"ssh1:{dst}"})
    assert info.state == "succeeded" and info.result["resumed"] is True, info.error
    copying = [p for _t, p in seen if p.bytes_total]
    assert copying and {p.bytes_total for p in copying} == {ckpt["total"]} and ckpt["total"] == total
    done = [p.bytes_done for p in copying]
    assert done == sorted(done) and done[0] >= ckpt["bytes_durable"] // 2, done[:5]
    assert diff(describe(src), describe(dst)) == []


def test_restart_after_a_kill_starts_over_instead_of_resuming(site, tmp_path):
    """--restart: the interrupted task is cancelled, a new one begins, and the partly written
    large file is sent again from its first byte rather than resumed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    total = _tree_for_interruptions(src)
    ws = site.workspace.root
    _kill_at_half(ws, src, dst, total)
    killed, _, _ = _checkpoint(ws)
    partial = [p.name[len(".ferry-part."):] for p in dst.glob(".ferry-part.*")]
    assert partial, "a large file was being written when the copy was killed"
    out = replicate(ws, f"local:{src}", f"ssh1:{dst}", "--restart")
    assert out["_code"] == 0, out
    assert out["task"] != killed and out["resumed"] is False and out["resumed_bytes"] == 0
    assert out["bytes_sent"] >= sum((src / name).stat().st_size for name in partial), "sent whole again"
    assert diff(describe(src), describe(dst)) == []
    tasks = {t["id"]: t["state"] for t in ferry(ws, "tasks", "--json", "--all").json}
    assert tasks[killed] == "cancelled"


@pytest.mark.parametrize("relayed, files, cap", [(False, 4, 8), (True, 4, 8), (False, 8, 16)],
                         ids=["control-agents", "control-agents-relayed", "streams"])
async def test_bwlimit_holds_the_cap_over_several_seconds(site, tmp_path, monkeypatch, relayed, files, cap):
    """--bwlimit: the bytes the target takes in, measured from the engine's progress events over
    the middle of a copy of several seconds, stay within 15% of the cap; in a small round (the
    control agents carry the files, through the OpenSSH client or relayed over asyncssh) and a
    large one (parallel streams)."""
    if relayed:
        relay_over_asyncssh(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(files):
        write(src / f"f{i}", os.urandom(10 << 20))
    info, seen = await replicate_watched(site.workspace, "files", {"src": f"local:{src}", "dst": f"ssh1:{dst}",
                                                                   "bwlimit": cap << 20, "streams": 2})
    samples = [(t, p.bytes_done) for t, p in seen if p.bytes_done]
    assert info.state == "succeeded", info.error
    total = files * 10 << 20
    middle = [(t, b) for t, b in samples if 0.2 * total <= b <= 0.9 * total]
    (t0, b0), (t1, b1) = middle[0], middle[-1]
    assert t1 - t0 >= 2.5, "measured over a few seconds"
    rate = (b1 - b0) / (t1 - t0)
    assert 0.85 * (cap << 20) <= rate <= 1.15 * (cap << 20), f"{rate / (1 << 20):.2f} MiB/s"
