"""The engine's calls, typed: one table for every client of the engine service.

Each method sends one call and decodes its answer into the records of engine/api.py. Two clients
share the table: `remote.RemoteEngine` (asyncio; events, serial consoles, reconnects: the console,
and a command that follows a task) and `BlockingEngine` here: one blocking connection to the
workspace's running engine, for a command line that asks a few questions and ends. It starts no
event loop and imports no asyncio (issue 11: a command adds <= 50 ms to its work; importing asyncio
alone costs about a third of that). Its methods are coroutines that never suspend, so the same
`async def` command code runs on either client; `run_now` runs one without a loop.
"""

from __future__ import annotations

import _socket
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, TypeVar

from . import api
from .errors import PermanentError, TransientError
from .protocol import SOCKET_NAME, ProtocolError, frame, hello, recv_frame, short_path

if TYPE_CHECKING:
    from .workspace import Workspace

T = TypeVar("T")


class EngineUnavailable(TransientError):
    """No engine answers on the workspace's socket."""


class EngineCalls:
    """The calls of the engine service; a client supplies `_call(method, **args)`, which decodes the
    answer into the method's return annotation here (`returns`): each call's type is said once."""

    async def _call(self, method: str, type: Any = None, **args: Any) -> Any:
        raise NotImplementedError

    async def as_json(self, call: Callable[..., Awaitable[Any]], /, *args: Any, **kw: Any) -> str:
        """The CLI's --json of what `call` (one of these methods) returns: api.dumps of its records.
        BlockingEngine has the engine print it."""
        return api.dumps(await call(*args, **kw))

    # ------------------------------------------------------------------ the engine itself

    async def status(self) -> api.EngineStatus:
        return await self._call("status")

    async def stop_engine(self, *, now: bool = False) -> dict[str, Any]:
        return await self._call("stop", now=now)

    async def get_site(self) -> api.SiteConfig:
        return await self._call("get_site")

    # ------------------------------------------------------------------ tasks

    async def list_tasks(self, limit: int = 500) -> list[api.TaskInfo]:
        return await self._call("list_tasks", limit=limit)

    async def get_task(self, task_id: int) -> api.TaskInfo:
        return await self._call("get_task", task_id=task_id)

    async def task_log(self, task_id: int, limit: int = 200) -> list[api.TaskLogEntry]:
        return await self._call("task_log", task_id=task_id, limit=limit)

    async def task_files(self, task_id: int) -> list[api.TrackedFile]:
        return await self._call("task_files", task_id=task_id)

    async def submit(self, kind: str, params: dict[str, Any]) -> int:
        return await self._call("submit", kind=kind, params=params)

    async def pause(self, task_id: int) -> api.TaskInfo:
        return await self._call("pause", task_id=task_id)

    async def resume(self, task_id: int) -> api.TaskInfo:
        return await self._call("resume", task_id=task_id)

    async def cancel(self, task_id: int) -> api.TaskInfo:
        return await self._call("cancel", task_id=task_id)

    async def confirm(self, task_id: int, typed: str) -> api.TaskInfo:
        return await self._call("confirm", task_id=task_id, typed=typed)

    async def wait_task(self, task_id: int, timeout: float | None = None) -> api.TaskInfo:
        return await self._call("wait_task", task_id=task_id, timeout=timeout)

    async def replicate(self, level: str, params: dict[str, Any], *, restart: bool = False) -> tuple[int, bool]:
        return await self._call("replicate", level=level, params=params, restart=restart)

    async def start_probe(self, host: str, *, pings: int = 20, size_mib: int = 64) -> int:
        return await self._call("start_probe", host=host, pings=pings, size_mib=size_mib)

    # ------------------------------------------------------------------ VMs and templates

    async def vm_list(self, *, recycled: bool = False) -> list[api.VMView]:
        return await self._call("vm_list", recycled=recycled)

    async def vm_get(self, name: str) -> api.VMView:
        return await self._call("vm_get", name=name)

    async def vm_agent(self, name: str) -> api.AgentReport:
        return await self._call("vm_agent", name=name)

    async def vm_reconcile(self) -> api.ReconcileReport:
        return await self._call("vm_reconcile")

    async def vm_actions(self, name: str, *, recycled: bool = False) -> list[api.VMActionCheck]:
        return await self._call("vm_actions", name=name, recycled=recycled)

    async def precheck(self, kind: str, params: dict[str, Any]) -> None:
        await self._call("precheck", kind=kind, params=params)

    async def vm_task(self, kind: str, params: dict[str, Any]) -> int:
        return await self._call("vm_task", kind=kind, params=params)

    async def vm_task_or_attach(self, kind: str, params: dict[str, Any]) -> tuple[int, bool]:
        return await self._call("vm_task_or_attach", kind=kind, params=params)

    async def vm_timesync(self, name: str) -> api.TimeSync:
        return await self._call("vm_timesync", name=name)

    async def vm_cpu_hotadd(self, name: str, cpus: int) -> api.CPUHotAdd:
        return await self._call("vm_cpu_hotadd", name=name, cpus=cpus)

    # ------------------------------------------------------------------ hosts

    async def host_facts(self, host: str, timeout: float = 10.0) -> api.HostFacts:
        return await self._call("host_facts", host=host, timeout=timeout)

    async def hosts_facts(self, timeout: float = 10.0) -> dict[str, api.HostFacts]:
        return await self._call("hosts_facts", timeout=timeout)

    async def host_key(self, host: str) -> api.HostKey:
        return await self._call("host_key", host=host)

    async def trust_host(self, host: str, fingerprint: str) -> api.HostKey:
        return await self._call("trust_host", host=host, fingerprint=fingerprint)

    async def gc(self, dry_run: bool = False) -> list[api.Leftover]:
        return await self._call("gc", dry_run=dry_run)

    # ------------------------------------------------------------------ server migrations

    async def plan_check(self, path: str) -> api.PlanCheck:
        return await self._call("plan_check", path=path)

    async def plan_apply(self, path: str, dry_run: bool = False) -> api.PlanApplied:
        return await self._call("plan_apply", path=path, dry_run=dry_run)

    async def migration_list(self, wave: str | None = None) -> list[api.Migration]:
        return await self._call("migration_list", wave=wave)

    async def migration_get(self, name: str) -> api.Migration:
        return await self._call("migration_get", name=name)

    async def migration_source_key(self, name: str) -> api.HostKey:
        return await self._call("migration_source_key", name=name)

    async def trust_migration_source(self, name: str, fingerprint: str) -> api.HostKey:
        return await self._call("trust_migration_source", name=name, fingerprint=fingerprint)

    async def migration_override(self, name: str, reason: str) -> api.Migration:
        return await self._call("migration_override", name=name, reason=reason)

    async def migration_report(self, name: str) -> str:
        return await self._call("migration_report", name=name)

    async def migration_cutover_summary(self, name: str) -> dict:
        return await self._call("migration_cutover_summary", name=name)

    async def migration_cancel_cutover(self, name: str, reason: str) -> int | None:
        return await self._call("migration_cancel_cutover", name=name, reason=reason)

    # ------------------------------------------------------------------ operations

    async def alarms(self, all: bool = False) -> list[api.AlarmInfo]:
        return await self._call("alarms", all=all)

    async def alarm_ack(self, id: int, comment: str = "") -> api.AlarmInfo:
        return await self._call("alarm_ack", id=id, comment=comment)

    async def alarm_clear(self, id: int, reason: str) -> api.AlarmInfo:
        return await self._call("alarm_clear", id=id, reason=reason)

    async def silence_add(self, matchers: dict[str, str], duration_s: float, reason: str) -> api.SilenceInfo:
        return await self._call("silence_add", matchers=matchers, duration_s=duration_s, reason=reason)

    async def silence_list(self, all: bool = False) -> list[api.SilenceInfo]:
        return await self._call("silence_list", all=all)

    async def silence_remove(self, id: int) -> api.SilenceInfo:
        return await self._call("silence_remove", id=id)

    async def events(self, limit: int = 100) -> list[api.EventInfo]:
        return await self._call("events", limit=limit)

    async def schedules(self) -> list[api.ScheduleInfo]:
        return await self._call("schedules")

    async def health_run(self, checklist: str | None = None, host: str | None = None) -> int:
        return await self._call("health_run", checklist=checklist, host=host)

    async def health_list(self, host: str | None = None) -> list[api.HealthCheck]:
        return await self._call("health_list", host=host)

    async def health_history(self, check: str, host: str | None = None, limit: int = 50) -> list[api.HealthResult]:
        return await self._call("health_history", check=check, host=host, limit=limit)

    async def backup_now(self, remote: str | None = None) -> api.BackupResult:
        return await self._call("backup_now", remote=remote)

    async def backup_list(self) -> api.BackupList:
        return await self._call("backup_list")

    async def backup_prune(self, dry_run: bool = False) -> api.BackupList:
        return await self._call("backup_prune", dry_run=dry_run)

    async def metrics(self, name: str, metric: str | None = None, since: float = 3600.0) -> list[api.MetricSeries]:
        return await self._call("metrics", name=name, metric=metric, since=since)

    async def metrics_compare(self) -> list[api.HostMetrics]:
        return await self._call("metrics_compare")

    async def metrics_compare_vms(self) -> list[api.VMMetrics]:
        return await self._call("metrics_compare_vms")

    # ------------------------------------------------------------------ the network lab

    async def lab_up(self) -> api.LabStatus:
        return await self._call("lab_up")

    async def lab_down(self) -> api.LabStatus:
        return await self._call("lab_down")

    async def lab_status(self) -> api.LabStatus:
        return await self._call("lab_status")

    # ------------------------------------------------------------------ settings and audit

    async def get_setting(self, key: str, default: Any = None) -> Any:
        return await self._call("get_setting", key=key, default=default)

    async def set_setting(self, key: str, value: Any) -> None:
        await self._call("set_setting", key=key, value=value)

    async def audit(self, action: str, target: str, params: dict | None, result: str) -> None:
        await self._call("audit", action=action, target=target, params=params, result=result)

    async def audit_log(self, limit: int = 50) -> list[api.AuditEntry]:
        return await self._call("audit_log", limit=limit)


