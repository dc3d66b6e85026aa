"""The network lab, and live moves of a VM between its hosts (issue 12).

    .venv/bin/python bench/lab.py [--memory 512] [--dirty 0,8,32] [--runs 2]     # as root

1. The lab: NetLab.up() of three hosts from nothing (namespaces, links, sshd each, the DHCP server,
   the nftables fence), again while it is up (adopted: nothing rebuilt), and down(). Target (the
   issue): up in seconds.
2. Moves: a VM of MEMORY MiB on the lab network moves lab1 -> lab3 -> lab1 ... (RUNS moves per
   rate) while its guest dirties a 64 MiB buffer at each rate of --dirty (MiB/s of random data:
   the live image's workload; 0 = idle), and a VM on lab2 pings it every 0.1 s throughout.
   Per move: the wall time of `ferry vm move` against QEMU's own time for the migration
   (query-migrate's total-time, measured in the same run: the reference), their ratio (Ferry's
   overhead: a new process, prechecks, the target QEMU started, the source quit and recorded);
   the downtime QEMU measured; the memory rounds; and the pings the peer lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ferry.engine.platform.netlab import NetLab  # noqa: E402
from harness.netlab import guest_sh, netlab_workspace, random_subnet  # noqa: E402

HOSTS = ("lab1", "lab2", "lab3")


def ferry(ws: Path, *args: str, json_out: bool = True):
    r = subprocess.run([sys.executable, "-m", "ferry.console.cli", "--workspace", str(ws), *args,
                        *(["--json"] if json_out else [])],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return json.loads(r.stdout) if json_out else r.stdout


def guest(ws: Path, name: str, script: str, timeout: float = 60) -> str:
    return asyncio.run(guest_sh(ws, name, script, timeout))[1]


def bench_lab(base: Path) -> None:
    lab = NetLab(base / "benchlab", HOSTS, random_subnet())
    try:
        t0 = time.perf_counter()
        lab.up()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        lab.up()
        again = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        lab.down()
        down = time.perf_counter() - t0
    print(f"lab of {len(HOSTS)} hosts: up from nothing {first:.2f} s, up while up (adopted) {again:.2f} s, "
          f"down {down:.2f} s")


def bench_moves(memory: int, rates: list[int], runs: int) -> None:
    for ws, _lab in netlab_workspace("fbench-move-", hosts=HOSTS, site="benchmove"):
        ferry(ws, "vm", "create", "mover", "--host", "lab1", "--network", "lab", "--memory", f"{memory}M")
        ferry(ws, "vm", "create", "peer", "--host", "lab2", "--network", "lab", "--memory", "128M")
        for n in ("mover", "peer"):
            ferry(ws, "vm", "start", n)
        guest(ws, "mover", "ip addr add 192.168.99.1/24 dev eth0 && ip link set eth0 up")
        guest(ws, "peer", "ip addr add 192.168.99.2/24 dev eth0 && ip link set eth0 up")
        print(f"\nlive moves of a {memory} MiB guest between lab hosts over SSH, a peer pinging it every 0.1 s:")
        print(f"{'dirty MiB/s':>11}  {'achieved':>8}  {'ferry s':>7}  {'qemu s':>6}  {'ratio':>5}  "
              f"{'downtime ms':>11}  {'rounds':>6}  {'pings lost':>10}")
        for rate in rates:
            guest(ws, "mover", "killall workload 2>/dev/null; rm -f /dev/shm/ferry-dirty /run/ferry/workload; "
                               + (f"/usr/libexec/ferry/workload {rate} 64 </dev/null >/dev/null 2>&1 &"
                                  if rate else "true"))
            time.sleep(3 if rate else 0)        # the buffer touched once, the rate steady
            for _ in range(runs):
                to = "lab3" if ferry(ws, "vm", "show", "mover")["host"] == "lab1" else "lab1"
                guest(ws, "peer", "rm -f /tmp/stop /tmp/pings; (i=0; lost=0; while [ ! -e /tmp/stop ]; do "
                                  "ping -c1 -W1 192.168.99.1 >/dev/null 2>&1 || lost=$((lost+1)); i=$((i+1)); "
                                  "usleep 100000; done; echo $i $lost > /tmp/pings) </dev/null >/dev/null 2>&1 &")
                time.sleep(1)
                t0 = time.perf_counter()
                out = ferry(ws, "vm", "move", "mover", "--to", to)
                wall = time.perf_counter() - t0
                time.sleep(1)
                guest(ws, "peer", "touch /tmp/stop")
                pings = ""
                deadline = time.monotonic() + 10
                while not pings and time.monotonic() < deadline:
                    time.sleep(0.3)
                    pings = guest(ws, "peer", "cat /tmp/pings 2>/dev/null").strip()
                sent, lost = (pings.split() + ["?", "?"])[:2]
                status = guest(ws, "mover", "cat /run/ferry/workload 2>/dev/null") if rate else ""
                achieved = next((kv.split("=")[1] for kv in status.split() if kv.startswith("achieved_mb_s=")), "-")
                result = ferry(ws, "tasks")[0]["result"] or out
                qemu_s = (result.get("total_ms") or 0) / 1000
                print(f"{rate:>11}  {achieved:>8}  {wall:>7.2f}  {qemu_s:>6.2f}  "
                      f"{wall / qemu_s if qemu_s else float('nan'):>5.2f}  {result.get('downtime_ms', '?'):>11}  "
                      f"{result.get('rounds', '?'):>6}  {lost:>4} of {sent}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=int, default=512, help="MiB of the moving guest (default 512)")
    p.add_argument("--dirty", default="0,8,32", help="MiB/s the guest dirties, one scenario each (default 0,8,32)")
    p.add_argument("--runs", type=int, default=2, help="moves per scenario (default 2)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/lab.py needs root (network namespaces, bridges, taps)")
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="fbench-lab-", dir="/tmp"))
    try:
        bench_lab(base)
        bench_moves(args.memory, [int(x) for x in args.dirty.split(",")], args.runs)
    finally:
        subprocess.run(["rm", "-rf", str(base)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
