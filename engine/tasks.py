"""The durable task runner: queue, limits, checkpoints, resume, pause, cancel, retry, confirmations.

A task kind is a class registered by name. A task saves checkpoints in state.db; a
checkpoint must only describe work that is already durable. When an engine starts with
`adopt=True`, tasks whose owning engine died continue from their last checkpoint.

Several Ferry processes may share one state.db (the console, a CLI command). Each task
is owned by one engine at a time; other processes leave control requests in the task's
row, which the owner applies within a second.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, ClassVar

from .config import SiteConfig
from .errors import FerryError, PermanentError, TaskCancelled, TransientError
from .events import Event, EventBus, Subscription
from .helpers import TASK_TAG, detached, pid_running, stop_helpers, task_tag
from .store import Store, current_user, describe_process, redacted_keys, scrub
from .taskmodel import FINAL_STATES, Progress, TaskInfo, TaskState, task_action_refusal
from .logs import logger

log = logger("ferry.tasks")

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0
CONTROL_POLL_S = 0.5
PROGRESS_PUBLISH_S = 0.1
# How often a running task's progress is written to state.db (where other processes read it);
# FERRY_PROGRESS_PERSIST_S changes it (the chaos tests kill Ferry at points they read there).
PROGRESS_PERSIST_S = float(os.environ.get("FERRY_PROGRESS_PERSIST_S") or 1.0)
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
BACKOFF_JITTER = 0.2     # each delay is shortened by up to this fraction, so retries spread out

# Engines alive in this process, so a same-pid owner can be told apart from a stopped one.
_LIVE_OWNERS: set[str] = set()


@dataclass(frozen=True)
class Backoff:
    """Delays between the attempts of a task that failed with a transient error: base, 2 x base,
    4 x base, ... capped at `cap`, each shortened by a random fraction of up to `jitter`."""

    base: float = BACKOFF_BASE_S
    cap: float = BACKOFF_MAX_S
    jitter: float = BACKOFF_JITTER

    def delay(self, attempt: int, u: float) -> float:
        """The wait after failed attempt `attempt` (1, 2, ...); u in [0, 1] picks the jitter."""
        return min(self.cap, self.base * 2 ** (attempt - 1)) * (1.0 - self.jitter * u)


class TaskRunsElsewhere(PermanentError):
    """The job is already done by a task another live Ferry process runs."""

    def __init__(self, info: TaskInfo, process: str) -> None:
        super().__init__(f"task {info.id} ({info.title}) is already run by another Ferry process: {process}",
                         f"follow it with `ferry task show {info.id}`, or control it with "
                         f"`ferry task pause|cancel {info.id}`")
        self.task_id = info.id
        self.process = process


class JobAlreadyRunning(PermanentError):
    """The job is already under way in this engine (another front end started it): follow that task."""

    def __init__(self, info: TaskInfo) -> None:
        super().__init__(f"task {info.id} ({info.title}) already does this job",
                         f"follow it with `ferry task show {info.id}`")
        self.task_id = info.id


def owner_process(owner: str | None) -> str:
    """The Ferry process named by a task's owner (host:pid:token), as an operator can find it."""
    try:
        host, pid_s, _token = (owner or "").split(":")
        pid = int(pid_s)
    except ValueError:
        return owner or "none"
    return describe_process(pid) if host == socket.gethostname() else f"pid {pid} on {host}"