_RETURNS: dict[str, Any] = {}


def returns(method: str) -> Any:
    """The type a call's answer is decoded into: its method's return annotation in EngineCalls (Any
    for a call that answers nothing, or one not in the table). Evaluated when first asked: a command
    line that prints the engine's --json text never imports the records."""
    if method not in _RETURNS:
        import typing
        fn = getattr(EngineCalls, "stop_engine" if method == "stop" else method, None)
        t = typing.get_type_hints(fn).get("return", Any) if callable(fn) else Any
        _RETURNS[method] = Any if t is type(None) else t
    return _RETURNS[method]


class BlockingEngine(EngineCalls):
    """The workspace's running engine over one blocking connection (see the module's docstring)."""

    def __init__(self, ws: Workspace, sock: _socket.socket) -> None:
        self.workspace = ws
        self._sock = sock
        self._ids = 0
        self._json = False      # within as_json: a call answers the engine's --json text

    @classmethod
    def connect(cls, ws: Workspace, *, client: str = "cli") -> BlockingEngine | None:
        """The engine running for `ws`, or None when none answers here (the caller then goes the
        asyncio way, which starts one, or waits for one that is going away)."""
        # The socket module's C core: the module itself builds its IntEnums of constants as it is
        # imported (~2 ms of every command), and a blocking client needs none of what it adds.
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            with short_path(ws.root / SOCKET_NAME) as where:
                sock.connect(where)
            sock.settimeout(30)
            sock.sendall(frame(json.dumps(hello(client)).encode()))
            raw = recv_frame(sock)
            sock.settimeout(None)    # a call takes what it takes (facts of hosts, a gc); ctrl-c stops it
        except (OSError, ProtocolError):
            sock.close()
            return None
        try:
            msg = json.loads(raw) if raw else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("op") != "hello":
            sock.close()
            if isinstance(msg, dict) and msg.get("op") == "refused":
                raise PermanentError(str(msg.get("message")), str(msg.get("hint", "")))
            return None
        return cls(ws, sock)

    def _ask(self, method: str, args: dict[str, Any], *, as_json: bool = False) -> bytes:
        self._ids += 1
        msg = {"op": "call", "id": self._ids, "method": method, "args": args}
        try:
            if as_json:     # plain arguments of a command line: the json module encodes them
                self._sock.sendall(frame(json.dumps({**msg, "json": True}, separators=(",", ":")).encode()))
            else:
                self._sock.sendall(frame(api.encode(msg)))
            raw = recv_frame(self._sock)
        except OSError:
            raw = None
        if raw is None:
            raise EngineUnavailable(f"the engine went away (workspace {self.workspace.root})",
                                    "`ferry engine status`; its tasks go on when it starts again")
        return raw

    async def _call(self, method: str, type: Any = None, **args: Any) -> Any:
        if self._json:
            # The engine prints it (api.dumps_as): this side decodes one string with the json module
            # and needs neither msgspec nor the records (each costs a command line several ms).
            msg = json.loads(self._ask(method, args, as_json=True))
        else:
            msg = api.decode(self._ask(method, args))
        if msg.get("op") == "error":
            raise api.error_from_wire(msg.get("error") or {})
        if self._json:
            return msg["json"]
        value = msg.get("value")
        type = returns(method) if type is None else type
        return value if type is Any else api.convert(value, type)

    async def as_json(self, call: Callable[..., Awaitable[Any]], /, *args: Any, **kw: Any) -> str:
        self._json = True
        try:
            return await call(*args, **kw)     # its _call answers the engine's text
        finally:
            self._json = False

    def close(self) -> None:
        self._sock.close()


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that awaits only BlockingEngine calls (they never suspend)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("run_now: the coroutine waited for an event loop; run it with asyncio")
