"""Replication benchmark: Ferry against rsync and dd|ssh, same data, same loopback sshd, one run.

    .venv/bin/python bench/replicate.py [--data DIR] [--keep]

Data (built once, kept in --data, default /var/tmp/ferry-bench): a tree of 20,000 files of mixed
sizes (>= 2 GB) and a 2 GiB image with random data and large zero regions. Each scenario is timed
for Ferry's command line and for the reference tool; the ratio and the target are printed.

Ferry makes every copy durable (fsync/syncfs) before it reports success; rsync and dd do not.
So each reference is timed twice: as the issue states it, and followed by `sync` (until its
data is on disk too). The ratio is against the plain reference, the stricter of the two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness.sshd import SshdFactory  # noqa: E402

MiB = 1 << 20
RUNS = 3          # timed runs per tool and scenario, alternating; the best of each is compared
FILES = 20_000
IMAGE = 2 << 30


def build_tree(root: Path) -> int:
    """20,000 files, mostly small, some medium, a few large: ~2.4 GB. Deterministic."""
    marker = root.with_name(root.name + ".complete")
    if marker.exists():
        return int(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(1)
    block = rng.randbytes(4 * MiB)
    total = 0
    for i in range(FILES):
        r = rng.random()
        if r < 0.80:
            size = rng.randint(0, 16 * 1024)
        elif r < 0.975:
            size = rng.randint(16 * 1024, 256 * 1024)
        elif r < 0.9995:
            size = rng.randint(1 * MiB, 3 * MiB)
        else:
            size = rng.randint(30 * MiB, 90 * MiB)
        d = root / f"d{i % 50:02d}" / f"s{(i // 50) % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        off = (i * 7919) % MiB
        with open(d / f"f{i:05d}.dat", "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(block) - off)
                f.write(block[off:off + n])
                left -= n
                off = 0
        total += size
    marker.write_text(str(total))
    return total


def build_image(path: Path) -> None:
    """2 GiB: 64 MiB of random data, then 64 MiB of zeros (alternately written and holes), repeated."""
    if path.exists() and path.stat().st_size == IMAGE:
        return
    rng = random.Random(2)
    with open(path, "wb") as f:
        f.truncate(IMAGE)
        for region in range(IMAGE // (64 * MiB)):
            f.seek(region * 64 * MiB)
            if region % 2 == 0:
                for _ in range(16):
                    f.write(rng.randbytes(4 * MiB))
            elif region % 4 == 1:
                f.write(bytes(64 * MiB))


def sh(cmd: list[str] | str, **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


WARM: list[Path] = []


def settle() -> None:
    """The same start for every timed run: nothing dirty, no stale copies in memory, the source
    read once (warm), as a server's hot data would be. (Writes into a page cache full of earlier
    copies were measured to cost up to three times more here, for either tool.)"""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass   # not root: runs are a little noisier
    for root in WARM:
        if root.is_file():
            with open(root, "rb") as f:
                while f.read(16 << 20):
                    pass
        else:
            for p in root.rglob("*"):
                if p.is_file():
                    p.read_bytes()
    time.sleep(0.5)


class Bench:
    def __init__(self, data: Path, work: Path) -> None:
        self.data = data
        self.work = work
        self.rows: list[tuple[str, str, str, str, str, bool]] = []
        self.undo: list[tuple[Path, int, bytes, int, int]] = []
        factory = SshdFactory(work / "sshd")
        self.factory = factory
        self.site = factory.site(work, 1, names=["bench"])
        self.server = self.site.servers["bench"]
        self.ws = self.site.workspace.root
        self.home = work / "home"
        self.home.mkdir()
        self.env = {**os.environ, "HOME": str(self.home), "PYTHONPATH": str(ROOT)}
        self.env.pop("SSH_AUTH_SOCK", None)
        # Ferry as installed: with byte-compiled modules (pip compiles them; this checkout might not).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "engine"), str(ROOT / "console")],
                       env=self.env, check=True, stdout=subprocess.DEVNULL)
        kh = work / "ssh_known_hosts"
        self.server.trust(kh)
        self.ssh = (f"ssh -p {self.server.port} -i {self.server.user_key} -o UserKnownHostsFile={kh} "
                    f"-o StrictHostKeyChecking=yes -o BatchMode=yes")
        self.remote = f"{self.server.user}@127.0.0.1"

    def change(self, path: Path, offset: int, data: bytes) -> None:
        """Overwrite part of the data set, remembering how to put it back (see restore)."""
        st = path.stat()
        data = data[:max(0, st.st_size - offset)]   # a change, never a growth
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(len(data))
            f.seek(offset)
            f.write(data)
        self.undo.append((path, offset, old, st.st_atime_ns, st.st_mtime_ns))

    def restore(self) -> None:
        """Put the data set back as it was built, so the next run need not rebuild it."""
        for path, offset, old, atime, mtime in reversed(self.undo):
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(old)
            os.utime(path, ns=(atime, mtime))
        self.undo.clear()

    def ferry(self, *args: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ferry.console.cli", "--workspace", str(self.ws), *args, "--json"],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"ferry {' '.join(args)} failed: {out} {err}")
        return elapsed, json.loads(out)

    def peak_memory(self, *args: str) -> int:
        """Peak resident memory (bytes) of the `ferry` process (the engine) during a run."""
        proc = subprocess.Popen([sys.executable, "-m", "ferry.console.cli", "--workspace", str(self.ws), *args],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        if proc.returncode != 0:
            raise SystemExit(f"ferry {' '.join(args)} failed")
        return peak

    def row(self, name: str, ferry: str, ref: str, ratio: float | None, target: str, ok: bool) -> None:
        self.rows.append((name, ferry, ref, f"{ratio:.2f}" if ratio is not None else "-", target, ok))
        print(f"  {name}: ferry {ferry}, reference {ref}, ratio {ratio if ratio is None else round(ratio, 2)} "
              f"(target {target}) {'PASS' if ok else 'FAIL'}", flush=True)

    # ------------------------------------------------------------------ file level

    def files(self, tree: Path, total: int) -> None:
        print(f"file level: {FILES} files, {total / 1e9:.2f} GB; each figure is the best of {RUNS} runs", flush=True)

        def rsync(dst: Path) -> float:
            return sh(["rsync", "-aHAX", "--numeric-ids", "-e", self.ssh, f"{tree}/", f"{self.remote}:{dst}/"])

        def ferry(dst: Path) -> tuple[float, dict]:
            return self.ferry("replicate", "files", f"local:{tree}", f"bench:{dst}")

        t_rsync, t_rsync_sync, t_ferry = [], [], []
        for i in range(RUNS):           # alternate, fresh targets, nothing deleted in between
            settle()
            t_rsync.append(rsync(self.work / f"rsync-{i}"))
            t_rsync_sync.append(t_rsync[-1] + sh(["sync"]))
            settle()
            t, out = ferry(self.work / f"ferry-{i}")
            assert out["verified_on_arrival"] and out["bytes_sent"] == total
            t_ferry.append(t)
        ratio = min(t_ferry) / min(t_rsync)
        self.row("full file copy", f"{min(t_ferry):.2f}s", f"{min(t_rsync):.2f}s (+sync {min(t_rsync_sync):.2f}s)",
                 ratio, "<= 0.80", ratio <= 0.80)

        dst_r, dst_f = self.work / "rsync-0", self.work / "ferry-0"
        t_rsync = min(rsync(dst_r) for _ in range(RUNS))
        times = []
        for _ in range(RUNS):
            t, out = ferry(dst_f)
            assert out["items_changed"] == 0
            times.append(t)
        ratio = min(times) / t_rsync
        self.row("no-change incremental", f"{min(times):.2f}s", f"{t_rsync:.2f}s", ratio, "<= 1.00", ratio <= 1.0)

        rng = random.Random(3)
        files = sorted(p for p in tree.rglob("*.dat") if p.stat().st_size >= 64)
        t_rsync, t_ferry, changed = [], [], 0
        for _ in range(RUNS):           # a different 1% each time
            for p in rng.sample(files, len(files) // 100):
                self.change(p, 0, rng.randbytes(64))
            settle()
            t_rsync.append(rsync(dst_r))
            settle()
            t, out = ferry(dst_f)
            t_ferry.append(t)
            changed = out["items_changed"]
        ratio = min(t_ferry) / min(t_rsync)
        self.row("1% of files changed", f"{min(t_ferry):.2f}s ({changed} changed)", f"{min(t_rsync):.2f}s",
                 ratio, "<= 1.50", ratio <= 1.5)

        # Memory per file: the peak of a full copy of the tree, less the peak of copying one file.
        one = self.work / "one-file"
        one.mkdir()
        (one / "f").write_bytes(b"x")
        base = self.peak_memory("replicate", "files", f"local:{one}", f"bench:{self.work / 'one-copy'}")
        settle()
        peak = self.peak_memory("replicate", "files", f"local:{tree}", f"bench:{self.work / 'ferry-memory'}")
        per_file = max(0, peak - base) / FILES
        self.row("memory per file", f"{per_file:.0f} B/file (peak {peak / MiB:.0f} MiB, one file {base / MiB:.0f} MiB)",
                 "-", None, "<= ~1 KB per file", per_file <= 1024)

        # A fresh target for the interruption: ext4 avoids reusing just-freed inodes for a while,
        # so deleting a copy now would slow the next one down. Everything is deleted at the end.
        self.kill_half("files", f"local:{tree}", f"bench:{self.work / 'ferry-kill'}", total)

    # ------------------------------------------------------------------ block level

    def blocks(self, image: Path) -> None:
        print(f"block level: {IMAGE >> 30} GiB image; each figure is the best of {RUNS} runs", flush=True)
        t_dd, t_dd_sync, t_ferry = [], [], []
        for i in range(RUNS):
            dst_d = self.work / f"dd-{i}.img"
            settle()
            t_dd.append(sh(f"dd if={image} bs=4M status=none | {self.ssh} {self.remote} "
                           f"'dd of={dst_d} bs=4M status=none'"))
            t_dd_sync.append(t_dd[-1] + sh(["sync"]))
            settle()
            t, out = self.ferry("replicate", "blocks", f"local:{image}", f"bench:{self.work / f'ferry-{i}.img'}")
            assert out["verified_on_arrival"]
            t_ferry.append(t)
        ratio = min(t_ferry) / min(t_dd)
        self.row("full block copy", f"{min(t_ferry):.2f}s", f"{min(t_dd):.2f}s (+sync {min(t_dd_sync):.2f}s)", ratio,
                 "<= 0.70", ratio <= 0.70)

        rng = random.Random(4)
        chunks = IMAGE // (4 * MiB)
        changed = rng.sample(range(chunks), chunks // 100)
        for c in changed:
            self.change(image, c * 4 * MiB + rng.randrange(0, 4 * MiB - 65536), rng.randbytes(65536))
        settle()
        t_ferry, out = self.ferry("replicate", "blocks", f"local:{image}", f"bench:{self.work / 'ferry-0.img'}")
        share = out["bytes_sent"] / IMAGE
        wire = out["wire_bytes"] / IMAGE
        self.row("1% of blocks changed", f"{out['bytes_sent'] / MiB:.1f} MiB sent in {t_ferry:.2f}s "
                 f"({wire:.2%} on the wire)", "-", None, "bytes sent <= 2%", share <= 0.02)
        self.kill_half("blocks", f"local:{image}", f"bench:{self.work / 'ferry-kill.img'}", None)

    # ------------------------------------------------------------------ kill -9 at about half

    def kill_half(self, level: str, src: str, dst: str, total: int | None) -> None:
        """Kill -9 Ferry when about half is durable; the re-run must re-send < 1% beyond the checkpoint."""
        kind = f"replicate.{level}"
        data_total = total if level == "files" else IMAGE // 2   # the image's non-zero data
        zero_hash = hashlib.sha256(bytes(4 * MiB)).digest()
        con = sqlite3.connect(self.ws / "state.db")

        def durable_now() -> int:
            row = con.execute("SELECT id, checkpoint FROM tasks WHERE kind=? AND dedup_key=? ORDER BY id DESC LIMIT 1",
                              (kind, f"{src} -> {dst}")).fetchone()
            if not row or not row[1]:
                return 0
            if level == "files":
                return json.loads(row[1]).get("bytes_durable", 0)
            data_chunks = con.execute("SELECT COUNT(*) FROM chunks WHERE task_id=? AND hash!=?",
                                      (row[0], zero_hash)).fetchone()[0]
            return data_chunks * 4 * MiB

        # Slowed down (both ways it is far faster than a second) so that the kill lands mid-way.
        proc = subprocess.Popen([sys.executable, "-m", "ferry.console.cli", "--workspace", str(self.ws), "replicate",
                                 level, src, dst, "--bwlimit", "200M"], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and durable_now() < data_total // 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        durable = durable_now()
        con.close()
        t, out = self.ferry("replicate", level, src, dst)
        assert out["resumed"] and out["verified_on_arrival"], out
        resent = out["bytes_sent"] - (data_total - durable)
        # Negative: data written after the last checkpoint was verified by hash and kept, not re-sent.
        what = (f"re-sent {resent / MiB:.1f} MiB beyond the checkpoint ({resent / data_total:.2%})" if resent > 0 else
                f"re-sent nothing beyond the checkpoint; {-resent / MiB:.1f} MiB written after it verified and kept")
        self.row(f"kill -9 at {durable / data_total:.0%} ({level})", what, "-", None, "< 1%",
                 resent < 0.01 * data_total)

    def report(self) -> int:
        head = ("scenario", "ferry", "reference", "ratio", "target", "result")
        cells = [head] + [(n, f, r, "-" if q is None else str(q), t, "PASS" if ok else "FAIL")
                          for n, f, r, q, t, ok in self.rows]
        widths = [max(len(c[i]) for c in cells) + 2 for i in range(len(head))]
        print()
        for c in cells:
            print("".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
        return 0 if all(r[-1] for r in self.rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/var/tmp/ferry-bench"))
    p.add_argument("--only", choices=["files", "blocks"])
    args = p.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    print("preparing data (kept for later runs) ...", flush=True)
    tree = args.data / "tree"
    total = build_tree(tree)
    image = args.data / "image.raw"
    build_image(image)
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=args.data))
    WARM[:] = [tree, image, ROOT / "engine", ROOT / "console"]
    bench = Bench(args.data, work)
    try:
        if args.only in (None, "files"):
            bench.files(tree, total)
        if args.only in (None, "blocks"):
            bench.blocks(image)
    finally:
        bench.factory.stop_all()
        bench.restore()
        shutil.rmtree(work, ignore_errors=True)
    return bench.report()


if __name__ == "__main__":
    sys.exit(main())
