"""Boot benchmark: a VM booting the live image to an answering guest agent, under TCG.

    .venv/bin/python bench/boot.py [--runs N]

Ferry: `ferry vm start` of a lab VM (it returns once the guest agent answers), as a user runs
it: a new process, the engine's checks, QEMU started as a daemon, QMP, the agent's handshake.
Reference: QEMU started by hand with the same kernel, initramfs, memory and agent channel,
timed until the agent answers a guest-sync on its socket. Each is the best of N alternating
runs (default 5); the ratio is Ferry's overhead over bare QEMU. Target (issue 4): under 10 s.
The live image comes from $FERRY_IMAGE_CACHE (default ~/.cache/ferry-tests, the tests' cache),
built there by `ferry lab image build` when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 10.0
APPEND = "console=ttyS0 quiet panic=-1 ferry.role=idle"   # what Ferry gives an idle live guest


def ferry(ws: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "ferry.console.cli", "--workspace", str(ws), *args, "--json"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return json.loads(r.stdout)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def agent_answers(sock_path: Path, token: int) -> bool:
    """One guest-sync round trip on the agent's socket (False if the guest is not there yet)."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(str(sock_path))
            s.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % token)
            buf = b""
            while not (b"%d" % token in buf and buf.endswith(b"\n")):   # the reply: {"return": token}
                more = s.recv(4096)
                if not more:
                    return False
                buf += more
            return True
    except OSError:
        return False


def bare_qemu(image: dict, work: Path, run: int) -> float:
    """QEMU by hand: same kernel, initramfs, memory and agent channel; until the agent answers."""
    sock = work / f"qga-{run}.sock"
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "256", "-kernel", image["kernel"], "-initrd", image["initrd"],
            "-append", APPEND, "-serial", "none",
            "-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not agent_answers(sock, 1000 + run):
            if proc.poll() is not None:
                raise SystemExit(f"qemu exited: {proc.stderr.read().decode().strip()}")
            if time.perf_counter() - t0 > 120:
                raise SystemExit("the bare QEMU guest's agent never answered")
            time.sleep(0.05)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("FERRY_IMAGE_CACHE", str(Path.home() / ".cache" / "ferry-tests"))
    ws = Path(tempfile.mkdtemp(prefix="fboot-", dir="/tmp"))   # short: UNIX socket paths live in it
    try:
        image = ferry(ws, "lab", "image", "build")
        ferry(ws, "vm", "create", "bootbench", "--host", "lab1", "--memory", "256M")
        # The first start also settles the host's acceleration (cached after): not timed.
        accel = ferry(ws, "vm", "start", "bootbench").get("accel", "?")
        ferry(ws, "vm", "stop", "bootbench", "--force")
        t_ferry, t_qemu = [], []
        for run in range(args.runs):
            t_qemu.append(bare_qemu(image, ws, run))
            t_ferry.append(timed(lambda: ferry(ws, "vm", "start", "bootbench")))
            ferry(ws, "vm", "stop", "bootbench", "--force")
        best, ref = min(t_ferry), min(t_qemu)
        ok = best < TARGET_S
        print(f"boot to an answering guest agent ({accel}, live image {image['version']}, best of {args.runs}):")
        print(f"  ferry vm start {best:.2f} s (all: {', '.join(f'{t:.2f}' for t in t_ferry)})")
        print(f"  bare QEMU      {ref:.2f} s (all: {', '.join(f'{t:.2f}' for t in t_qemu)})")
        print(f"  ratio {best / ref:.2f} (Ferry's overhead over bare QEMU); target < {TARGET_S:g} s: "
              f"{'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        subprocess.run([sys.executable, "-m", "ferry.console.cli", "--workspace", str(ws), "vm", "stop", "bootbench",
                        "--force"], capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
