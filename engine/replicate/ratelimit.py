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
