"""Running commands on a host and reading what they say: the last error line, output as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Callable, Sequence

from ..transport.base import RunResult, Transport

POLL = 0.5


def last_line(r: RunResult) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]", r.stderr.decode("utf-8", "replace"))
             if ln.strip() and not ln.startswith("ferry-")]
    return lines[-1] if lines else f"exit status {r.exit_status}"


async def watch(t: Transport, argv: Sequence[str], *, on_out: Callable[[str], None] | None = None,
                 on_err: Callable[[str], None] | None = None, poll=None) -> RunResult:
    """Run a long command, feeding its output to callbacks as it comes and calling `poll` twice a second."""
    proc = await t.start(argv)
    out, err = bytearray(), bytearray()

    async def pump(stream, buf: bytearray, cb) -> None:
        while chunk := await stream.read(65536):
            buf += chunk
            del buf[:-65536]          # only the tail matters (digests, the last error line)
            if cb:
                cb(chunk.decode("utf-8", "replace"))

    try:
        if proc.stdin is not None:
            await proc.stdin.close()
        pumps = asyncio.ensure_future(asyncio.gather(pump(proc.stdout, out, on_out), pump(proc.stderr, err, on_err)))
        pumps.add_done_callback(lambda f: None if f.cancelled() else f.exception())   # retrieved, even if abandoned
        try:
            while not pumps.done():
                await asyncio.wait({pumps}, timeout=POLL)
                if poll is not None and not pumps.done():
                    await poll()
            await pumps
        finally:
            pumps.cancel()
        status = await proc.wait()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.kill())
        raise
    return RunResult(status, bytes(out), bytes(err))


async def qemu_img_progress(t: Transport, args: Sequence[str], report: Callable[[float], None]) -> RunResult:
    """qemu-img SUBCOMMAND -p ARGS..., calling report(fraction done) as its progress line moves."""
    return await watch(t, ["qemu-img", args[0], "-p", *args[1:]],
                       on_out=Tail(r"\((\d+(?:\.\d+)?)/100%\)", lambda pct: report(pct / 100)))


class Tail:
    """The last match of a pattern in a stream that arrives in arbitrary pieces."""

    def __init__(self, pattern: str, on_value: Callable[[float], None]) -> None:
        self.re, self.on_value, self.buf = re.compile(pattern), on_value, ""

    def __call__(self, text: str) -> None:
        self.buf = (self.buf + text)[-512:]
        found = self.re.findall(self.buf)
        if found:
            self.on_value(float(found[-1]))
