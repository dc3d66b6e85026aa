"""Block-level replication over real sshd: sparse full copies, incremental rounds, refusals,
interruptions (kill -9, a killed connection), a full disk, a real block device."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from harness.cli import ferry, ferry_process, isolate_ssh, kill9
from harness.qemu import sha256
from harness.trees import loop_device, resident
from harness.waiting import running, until_sync

MiB = 1 << 20
CHUNK = 1 * MiB


@pytest.fixture
def site(sshd_factory, tmp_path, monkeypatch):
    isolate_ssh(monkeypatch, tmp_path / "home")
    return sshd_factory.site(tmp_path, 2)



def make_image(path: Path, size_mib: int, *, data_every: int = 2) -> int:
    """Random data in every `data_every`-th MiB, zeros (half written, half holes) elsewhere.
    Returns the number of bytes of data."""
    data = 0
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for i in range(size_mib):
            if i % data_every == 0:
                f.seek(i * MiB)
                f.write(os.urandom(MiB))
                data += MiB
            elif i % 4 == 1:
                f.seek(i * MiB)
                f.write(bytes(MiB))
    return data


def blocks(ws, src: str, dst: str, *extra: str) -> dict:
    r = ferry(ws, "replicate", "blocks", src, dst, "--json", "--chunk-size", "1M", *extra)
    assert r.out, r.err
    return {**r.json, "_code": r.code, "_err": r.err}


def test_full_copy_skips_zeros_and_keeps_holes_then_incremental_sends_only_changes(site, tmp_path, via):
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    data = make_image(src, 64)
    ws = site.workspace.root
    out = blocks(ws, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert out["verified_on_arrival"] is True and out["resumed"] is False
    assert resident(dst) <= data // 8, "the copy went to disk past the target host's page cache (O_DIRECT)"
    assert sha256(src) == sha256(dst)
    assert out["bytes_sent"] == data, "all-zero chunks are never sent"
    assert os.stat(dst).st_blocks * 512 <= data + 4 * MiB, "zero regions stay holes on the target"
    for key in ("bytes_total", "bytes_sent", "items_total", "items_changed", "duration_s", "resumed", "verified_on_arrival",
                "content_compared", "verification"):
        assert key in out

    # Change 3 chunks, one of them to zeros: only those travel.
    with open(src, "r+b") as f:
        for off in (5 * MiB + 100, 33 * MiB):
            f.seek(off)
            f.write(os.urandom(4096))
        f.seek(10 * MiB)
        f.write(bytes(MiB))
    again = blocks(ws, f"local:{src}", f"ssh1:{dst}")
    assert again["_code"] == 0 and again["round"] == 2
    assert again["items_changed"] == 3
    assert again["bytes_sent"] <= 2 * MiB
    assert sha256(src) == sha256(dst)


@pytest.mark.parametrize("chunk", ["4M", "3M", "64K"])
def test_sizes_that_are_not_whole_chunks_or_parts(site, tmp_path, chunk):
    """Chunks travel in 1 MiB parts; the last chunk and the last part are short."""
    src, dst = tmp_path / "odd.raw", tmp_path / "odd-copy.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(10 * MiB + 300 * 1024 + 17))
    r = ferry(site.workspace.root, "replicate", "blocks", f"local:{src}", f"ssh1:{dst}", "--json",
              "--chunk-size", chunk)
    assert r.code == 0, r.err
    assert r.json["verified_on_arrival"] and r.json["bytes_sent"] == src.stat().st_size
    assert sha256(src) == sha256(dst)


def test_target_smaller_than_source_is_refused_before_writing(site, tmp_path):
    src, dst = tmp_path / "disk.raw", tmp_path / "small.raw"
    make_image(src, 16)
    with open(dst, "wb") as f:
        f.write(os.urandom(8 * MiB))
    before = sha256(dst)
    out = blocks(site.workspace.root, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 1
    assert "smaller than the source" in out["error"] and str(dst) in out["error"]
    assert "nothing was written" in out["hint"]
    assert sha256(dst) == before


def test_existing_larger_target_with_garbage_is_made_equal(site, tmp_path):
    src, dst = tmp_path / "disk.raw", tmp_path / "old.raw"
    make_image(src, 16)
    with open(dst, "wb") as f:
        f.write(os.urandom(20 * MiB))
    out = blocks(site.workspace.root, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0 and out["verified_on_arrival"]
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read(16 * MiB)).hexdigest() == sha256(src)


def test_compression_sends_less_for_compressible_data(site, tmp_path):
    src, dst = tmp_path / "text.raw", tmp_path / "copy.raw"
    with open(src, "wb") as f:
        f.write((b"a fairly compressible log line number %d\n" * 30000)[: 8 * MiB].ljust(8 * MiB, b"x"))
    out = blocks(site.workspace.root, f"local:{src}", f"ssh1:{dst}", "--compress")
    assert out["_code"] == 0 and out["verified_on_arrival"]
    assert out["bytes_sent"] < out["bytes_changed"] / 5
    assert sha256(src) == sha256(dst)


def _task(ws: Path):
    import sqlite3
    con = sqlite3.connect(ws / "state.db")
    try:
        row = con.execute("SELECT id, checkpoint, progress, (SELECT COUNT(*) FROM chunks WHERE task_id=tasks.id)"
                          " FROM tasks WHERE kind='replicate.blocks' ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        con.close()
    if row is None:
        return 0, None, None, 0
    return row[0], json.loads(row[1]) if row[1] else None, json.loads(row[2]) if row[2] else None, row[3]


def test_kill_9_mid_copy_then_rerun_resumes_with_little_resent(site, tmp_path):
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    data = make_image(src, 160, data_every=1)
    ws = site.workspace.root
    proc = ferry_process(ws, "replicate", "blocks", f"local:{src}", f"ssh1:{dst}", "--chunk-size", "1M",
                         "--bwlimit", "16M", env={"HOME": os.environ["HOME"]})
    try:
        until_sync(lambda: running(proc) and _task(ws)[3] >= 50, timeout=60, what="50 chunks in the checkpoint")
    finally:
        kill9(ws, proc)
    _, _, _, durable_chunks = _task(ws)
    assert durable_chunks < 160, "the copy finished before it was killed"
    out = blocks(ws, f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert out["resumed"] is True and out["verified_on_arrival"] is True
    assert out["resumed_chunks"] >= durable_chunks
    resent = out["bytes_sent"] - (data - durable_chunks * CHUNK)
    assert resent < 0.01 * data, f"re-sent {resent} bytes beyond the checkpoint"
    assert sha256(src) == sha256(dst)


def _in_background(ws: Path, src: Path, dst: Path, bwlimit: str) -> tuple[threading.Thread, dict]:
    """A paced copy local:src -> ssh1:dst in a thread; its result fills the dict when done."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(blocks(ws, f"local:{src}", f"ssh1:{dst}", "--bwlimit", bwlimit)))
    t.start()
    return t, result


