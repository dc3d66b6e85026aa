"""Server migration end to end, predicted against measured (issue 13): `python bench/migration.py`.

Runs the suite's end-to-end tests marked e2e (`-m e2e`): the Debian source server itself
(tests/test_debsource.py), the source's side of a cutover with its go-live timer really running out
(tests/test_migration_source.py), and a migration to go-live (tests/test_migration_cutover.py: assessed,
prepared, synced twice, test-launched, cut over, finalized), then prints the last one's figures:
- the initial sync: its prediction at its start (a probe of the data path, source tar -> dbclient ->
  receiver tar as the round runs them: an empty connection, 16 MiB of the source's big files and its
  small files, each timed to its last byte extracted) against the measured round, and the assessment's
  estimate (at the bandwidth the network check measured, before any target exists);
- the cutover's downtime: predicted (its parts: final offline sync, switch, boot, hypervisor tools, guest
  agent, checks) against measured, part by part from the steps' own durations, with about 1% of the
  data changed since the last round;
- the bytes that crossed this machine (its leg on the VM network, both ways) against the bytes moved:
  the data goes source -> receiver directly (target: under 1%).
Then (unless --quick) the cutover's way back step by step (tests/test_migration_rollback.py: the engine
killed as each step begins, the cutover resumed at it, rolled back, the source serving again; the engine
dead after park and the source back by its go-live timer), about three minutes a step.
Needs root and the bootstrap's tools (scripts/bootstrap.sh install); about fifteen minutes with --quick,
an hour without.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ratio(measured: float | None, predicted: float | None) -> str:
    if not measured or not predicted:
        return "n/a"
    return f"{predicted / measured:.2f} (error {100 * (predicted - measured) / measured:+.0f}%)"


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    files = ["tests/test_debsource.py", "tests/test_migration_source.py", "tests/test_migration_cutover.py",
             "tests/test_migration_block.py"]
    if not quick:
        files.append("tests/test_migration_rollback.py")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "figures.json"
        env = {**os.environ, "FERRY_BENCH_OUT": str(out)}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "e2e", "-p", "no:cacheprovider",
                            *files], cwd=ROOT, env=env)
        if not out.exists():
            print("bench/migration.py: the run recorded no figures", file=sys.stderr)
            return 1
        f = json.loads(out.read_text())
    print("\n== server migration (Debian 12 source, file-level, lab) ==")
    mib = 1 << 20
    print(f"initial sync     {f['initial_sync_bytes'] / mib:.1f} MiB in {f['initial_sync_s']:.1f} s; "
          f"predicted at its start (a probe of the data path) {f.get('initial_sync_predicted_s') or 0:.1f} s -> "
          f"predicted/measured {ratio(f['initial_sync_s'], f.get('initial_sync_predicted_s'))}")
    if f.get("initial_sync_probe"):
        print(f"                 ({f.get('initial_sync_files')} files; {f['initial_sync_probe'].split(': ', 1)[-1]})")
    print(f"                 (the assessment's estimate, a lower bound at the network check's bandwidth: "
          f"{f.get('initial_sync_estimate_s') or 0:.1f} s -> {ratio(f['initial_sync_s'], f.get('initial_sync_estimate_s'))})")
    print(f"incremental      {f['incremental_bytes'] / mib:.1f} MiB in {f['incremental_s']:.1f} s")
    if "downtime_s" in f:
        p, s = f["predicted_downtime"], f["steps"]
        measured_parts = {
            "final_sync_s": s["stop_services"] + s["offline_sync"],
            "switch_s": s["park"] + s["switch_boot"],
            "boot_s": s["start_target"],
            "tools_s": s["remove_tools"],
            "agent_s": s["guest_agent"],
            "checks_s": s["final_address"] + s["check_service"],
        }
        print(f"downtime         measured {f['downtime_s']:.1f} s, predicted {p['total_s']:.1f} s -> "
              f"predicted/measured {ratio(f['downtime_s'], p['total_s'])}")
        for k, v in measured_parts.items():
            print(f"  {k.removesuffix('_s'):12} measured {v:6.1f} s   predicted {p['parts'].get(k) or 0:6.1f} s")
        print(f"  (the test launch measured in its copy: {f.get('test')})")
    moved, crossed = f["moved_bytes"], f["crossed_bytes"]
    print(f"this machine     {crossed / mib:.2f} MiB crossed it of {moved / mib:.1f} MiB moved "
          f"({100 * crossed / moved:.2f}%; target under 1%)")
    if "block_initial_s" in f:
        print(f"\n== block-level (tests/test_migration_block.py: {f['block_disk_bytes'] / mib:.0f} MiB disk, 4 MiB chunks) ==")
        print(f"initial sync     {f['block_initial_bytes'] / mib:.1f} MiB in {f['block_initial_s']:.1f} s (the zero chunks "
              f"left out); this machine carried {f['block_crossed_bytes_initial'] / mib:.2f} MiB")
        print(f"incremental      {f['block_incremental_bytes'] / mib:.1f} MiB in {f['block_incremental_s']:.1f} s "
              "(a hash pass over the disk, then the changed chunks)")
        if "block_downtime_s" in f:
            print(f"downtime         measured {f['block_downtime_s']:.1f} s, predicted "
                  f"{f['block_predicted_downtime']['total_s']:.1f} s; steps {f['block_steps']}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