class TaskKind:
    """Base for task kinds. Subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""
    max_retries: ClassVar[int | None] = None   # None: the site's [engine] retries

    def validate(self, params: dict[str, Any]) -> None:
        """Raise PermanentError for bad parameters, before the task is created."""

    def hosts(self, params: dict[str, Any]) -> list[str]:
        """Hosts the task uses (for per-host limits)."""
        return []

    def title(self, params: dict[str, Any]) -> str:
        return self.name

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        """Same key = same job: re-running it resumes the unfinished task."""
        return None

    # When the task fails (not transiently), roll back as when it is cancelled. For kinds whose
    # half-made result is of no use (a VM without its disks); others keep their work for a resume.
    rollback_on_failure: ClassVar[bool] = False

    async def interrupted(self, ctx: "TaskContext") -> None:
        """First aid, the moment a Ferry process finds the task's process dead: make safe what must not
        wait for a resume or a rollback that may come much later (a guest left with its filesystems
        frozen). Quick, idempotent, best effort; the task is not claimed, nor its state changed."""

    async def rollback(self, ctx: "TaskContext") -> None:
        """Undo what the task made beyond the files it tracked (the engine removes those after
        this): its records in state.db, jobs it left in other processes. Runs when the task is
        cancelled (while it runs, or paused, interrupted or failed), and when it fails if
        rollback_on_failure. It may run after a crash at any instant, and again after a crash in
        itself: it looks at what exists, and is idempotent. Its helper processes are already stopped."""

    async def run(self, ctx: "TaskContext") -> dict[str, Any] | None:
        raise NotImplementedError


KINDS: dict[str, type[TaskKind]] = {}


def register(cls: type[TaskKind]) -> type[TaskKind]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    KINDS[cls.name] = cls
    return cls


def kind_of(name: str) -> TaskKind:
    try:
        return KINDS[name]()
    except KeyError:
        raise PermanentError(f"unknown task kind {name!r}", f"known kinds: {', '.join(sorted(KINDS))}") from None


class _RateMeter:
    """Bytes per second over a sliding window of a few seconds, so ETA follows the current speed."""

    WINDOW_S = 5.0
    MIN_SPAN_S = 1.0     # no rate from a shorter span: a first burst is not a speed

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()

    def restart(self) -> None:
        self.samples.clear()

    def rebase(self, delta: int) -> None:
        """The counter moved by `delta` without work being done now: not part of the rate."""
        self.samples = deque((t, v + delta) for t, v in self.samples)

    def update(self, value: int) -> float | None:
        now = self.clock()
        if self.samples and value < self.samples[-1][1]:
            self.samples.clear()  # counter went back (a new phase): start over
        self.samples.append((now, value))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW_S:
            self.samples.popleft()
        t0, v0 = self.samples[0]
        if now - t0 < self.MIN_SPAN_S:
            return None
        return (value - v0) / (now - t0)


def at_rest(p: Progress) -> Progress:
    """Progress of a task that is not running: no rate, no ETA."""
    return p if p.rate is None and p.eta is None else replace(p, rate=None, eta=None)


class TaskContext:
    """What a running task sees: its parameters, checkpoint, progress, log, transports, confirmation."""

    def __init__(self, engine: "Engine", info: TaskInfo, checkpoint: dict | None, attempt: int, *,
                 params: dict[str, Any] | None = None, progress: Progress | None = None) -> None:
        self.engine = engine
        self.id = info.id
        self.kind = info.kind
        self.params = info.params if params is None else params
        self.checkpoint = checkpoint
        self.resumed = checkpoint is not None
        self.attempt = attempt
        start = at_rest(info.progress if progress is None else progress)
        self._progress = self._reported = start
        # Where the bar stood when this run began (after a pause, a retry, a new engine): it does
        # not go back below it while the task counts the same total again.
        self._floor: Progress | None = start if start.fraction else None
        self._meter = _RateMeter()
        self._last_pub = 0.0
        self._flush: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------- data

    def transport(self, host: str):
        return self.engine.transport(host)

    @property
    def site(self) -> SiteConfig:
        return self.engine.site

    @property
    def current_progress(self) -> Progress:
        return self._progress

    @property
    def stopping(self) -> str | None:
        """Why the engine is stopping this run, once it has begun to: "pause", "cancel", or "stop"
        (the engine itself stops; the task resumes later). None while it runs on. A task keeps
        what a resume needs unless it is "cancel"."""
        return self.engine._stop_reason.get(self.id)

    def progress(self, *, measured: bool = True, **fields: Any) -> None:
        """Update progress (units_done/total, bytes_done/total, item, detail).

        Rate and ETA come from bytes only: a task that moves no bytes shows neither.
        measured=False: this change is work found already done (on resume) or skipped, which
        moves the bar but not the rate."""
        before = self._reported
        detail = fields.pop("detail", None)
        merged = {**before.to_dict(), **fields}
        if detail is not None:
            merged["detail"] = {**before.detail, **detail}
        reported = self._reported = Progress.from_dict(merged)
        shown = self._hold(reported)
        if "rate" in fields:
            rate = fields["rate"]
        elif shown is not reported or not (reported.bytes_done or reported.bytes_total):
            rate = None
        else:
            if not measured:
                self._meter.rebase(reported.bytes_done - before.bytes_done)
            rate = self._meter.update(reported.bytes_done)
        if "eta" in fields:
            eta = fields["eta"]
        else:
            left = (shown.bytes_total or 0) - shown.bytes_done
            eta = max(0, left) / rate if shown.bytes_total and rate and rate > 0 else None
        self._progress = replace(shown, rate=rate, eta=eta)
        self._publish_progress()

    def _hold(self, p: Progress) -> Progress:
        """After a resume, keep the bar where it stood while the task counts up to it again."""
        f = self._floor
        if f is None:
            return p
        if f.bytes_total:
            if p.bytes_total == f.bytes_total and p.bytes_done <= f.bytes_done:
                units = max(p.units_done, f.units_done) if p.units_total == f.units_total else p.units_done
                return replace(p, bytes_done=f.bytes_done, units_done=units)
        elif f.units_total and not p.bytes_total and p.units_total == f.units_total and p.units_done <= f.units_done:
            return replace(p, units_done=f.units_done)
        # Past it, or counting another total: the task's own figures from here on, and a rate
        # measured from here (what it went through to catch up is not its speed).
        self._floor = None
        self._meter.restart()
        return p

    def at_rest(self) -> Progress:
        """Progress stops (a pause, a confirmation to wait for): no rate or ETA until it moves again."""
        self._meter.restart()
        self._progress = at_rest(self._progress)
        return self._progress

    def _publish_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_pub >= PROGRESS_PUBLISH_S:
            self._do_publish()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(PROGRESS_PUBLISH_S - (now - self._last_pub), self._do_publish)

    def _do_publish(self) -> None:
        self._flush = None
        self._last_pub = time.monotonic()
        self.engine._on_progress(self.id, self._progress)

    def log(self, message: str, level: str = "info") -> None:
        self.engine._on_log(self.id, level, message)

    # -------------------------------------------------------------- durability and confirmation

    async def save_checkpoint(self, state: dict[str, Any], *, chunks: list[tuple[int, bytes]] | None = None,
                              reset_chunks: bool = False) -> None:
        """Commit `state` (and chunk-map entries) transactionally. Call only once the work it
        describes is durable."""
        await self.engine.store.call(self.engine.store.save_checkpoint, self.id, self.engine.owner,
                                     state, self._progress.to_dict(), chunks, reset_chunks)
        self.checkpoint = state
        if self.engine.state == "draining":
            # The engine is stopping gracefully: this checkpoint is where the task stops; the next
            # engine resumes it from here, losing nothing.
            self.engine._stop_reason.setdefault(self.id, "stop")
            raise asyncio.CancelledError()

    async def track(self, host: str, path: str, *, role: str = "temp") -> None:
        """Record a file or folder this task is about to make on `host`, before it exists: "temp" ones
        are removed when the task ends, however it ends; "made" ones (what the task builds) are kept
        when it succeeds and removed when it rolls back. A resume, a rollback or `ferry gc` finds them."""
        await self.engine.store.call(self.engine.store.track_file, self.id, host, path, role)

    async def untrack(self, host: str, path: str) -> None:
        """The file is gone, or no longer the task's (it belongs to what the task finished)."""
        await self.engine.store.call(self.engine.store.untrack_file, self.id, host, path)

    async def tracked(self) -> list[dict]:
        """The files this task recorded: dicts with host, path, role."""
        return await self.engine.store.call(self.engine.store.tracked_files, self.id)

    async def load_chunks(self) -> dict[int, bytes]:
        return await self.engine.store.call(self.engine.store.load_chunks, self.id)

    async def confirm(self, prompt: str, expected: str) -> None:
        """Wait (state `waiting`) until an operator confirms by typing `expected`."""
        await self.engine._wait_confirmation(self, prompt, expected)

    def flush(self) -> None:
        """Publish progress held back by the rate limit, now."""
        if self._flush is not None:
            self._flush.cancel()
            self._do_publish()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class Engine:
    """Runs tasks of this process; shares state.db with other Ferry processes."""

    def __init__(self, store: Store, site: SiteConfig, *, transports: Any = None, adopt: bool = False,
                 backoff: Backoff | None = None, sleep: Callable[[float], Awaitable[Any]] | None = None,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.site = site
        self.transports = transports
        self.adopt = adopt
        # The retry schedule, and what waits it out (injectable, so tests see the schedule itself).
        self.backoff = backoff or Backoff(BACKOFF_BASE_S, BACKOFF_MAX_S, BACKOFF_JITTER)
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.bus = EventBus()
        self.state = "stopped"
        self._running: dict[int, asyncio.Task] = {}
        self._hosts_of: dict[int, list[str]] = {}
        self._queue: dict[int, list[str]] = {}   # queued here, in order -> hosts
        self._stop_reason: dict[int, str] = {}
        self._confirms: dict[int, tuple[asyncio.Future, str]] = {}
        self._host_load: Counter[str] = Counter()
        self._last_persist: dict[int, float] = {}
        self._persisting: set[int] = set()
        self._bg: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        # Parameters with secrets, for tasks this process created or resumed: state.db only ever
        # holds them redacted, so a secret lives as long as this process and no longer.
        self._secret_params: dict[int, dict[str, Any]] = {}
        self._watched: set[int] = set()   # tasks of other processes to take over if those die
        self.workspace_id = ""             # names this workspace in the tags of task helpers
        self.services: dict[type, Any] = {}   # one of each service per engine (VMService.of)

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self.state == "running":
            return
        _LIVE_OWNERS.add(self.owner)
        self.state = "running"
        try:
            await self._tag_of(0)
            await self.recover()
        except FerryError as e:   # state.db locked by another process: reading commands go on
            log.warning("could not look for interrupted tasks now: %s", e)
        if self.adopt:
            await self.adopt_orphans()
        self._loop_task = asyncio.create_task(self._control_loop(), name="ferry-engine-control")
        self.bus.publish(Event("engine", data="running"))

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop running tasks; they stay resumable (interrupted, unowned) from their last checkpoint.
        With `drain` seconds, first let each running task reach its next checkpoint and stop there
        (no queued task starts meanwhile); whatever is still running after that is stopped at once."""
        if self.state != "running":
            return
        if drain > 0 and self._running:
            self.state = "draining"
            self.bus.publish(Event("engine", data="draining"))
            await asyncio.wait(list(self._running.values()), timeout=drain)
        self.state = "stopping"
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for tid, t in list(self._running.items()):
            self._stop_reason.setdefault(tid, "stop")
            t.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        for tid in self._queue:
            await self.store.call(self.store.update_task, tid, owner=None, owner_is=self.owner)
        self._queue.clear()
        await asyncio.gather(*self._bg, return_exceptions=True)
        _LIVE_OWNERS.discard(self.owner)
        self.state = "stopped"
        self.bus.publish(Event("engine", data="stopped"))

    def subscribe(self) -> Subscription:
        return self.bus.subscribe()

    def transport(self, host: str):
        if self.transports is None:
            raise PermanentError("this engine has no transports", "internal: create the engine with a TransportPool")
        return self.transports.get(host)

    # -------------------------------------------------------------- queries

    async def get(self, task_id: int) -> TaskInfo:
        row = await self.store.call(self.store.task_row, task_id)
        if row is None:
            raise PermanentError(f"no task {task_id}", "list tasks with `ferry tasks`")
        return TaskInfo.from_row(row)

    async def list(self, *, states: tuple[str, ...] | None = None, limit: int = 500) -> list[TaskInfo]:
        rows = await self.store.call(self.store.task_rows, states=states, limit=limit)
        return [TaskInfo.from_row(r) for r in rows]

    def is_local(self, info: TaskInfo) -> bool:
        return info.owner == self.owner

    # -------------------------------------------------------------- operator actions

    async def submit(self, kind: str, params: dict[str, Any], *, title: str | None = None) -> int:
        """Create a task and queue it on this engine. A job (dedup key) has one unfinished task at
        most: when one exists, a clear error names it."""
        tid, created = await self._create(kind, params, title=title)
        if not created:
            info = await self.get(tid)
            if info.owner != self.owner and await self.owner_alive(info):
                raise TaskRunsElsewhere(info, owner_process(info.owner))
            raise PermanentError(f"task {tid} ({info.title}) already does this job; it is {info.state}",
                                 f"resume it (`ferry task resume {tid}`) or cancel it (`ferry task cancel {tid}`)")
        return tid

    async def submit_or_resume(self, kind: str, params: dict[str, Any], *, restart: bool = False) -> tuple[int, bool]:
        """Resume the unfinished (or failed) task for the same job (same dedup key), or create one.
        Returns (id, resumed). A new task's `round` parameter counts the job's earlier successes.
        Raises TaskRunsElsewhere when another live Ferry process runs the job."""
        k = kind_of(kind)
        if k.dedup_key(params) is None:
            return await self.submit(kind, params), False
        for _ in range(3):
            tid, created = await self._create(kind, params, rounds=True)
            if created:
                return tid, False
            if restart:
                await self._retire(tid, "started over (--restart)")
                continue   # and create the new one, unless another process was quicker
            await self._claim_or_raise(tid)
            info = await self.get(tid)
            if tid in self._running or tid in self._queue:
                raise JobAlreadyRunning(info)    # never queue a task that is under way again
            merged = {**info.params, **params}
            fields: dict[str, Any] = {"params": scrub(merged)}
            if info.state == TaskState.FAILED:
                fields.update(attempts=0, error=None, hint=None, finished=None)
            await self.store.call(self.store.update_task, tid, **fields)
            self._keep_secrets(tid, merged)
            await self._audit("task.resume", f"task {tid} ({kind})", params, "ok")
            await self._requeue(tid)
            return tid, True
        raise TransientError(f"another Ferry process keeps starting the same {kind} job",
                             "run the command again once it has started; `ferry tasks` shows it")

    async def _create(self, kind: str, params: dict[str, Any], *, title: str | None = None,
                      rounds: bool = False) -> tuple[int, bool]:
        """Insert and queue a task unless its job has an unfinished task: (id, created)."""
        k = kind_of(kind)
        k.validate(params)
        hosts = k.hosts(params)
        for h in hosts:
            if h != "local":
                self.site.host(h)
        tid, created = await self.store.call(
            self.store.insert_task, kind=kind, title=title or k.title(params), params=scrub(params), hosts=hosts,
            state=TaskState.QUEUED, dedup_key=k.dedup_key(params), owner=self.owner, count_rounds=rounds)
        if not created:
            return tid, False
        info = await self.get(tid)
        self._keep_secrets(tid, {**params, **{k: v for k, v in info.params.items() if k not in params}})
        await self._audit("task.create", f"task {tid} ({kind})", info.params, "ok")
        self.bus.publish(Event("created", tid, info))
        self._enqueue(tid, hosts)
        return tid, True

    def _keep_secrets(self, tid: int, params: dict[str, Any]) -> None:
        if scrub(params) != params:
            self._secret_params[tid] = params
        else:
            self._secret_params.pop(tid, None)

    async def _retire(self, tid: int, why: str) -> None:
        """Cancel an unfinished task so that its job can start over (refused when another live
        Ferry process runs it: that is for its operator to stop)."""
        await self._claim_or_raise(tid)
        info = await self.get(tid)
        if tid in self._running:
            await self._apply(info, "cancel", reason=why)
            await self.wait(tid)
        else:
            self._queue.pop(tid, None)
            await self._finish(tid, TaskState.CANCELLED, error=why if info.state != TaskState.FAILED
                               else f"{why}; it had failed: {info.error}")
        await self._audit("task.cancel", f"task {tid} ({info.kind})", {"reason": why}, "ok")

    def watch(self, task_id: int) -> None:
        """Take the task over, from its checkpoint, if the Ferry process running it stops."""
        self._watched.add(task_id)

    async def pause(self, task_id: int) -> TaskInfo:
        return await self._control(task_id, "pause")

    async def resume(self, task_id: int) -> TaskInfo:
        return await self._control(task_id, "resume")

    async def cancel(self, task_id: int, *, reason: str = "") -> TaskInfo:
        return await self._control(task_id, "cancel", reason=reason)

    async def confirm(self, task_id: int, typed: str) -> TaskInfo:
        return await self._control(task_id, "confirm", typed=typed)

    async def wait(self, task_id: int, *, timeout: float | None = None,
                   until: frozenset[TaskState] = FINAL_STATES) -> TaskInfo:
        """Wait until the task reaches one of `until` (final states by default)."""
        sub = self.subscribe()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                info = await self.get(task_id)
                if info.state in until:
                    return info
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"task {task_id} still {info.state} after {timeout}s")
                # Other processes change rows without events here: poll the store as well.
                await sub.wait(timeout=min(1.0, left) if left is not None else 1.0)
        finally:
            sub.close()

    # -------------------------------------------------------------- control plumbing

    async def _control(self, task_id: int, action: str, **kw: Any) -> TaskInfo:
        info = await self.get(task_id)
        target = f"task {task_id} ({info.kind})"
        try:
            if info.owner == self.owner or info.state in (TaskState.SUCCEEDED, TaskState.CANCELLED):
                local = True
            else:
                # Take it over in one step when its process is gone, so that two processes never
                # both act on it; else leave a request, which the owner applies within a second.
                local = await self.store.call(self.store.claim, task_id, self.owner, self._can_take)
            if local:
                run = self._running.get(task_id) if action in ("pause", "cancel") else None
                await self._apply(info, action, by=current_user(), **kw)
                if run is not None:
                    # Answer once it has stopped (and, cancelled, rolled back): the caller then sees
                    # the state it asked for, and a next action is judged on it.
                    await asyncio.wait({run})
            else:
                await self.store.call(self.store.update_task, task_id, requested={
                    "action": action, "by": f"{current_user()} (pid {os.getpid()})", **kw})
        except FerryError as e:
            await self._audit(f"task.{action}", target, kw, f"refused: {e.message}")
            raise
        await self._audit(f"task.{action}", target, kw, "ok")
        return await self.get(task_id)

    async def _apply(self, info: TaskInfo, action: str, *, by: str | None = None, **kw: Any) -> None:
        tid, state = info.id, info.state
        who = f" by {by}" if by else ""
        if action == "confirm":
            entry = self._confirms.get(tid)
            if entry is None or state != TaskState.WAITING:
                raise PermanentError(f"task {tid} is not waiting for a confirmation (it is {state})")
            fut, expected = entry
            if kw.get("typed", "").strip() != expected:
                raise PermanentError(f"confirmation for task {tid} does not match", f"type {expected!r} exactly")
            if not fut.done():
                fut.set_result(True)
            return
        refusal = task_action_refusal(action, state)
        if refusal is not None:
            raise PermanentError(refusal[0].replace("the task", f"task {tid}", 1), refusal[1])
        if action == "pause":
            if state == TaskState.PAUSED:
                return
            self._on_log(tid, "info", f"paused{who}; it keeps its checkpoint")
            if tid in self._running:
                self._stop_reason[tid] = "pause"
                self._running[tid].cancel()
                return
            self._queue.pop(tid, None)
            await self._set_state(tid, TaskState.PAUSED)
        elif action == "resume":
            if tid in self._running or tid in self._queue:
                return  # already going on here
            # Paused, failed, or interrupted (its engine died while it was queued/running/waiting).
            await self._claim_or_raise(tid)
            if state == TaskState.FAILED:
                await self.store.call(self.store.update_task, tid, attempts=0, error=None, hint=None, finished=None)
            self._on_log(tid, "info", f"resumed{who}")
            await self._requeue(tid)
        elif action == "cancel":
            self._on_log(tid, "warning", f"cancelled{who}")
            if tid in self._running:
                self._stop_reason[tid] = "cancel"
                self._running[tid].cancel()
                return
            self._queue.pop(tid, None)
            # Not running here: it is rolled back now, by this process, which holds it.
            await self._claim_or_raise(tid)
            error = await self._roll_back_idle(info, kw.get("reason") or None)
            await self._finish(tid, TaskState.CANCELLED, error=error)

    async def _roll_back_idle(self, info: TaskInfo, reason: str | None) -> str | None:
        """Roll back a task that is not running (paused, interrupted, failed, or cancelled before its
        run began): from its stored checkpoint, its helpers stopped first."""
        row = await self.store.call(self.store.task_row, info.id)
        ctx = TaskContext(self, TaskInfo.from_row(row), row["checkpoint"], 0,
                          params=self._secret_params.get(info.id, info.params))
        token = TASK_TAG.set(await self._tag_of(info.id))
        try:
            if row["started"] is not None:
                await self._stop_helpers(TaskInfo.from_row(row))
            return await self._roll_back(kind_of(info.kind), ctx, reason)
        finally:
            TASK_TAG.reset(token)
            ctx.close()

    async def _tag_of(self, tid: int) -> str:
        """The tag of task `tid`'s helper processes (the workspace's id, made once, and the task's)."""
        if not self.workspace_id:
            self.workspace_id = await self.store.call(self.store.workspace_id)
        return task_tag(self.workspace_id, tid)

    async def _stop_helpers(self, info: TaskInfo) -> None:
        """Stops the processes an earlier run of the task left on its hosts (found by its tag)."""
        tag = await self._tag_of(info.id)
        for host in info.hosts or ["local"]:
            try:
                killed, left = await stop_helpers(self.transport(host), tag)
            except (FerryError, OSError) as e:
                self._on_log(info.id, "warning", f"could not look for its earlier helper processes on {host}: {e}")
                continue
            if killed:
                self._on_log(info.id, "warning", f"stopped {killed} helper process(es) an earlier run left on {host}"
                             + (f"; {left} would not stop" if left else ""))
            if left:
                raise TransientError(f"{left} helper process(es) of task {info.id} on {host} would not stop",
                                     "they may be stuck in the kernel (I/O); look at them with ps, then retry")

    async def _roll_back(self, kind: TaskKind, ctx: TaskContext, error: str | None) -> str | None:
        """The kind's rollback, then every file the task tracked removed: the error to record (what
        could not be undone is said, and stays tracked for `ferry gc`)."""
        tid = ctx.id
        self._on_log(tid, "info", "rolling back: removing what it made")
        try:
            await kind.rollback(ctx)
        except Exception as e:  # noqa: BLE001 - a failed rollback is reported, never lost
            if not isinstance(e, FerryError):
                log.exception("task %s: rollback", tid)
            note = f"rollback incomplete: {getattr(e, 'message', None) or e}"
            self._on_log(tid, "error", note + "; `ferry gc` lists what is left")
            return f"{error}; {note}" if error else note
        left = await self._clean_up(tid, roles=None)
        if left:
            note = f"rollback left {left} file(s) it could not remove; `ferry gc` lists them"
            return f"{error}; {note}" if error else note
        return error

    async def _clean_up(self, tid: int, *, roles: tuple[str, ...] | None) -> int:
        """Removes the files the task tracked (of `roles`; None: all) and forgets them: the files of
        other roles stay, forgotten (they belong to what the task made). Returns how many could not
        be removed (they stay tracked)."""
        left = 0
        for f in await self.store.call(self.store.tracked_files, tid):
            if roles is not None and f["role"] not in roles:
                await self.store.call(self.store.untrack_file, tid, f["host"], f["path"])
                continue
            try:
                await remove_path(self.transport(f["host"]), f["path"])
            except (FerryError, OSError) as e:
                left += 1
                self._on_log(tid, "warning", f"could not remove {f['path']} on {f['host']}: {e}")
                continue
            await self.store.call(self.store.untrack_file, tid, f["host"], f["path"])
        return left

    async def _claim_or_raise(self, tid: int) -> None:
        ok = await self.store.call(self.store.claim, tid, self.owner, self._can_take)
        if not ok:
            info = await self.get(tid)
            if info.state in (TaskState.SUCCEEDED, TaskState.CANCELLED):
                raise PermanentError(f"task {tid} is already {info.state}", "start the job again for a new task")
            raise TaskRunsElsewhere(info, owner_process(info.owner))

    async def _requeue(self, tid: int) -> None:
        await self._set_state(tid, TaskState.QUEUED)
        info = await self.get(tid)
        self._enqueue(tid, info.hosts)

    async def owner_alive(self, info: TaskInfo) -> bool:
        """Is the task held by another Ferry process that is still alive?"""
        row = await self.store.call(self.store.task_row, info.id)
        return bool(row and row["owner"]) and not self._can_take(row["owner"], row["heartbeat"])

    def task_gone(self, row: dict | None) -> bool:
        """Has the task of this store row (None: deleted) stopped holding what it claimed: finished,
        or its Ferry process gone? Safe to call on the store's thread (Store.vm_take)."""
        return row is None or TaskState(row["state"]).final or self._can_take(row["owner"], row["heartbeat"])

    def _can_take(self, owner: str | None, heartbeat: float | None) -> bool:
        """May this engine take a task held by `owner`? Yes if unowned, ours, or its engine is gone."""
        if not owner or owner == self.owner:
            return True
        if (heartbeat or 0) < time.time() - STALE_AFTER_S:
            return True
        return not _owner_pid_alive(owner)

    @property
    def active(self) -> int:
        """How many tasks this engine runs or has queued."""
        return len(self._running) + len(self._queue)

    # -------------------------------------------------------------- scheduling

    def _enqueue(self, tid: int, hosts: list[str]) -> None:
        if tid not in self._queue and tid not in self._running:
            self._queue[tid] = list(hosts)
        self._schedule()

    def _schedule(self) -> None:
        """Start queued tasks in order while there is room globally and on their hosts."""
        if self.state != "running":
            return
        per_host = self.site.limits.max_tasks_per_host
        for tid, hosts in list(self._queue.items()):
            if len(self._running) >= self.site.limits.max_tasks:
                return
            if any(self._host_load[h] >= per_host for h in hosts):
                continue
            del self._queue[tid]
            self._hosts_of[tid] = hosts
            for h in hosts:
                self._host_load[h] += 1
            self._running[tid] = asyncio.create_task(self._run_task(tid), name=f"ferry-task-{tid}")

    async def _control_loop(self) -> None:
        last_beat = last_adopt = 0.0
        while True:
            try:
                for tid, req in await self.store.call(self.store.take_requests, self.owner):
                    action = req.pop("action", "")
                    try:
                        info = await self.get(tid)
                        await self._apply(info, action, **req)
                    except FerryError as e:
                        self._on_log(tid, "warning", f"{action} request refused: {e}")
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_S:
                    await self.store.call(self.store.heartbeat, self.owner)
                    last_beat = now
                if now - last_adopt >= HEARTBEAT_S:
                    await self.recover()
                    if self.adopt or self._watched:
                        await self.adopt_orphans(None if self.adopt else self._watched)
                    last_adopt = now
            except asyncio.CancelledError:
                raise
            except Exception:  # the control loop must survive a transient database hiccup
                log.exception("engine control loop")
            await asyncio.sleep(CONTROL_POLL_S)

    async def recover(self) -> list[int]:
        """Tasks whose Ferry process died (kill -9, a crash, power loss) are marked interrupted, never
        left "running": the same command again, `ferry task resume`, or an engine that adopts them
        resumes them; `ferry task cancel` rolls them back. Every Ferry process does this when it starts."""
        rows = await self.store.call(self.store.task_rows, states=("queued", "running", "waiting"))
        done = []
        for r in rows:
            if not r["owner"] or r["owner"] == self.owner or not self._can_take(r["owner"], r["heartbeat"]):
                continue
            if await self.store.call(self.store.interrupt, r["id"], self._can_take):
                self._on_log(r["id"], "warning", f"interrupted: its Ferry process ({owner_process(r['owner'])}) "
                             "stopped without finishing it; it resumes from its last checkpoint when run "
                             f"again (`ferry task resume {r['id']}`), or rolls back if cancelled")
                await self._publish_state(r["id"])
                await self._first_aid(r)
                done.append(r["id"])
        return done

    async def _first_aid(self, r: dict) -> None:
        """The kind's `interrupted` hook for a task just found interrupted (within 30 s, errors logged)."""
        if r["kind"] not in KINDS:
            return
        ctx = TaskContext(self, TaskInfo.from_row(r), r["checkpoint"], 0, params=self._secret_params.get(r["id"]))
        try:
            async with asyncio.timeout(30):
                await kind_of(r["kind"]).interrupted(ctx)
        except Exception as e:  # noqa: BLE001 - first aid never stops the command that found the task
            self._on_log(r["id"], "warning", f"making its interruption safe failed: {getattr(e, 'message', None) or e}")
        finally:
            ctx.close()

    async def adopt_orphans(self, only: set[int] | None = None) -> list[int]:
        """Take over unfinished tasks (of `only`, when given) whose engine died; they continue
        from their checkpoint."""
        if only is not None:
            rows = []
            for tid in sorted(only):
                r = await self.store.call(self.store.task_row, tid)
                if r is None or TaskState(r["state"]).final:
                    self._watched.discard(tid)
                elif r["state"] in ("queued", "running", "waiting", "interrupted"):
                    rows.append(r)
        else:
            rows = await self.store.call(self.store.task_rows, states=("queued", "running", "waiting", "interrupted"))
        taken = []
        for r in sorted(rows, key=lambda r: r["id"]):
            if r["owner"] == self.owner or r["kind"] not in KINDS or not self._can_take(r["owner"], r["heartbeat"]):
                continue
            if await self.store.call(self.store.claim, r["id"], self.owner, self._can_take):
                self._on_log(r["id"], "info", "resumed from its last checkpoint after its engine stopped")
                await self._requeue(r["id"])
                taken.append(r["id"])
        return taken

    # -------------------------------------------------------------- running one task

    async def _run_task(self, tid: int) -> None:
        ctx: TaskContext | None = None
        try:
            # Every command the task starts on a host carries its tag and dies with this process.
            TASK_TAG.set(await self._tag_of(tid))
            row = await self.store.call(self.store.task_row, tid)
            info = TaskInfo.from_row(row)
            kind = kind_of(info.kind)
            retries = kind.max_retries if kind.max_retries is not None else self.site.limits.retries
            if info.started is not None:
                # It ran before (paused, failed, or its process died): what that run started must
                # not go on writing behind this one.
                await self._stop_helpers(info)
            attempt = 0
            while True:
                attempt += 1
                row = await self.store.call(self.store.task_row, tid)
                info = TaskInfo.from_row(row)
                if not await self.store.call(self.store.update_task, tid, state=TaskState.RUNNING,
                                             started=info.started or time.time(), attempts=info.attempts + 1,
                                             error=None, hint=None, owner_is=self.owner):
                    self._taken_over(tid)
                    return
                await self._publish_state(tid)
                params = self._secret_params.get(tid, info.params)
                missing = redacted_keys(params)
                if missing:
                    raise PermanentError(
                        f"task {tid} needs its {', '.join(missing)} again, which Ferry never stores",
                        "start the job again with the same command: it passes them to the process that runs it")
                ctx = TaskContext(self, info, row["checkpoint"], attempt, params=params,
                                  progress=ctx.current_progress if ctx else None)
                try:
                    try:
                        result = await kind.run(ctx)
                    finally:
                        ctx.flush()  # the newest progress goes out before the state change
                except TransientError as e:
                    if attempt > retries:
                        await self._finish(tid, TaskState.FAILED, error=f"{e.message} (gave up after {attempt} attempts)",
                                           hint=e.hint, progress=ctx.current_progress)
                        return
                    delay = self.backoff.delay(attempt, self._rng.random())
                    self._on_log(tid, "warning", f"attempt {attempt} failed: {e}; retrying in {delay:.0f}s "
                                                 f"({attempt}/{retries})")
                    ctx.at_rest()
                    ctx.progress(detail={"retry": f"retry {attempt}/{retries} in {delay:.0f}s: {e.message}"})
                    ctx.close()
                    await self._sleep(delay)
                    continue
                except TaskCancelled as e:
                    error = await self._roll_back(kind, ctx, e.message)
                    await self._finish(tid, TaskState.CANCELLED, error=error, progress=ctx.current_progress)
                    return
                except FerryError as e:
                    error = await self._roll_back(kind, ctx, e.message) if kind.rollback_on_failure else e.message
                    await self._finish(tid, TaskState.FAILED, error=error, hint=e.hint,
                                       progress=ctx.current_progress)
                    return
                except Exception as e:
                    log.exception("task %s (%s) crashed", tid, info.kind)
                    error = f"internal error: {type(e).__name__}: {e}"
                    if kind.rollback_on_failure:
                        error = await self._roll_back(kind, ctx, error)
                    await self._finish(tid, TaskState.FAILED, error=error,
                                       hint="see logs/ferry.log in the workspace; please report it",
                                       progress=ctx.current_progress)
                    return
                if ctx.current_progress.detail.get("retry"):
                    ctx.progress(detail={"retry": None})
                await self._clean_up(tid, roles=("temp",))
                await self._finish(tid, TaskState.SUCCEEDED, result=result or {}, progress=ctx.current_progress)
                return
        except FerryError as e:   # around the task's own run: its parameters, the state database
            try:
                await self._finish(tid, TaskState.FAILED, error=e.message, hint=e.hint,
                                   progress=ctx.current_progress if ctx else None)
            except FerryError:
                log.exception("task %s: recording its failure (%s)", tid, e)
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(tid, "stop")
            progress = ctx.current_progress if ctx else None
            row = await self.store.call(self.store.task_row, tid)
            if row is None or TaskState(row["state"]).final:
                # Cancelled after it ended (the engine stopping while the end was announced): it stays as it ended.
                pass
            elif reason == "pause":
                await self._set_state(tid, TaskState.PAUSED, progress=progress)
            elif reason == "cancel":
                if ctx is not None:
                    error = await asyncio.shield(self._roll_back(kind_of(ctx.kind), ctx, None))
                else:      # cancelled before its run began (just resumed, say): what it made before goes too
                    error = await asyncio.shield(self._roll_back_idle(TaskInfo.from_row(row), None))
                await self._finish(tid, TaskState.CANCELLED, error=error, progress=progress)
            else:
                # The engine is stopping: the task stopped mid-way (interrupted), resumable by the next engine.
                await self.store.call(self.store.update_task, tid, state=TaskState.INTERRUPTED, owner=None,
                                      progress=at_rest(progress).to_dict() if progress else None,
                                      owner_is=self.owner)
                await self._publish_state(tid)
        finally:
            if ctx:
                ctx.close()
            self._running.pop(tid, None)
            for h in self._hosts_of.pop(tid, []):
                self._host_load[h] -= 1
            self._confirms.pop(tid, None)
            self._last_persist.pop(tid, None)
            self._schedule()

    async def _wait_confirmation(self, ctx: TaskContext, prompt: str, expected: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._confirms[ctx.id] = (fut, expected)
        ctx.flush()
        await self.store.call(self.store.update_task, ctx.id, state=TaskState.WAITING, owner_is=self.owner,
                              waiting={"prompt": prompt, "expected": expected}, progress=ctx.at_rest().to_dict())
        await self._publish_state(ctx.id)
        self._on_log(ctx.id, "info", f"waiting for confirmation: {prompt}")
        try:
            await fut
        finally:
            self._confirms.pop(ctx.id, None)
        await self.store.call(self.store.update_task, ctx.id, state=TaskState.RUNNING, waiting=None,
                              owner_is=self.owner)
        await self._publish_state(ctx.id)
        self._on_log(ctx.id, "info", "confirmed by operator")

    async def _set_state(self, tid: int, state: TaskState, *, progress: Progress | None = None) -> None:
        fields: dict[str, Any] = {"state": state}
        if progress is not None:
            fields["progress"] = (progress if state == TaskState.RUNNING else at_rest(progress)).to_dict()
        elif state != TaskState.RUNNING:
            row = await self.store.call(self.store.task_row, tid)
            if row and row["progress"]:
                fields["progress"] = at_rest(Progress.from_dict(row["progress"])).to_dict()
        if state != TaskState.WAITING:
            fields["waiting"] = None
        if not await self.store.call(self.store.update_task, tid, owner_is=self.owner, **fields):
            return self._taken_over(tid)
        await self._publish_state(tid)

    async def _finish(self, tid: int, state: TaskState, *, result: dict | None = None, error: str | None = None,
                      hint: str | None = None, progress: Progress | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "finished": time.time(), "waiting": None, "requested": None}
        if result is not None:
            fields["result"] = result
        if error is not None:
            fields["error"] = error
        if hint is not None:
            fields["hint"] = hint
        if progress is not None:
            if state == TaskState.SUCCEEDED:
                # A task that succeeded did all its work, whatever its last progress report said.
                # One without any measure of its work (a shutdown, say) counts as one unit, done.
                units = progress.units_total or (None if progress.bytes_total else max(1, progress.units_done))
                progress = replace(progress, units_done=units or progress.units_done, units_total=units,
                                   bytes_done=progress.bytes_total or progress.bytes_done)
            fields["progress"] = at_rest(progress).to_dict()
        if state != TaskState.FAILED:    # a failed task may be resumed here, with its secrets
            # Forgotten before the final state is written: whoever sees the task ended sees no secret.
            self._secret_params.pop(tid, None)
        if not await self.store.call(self.store.update_task, tid, owner_is=self.owner, **fields):
            return self._taken_over(tid)
        try:
            await self.store.call(self.store.release_holds, tid)
        except FerryError as e:    # the marks of an ended task are ignored anyway; only shown stale
            log.warning("task %s: releasing what it held: %s", tid, e)
        level = {"succeeded": "info", "cancelled": "warning"}.get(state, "error")
        self._on_log(tid, level, f"{state}" + (f": {error}" if error else "") + (f" (hint: {hint})" if hint else ""))
        await self._publish_state(tid)

    def _taken_over(self, tid: int) -> None:
        """Another Ferry process took the task over (this one looked dead: frozen, or its heartbeat
        too old): its state is that process's to write now."""
        log.warning("task %s was taken over by another Ferry process; this one leaves it", tid)

    async def _publish_state(self, tid: int) -> None:
        self.bus.publish(Event("state", tid, await self.get(tid)))

    # -------------------------------------------------------------- progress, logs, audit

    def _on_progress(self, tid: int, progress: Progress) -> None:
        self.bus.publish(Event("progress", tid, progress))
        now = time.monotonic()
        if tid not in self._persisting and now - self._last_persist.get(tid, 0.0) >= PROGRESS_PERSIST_S:
            self._last_persist[tid] = now
            self._persisting.add(tid)

            async def persist() -> None:
                try:
                    await self.store.call(self.store.update_task, tid, progress=progress.to_dict(), soft=True,
                                          state_is=TaskState.RUNNING)
                except Exception:   # progress is advisory: never let it break the task
                    log.exception("saving progress of task %s", tid)
                finally:
                    self._persisting.discard(tid)
            t = asyncio.create_task(persist())
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    def _on_log(self, tid: int, level: str, message: str) -> None:
        self.bus.publish(Event("log", tid, (level, message)))
        getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(
            "task %s: %s", tid, message)
        async def append() -> None:
            try:
                await self.store.call(self.store.append_log, tid, level, message)
            except Exception:
                log.exception("saving a log line of task %s", tid)
        t = asyncio.create_task(append())
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _audit(self, action: str, target: str, params: dict | None, result: str) -> None:
        await self.store.call(self.store.audit, action, target, params, result)


def _owner_pid_alive(owner: str) -> bool:
    """Is the engine named `owner` (host:pid:token) still alive? Owners on other machines count as alive."""
    try:
        host, pid_s, _token = owner.split(":")
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return owner in _LIVE_OWNERS
    return pid_running(pid)


async def remove_path(t: Any, path: str) -> None:
    """Removes a file or folder a task tracked (never a path that is not deep and absolute)."""
    parts = path.split("/")
    if not path.startswith("/") or len([p for p in parts if p]) < 2 or ".." in parts:
        raise PermanentError(f"refusing to remove {path!r}: not a path a task makes", "internal: report this")
    with detached():
        await t.run(["rm", "-rf", "--one-file-system", "--", path], timeout=600, check=True)
