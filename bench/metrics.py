"""Sampling benchmark: one performance sample (engine/ops/metrics.py) over 100 SSH hosts.

    .venv/bin/python bench/metrics.py [--hosts 100] [--runs 5]

100 host entries share one loopback sshd (real SSH: a connection and a session per host). The engine
runs in this process (EngineClient) and samples as its loop does every [metrics] interval; the first
sample connects to every host, the next ones reuse the pooled connections. Printed: wall time and
the engine's CPU time per sample (this process), the machine's CPU over it, metrics.db's rows and size,
and the share of one core the engine spends at the default interval of 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
INTERVAL = 10.0


async def bench(n: int, runs: int, base: Path) -> tuple[list[tuple[float, float, float, int]], int, int]:
    from health import hosts_client, machine_cpu

    out = []
    async with hosts_client(n, base, {}) as client:
        for _ in range(runs):
            m0, c0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
            values = await client.sampler.sample()
            out.append((time.perf_counter() - t0, time.process_time() - c0, machine_cpu() - m0,
                        sum(1 for k in values if k.startswith("host:"))))
        rows = client.sampler.db.count()
        size = sum(p.stat().st_size for p in client.workspace.root.glob("metrics.db*"))
    return out, rows, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-metrics-") as tmp:
        results, rows, size = asyncio.run(bench(a.hosts, a.runs, Path(tmp)))
    print(f"performance sample, {a.hosts} SSH hosts on one loopback sshd, {os.cpu_count()} CPUs")
    for i, (wall, cpu, total, answered) in enumerate(results, 1):
        print(f"  sample {i} ({'connecting' if i == 1 else 'pooled connections'}): wall {wall:.2f} s, engine CPU "
              f"{cpu:.2f} s, machine CPU {total:.2f} s; {answered}/{a.hosts} hosts answered")
    pooled = results[1:] or results
    cpu = sum(c for _, c, _, _ in pooled) / len(pooled)
    print(f"metrics.db after {len(results)} samples: {rows} rows, {size / 1024:.0f} KiB; "
          f"pooled samples cost the engine {cpu:.2f} s of CPU each: {100 * cpu / INTERVAL:.1f} % of one core "
          f"at an interval of {INTERVAL:g} s")


if __name__ == "__main__":
    main()
