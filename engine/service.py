"""The engine as a service: one process per workspace that runs every task, whatever the consoles do.

    python -m ferry.engine.service --workspace DIR     (what `ferry engine start` and every front
                                                        end that needs an engine start, detached)

It holds the workspace's engine lock (one engine per workspace), listens on `engine.sock` in the
workspace (mode 0600, or 0660 for the group named by `[engine] group`), checks every peer's
credentials with SO_PEERCRED, refuses a front end of another version, and serves the calls of
`engine.client.EngineClient` (see engine/api.py for the records) plus an event stream per client.
Tasks left interrupted by an engine that died or stopped resume when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import importlib
import os
import signal
import sys
import time
from typing import Any

from . import api
from .calls import returns
from .client import EngineClient
from .errors import ConfigError, FerryError, PermanentError
from .events import Event
from .protocol import (ProtocolError, frame, in_group, paths, peer_credentials, read_frame, running_pid,
                       short_path, stopped_marker, user_name)
from .store import ACTOR
from .taskmodel import ACTIVE_STATES
from .workspace import Workspace
from .logs import logger

log = logger("ferry.service")

DRAIN_S = 60.0          # how long `ferry engine stop` lets running tasks reach their next checkpoint

# The calls a front end may make: EngineClient's public coroutines (engine/client.py), and the
# service's own (status, stop). Nothing else is reachable through the socket.
CALLS = frozenset({
    "get_site", "list_tasks", "get_task", "task_log", "task_files", "submit", "pause", "resume", "cancel",
    "confirm", "replicate", "start_probe", "vm_list", "vm_get", "vm_agent", "vm_reconcile", "vm_task",
    "vm_task_or_attach", "vm_timesync", "vm_cpu_hotadd", "wait_task", "host_facts", "hosts_facts",
    "get_setting", "set_setting", "audit", "audit_log", "gc", "host_key", "trust_host", "precheck",
    "vm_actions", "lab_up", "lab_down", "lab_status", "plan_check", "plan_apply", "migration_list",
    "migration_get", "migration_source_key", "trust_migration_source", "migration_override", "migration_report",
    "migration_cutover_summary", "migration_cancel_cutover",
    "alarms", "alarm_ack", "alarm_clear", "silence_add", "silence_list", "silence_remove", "events", "schedules",
    "health_run", "health_list", "health_history", "backup_now", "backup_list", "backup_prune",
    "metrics", "metrics_compare", "metrics_compare_vms",
})


class _Peer:
    """One connected front end."""

    def __init__(self, service: "EngineService", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 pid: int, user: str, kind: str) -> None:
        self.service, self.reader, self.writer = service, reader, writer
        self.pid, self.user, self.kind = pid, user, kind
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._pump: asyncio.Task | None = None
        self._serials: dict[int, _SerialChannel] = {}      # open serial consoles, by channel number

    def __str__(self) -> str:
        return f"{self.kind} of {self.user} (pid {self.pid})"

    async def send(self, msg: dict[str, Any]) -> None:
        data = frame(api.encode(msg))
        async with self._write_lock:
            self.writer.write(data)
            await self.writer.drain()      # a slow reader slows only its own sender, never the engine

    async def serve(self) -> None:
        try:
            while True:
                raw = await read_frame(self.reader)
                if raw is None:
                    return
                msg = api.decode(raw)
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "call":
                    t = asyncio.create_task(self._call(msg))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                elif op == "subscribe" and self._pump is None:
                    self._pump = asyncio.create_task(self._events())
                elif op == "serial":
                    chan = self._serials.get(msg.get("ch"))
                    if chan is not None:
                        chan.typed(base64.b64decode(msg.get("data") or ""))
                elif op == "serial_close":
                    chan = self._serials.pop(msg.get("ch"), None)
                    if chan is not None:
                        chan.stop()
                else:
                    raise ProtocolError(f"unexpected frame {str(op)[:40]!r}")
        except (ProtocolError, ValueError) as e:
            log.warning("%s: %s; closing its connection", self, e)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for t in [*self._tasks, *([self._pump] if self._pump else [])]:
                t.cancel()
            await asyncio.gather(*self._tasks, *([self._pump] if self._pump else []), return_exceptions=True)
            for chan in self._serials.values():
                chan.stop()
            self._serials.clear()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _call(self, msg: dict[str, Any]) -> None:
        cid, method, args = msg.get("id"), msg.get("method"), msg.get("args") or {}
        ACTOR.set(self.user)
        opened: _SerialChannel | None = None
        try:
            if method not in CALLS and method not in ("status", "stop", "serial_open"):
                raise ProtocolError(f"no call named {str(method)[:40]!r}", "is this front end of another version?")
            if method == "status":
                value: Any = self.service.status()
            elif method == "stop":
                value = self.service.request_stop(now=bool(args.get("now")), by=self.user)
            elif method == "serial_open":
                ch = args.pop("ch", None)
                if not isinstance(ch, int) or ch in self._serials:
                    raise ProtocolError(f"serial_open needs a channel number not in use, not {ch!r}")
                opened = self._serials[ch] = _SerialChannel(self, ch, await self.service.core.open_serial(**args))
                value = {"ch": ch}
            else:
                await self.service.core.reload_site()       # config.toml edited: takes effect now
                value = await getattr(self.service.core, method)(**args)
            if msg.get("json"):     # a command line's --json, printed here: it then needs no codec of its own
                reply = {"op": "result", "id": cid, "json": api.dumps_as(value, returns(method))}
            elif "unless" in msg:   # the caller holds an answer of this call: the same again is not sent
                reply = held_reply(cid, api.to_builtins(value), msg.get("unless"))
            else:
                reply = {"op": "result", "id": cid, "value": api.to_builtins(value)}
        except FerryError as e:
            reply = {"op": "error", "id": cid, "error": api.error_to_wire(e)}
        except TypeError as e:       # wrong arguments from a front end of another build
            reply = {"op": "error", "id": cid, "error": {"kind": "PermanentError", "message": f"{method}: {e}",
                                                         "hint": "use a ferry of the engine's version"}}
        except Exception as e:
            log.exception("call %s from %s", method, self)
            reply = {"op": "error", "id": cid, "error": {"kind": "FerryError", "permanent": True,
                                                         "message": f"{method} failed in the engine: {e}",
                                                         "hint": f"see the engine's log: {self.service.log_path}"}}
        with contextlib.suppress(ConnectionError):
            await self.send(reply)
        if opened is not None:
            opened.start()      # its first bytes go after the answer that names the channel

    async def _events(self) -> None:
        """Every event of the engine, as fast as this client reads them, and never faster: the next
        is taken from the subscription only once the connection's send buffer has room again, so
        what waits for a slow client waits in its subscription, which is bounded and coalesces (see
        engine/events.py). It misses intermediate progress and, told so, log lines; further behind,
        it is told to read the task list again ("resync"); it never slows the engine."""
        sub = self.service.core.subscribe()
        try:
            while True:
                ev = await sub.get()
                await self.send({"op": "event", "type": ev.type, "task_id": ev.task_id,
                                 "data": api.to_builtins(ev.data), "ts": ev.ts})
        except ConnectionError:
            pass
        finally:
            sub.close()


def held_reply(cid: Any, value: Any, unless: Any) -> dict[str, Any]:
    """The answer to a call whose caller holds the answer with digest `unless`: "unchanged" when it
    is the same (a VM list of 10,000 records a console polls is mostly the same, and decoding it
    again costs its screen a tenth of a second), else the value with its digest."""
    raw = api.encode(value)
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    if digest == unless:
        return {"op": "result", "id": cid, "unchanged": True, "digest": digest}
    return {"op": "result", "id": cid, "value": api.raw(raw), "digest": digest}


class _SerialChannel:
    """A VM's serial console open for one front end: what the guest prints is sent as serial frames,
    read from the VM only as fast as the front end takes them; what it types is written in order."""

    def __init__(self, peer: _Peer, ch: int, console: Any) -> None:
        self.peer, self.ch, self.console = peer, ch, console
        self._input: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._out()), asyncio.create_task(self._in())]

    def typed(self, data: bytes) -> None:
        self._input.put_nowait(data)

    async def _out(self) -> None:
        try:
            while data := await self.console.read():
                await self.peer.send({"op": "serial", "ch": self.ch, "data": base64.b64encode(data).decode()})
            reason = self.console.reason
            if self.peer._serials.pop(self.ch, None) is not None:
                await self.peer.send({"op": "serial_close", "ch": self.ch, "reason": reason})
        except ConnectionError:
            pass
        finally:
            await self.console.close()

    async def _in(self) -> None:
        while True:
            data = await self._input.get()
            try:
                await self.console.write(data)
            except FerryError:
                return      # the VM stopped: _out says so

    def stop(self) -> None:
        """The front end closed the channel, or went away: detach from the VM."""
        for t in self._tasks:
            t.cancel()
        if not self._tasks:
            asyncio.ensure_future(self.console.close())
        else:
            asyncio.ensure_future(self._closed())

    async def _closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.console.close()


class EngineService:
    def __init__(self, ws: Workspace, site, *, idle_exit: float | None = None, hold: bool = False) -> None:
        self.ws, self.site = ws.ensure(), site
        self.sock_path, self.lock_path, self.pid_path = paths(ws)
        # hold: tasks a dead or stopped engine left stay interrupted until resumed by hand (after a
        # crash that may come back, say); otherwise this engine resumes them as it starts.
        self.hold = hold
        # Under systemd (it sets INVOCATION_ID): it restarts the engine; front ends never start one.
        self.managed = bool(os.environ.get("INVOCATION_ID"))
        self.core = EngineClient(ws, site, adopt=not hold)
        self.peers: set[_Peer] = set()
        self.started = time.time()
        self.log_path = str(ws.logs_dir / "ferry.log")
        self.idle_exit = idle_exit
        self.last_contact = 0.0         # (monotonic) when a front end last came or went
        self._stop = asyncio.Event()
        self._stop_now = False
        self._lock_fd: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = running_pid(self.ws)
            raise PermanentError(f"an engine already runs for workspace {self.ws.root}"
                                 + (f" (pid {pid})" if pid and pid > 0 else ""),
                                 "`ferry engine status` shows it; `ferry engine stop` stops it") from None
        self._lock_fd = fd

    async def _listen(self) -> None:
        group = self.site.limits.group
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()          # we hold the lock: whatever socket is there is stale
        old = os.umask(0o177)
        try:
            with short_path(self.sock_path) as where:
                self._server = await asyncio.start_unix_server(self._accept, path=where, limit=1 << 20)
        finally:
            os.umask(old)
        if group:
            import grp
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise PermanentError(f"[engine] group {group!r} is not a group on this machine",
                                     "create it (groupadd) or remove `group` from [engine]") from None
            os.chown(self.sock_path, -1, gid)
            os.chmod(self.sock_path, 0o660)
        else:
            os.chmod(self.sock_path, 0o600)

    async def run(self) -> int:
        self._lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, False, "signal")
        loop.add_signal_handler(signal.SIGHUP, lambda: None)   # a lost terminal never stops the engine
        await self.core.start()      # marks dead tasks interrupted, and takes them over: they resume
        await self._listen()
        # The schedules run here, whether or not a front end is attached: missed slots are caught up
        # first; config.toml is re-read between slots, as before every call.
        self.core.ops.launch(reload=self.core.reload_site)
        if os.environ.get("FERRY_METRICS", "").strip().lower() != "off":   # (the test suite's engines: off)
            self.core.sampler.launch(reload=self.core.reload_site)     # performance samples (and /metrics where [metrics] listen says)
        self.pid_path.write_text(f"{os.getpid()} {api.VERSION}\n")
        with contextlib.suppress(FileNotFoundError):
            stopped_marker(self.ws).unlink()
        log.info("engine %s serving %s (pid %d, site %s)", api.VERSION, self.sock_path, os.getpid(), self.site.name)
        idle = asyncio.create_task(self._idle_watch()) if self.idle_exit else None
        try:
            await self._stop.wait()
        finally:
            if idle:
                idle.cancel()
            log.info("engine stopping%s", " now" if self._stop_now else " (tasks reach a checkpoint first)")
            self.core.engine.bus.publish(Event("engine", data="stopping"))   # front ends: on purpose
            if self._server:
                self._server.close()
            await self.core.ops.stop()       # runs under way are recorded as interrupted
            await self.core.sampler.stop()
            await self.core.engine.stop(drain=0 if self._stop_now else DRAIN_S)
            for h in list(self._handlers):
                h.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self.core.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()
            log.info("engine stopped")
        return 0

    def request_stop(self, now: bool = False, by: str = "") -> dict[str, Any]:
        if by and by != "signal":
            log.info("stop requested by %s%s", by, " (now)" if now else "")
        self._stop_now = self._stop_now or now
        with contextlib.suppress(OSError):
            stopped_marker(self.ws).write_text(f"{time.time()} {by}\n")
        self._stop.set()
        return {"stopping": True, "active": self._active()}

    def _active(self) -> int:
        return self.core.engine.active

    def status(self) -> api.EngineStatus:
        return api.EngineStatus(version=api.VERSION, protocol=api.PROTOCOL, pid=os.getpid(),
                                workspace=str(self.ws.root), site=self.site.name, state=self.core.engine_state,
                                started=self.started, clients=len(self.peers), tasks_active=self._active(),
                                log=self.log_path, hold=self.hold)

    async def _idle_watch(self) -> None:
        """(Tests) stop once no front end and no task has been here for `idle_exit` seconds."""
        quiet_since = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.idle_exit))
            # (a command line's whole visit can fall between two looks: its last contact counts too,
            # and a connection still shaking hands is one)
            busy = self._active() or await self._waiting_tasks() or self._handlers or self.peers
            quiet_since = max(quiet_since, self.last_contact)
            if busy:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.idle_exit:
                log.info("no front end and no task for %.0f s: stopping", self.idle_exit)
                self.request_stop()
                return

    async def _waiting_tasks(self) -> bool:
        tasks = await self.core.list_tasks(limit=50)
        return any(t.state in ACTIVE_STATES and t.owner == self.core.engine.owner for t in tasks)

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.last_contact = time.monotonic()
        try:
            await self._handle(reader, writer)
        finally:
            self._handlers.discard(task)
            self.last_contact = time.monotonic()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def refuse(message: str, hint: str) -> None:
            writer.write(frame(api.encode({"op": "refused", "message": message, "hint": hint})))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

        pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
        try:
            raw = await asyncio.wait_for(read_frame(reader), 10)
            msg = api.decode(raw) if raw else None
        except (asyncio.TimeoutError, ProtocolError, ValueError, ConnectionError):
            msg = None
        group = self.site.limits.group
        if uid != os.getuid() and not (group and in_group(uid, gid, group)):
            log.warning("refused a connection from %s (uid %d, pid %d)", user_name(uid), uid, pid)
            return await refuse(f"user {user_name(uid)} may not use the engine of {self.ws.root}",
                                f"it belongs to {user_name(os.getuid())}"
                                + ("" if group else "; name a group in [engine] group to share it"))
        if not isinstance(msg, dict) or msg.get("op") != "hello":
            writer.close()
            return
        if msg.get("version") != api.VERSION or msg.get("protocol") != api.PROTOCOL:
            return await refuse(f"this ferry is version {msg.get('version')} (protocol {msg.get('protocol')}) but "
                                f"the engine of {self.ws.root} runs {api.VERSION} (protocol {api.PROTOCOL})",
                                "use the ferry of the engine's version, or restart the engine with this one: stop "
                                f"it with that ferry (`ferry engine stop`) or `kill {os.getpid()}` (tasks resume "
                                "from their checkpoints), then run the command again")
        writer.write(frame(api.encode({"op": "hello", "version": api.VERSION, "protocol": api.PROTOCOL,
                                       "pid": os.getpid(), "workspace": str(self.ws.root),
                                       "managed": self.managed})))
        await writer.drain()
        peer = _Peer(self, reader, writer, pid, user_name(uid), str(msg.get("client", "client"))[:20])
        self.peers.add(peer)
        log.info("%s attached", peer)
        try:
            await peer.serve()
        finally:
            self.peers.discard(peer)
            log.info("%s detached", peer)


def systemd_unit(ws: Workspace, *, user: str | None = None) -> str:
    """A systemd unit that runs this workspace's engine: restarted on failure, logging to the journal."""
    import getpass
    user = user or getpass.getuser()
    return f"""# Ferry engine for workspace {ws.root}
# Install: ferry engine unit > /etc/systemd/system/ferry-engine.service
#          systemctl daemon-reload && systemctl enable --now ferry-engine
[Unit]
Description=Ferry engine ({ws.root})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Environment=FERRY_WORKSPACE={ws.root}
ExecStart={sys.executable} -m ferry.engine.service --workspace {ws.root} --journal
# Only the engine is signalled: the VMs it started run on. SIGTERM: running tasks stop at their next checkpoint (up to {DRAIN_S:.0f} s) and resume at the next start
KillMode=process
TimeoutStopSec={DRAIN_S + 30:.0f}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ferry-engine", description="Ferry's engine service for one workspace")
    p.add_argument("--workspace", metavar="DIR")
    p.add_argument("--journal", action="store_true", help="also log to stderr (systemd's journal)")
    p.add_argument("--hold", action="store_true", help="do not resume interrupted tasks (also FERRY_ENGINE_HOLD=1)")
    args = p.parse_args(argv)
    ws = Workspace.resolve(args.workspace)
    try:
        ws.ensure()
        site = ws.load_config()
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except FerryError as e:
        print(f"ferry engine: {e}", file=sys.stderr)
        return 1
    from .logs import setup_logging
    setup_logging(ws)
    # Task kinds beyond the built-in ones (a site's own, or the test suite's): modules that register
    # them when imported, named in FERRY_TASK_KINDS (comma-separated).
    for name in filter(None, (m.strip() for m in os.environ.get("FERRY_TASK_KINDS", "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as e:     # noqa: BLE001 - said, and the engine serves the kinds it has
            log.error("FERRY_TASK_KINDS names %r, which cannot be imported: %s; its tasks wait, interrupted", name, e)
            print(f"ferry engine: FERRY_TASK_KINDS names {name!r}, which cannot be imported: {e}", file=sys.stderr)
    if args.journal or os.environ.get("JOURNAL_STREAM"):
        from .logs import log_to_stderr
        log_to_stderr()
    idle = os.environ.get("FERRY_ENGINE_IDLE_EXIT")

    async def go() -> int:
        hold = args.hold or os.environ.get("FERRY_ENGINE_HOLD") == "1"
        return await EngineService(ws, site, idle_exit=float(idle) if idle else None, hold=hold).run()
    try:
        return asyncio.run(go())
    except FerryError as e:
        print(f"ferry engine: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