def test_progress_counts_zero_chunks_so_the_bar_follows_the_image(site, tmp_path):
    """Half the image is zeros that never travel: the bar (and so the ETA) still moves through
    them, while the per-stream figures show the data actually written."""
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    make_image(src, 64, data_every=2)
    ws = site.workspace.root
    t, result = _in_background(ws, src, dst, "8M")
    samples = []

    def sampled_to_the_end() -> bool:
        p = _task(ws)[2] or {}
        written = sum(((p.get("detail") or {}).get("streams") or {}).values())
        if written >= 4 * MiB and p.get("bytes_done", 0) < (p.get("bytes_total") or 0):
            samples.append((p["bytes_done"], written))
        return not t.is_alive()
    until_sync(sampled_to_the_end, timeout=300, every=0.05, what="the copy to end")
    t.join()
    assert result["_code"] == 0 and result["verified_on_arrival"], result
    assert samples, "no progress was seen during the copy"
    assert any(done >= 1.5 * written for done, written in samples), samples[-5:]


def test_killed_connection_mid_copy_is_retried(site, tmp_path, via):
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    make_image(src, 96, data_every=1)
    ws = site.workspace.root
    t, result = _in_background(ws, src, dst, "12M")
    until_sync(lambda: running(t, result) and ((_task(ws)[2] or {}).get("bytes_done") or 0) >= 24 * MiB,
               timeout=60, what="24 MiB copied")
    assert site.servers["ssh1"].kill_connections() >= 1
    t.join(120)
    assert result["_code"] == 0 and result["verified_on_arrival"], result
    assert sha256(src) == sha256(dst)


def test_target_disk_full_then_resume(site, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        src = tmp_path / "disk.raw"
        make_image(src, 32, data_every=1)
        ws = site.workspace.root
        out = blocks(ws, f"local:{src}", f"ssh1:{mnt}/copy.raw")
        assert out["_code"] == 1
        assert "No space left on device" in out["error"] and "ssh1" in out["error"], out
        subprocess.run(["mount", "-o", "remount,size=48m", str(mnt)], check=True)
        again = blocks(ws, f"local:{src}", f"ssh1:{mnt}/copy.raw")
        assert again["_code"] == 0 and again["verified_on_arrival"] and again["resumed"]
        assert sha256(src) == sha256(mnt / "copy.raw")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_block_device_source(site, tmp_path):
    img = tmp_path / "backing.raw"
    make_image(img, 24)
    with loop_device(img, read_only=True) as dev:
        dst = tmp_path / "from-device.raw"
        out = blocks(site.workspace.root, f"local:{dev}", f"ssh2:{dst}")
        assert out["_code"] == 0 and out["verified_on_arrival"]
        assert out["bytes_total"] == 24 * MiB
        assert sha256(img) == sha256(dst)


def test_block_device_target_gets_data_and_zeros(site, tmp_path):
    """A loop device over a file full of garbage as the target: data chunks are written (direct
    I/O to the device), zero chunks are zeroed out on it, and the device then equals the source."""
    src = tmp_path / "disk.raw"
    make_image(src, 24)
    backing = tmp_path / "device-backing.raw"
    backing.write_bytes(os.urandom(32 * MiB))
    with loop_device(backing) as dev:
        out = blocks(site.workspace.root, f"local:{src}", f"ssh1:{dev}")
        assert out["_code"] == 0 and out["verified_on_arrival"], out
        assert out["items_changed"] == 24, "every chunk differed from the garbage, zeros included"
    with open(backing, "rb") as f:
        assert hashlib.sha256(f.read(24 * MiB)).hexdigest() == sha256(src)


def test_restart_sends_everything_again_into_a_new_target(site, tmp_path):
    """--restart starts over: the target image is made anew and every data chunk travels again,
    where a plain re-run would have compared and sent nothing."""
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    data = make_image(src, 12)
    ws = site.workspace.root
    first = blocks(ws, f"local:{src}", f"ssh1:{dst}")
    assert first["_code"] == 0 and first["bytes_sent"] == data
    with open(dst, "r+b") as f:   # damage the target where the source has zeros: a re-run would compare
        f.seek(3 * MiB)
        f.write(b"junk")
    again = blocks(ws, f"local:{src}", f"ssh1:{dst}", "--restart")
    assert again["_code"] == 0, again
    assert again["bytes_sent"] == data and again["resumed"] is False and again["hashed_chunks"] == 0
    assert sha256(src) == sha256(dst)
    assert again["task"] != first["task"]
