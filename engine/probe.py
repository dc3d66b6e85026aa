"""Link probe: round-trip latency and stream throughput to a host over its transport.

Later issues use it for the migration network check (REQUIREMENTS E3).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from .errors import PermanentError, TransportError
from .tasks import TaskContext, TaskKind, register

MiB = 1 << 20
CHUNK = MiB


def latency_stats(rtts_s: list[float]) -> dict[str, float]:
    """min/avg/max and jitter (mean absolute difference of consecutive samples), in ms."""
    ms = [r * 1000 for r in rtts_s]
    jitter = statistics.fmean(abs(a - b) for a, b in zip(ms, ms[1:])) if len(ms) > 1 else 0.0
    return {"min_ms": min(ms), "avg_ms": statistics.fmean(ms), "max_ms": max(ms), "jitter_ms": jitter,
            "samples": len(ms)}


@register
class ProbeTask(TaskKind):
    name = "probe"
    max_retries = 2

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("host"):
            raise PermanentError("probe needs a host", "ferry probe HOST")
        if not 1 <= int(params.get("pings", 20)) <= 10000:
            raise PermanentError("pings must be between 1 and 10000", "for example --pings 20")
        if not 0 <= int(params.get("size_mib", 64)) <= 1 << 20:
            raise PermanentError("size must be between 0 and 1048576 MiB", "for example --size 64")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]]

    def title(self, params: dict[str, Any]) -> str:
        return f"probe {params['host']}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        host = ctx.params["host"]
        pings = int(ctx.params.get("pings", 20))
        size = int(ctx.params.get("size_mib", 64)) * MiB
        t = ctx.transport(host)
        total = 2 * size
        ctx.progress(units_done=0, units_total=pings, bytes_done=0, bytes_total=total or None, item="latency")

        rtts = await self._latency(ctx, t, pings)
        lat = latency_stats(rtts)
        ctx.progress(detail={"latency": lat})
        ctx.log(f"latency over the channel: min {lat['min_ms']:.2f} / avg {lat['avg_ms']:.2f} / "
                f"max {lat['max_ms']:.2f} ms, jitter {lat['jitter_ms']:.2f} ms")
        up = down = None
        if size:
            ctx.progress(item="upload")
            up = await self._upload(ctx, t, size)
            ctx.progress(item="download")
            down = await self._download(ctx, t, size, base=size)
            ctx.log(f"throughput: upload {up / MiB:.1f} MiB/s, download {down / MiB:.1f} MiB/s")
        ctx.progress(item="done")
        return {"host": host, "latency": lat, "bytes": size,
                "upload_Bps": up, "download_Bps": down,
                "upload_mbit": up * 8 / 1e6 if up else None, "download_mbit": down * 8 / 1e6 if down else None}

    async def _latency(self, ctx: TaskContext, t, pings: int) -> list[float]:
        proc = await t.start(["cat"])
        rtts = []
        try:
            for i in range(pings):
                msg = f"{i:08d}\n".encode()
                t0 = time.perf_counter()
                proc.stdin.write(msg)
                await proc.stdin.drain()
                got = await proc.stdout.readexactly(len(msg))
                rtts.append(time.perf_counter() - t0)
                if got != msg:
                    raise TransportError(f"{ctx.params['host']}: echo returned different bytes",
                                         "the channel corrupts data; check the link")
                ctx.progress(units_done=i + 1)
        except EOFError:
            raise TransportError(f"{ctx.params['host']}: echo process ended early",
                                 "check that `cat` runs on the host") from None
        finally:
            await proc.stdin.close()
            await proc.wait(timeout=10)
        return rtts

    async def _upload(self, ctx: TaskContext, t, size: int) -> float:
        block = os.urandom(CHUNK)  # incompressible, so link compression cannot flatter the figure
        proc = await t.start(["sh", "-c", "cat > /dev/null"])
        t0 = time.perf_counter()
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            proc.stdin.write(block[:n])
            await proc.stdin.drain()
            sent += n
            ctx.progress(bytes_done=sent)
        await proc.stdin.close()
        status = await proc.wait(timeout=60)
        elapsed = time.perf_counter() - t0
        if status != 0:
            raise TransportError(f"{ctx.params['host']}: upload sink exited with {status}", "check the host")
        return size / elapsed

    async def _download(self, ctx: TaskContext, t, size: int, base: int) -> float:
        # The host repeats one random MiB: cheap to produce, still incompressible.
        script = ("head -c 1048576 /dev/urandom > \"$T\" && i=0; while [ $i -lt $1 ]; do cat \"$T\"; i=$((i+1)); done;"
                  " rm -f \"$T\"")
        mib = (size + CHUNK - 1) // CHUNK
        proc = await t.start(["sh", "-c", 'T=$(mktemp) || exit 1; ' + script, "probe", str(mib)])
        t0 = time.perf_counter()
        got = 0
        while got < size:
            chunk = await proc.stdout.read(CHUNK)
            if not chunk:
                break
            got += len(chunk)
            ctx.progress(bytes_done=base + min(got, size))
        elapsed = time.perf_counter() - t0
        await proc.wait(timeout=30)
        if got < size:
            raise TransportError(f"{ctx.params['host']}: download stream ended after {got} of {size} bytes",
                                 "the link or the host dropped the stream")
        return size / elapsed
