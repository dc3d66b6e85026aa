"""Health round benchmark: the daily checklist's built-in checks over 100 SSH hosts.

    .venv/bin/python bench/health.py [--hosts 100] [--runs 3]

100 host entries share one loopback sshd (real SSH: a connection, a key exchange and a session per
host), each with a datastore of its own. The engine runs in this process (EngineClient), as the
engine service runs it; `ferry health run` (task health.run) with [health] max_attempts = 1, so one
round is measured and not the re-checks of soft problems. The first round connects to every host;
the next ones reuse the pooled connections. Printed: wall time and the engine's CPU time per round
(this process), and the whole machine's CPU over the round (sshd and the hosts' shells included).
Target (issue 14): one round over 100 hosts <= 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
TARGET_S = 10.0


def machine_cpu() -> float:
    """Seconds of CPU the whole machine spent (user + system + ...), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def hosts_client(n: int, base: Path, doc: dict, host: Callable[[str, dict], None] | None = None
                       ) -> AsyncIterator[Any]:
    """An engine in this process (EngineClient, started) on a site of `n` SSH hosts h001.. that share one
    loopback sshd; `doc` is the rest of config.toml, `host(name, doc)` adds what each host has more."""
    from ferry.engine.client import EngineClient
    from ferry.engine.config import dump_config
    from ferry.engine.transport import TransportPool
    from ferry.engine.workspace import Workspace
    from harness.sshd import SshdFactory

    factory = SshdFactory(base / "sshd")
    try:
        server = factory.one()
        ws = Workspace(base / "ws").ensure()
        doc = {"site": {"name": "bench"}, "clusters": {"lab": {}}, "hosts": {}, **doc}
        for i in range(n):
            name = f"h{i + 1:03d}"
            doc["hosts"][name] = server.host_table()
            if host:
                host(name, doc)
        ws.config_path.write_text(dump_config(doc))
        server.trust(ws.known_hosts_path)
        (base / "known_hosts").touch()
        (base / "ssh_config").touch()
        site = ws.load_config()
        pool = TransportPool(site, ws, ssh_config_paths=[base / "ssh_config"], user_known_hosts=base / "known_hosts",
                             use_agent=False, connect_timeout=30)
        client = EngineClient(ws, site, transports=pool)
        await client.start()
        try:
            yield client
        finally:
            await client.close()
    finally:
        factory.stop_all()


async def bench(n: int, runs: int, base: Path) -> list[tuple[float, float, float, dict]]:
    def datastore(name: str, doc: dict) -> None:
        path = base / "datastores" / name
        path.mkdir(parents=True)
        doc["datastores"][f"{name}-ds"] = {"path": str(path), "hosts": [name]}

    doc = {"datastores": {}, "health": {"max_attempts": 1, "parallel": 32, "timeout": 30}}
    out = []
    async with hosts_client(n, base, doc, datastore) as client:
        for _ in range(runs):
            m0, c0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
            info = await client.wait_task(await client.health_run("daily"), timeout=300)
            wall, cpu, total = time.perf_counter() - t0, time.process_time() - c0, machine_cpu() - m0
            if info.state != "succeeded":
                raise SystemExit(f"health run failed: {info.error} ({info.hint})")
            out.append((wall, cpu, total, info.result))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-health-") as tmp:
        results = asyncio.run(bench(a.hosts, a.runs, Path(tmp)))
    print(f"health round, daily checklist, {a.hosts} SSH hosts on one loopback sshd, {os.cpu_count()} CPUs "
          f"(target <= {TARGET_S:g} s)")
    for i, (wall, cpu, total, r) in enumerate(results, 1):
        states = ", ".join(f"{v} {k}" for k, v in r["states"].items() if v)
        print(f"  round {i} ({'connecting' if i == 1 else 'pooled connections'}): wall {wall:.2f} s, engine CPU "
              f"{cpu:.2f} s, machine CPU {total:.2f} s; {r['checks']} checks: {states}"
              + (f"; unreachable {len(r['unreachable'])}" if r["unreachable"] else ""))
    worst = max(w for w, *_ in results)
    print(f"worst round {worst:.2f} s: {'within' if worst <= TARGET_S else 'OVER'} the target of {TARGET_S:g} s")


if __name__ == "__main__":
    main()
