"""Many Ferry processes starting at once on a fresh workspace: every one must succeed.

    .venv/bin/python bench/store_open.py [--starts 100] [--trials 3]

Each trial makes a new workspace and starts `ferry tasks --json` that many times in parallel,
released at one instant once every process has done its imports, so that they all race to
create state.db, switch it to WAL and migrate its schema. Prints the failures (none expected)
and how long the slowest start took. The suite runs 40 starts (tests/test_races.py); this is
the 100 of issue 9.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import ferry.console.cli
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    code = ferry.console.cli.main(["--workspace", {ws!r}, "tasks", "--json"])
    print(f"took {{time.monotonic() - t0:.3f}}", file=sys.stderr)
    sys.exit(code)
""")


def trial(starts: int) -> tuple[int, float, list[str]]:
    with tempfile.TemporaryDirectory(prefix="ferry-bench-open-") as tmp:
        code = CHILD.format(root=str(ROOT), ws=str(Path(tmp) / "ws"))
        children = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(starts)]
        for c in children:
            if c.stdout.readline() != "ready\n":
                raise SystemExit(f"a child did not start: {c.stderr.read()}")
        for c in children:
            c.stdin.write("go\n")
            c.stdin.flush()
        failures, slowest = [], 0.0
        for c in children:
            out, err = c.communicate(timeout=600)
            took = [float(ln.split()[1]) for ln in err.splitlines() if ln.startswith("took ")]
            slowest = max([slowest, *took])
            if c.returncode != 0 or out.strip() != "[]":
                failures.append((err.strip().splitlines() or ["(no output)"])[0])
        return starts - len(failures), slowest, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=100, help="parallel starts per trial (default 100)")
    ap.add_argument("--trials", type=int, default=3, help="fresh workspaces to try (default 3)")
    args = ap.parse_args()
    bad = 0
    for i in range(1, args.trials + 1):
        t0 = time.monotonic()
        ok, slowest, failures = trial(args.starts)
        bad += len(failures)
        print(f"trial {i}: {ok} of {args.starts} parallel starts on a fresh workspace succeeded "
              f"(slowest {slowest:.2f} s, trial {time.monotonic() - t0:.1f} s)")
        for f in sorted(set(failures)):
            print(f"  failed: {f}")
    print("PASS" if bad == 0 else f"FAIL: {bad} failed starts")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
