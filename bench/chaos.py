"""Crash-safety benchmark (issue 10): Ferry killed with `kill -9` at N points of each kind of task,
then the same command run again (or `ferry task resume ID`, or `ferry task cancel ID`), and checked.

    .venv/bin/python bench/chaos.py [--points N] [--kinds clone,export,...] [--quick]
                                    [--disk SIZE] [--data SIZE] [--files N] [--tree SIZE] [--seed N]

Kinds (default all): blocks, files (replicate), clone, import (of an OVA), deploy (template deploy
x3, linked), export, delete (--secure), start. Each kind runs once uninterrupted first (its time sets
the range of the random-time points, and its result is checked like any other), then N points
(default 10): half triggered by the task's progress, half at random times in the uninterrupted run's
span. Progress is a fraction of the task's bytes or steps, read from state.db as another process
sees it (written there every 20 ms here), or, every other progress point of a kind that has them,
what is seen on disk: a copy's temporary file holding half the data; a linked deploy (0.25 s for
three) once its first or its second VM has its disk in place. A point the work ran past before the
kill is tried again earlier (twice at most); what still ends first is not counted as a kill.
Follow-ups in turn: rerun, cancel, resume, rerun (10 points: 5 reruns, 3 cancels, 2 resumes).

Each trial checks what a user would notice (tests/harness/chaos.py: run_trial).
- While the killed task waits: `ferry tasks` does not show it running; a VM it was making is shown
  incomplete (or is complete), a VM it was deleting is shown deleting (or as it was, disk unchanged).
- Finished (rerun, resume): the killed task goes on and succeeds; the result is right: `qemu-img
  compare` against the source and `qemu-img check`; an export imported back and compared; a replica
  byte for byte; a started VM running with one QEMU and its agent answering; a deleted VM gone with
  its files.
- Rolled back (cancel): nothing of it left. Counted as finished instead: a cancel that came after the
  work was done (its complete result stays), and a secure delete cancelled once its wipe had begun
  (it stays "deleting" and the same command finishes it). A cancelled replication leaves the target
  as far as it got (a sync) without a partly written file; a cancelled start leaves the VM stopped
  without QEMU, or running as recorded.
- Always: no VM record incomplete, deleting, busy or without its disks; no file in a datastore
  without a record; no temporary file (`.ferry-task*` and older temporary names); nothing `ferry gc
  --dry-run` would remove; no QEMU without a record, none running for a VM recorded stopped; no task
  left unfinished; no helper process of the task alive; the sources unchanged (hashed before and
  after). Only what is new since before the trial counts.

Sizes: VM disks --disk (default 2G) holding --data (default 1G) of random data; the replicated tree
--files files (default 2000) of --tree bytes (default 512M). --quick: 2 points per kind, 256 MiB
disks with 64 MiB of data, 200 files of 32 MiB: a smoke run of a few minutes. Inputs are built once
in --data-dir (default /var/tmp/ferry-chaos) and kept; the lab workspace is removed at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ferry.engine.vm.model import parse_size  # noqa: E402
from harness.chaos import SCENARIOS, Lab, Scenario, Trial, after, at, kill_at, random_points, run_trial  # noqa: E402
from harness.qemu import image_cache, kill_all  # noqa: E402

MiB = 1 << 20
RETRIES = 2          # a point the work ran past before the kill is tried this many times more, earlier


def calibrate(sc: Scenario, i: int) -> tuple[float, list[str]]:
    """The kind run once without a kill: how long its task runs, and what is wrong with its result."""
    sc.setup(i)
    k = kill_at(sc.lab.ws, *sc.command(i), when=lambda task: False, env=sc.lab.env)
    wrong = [] if k.code == 0 else [f"exit {k.code}: {(k.err.strip() or k.out.strip()).splitlines()[-1:]}"]
    wrong += sc.result(i)
    sc.teardown(i)
    return k.elapsed, wrong


def points(n: int, span: float, rng: random.Random, stages: list) -> list:
    """Half the points triggered by progress (every other one, when the kind has them, a point seen
    on disk: see Scenario.stages), half at random times within the span; interleaved."""
    by_progress = [at(f) for f in random_points(math.ceil(n / 2), rng)]
    for j in range(0, len(by_progress), 2) if stages else ():
        by_progress[j] = stages[(j // 2) % len(stages)]
    by_time = [after(span * f) for f in random_points(n // 2, rng, lo=0.0, hi=1.0)] if n // 2 else []
    out = []
    for j in range(max(len(by_progress), len(by_time))):
        out += by_progress[j:j + 1] + by_time[j:j + 1]
    return out


def summary(trials: list[Trial]) -> str:
    """What the wrong trials left, the same problem counted once with how often (numbers aside)."""
    bad = [t for t in trials if t.left or t.outcome == "wrong"]
    if not bad:
        return "nothing"
    seen: Counter = Counter()
    example: dict[str, str] = {}
    for t in bad:
        for problem in t.left or [f"outcome {t.outcome}"]:
            key = re.sub(r"\d+", "N", problem)
            seen[key] += 1
            example.setdefault(key, problem[:100])
    head = "; ".join(example[k] + (f" (x{c})" if c > 1 else "") for k, c in seen.most_common(3))
    return f"{len(bad)} trial(s) wrong: {head}" + (" ..." if len(seen) > 3 else "")


def table(rows: list[tuple[str, ...]]) -> str:
    """The issue's table (markdown)."""
    head = ("task kind", "kills", "finished correctly", "rolled back clean", "left behind")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, help="kill points per kind (default 10; --quick: 2)")
    p.add_argument("--kinds", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 points per kind, small sizes")
    p.add_argument("--disk", help="virtual size of the VMs' disks (default 2G; --quick: 256M)")
    p.add_argument("--data", help="random data in each disk (default 1G; --quick: 64M)")
    p.add_argument("--files", type=int, help="files in the replicated tree (default 2000; --quick: 200)")
    p.add_argument("--tree", help="bytes in the replicated tree (default 512M; --quick: 32M)")
    p.add_argument("--seed", type=int, default=int(time.time()), help="for the random points (printed)")
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/ferry-chaos"), help="built inputs, kept")
    p.add_argument("--keep", action="store_true", help="keep the lab workspace (its path is printed)")
    args = p.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SCENARIOS]
    if unknown:
        p.error(f"unknown kind {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    quick = args.quick
    n = args.points or (2 if quick else 10)
    disk = parse_size(args.disk or ("256M" if quick else "2G"), "disk")
    data = parse_size(args.data or ("64M" if quick else "1G"), "data")
    files = args.files or (200 if quick else 2000)
    tree = parse_size(args.tree or ("32M" if quick else "512M"), "tree")
    if data > disk:
        p.error("--data cannot exceed --disk")
    rng = random.Random(args.seed)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(prefix="fchaos-", dir="/tmp"))     # short: UNIX sockets live in it
    env = {"FERRY_IMAGE_CACHE": os.environ.get("FERRY_IMAGE_CACHE", str(image_cache())), "FERRY_ENGINE_HOLD": "1"}
    lab = Lab(ws, args.data_dir, env)
    print(f"chaos: {n} points per kind, seed {args.seed}; disks {disk >> 20} MiB with {data >> 20} MiB of data, "
          f"tree {files} files / {tree >> 20} MiB; workspace {ws}", flush=True)
    rows: list[tuple[str, ...]] = []
    all_good = True
    started = time.monotonic()
    try:
        lab.ok("lab", "image", "build")
        for kind in kinds:
            sc = SCENARIOS[kind](lab, disk=disk, data=data, files=files, tree=tree)
            t0 = time.monotonic()
            sc.prepare()
            span, wrong = calibrate(sc, 0)
            print(f"{sc.name}: uninterrupted run {span:.2f} s" + (f", WRONG: {'; '.join(wrong)}" if wrong else ""),
                  flush=True)
            trials: list[Trial] = []
            i = 1
            for j, point in enumerate(points(n, span, rng, sc.stages())):
                follow = sc.follows[j % len(sc.follows)]
                for _ in range(RETRIES + 1):
                    trial = run_trial(sc, i, point, follow)
                    i += 1
                    print(f"  {trial.line()}", flush=True)
                    if trial.killed or trial.left or not (point := point.earlier()):
                        break
                trials.append(trial)
            killed = [t for t in trials if t.killed]
            finished = sum(t.good and t.outcome == "finished" for t in killed)
            rolled = sum(t.good and t.outcome == "rolled back" for t in killed)
            left = summary(trials) + (f"; the uninterrupted run was wrong: {'; '.join(wrong)[:200]}" if wrong else "")
            missed = len(trials) - len(killed)
            rows.append((sc.name, str(len(killed)) + (f" ({missed} ended first)" if missed else ""),
                         str(finished), str(rolled), left))
            ok = not wrong and all(t.good or t.outcome == "missed" and not t.left for t in trials) \
                and len(killed) >= n
            all_good &= ok
            print(f"{sc.name}: {len(killed)} kills, {finished} finished, {rolled} rolled back, "
                  f"{'PASS' if ok else 'FAIL'} ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        if not args.keep:
            lab.run("lab", "down")      # the network lab Ferry opened for the workspace (as root), if any
            lab.run("engine", "stop", "--now")
        kill_all(ws)
        if args.keep:
            print(f"workspace kept: {ws}")
        else:
            shutil.rmtree(ws, ignore_errors=True)
    print(f"\nkill -9 at {n} points per kind, seed {args.seed}, {time.monotonic() - started:.0f} s:\n")
    print(table(rows))
    print(f"\ntarget: every trial finished correctly or rolled back clean, >= {n} kills per kind: "
          f"{'PASS' if all_good else 'FAIL'}")
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
