"""A token bucket shared by all streams of a transfer (--bwlimit)."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    def __init__(self, rate: float | None, burst_s: float = 0.25) -> None:
        self.rate = rate if rate and rate > 0 else None
        self.burst = (self.rate or 0) * burst_s
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until n bytes may go out."""
        if self.rate is None:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


def parse_rate(text: str) -> float:
    """'50M' -> bytes per second. Suffixes K, M, G (powers of 1024); plain numbers are bytes/s."""
    t = text.strip().upper().removesuffix("B/S").removesuffix("/S").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (for example 50M for 50 MiB/s)") from None
    if value <= 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return value
