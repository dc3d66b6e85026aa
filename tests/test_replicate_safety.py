"""Replication refuses what would destroy data, says exactly what it verified, never follows a
symlink on either side, never hangs on a FIFO or a stuck agent, and takes no malformed frame."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ferry.engine.errors import FerryError
from ferry.engine.replicate import agent as W
from ferry.engine.replicate.channel import AgentChannel
from ferry.engine.replicate.hosts import AgentHost
from harness.cli import engine_pid, ferry, ferry_process, isolate_ssh, kill9
from harness.qemu import sha256
from harness.trees import describe, diff, loop_device, write
from harness.waiting import running, until_sync


@pytest.fixture
def site(sshd_factory, tmp_path, monkeypatch):
    """ssh1 and ssh2: two host entries for two sshds on this very machine (127.0.0.1)."""
    isolate_ssh(monkeypatch, tmp_path / "home")
    return sshd_factory.site(tmp_path, 2)


def replicate(ws, level: str, src: str, dst: str, *extra: str) -> dict:
    r = ferry(ws, "replicate", level, src, dst, "--json", *extra)
    assert r.out, r.err
    return {**r.json, "_code": r.code, "_err": r.err}


def refused_up_front(ws, level: str, src: str, dst: str, *extra: str) -> str:
    """The one line `ferry replicate` prints for what the engine refuses before a task exists:
    exit code 2, nothing on stdout, and no task made (none listed, not even a failed one)."""
    r = ferry(ws, "replicate", level, src, dst, *extra)
    lines = r.err.splitlines()
    assert r.code == 2 and r.out == "" and len(lines) == 1, (src, dst, r)
    assert lines[0].startswith("ferry: refused: ") and "(hint: " in lines[0], (src, dst, r)
    assert ferry(ws, "tasks", "--json").json == [], (src, dst)
    return lines[0]


def _project(root: Path) -> Path:
    """/.../p with p/sub holding the data a careless copy would destroy."""
    p = root / "p"
    (p / "sub" / "deep").mkdir(parents=True)
    write(p / "sub" / "data.bin", os.urandom(300_000))
    write(p / "sub" / "deep" / "note", b"keep me\n")
    write(p / "sibling", b"also keep me\n")
    return p


# --------------------------------------------------------------------------- 1. overlap

def _disguises(tmp_path: Path, p: Path) -> list[tuple[str, str]]:
    link = tmp_path / "link-to-p"
    link.symlink_to(p)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "up").symlink_to(p)
    return [
        # `local` and an ssh host are one machine
        (f"ssh1:{p}/sub", f"local:{p}"),
        # two host entries for one address
        (f"ssh1:{p}/sub", f"ssh2:{p}"),
        # a symlinked path to the same directory (same host name, different names)
        (f"local:{link}/sub", f"local:{p}"),
        (f"local:{p}/sub", f"local:{link}"),
        # the target inside the source, through another host name
        (f"local:{p}", f"ssh1:{p}/sub/new"),
        (f"ssh2:{link}", f"ssh1:{p}/sub"),
        # the very same directory under two names
        (f"local:{p}", f"ssh1:{link}"),
        # `..` that only the host can resolve: a/b/up/.. is the parent of p, not a/b
        (f"local:{p}/sub", f"ssh2:{tmp_path}/a/b/up/../p"),
        (f"ssh1:{tmp_path}/a/b/up/../p/sub", f"local:{p}"),
    ]


def test_overlapping_source_and_target_are_refused_before_a_task_exists(site, tmp_path):
    """Each disguise is refused by the engine's precheck: one line, exit code 2, no task made
    (before, the task's round refused it: two lines, exit code 1 and a failed task left)."""
    p = _project(tmp_path)
    before = describe(p)
    ws = site.workspace.root
    for src, dst in _disguises(tmp_path, p):
        line = refused_up_front(ws, "files", src, dst, "--json")
        assert "overlap on one machine" in line and "nothing was written" in line, line
        assert describe(p) == before, f"{src} -> {dst} changed the tree"
    assert not (p / "sub" / "new").exists()


def test_the_folder_labs_hosts_and_local_are_one_machine(tmp_path):
    """The issue's own case: the folder lab's hosts (the suite's lab) are folders of this machine,
    as `local` is."""
    p = _project(tmp_path)
    before = describe(p)
    ws = tmp_path / "ws"
    line = refused_up_front(ws, "files", f"lab1:{p}/sub", f"local:{p}")
    assert line == (f"ferry: refused: lab1:{p}/sub and local:{p} overlap on one machine: the source is inside "
                    "the target, and the copy would delete it (hint: pick a target outside the source and a "
                    "source outside the target; nothing was written)"), line
    assert "the target is inside the source" in refused_up_front(ws, "files", f"lab2:{p}", f"lab1:{p}/sub/new")
    assert describe(p) == before and not (p / "sub" / "new").exists()


async def test_an_overlap_made_after_the_precheck_is_refused_by_the_round(site, tmp_path):
    """The precheck and the round are apart in time: a target swapped for a symlink into the source
    in between is refused by the round's own look, before it writes (the task then fails)."""
    from ferry.engine.client import EngineClient
    from ferry.engine.replicate.task import precheck

    p = _project(tmp_path)
    before = describe(p)
    dst = tmp_path / "target"
    params = {"src": f"local:{p}", "dst": f"ssh1:{dst}"}

    client = EngineClient.open(site.workspace, adopt=False)
    await client.start()
    try:
        await precheck(client.engine, "files", params)          # no overlap yet: no refusal
        dst.symlink_to(p / "sub")                                # now the target is in the source
        tid, _ = await client.engine.submit_or_resume("replicate.files", params)
        info = await client.wait_task(tid)
    finally:
        await client.close()
    assert str(info.state) == "failed", info
    assert info.error.startswith(f"refused: local:{p} and ssh1:{dst} (really {p}/sub) overlap on one machine: "
                                 "the target is inside the source"), info.error
    assert describe(p) == before


def test_overlap_by_name_is_refused_before_a_task_exists(site, tmp_path):
    p = _project(tmp_path)
    ws = site.workspace.root
    for src, dst, what in ((f"local:{p}/sub", f"local:{p}", "the source"),
                           (f"local:{p}", f"local:{p}/sub", "the target"),
                           (f"ssh1:{p}/./sub/", f"ssh1:{p}//", "the source")):
        assert f"refused: {what}" in refused_up_front(ws, "files", src, dst)


def test_bind_mount_of_the_target_inside_the_source_is_refused(site, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    p = _project(tmp_path)
    mnt = tmp_path / "elsewhere"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(p), str(mnt)], check=True)
    try:
        before = describe(p)
        line = refused_up_front(site.workspace.root, "files", f"ssh1:{p}/sub", f"local:{mnt}")
        assert "the source is inside the target" in line, line
        assert describe(p) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_block_target_that_is_the_source_is_refused(site, tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    alias = tmp_path / "alias.raw"
    alias.symlink_to(img)
    digest = sha256(img)
    line = refused_up_front(site.workspace.root, "blocks", f"local:{img}", f"ssh1:{alias}", "--json")
    assert "they are the same file or device" in line and "nothing was written" in line, line
    assert sha256(img) == digest


def test_a_loop_device_over_the_source_image_is_refused_as_target(site, tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    with loop_device(img) as dev:
        digest = sha256(img)
        line = refused_up_front(site.workspace.root, "blocks", f"local:{img}", f"ssh1:{dev}")
        assert "loop device over the other" in line, line
        assert sha256(img) == digest


# --------------------------------------------------------------------------- 2. what "verified" says

def test_content_changed_under_the_same_size_and_mtime_is_caught_next_round(site, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(src / "config", b"port=8080\n", mtime_ns=1_700_000_000_000_000_000)
    write(src / "other", b"untouched\n")
    ws = site.workspace.root
    first = replicate(ws, "files", f"local:{src}", f"ssh1:{dst}")
    assert first["_code"] == 0 and first["verified_on_arrival"] and not first["content_compared"]
    assert "contents not compared" in first["verification"]

    # New content, same size, mtime set back: size and mtime alone would keep the stale copy.
    write(src / "config", b"port=9090\n", mtime_ns=1_700_000_000_000_000_000)
    out = replicate(ws, "files", f"local:{src}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert (dst / "config").read_bytes() == b"port=9090\n"
    # Compared: every file whose inode changed after the last round began (less a margin for the
    # coarse clock ctime is kept on): config, and other if it was written just before round 1.
    since = first["source_walk_ns"] - 2_000_000_000
    expected = sum(1 for f in src.iterdir() if os.stat(f).st_ctime_ns > since)
    assert out["touched_compared"] == expected >= 1 and out["unchanged_by"] == "size+mtime+ctime"
    assert out["content_compared"] is False and "compared by SHA-256" in out["verification"]
    assert diff(describe(src), describe(dst)) == []

    # --checksum compares every file's content and says so.
    full = replicate(ws, "files", f"local:{src}", f"ssh1:{dst}", "--checksum")
    assert full["_code"] == 0 and full["content_compared"] is True and full["unchanged_by"] == "sha256"


def test_the_cli_line_says_what_was_verified(site, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"x")
    r = ferry(site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{tmp_path / 'dst'}")
    assert r.code == 0
    assert "verified: copied data checked on arrival (CRC-32)" in r.out and "contents not compared" in r.out


# --------------------------------------------------------------------------- 3. symlinks and FIFOs

async def _send_agent(root: Path) -> AgentChannel:
    return await AgentChannel.start(AgentHost.local(), "send", root=str(root))


async def _ask(ch: AgentChannel, *requests: list) -> list[tuple[bytes, bytes]]:
    ch.send(W.F_REQ, W.pack_values([list(r) for r in requests] + [["mark", b"", 0]]))
    await ch.drain()
    frames = []
    while True:
        typ, payload = await asyncio.wait_for(ch.recv(), 60)   # a guard against a hang, not a wait
        if typ == W.F_JSON and b'"mark"' in payload:
            return frames
        frames.append((typ, payload))


async def test_source_never_sends_a_file_through_a_directory_swapped_for_a_symlink(tmp_path):
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    write(root / "d" / "f", b"inside the tree")
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "f", b"SECRET outside the tree", mode=0o600)

    ch = await _send_agent(root)
    try:
        # After the walk, before the read: the directory becomes a symlink to the outside.
        os.rename(root / "d", tmp_path / "d-moved")
        os.symlink(outside, root / "d")
        frames = await _ask(ch, ["file", b"d/f", 0], ["hash", b"d/f", None], ["meta", b"d/f", None])
    finally:
        await ch.kill()
    assert not any(b"SECRET" in payload for _t, payload in frames)
    errors = [W.unpack_values(p) for t, p in frames if t == W.F_ERR]
    assert len(errors) == 2 and all("a parent is a symlink" in e[3] for e in errors), errors
    hashes = [p for t, p in frames if t == W.F_JSON]
    assert len(hashes) == 1 and b'"sha256": null' in hashes[0]


async def test_source_reports_a_file_replaced_by_a_fifo_instead_of_blocking(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    os.mkfifo(root / "was-a-file")
    write(root / "after", b"the rest goes on")
    ch = await _send_agent(root)
    try:
        frames = await _ask(ch, ["file", b"was-a-file", 0], ["file", b"after", 0])
    finally:
        await ch.kill()
    errors = [W.unpack_values(p) for t, p in frames if t == W.F_ERR]
    assert errors and "no longer a regular file" in errors[0][3]
    assert [t for t, _ in frames].count(W.F_FILE) == 1


async def test_target_refuses_a_fifo_in_place_of_its_temporary_file(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / ".ferry-part.victim")
    errors, acked = await _receive(root, [(W.F_FILE, _small_file(b"victim", b"data")),
                                          (W.F_FILE, _small_file(b"fine", b"ok"))])
    assert [e[1] for e in errors] == [b"victim"] and "not a regular file is in the way" in errors[0][3]
    assert b"fine" in acked and (root / "fine").read_bytes() == b"ok"


def _agent_pids(parent: int) -> list[int]:
    """Replication agents process `parent` started (their command line carries the agent's boot code)."""
    out = []
    for pid in _children(parent):
        try:
            if b"ferry-agent" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def test_a_stuck_agent_is_a_clear_stall_error_then_a_retry(tmp_path):
    """A real stuck peer: the round's agents are stopped (SIGSTOP) mid-copy. Nothing arrives for
    the stall timeout; the engine says so, kills them, and the retry finishes the copy."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(4):
        write(src / f"big-{i}", os.urandom(12 << 20))
    ws = tmp_path / "ws"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(replicate(
        ws, "files", f"local:{src}", f"local:{dst}", "--bwlimit", "8M", "--stall-timeout", "5")))
    t.start()
    stopped: list[int] = []
    try:
        # The round runs in the workspace's engine service: its agents are that process's children.
        until_sync(lambda: running(t, result) and engine_pid(ws) and len(_agent_pids(engine_pid(ws))) >= 3
                   and any(dst.glob(".ferry-part.*")), timeout=60, what="the round's agents and a part file")
        for pid in _agent_pids(engine_pid(ws)):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        t.join(180)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        t.join(180)
    assert result["_code"] == 0, result
    assert "sent nothing for 5 s" in result["_err"], result["_err"]
    assert diff(describe(src), describe(dst)) == []


# --------------------------------------------------------------------------- 4. symlinked devices

def test_block_paths_given_as_symlinks_are_resolved_once_and_said(site, tmp_path):
    img = tmp_path / "real" / "disk.raw"
    img.parent.mkdir()
    img.write_bytes(os.urandom(2 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "disk-src").symlink_to(img)
    target = tmp_path / "copy.raw"
    target.write_bytes(os.urandom(5 << 20))
    (by_id / "disk-dst").symlink_to(target)
    ws = site.workspace.root
    out = replicate(ws, "blocks", f"local:{by_id / 'disk-src'}", f"ssh1:{by_id / 'disk-dst'}")
    assert out["_code"] == 0, out
    assert sha256(img) == sha256(target) and (by_id / "disk-dst").is_symlink()
    log = ferry(ws, "task", "show", str(out["task"])).out
    assert f"local:{by_id / 'disk-src'} is {img}" in log and f"ssh1:{by_id / 'disk-dst'} is {target}" in log


def test_a_symlinked_device_path_is_copied(site, tmp_path):
    img = tmp_path / "backing.raw"
    img.write_bytes(os.urandom(3 << 20) + bytes(5 << 20))
    with loop_device(img, read_only=True) as dev:
        mapper = tmp_path / "mapper"
        mapper.mkdir()
        (mapper / "vg0-lv0").symlink_to(dev)     # as /dev/VG/LV and /dev/mapper/* are
        dst = tmp_path / "from-device.raw"
        out = replicate(site.workspace.root, "blocks", f"local:{mapper / 'vg0-lv0'}", f"ssh2:{dst}")
        assert out["_code"] == 0, out
        assert sha256(img) == sha256(dst)


def test_file_roots_given_as_symlinks_are_followed_once_but_not_inside(site, tmp_path):
    real = tmp_path / "data"
    (real / "inner").mkdir(parents=True)
    write(real / "inner" / "f", b"data")
    (real / "link-inside").symlink_to(tmp_path)   # a symlink inside the tree stays a symlink
    (tmp_path / "srv").symlink_to(real)
    dst = tmp_path / "copy"
    out = replicate(site.workspace.root, "files", f"local:{tmp_path / 'srv'}", f"ssh1:{dst}")
    assert out["_code"] == 0, out
    assert (dst / "inner" / "f").read_bytes() == b"data"
    assert (dst / "link-inside").is_symlink() and os.readlink(dst / "link-inside") == str(tmp_path)


# --------------------------------------------------------------------------- 5. malformed frames

def _small_file(rel: bytes, data: bytes) -> bytes:
    import struct
    import zlib
    meta = W.pack_values([rel, 0o100644, 0, 0, len(data), 0, []])
    return struct.pack("<II", len(meta), 5) + meta + zlib.crc32(data).to_bytes(4, "big") + b"\0" + data


async def _receive(root: Path, frames: list[tuple[bytes, bytes]]) -> tuple[list, list]:
    """Hand frames to a real target agent: (its per-entry errors, the entries it acknowledged)."""
    ch = await AgentChannel.start(AgentHost.local(), "recv", root=str(root))
    errors, acked = [], []
    try:
        for typ, payload in frames:
            ch.send(typ, payload)
        ch.send(W.F_EOF)
        await ch.drain()
        while True:
            typ, payload = await asyncio.wait_for(ch.recv(), 60)   # a guard against a hang, not a wait
            if typ == W.F_ERR:
                errors.append(W.unpack_values(payload))
            elif typ == W.F_ACK:
                acked += [a[0] for a in W.unpack_values(payload)[1]]
            elif typ == W.F_EOF:
                return errors, acked
    finally:
        await ch.finish()


MALFORMED = [
    (W.F_ENTRY, W.pack_values(["symlink", b".", b"/etc", 0, 0, 0])),        # was a TypeError crash
    (W.F_ENTRY, W.pack_values(["hardlink", b".", b"x"])),
    (W.F_ENTRY, W.pack_values(["symlink", "text-not-bytes", b"/etc", 0, 0, 0])),
    (W.F_ENTRY, W.pack_values(["node", b"n", True, 0, 0, 0, 0])),           # a bool where a mode goes
    (W.F_ENTRY, W.pack_values(["node", b"not-a-node", 0o100644, 0, 0, 0, 0])),
    (W.F_ENTRY, W.pack_values(["teleport", b"t"])),
    (W.F_ENTRY, W.pack_values(["meta", b"m", 0o644, 0, 0, 0, ["not-a-pair"]])),
    (W.F_ENTRY, b"i\x01"),                                                   # a truncated integer
    (W.F_DIRMETA, W.pack_values([b"d", 0o755])),
    (W.F_DELETE, W.pack_values([7])),
    (W.F_FILE, b"\xff\xff\xff\xff\x00\x00\x00\x00"),                         # parts that do not add up
    (W.F_FILE, _small_file(b"short", b"data")[:-2]),                          # fewer bytes than announced
    (W.F_END, W.pack_values([b"never-begun", b"\0" * 4, False])),
    (W.F_BEGIN, W.pack_values([b"big", 0o100644, 0, 0, 10, 0, [], 0])),
    (W.F_DATA, b"\xff" * 8 + b"beyond the end"),                              # an offset past the file
]


async def test_malformed_frames_are_protocol_errors_naming_the_entry_and_the_rest_goes_on(tmp_path):
    root = tmp_path / "root"
    errors, acked = await _receive(root, [*MALFORMED, (W.F_FILE, _small_file(b"good", b"still written"))])
    assert len(errors) == len(MALFORMED) - 1, errors   # every frame but the (well-formed) BEGIN
    assert all(e[3].startswith("refused: protocol error") for e in errors), errors
    named = {e[1] for e in errors}
    assert {b".", b"n", b"not-a-node", b"t", b"m", b"d", b"short", b"big"} <= named, named
    assert acked == [b"good"] and (root / "good").read_bytes() == b"still written"
    # Nothing else was made; the abandoned large file stays a temporary, resumable or removed next round.
    assert sorted(p.name for p in root.iterdir()) == [".ferry-part.big", "good"]


async def test_a_chunk_outside_the_image_is_refused_not_written(tmp_path):
    target = tmp_path / "t.raw"
    target.write_bytes(bytes(1 << 20))
    ch = await AgentChannel.start(AgentHost.local(), "blk", path=str(target), chunk=1 << 20, target=True,
                                  open=True)
    try:
        ch.send(W.F_CHUNK, W.DATA_HDR.pack(5, W.CH_DATA, b"\0" * 32, 0) + b"far away")
        ch.send(W.F_EOF)
        await ch.drain()
        with pytest.raises(FerryError) as e:
            while True:
                await asyncio.wait_for(ch.recv(), 60)
    finally:
        await ch.kill()
    assert "protocol error" in e.value.message and "beyond the end of the image" in e.value.message
    assert target.read_bytes() == bytes(1 << 20)


HOSTILE_AGENT = r"""
import os, struct, sys
os.read(0, 1 << 16)
hello = b'{"hello": 1, "time_ns": 0}'
out = struct.pack(">cI", b"J", len(hello)) + hello
out += {payload}
os.write(1, out)
os.read(0, 1 << 16)
"""


@pytest.mark.parametrize("payload, says", [
    ('struct.pack(">cI", b"M", 1 << 30)', "a frame of 1073741824 bytes"),
    ('struct.pack(">cI", b"M", 5) + b"\\x00" * 5', "manifest"),
])
async def test_the_engine_caps_and_checks_what_an_agent_sends(tmp_path, payload, says):
    """A hostile or broken agent (a real process) sends an oversized frame or a damaged
    manifest: the engine raises a protocol error naming the host, never a traceback."""
    from ferry.engine.replicate.files import FileOptions, walk

    where = AgentHost("evil", kind="local", child_argv=[sys.executable, "-c",
                                                        HOSTILE_AGENT.replace("{payload}", payload)],
                      transport=lambda: None)
    with pytest.raises(FerryError) as e:
        await walk(where, str(tmp_path), FileOptions())
    assert e.value.message.startswith("evil: protocol error") and says in e.value.message, e.value.message



async def test_an_agent_whose_finish_is_cancelled_is_still_stopped_and_reaped(tmp_path):
    """A round that refuses to go on cancels the walk still running beside it, maybe while that
    walk waits for its agent to exit: the agent is then killed and reaped there, not left to a
    garbage collection after the event loop closed (seen as an unraisable warning in the suite)."""
    (tmp_path / "tree").mkdir()
    for i in range(2000):
        write(tmp_path / "tree" / f"f{i}", b"x")
    ch = await AgentChannel.start(AgentHost.local(), "walk", root=str(tmp_path / "tree"))
    finishing = asyncio.create_task(ch.finish())
    await asyncio.sleep(0)    # one turn of the loop: finish() is now waiting for the agent
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert ch.proc._p.returncode is not None, "the agent was reaped"
    assert ch.proc._p.pid not in _children(os.getpid())


def _children(parent: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------- the same class: a target in use

def test_a_mounted_device_is_refused_as_a_block_target(site, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(2 << 20) + bytes(6 << 20))
    backing = tmp_path / "fs.img"
    backing.write_bytes(bytes(16 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(backing) as dev:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            write(mnt / "precious", b"a mounted filesystem's data")
            out = replicate(site.workspace.root, "blocks", f"local:{src}", f"ssh1:{dev}")
            assert out["_code"] == 1 and "in use (mounted" in out["error"] and "nothing was written" in out["error"]
            assert "unmount it" in out["hint"]
            assert (mnt / "precious").read_bytes() == b"a mounted filesystem's data"
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    assert subprocess.run(["e2fsck", "-n", "-f", str(backing)], capture_output=True).returncode == 0


def test_the_disk_of_a_running_qemu_is_refused_as_a_block_target(site, tmp_path):
    """A real QEMU (stopped at its first instruction) holds an image open for writing, as a running
    VM does: copying onto it would corrupt the VM's disk under it."""
    import shutil

    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no qemu-system-x86_64")
    src, disk = tmp_path / "disk.raw", tmp_path / "vm-disk.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    disk.write_bytes(os.urandom(4 << 20))
    before = sha256(disk)
    qemu = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", "accel=tcg",
                             "-drive", f"file={disk},format=raw,if=virtio", "-qmp", f"unix:{tmp_path}/qmp,server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        until_sync(lambda: running(qemu) and (tmp_path / "qmp").exists(), timeout=30, what="QEMU to start")
        out = replicate(site.workspace.root, "blocks", f"local:{src}", f"ssh1:{disk}")
        assert out["_code"] == 1 and "open for writing by pid" in out["error"] and "qemu" in out["error"], out
    finally:
        qemu.kill()
        qemu.wait()
    assert sha256(disk) == before


def _all_agent_pids() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"ferry-agent" in (d / "cmdline").read_bytes():
                out.add(int(d.name))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("target", ["local", "ssh1"])
def test_agents_of_a_killed_engine_stop_and_the_same_command_resumes_at_once(site, tmp_path, target):
    """kill -9 of Ferry mid-copy: its agents (here and, through the OpenSSH client, on the host)
    stop within seconds instead of writing on unwatched, and the same command run at once
    resumes: the target's in-use check waits for an interrupted run's agents, where it refuses a
    foreign writer (it refused this resume before it learnt to tell them apart)."""
    src, dst = tmp_path / "disk.raw", tmp_path / "copy.raw"
    src.write_bytes(os.urandom(48 << 20))
    ws = site.workspace.root
    before = _all_agent_pids()
    proc = ferry_process(ws, "replicate", "blocks", f"local:{src}", f"{target}:{dst}", "--bwlimit", "8M",
                         "--chunk-size", "1M", env={"HOME": os.environ["HOME"]})
    try:
        mine = until_sync(lambda: running(proc) and dst.exists() and dst.stat().st_blocks and
                          (_all_agent_pids() - before), timeout=60, what="the copy to be under way")
    finally:
        kill9(ws, proc)
    until_sync(lambda: not (mine & _all_agent_pids()), timeout=3, what=f"agents {sorted(mine)} to stop")
    out = replicate(ws, "blocks", f"local:{src}", f"{target}:{dst}", "--chunk-size", "1M")
    assert out["_code"] == 0 and out["resumed"] is True, out
    assert sha256(src) == sha256(dst)
