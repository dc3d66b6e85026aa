"""The network check before a migration (REQUIREMENTS E3): the path the data will take, measured.

The data goes host to host: the receiver (the target VM, on the target host's network) pulls from
the source over SSH. Before the target exists, its host stands in for it, at its migration address
(D5). Measured there, not from Ferry's machine:

- latency, jitter and loss: PROBES TCP connections from the target host to the source's SSH port,
  each timed from SYN to the accepted connection (one round trip; a probe that gets no answer
  within a second is lost). Latency is the median, jitter the mean difference between
  consecutive probes (RFC 3550's idea, without its smoothing).
- throughput: the target host listens on its migration address at a port the kernel picks; the
  source sends STREAM_BYTES of zeros to it (python3 there, else bash's /dev/tcp); the receiver
  times from the first byte to the last.

Against the thresholds of the source notes (no loss, latency under 2 ms, bandwidth over 100 Mbit/s;
jitter under 1 ms stands for "no jitter"), all configurable: each one not met is a problem line,
and a migration with problems is blocked unless the operator overrides with a reason (audited by
the caller). Both hosts need python3 for the probes (Ferry's replication agent needs it anyway);
its absence is said in one line.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

from ..errors import PermanentError
from ..transport.base import Transport

PROBES = 20
STREAM_BYTES = 64 << 20
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class NetThresholds:
    max_loss_pct: float = 0.0
    max_latency_ms: float = 2.0
    max_jitter_ms: float = 1.0
    min_bandwidth_mbit: float = 100.0


@dataclass(frozen=True)
class NetCheck:
    source: str                      # address:port the data comes from
    target: str                      # the host (and address) that stands in for the receiver
    probes: int
    lost: int
    latency_ms: float | None         # median of the answered probes
    jitter_ms: float | None
    bandwidth_mbit: float | None
    stream_bytes: int
    stream_s: float | None
    problems: tuple[str, ...]        # each threshold not met, one line each
    checked_at: float

    @property
    def loss_pct(self) -> float:
        return 100.0 * self.lost / self.probes if self.probes else 100.0

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def line(self) -> str:
        """One line: the figures, and passed or the problems."""
        figs = (f"latency {self.latency_ms:.2f} ms" if self.latency_ms is not None else "latency -") + \
            (f", jitter {self.jitter_ms:.2f} ms" if self.jitter_ms is not None else "") + \
            f", loss {self.loss_pct:.0f}%" + \
            (f", {self.bandwidth_mbit:.0f} Mbit/s" if self.bandwidth_mbit is not None else "")
        return f"{self.source} -> {self.target}: {figs}: " + ("passed" if self.passed else "; ".join(self.problems))


# Run on the target host: PROBES timed TCP connects to the source; JSON on stdout.
_PROBE = """
import json, socket, sys, time
addr, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rtts, lost = [], 0
for i in range(n):
    t = time.perf_counter()
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
    except OSError:
        lost += 1
    else:
        rtts.append((time.perf_counter() - t) * 1000.0)
        s.close()
    time.sleep(0.02)
print(json.dumps({"rtts": rtts, "lost": lost}))
"""

# Run on the target host: listens, says its port, takes one stream; JSON on stdout when done.
_RECEIVE = """
import json, socket, sys, time
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.bind((sys.argv[1], 0))
srv.listen(1)
srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[2]))
total, first = 0, None
while True:
    b = conn.recv(1 << 20)
    if not b:
        break
    if first is None:
        first = time.perf_counter()
    total += len(b)
print(json.dumps({"bytes": total, "seconds": time.perf_counter() - first if first else 0.0}), flush=True)
"""

# Run on the source: sends N bytes of zeros to ADDR:PORT (python3, else bash's /dev/tcp).
_SEND = """
if command -v python3 >/dev/null 2>&1; then
  exec python3 -c 'import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
left, chunk = int(sys.argv[3]), bytes(1 << 20)
while left > 0:
    s.sendall(chunk[:min(left, len(chunk))]); left -= min(left, len(chunk))
