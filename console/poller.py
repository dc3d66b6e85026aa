"""Host facts polling: one poll per host at a time, the next one scheduled only when it finished.

A host that stops answering keeps its last good facts, marked stale since the first failure,
and is asked again after an exponential back-off. No textual here: the console runs
`HostPoller.run()` in a worker and turns each result into a message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

from ferry.engine.errors import FerryError

log = logging.getLogger("ferry.console")


async def attempt(call: Awaitable[Any], what: str, *, timeout: tuple[str, str] = (
        "no answer in time", "check that the host is up and reachable")) -> tuple[Any, str | None, str | None]:
    """Await one poll or question: (result, None, None), or (None, error, hint) for a failure,
    which is shown, not raised (a bug is logged too: the polling must go on)."""
    try:
        return await call, None, None
    except FerryError as e:
        return None, e.message, e.hint or None
    except (asyncio.TimeoutError, TimeoutError):
        return None, *timeout
    except Exception as e:
        log.exception(what)
        return None, f"internal error: {type(e).__name__}: {e}", "see logs/ferry.log in the workspace"

INTERVAL_S = 15.0        # between two good polls of one host
BACKOFF_BASE_S = 5.0     # first retry after a failure; doubles up to BACKOFF_MAX_S
BACKOFF_MAX_S = 120.0
CONCURRENCY = 8          # hosts polled at once
MAX_RATE = 10.0          # polls started per second, whatever the number of hosts: a big site is
                         # polled less often instead of loading the console and the hosts
FACTS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostStatus:
    """What the console knows about one host."""

    host: str
    facts: Any = None                 # the last good HostFacts, or None
    ok: bool | None = None            # None: never asked yet
    error: str | None = None
    hint: str | None = None
    stale_since: float | None = None  # first failure after the last success
    last_ok: float | None = None
    last_attempt: float | None = None
    failures: int = 0
    polling: bool = False
    next_due: float = 0.0


class HostPoller:
    def __init__(self, hosts: list[str], fetch: Callable[[str], Awaitable[Any]],
                 on_update: Callable[[HostStatus], None], *, interval: float = INTERVAL_S,
                 backoff_base: float = BACKOFF_BASE_S, backoff_max: float = BACKOFF_MAX_S,
                 concurrency: int = CONCURRENCY, max_rate: float = MAX_RATE,
                 clock: Callable[[], float] = time.time) -> None:
        self.fetch = fetch
        self.on_update = on_update
        self.max_rate = max_rate
        self.interval = max(interval, len(hosts) / max_rate)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.concurrency = concurrency
        self.clock = clock
        self.status: dict[str, HostStatus] = {h: HostStatus(h) for h in hosts}
        self._due: dict[str, float] = {h: 0.0 for h in hosts}   # monotonic time
        self._inflight: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._started: deque[float] = deque()      # when the polls of the last second started

    def poke(self, host: str) -> None:
        """Ask `host` again now (unless a poll of it is already running)."""
        if host in self._due and host not in self._inflight:
            self._due[host] = 0.0
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                while self._started and self._started[0] <= now - 1.0:
                    self._started.popleft()
                throttled = False
                for host, due in sorted(self._due.items(), key=lambda kv: kv[1]):
                    if due > now or len(self._inflight) >= self.concurrency:
                        break
                    if len(self._started) >= self.max_rate:
                        throttled = True
                        break
                    if host not in self._inflight:
                        self._started.append(now)
                        self._start(host)
                waits: list[asyncio.Future] = list(self._inflight.values())
                idle = [due for h, due in self._due.items() if h not in self._inflight]
                timeout = max(0.05, min(idle) - now) if idle else None
                if len(self._inflight) >= self.concurrency:
                    timeout = None     # a finishing poll wakes us
                elif throttled:
                    timeout = max(0.05, self._started[0] + 1.0 - now)
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait([*waits, wake], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        finally:
            for t in self._inflight.values():
                t.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def _start(self, host: str) -> None:
        st = replace(self.status[host], polling=True)
        self.status[host] = st
        self.on_update(st)
        self._inflight[host] = asyncio.create_task(self._poll(host), name=f"ferry-facts-{host}")

    async def _poll(self, host: str) -> None:
        try:
            facts, error, hint = await attempt(self.fetch(host), f"facts of {host}")
            if error is None and not getattr(facts, "reachable", True):
                error = getattr(facts, "error", None) or "host did not answer"
                hint = getattr(facts, "hint", None)
            now = self.clock()
            st = self.status[host]
            if error is None:
                st = replace(st, facts=facts, ok=True, error=None, hint=None, stale_since=None, last_ok=now,
                             last_attempt=now, failures=0, polling=False)
                delay = self.interval
            else:
                failures = st.failures + 1
                st = replace(st, ok=False, error=error, hint=hint, last_attempt=now, failures=failures,
                             polling=False, stale_since=st.stale_since or now,
                             # keep the last good facts to show them as stale; take what the failed poll had otherwise
                             facts=st.facts if st.facts is not None and getattr(st.facts, "reachable", False) else facts)
                delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            st = replace(st, next_due=now + delay)
            self.status[host] = st
            self._due[host] = time.monotonic() + delay
            self.on_update(st)
        finally:
            self._inflight.pop(host, None)


# ---------------------------------------------------------------------------------- VMs

VM_INTERVAL_S = 3.0      # between two VM list polls while the inventory is shown
VM_BACKOFF_MAX_S = 30.0
VM_LOAD = 0.05           # at most this share of the console's time goes to asking for the list: one that
                         # takes 0.3 s to come and decode (10,000 VMs) is asked for every 6 s


@dataclass(frozen=True)
class VMList:
    """The last VM list the console got: live VMs and templates, and the recycle bin."""

    vms: tuple[dict, ...] = ()
    recycled: tuple[dict, ...] = ()
    ok: bool | None = None            # None: not asked yet
    error: str | None = None
    hint: str | None = None
    stale_since: float | None = None
    last_ok: float | None = None


class VMPoller:
    """Polls the VM list: one poll at a time, the next one `interval` after the last one ended (longer
    when the list takes long to come: a big site is polled less often), and only while `active()`
    says the list is shown (a poke asks again as soon as it is)."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[list[dict], list[dict]]]],
                 on_update: Callable[[VMList], None], *, interval: float = VM_INTERVAL_S,
                 backoff_max: float = VM_BACKOFF_MAX_S, active: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.fetch = fetch
        self.on_update = on_update
        self.interval = interval
        self.backoff_max = backoff_max
        self.active = active
        self.clock = clock
        self.last = VMList()
        self.polls = 0
        self._wake = asyncio.Event()
        self._failures = 0

    def poke(self) -> None:
        """Ask again now (after the running poll, if one runs; never two at once)."""
        self._wake.set()

    async def run(self) -> None:
        first = True
        while True:
            delay = self.interval
            self._wake.clear()          # a poke from now on means "again after this one"
            if first or self.active():
                first = False
                delay = await self.poll_once()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def poll_once(self) -> float:
        """One poll; returns the delay before the next one."""
        started = time.monotonic()
        got, error, hint = await attempt(self.fetch(), "VM list",
                                         timeout=("the VM list did not come in time", "check that the hosts answer"))
        vms, recycled = got if error is None else ([], [])
        self.polls += 1
        now = self.clock()
        if error is None:
            self._failures = 0
            self.last = VMList(tuple(vms), tuple(recycled), True, last_ok=now)
            delay = max(self.interval, (time.monotonic() - started) / VM_LOAD)
        else:
            self._failures += 1
            # keep the last good list, marked stale
            self.last = replace(self.last, ok=False, error=error, hint=hint,
                                stale_since=self.last.stale_since or now)
            delay = min(self.backoff_max, self.interval * 2 ** self._failures)
        self.on_update(self.last)
        return delay
