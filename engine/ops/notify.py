"""Telling people of new critical and major alarms: a command (`[notify] command = [...]`) and/or a
webhook (`[notify] webhook = "https://..."`), from config.toml.

A notification never holds up the raise that caused it: it is a task of the event loop. It is retried
with backoff (`retries`, from `backoff` seconds, doubling, at most 5 minutes apart); each failure is
logged, and the outcome is an event of the alarm (notify, or notify.failed after the last attempt).

The command gets the alarm as JSON on stdin and in FERRY_ALARM_ID, _TYPE, _OBJECT, _SEVERITY, _SUMMARY
and FERRY_SITE; exit 0 is delivered. The webhook gets it as a JSON POST; any 2xx is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from typing import Awaitable, Callable

from ..logs import logger
from .model import AlarmInfo

log = logger("ferry.notify")
MAX_BACKOFF_S = 300.0


def payload(alarm: AlarmInfo, site: str) -> dict:
    return {"site": site, "alarm": dataclasses.asdict(alarm)}


async def run_command(argv: tuple[str, ...], body: bytes, env: dict[str, str], timeout: float) -> None:
    """Run the notification command once; raises RuntimeError saying why it failed."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, env={**os.environ, **env})
    except OSError as e:
        raise RuntimeError(f"cannot run {argv[0]}: {e.strerror}") from None
    try:
        _, err = await asyncio.wait_for(proc.communicate(body), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:g} s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        raise RuntimeError(f"{argv[0]} exited with status {proc.returncode}" + (f": {tail[0][:200]}" if tail else ""))


def post_webhook(url: str, body: bytes, timeout: float) -> None:
    """POST the JSON body (blocking: run it in a thread); raises RuntimeError saying why it failed."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "ferry"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"{url} answered {resp.status}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"{url}: {getattr(e, 'reason', e)}") from None


class Notifier:
    """Sends notifications in the background. `settings()` gives the site's NotifySettings and name now;
    `outcome(alarm, kind, text)` records what became of one (an event)."""

    def __init__(self, settings: Callable[[], tuple[object, str]],
                 outcome: Callable[[AlarmInfo, str, str], Awaitable[None]], *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._settings, self._outcome, self._sleep = settings, outcome, sleep
        self._tasks: set[asyncio.Task] = set()

    def send(self, alarm: AlarmInfo) -> list[asyncio.Task]:
        """Start delivering `alarm` to every configured channel; returns at once."""
        cfg, site = self._settings()
        body = json.dumps(payload(alarm, site), sort_keys=True).encode() + b"\n"
        started = []
        channels: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        command = tuple(getattr(cfg, "command", ()) or ())
        webhook = getattr(cfg, "webhook", None)
        timeout = float(getattr(cfg, "timeout_s", 30.0))
        if command:
            env = {"FERRY_ALARM_ID": str(alarm.id), "FERRY_ALARM_TYPE": alarm.type, "FERRY_ALARM_OBJECT": alarm.object,
                   "FERRY_ALARM_SEVERITY": str(alarm.severity), "FERRY_ALARM_SUMMARY": alarm.summary, "FERRY_SITE": site}
            channels.append((f"command {command[0]}", lambda: run_command(command, body, env, timeout)))
        if webhook:
            channels.append((f"webhook {webhook}", lambda: asyncio.to_thread(post_webhook, webhook, body, timeout)))
        for name, attempt in channels:
            t = asyncio.create_task(self._deliver(alarm, name, attempt, int(getattr(cfg, "retries", 5)),
                                                  float(getattr(cfg, "backoff_s", 2.0))), name=f"notify {alarm.id}")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            started.append(t)
        return started

    async def _deliver(self, alarm: AlarmInfo, name: str, attempt: Callable[[], Awaitable[None]], retries: int,
                       backoff: float) -> bool:
        tries = retries + 1
        for i in range(1, tries + 1):
            try:
                await attempt()
            except asyncio.CancelledError:
                raise
            except Exception as e:      # noqa: BLE001 - any failure of the channel is retried, then said
                log.warning("notifying alarm %d (%s on %s) by %s: attempt %d of %d failed: %s",
                            alarm.id, alarm.type, alarm.object, name, i, tries, e)
                if i == tries:
                    await self._said(alarm, "notify.failed", f"{name} failed {tries} time(s); last: {e}")
                    return False
                await self._sleep(min(MAX_BACKOFF_S, backoff * 2 ** (i - 1)))
                continue
            await self._said(alarm, "notify", f"{name} told" + (f" (attempt {i})" if i > 1 else ""))
            return True
        return False

    async def _said(self, alarm: AlarmInfo, kind: str, text: str) -> None:
        try:
            await self._outcome(alarm, kind, text)
        except Exception as e:       # noqa: BLE001 - the store going away at shutdown, say
            log.warning("alarm %d: %s (not recorded: %s)", alarm.id, text, e)

    async def wait(self) -> None:
        """Until every notification under way is done (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