s.shutdown(socket.SHUT_WR)
s.recv(1)' "$1" "$2" "$3"
fi
exec bash -c 'head -c "$3" /dev/zero > "/dev/tcp/$1/$2"' bash "$1" "$2" "$3"
"""


async def _python3(t: Transport, where: str) -> None:
    r = await t.run(["sh", "-c", "command -v python3"], timeout=30)
    if not r.ok:
        raise PermanentError(f"{where} has no python3, which the network check runs there",
                             f"install python3 on {where} (Debian: apt-get install python3-minimal)")


async def measure(source_t: Transport, source_addr: str, source_port: int, target_t: Transport,
                  target_name: str, target_addr: str, *, probes: int = PROBES, stream_bytes: int = STREAM_BYTES,
                  thresholds: NetThresholds = NetThresholds()) -> NetCheck:
    """Latency, jitter and loss from the target host to the source, and the source's throughput to
    the target host's migration address (see the module's docstring)."""
    await _python3(target_t, f"host {target_name}")
    r = await target_t.run(["python3", "-c", _PROBE, source_addr, str(source_port), str(probes),
                            str(PROBE_TIMEOUT_S)], timeout=probes * (PROBE_TIMEOUT_S + 1) + 30)
    if not r.ok:
        raise PermanentError(f"the latency probes from {target_name} to {source_addr} failed: "
                             f"{r.stderr.decode(errors='replace').strip().splitlines()[-1:] or ['no output']}",
                             "check that python3 runs on the host")
    got = json.loads(r.stdout)
    rtts, lost = got["rtts"], int(got["lost"])
    latency = statistics.median(rtts) if rtts else None
    jitter = statistics.fmean(abs(a - b) for a, b in zip(rtts, rtts[1:])) if len(rtts) > 1 else None
    bandwidth, seconds = await _throughput(source_t, source_addr, target_t, target_name, target_addr, stream_bytes) \
        if rtts else (None, None)
    problems = []
    loss_pct = 100.0 * lost / probes if probes else 100.0
    if loss_pct > thresholds.max_loss_pct:
        problems.append(f"loss {loss_pct:.0f}% ({lost} of {probes} probes unanswered), above "
                        f"{thresholds.max_loss_pct:g}%")
    if latency is not None and latency > thresholds.max_latency_ms:
        problems.append(f"latency {latency:.2f} ms, above {thresholds.max_latency_ms:g} ms")
    if jitter is not None and jitter > thresholds.max_jitter_ms:
        problems.append(f"jitter {jitter:.2f} ms, above {thresholds.max_jitter_ms:g} ms")
    if bandwidth is None or bandwidth < thresholds.min_bandwidth_mbit:
        problems.append("throughput not measured: the source did not answer" if bandwidth is None else
                        f"throughput {bandwidth:.0f} Mbit/s, below {thresholds.min_bandwidth_mbit:g} Mbit/s")
    return NetCheck(f"{source_addr}:{source_port}", f"{target_name} ({target_addr})", probes, lost, latency, jitter,
                    bandwidth, stream_bytes, seconds, tuple(problems), time.time())


async def _throughput(source_t: Transport, source_addr: str, target_t: Transport, target_name: str,
                      target_addr: str, stream_bytes: int) -> tuple[float | None, float | None]:
    """Mbit/s and seconds of STREAM_BYTES from the source to the target host's address."""
    timeout = 120.0
    recv = await target_t.start(["python3", "-c", _RECEIVE, target_addr, str(timeout)])
    try:
        line = await asyncio.wait_for(_line(recv.stdout), 30)
        if not line.strip().isdigit():
            err = (await recv.stderr.read()).decode(errors="replace").strip().splitlines()
            raise PermanentError(f"{target_name} could not listen on {target_addr} for the throughput test: "
                                 f"{err[-1] if err else 'no port'}",
                                 "check the host's migration_address in config.toml")
        port = int(line)
        sent = await source_t.run(["sh", "-c", _SEND, "sh", target_addr, str(port), str(stream_bytes)],
                                  timeout=timeout)
        if not sent.ok:
            return None, None
        out = json.loads(await asyncio.wait_for(_line(recv.stdout), timeout))
        await recv.wait(10)
    finally:
        await recv.kill()
    if not out["bytes"] or out["seconds"] <= 0:
        return None, None
    return out["bytes"] * 8 / out["seconds"] / 1e6, out["seconds"]


async def _line(reader) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        more = await reader.read(1)
        if not more:
            break
        buf += more
    return buf.decode(errors="replace")

