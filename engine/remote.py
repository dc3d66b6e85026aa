"""A front end's handle on the engine service: the same calls as EngineClient, over the socket.

    engine = await connect(workspace, client="cli")        # starts the engine (detached) if needed
    info = await engine.get_task(3)                         # a TaskInfo, decoded by type
    sub = engine.subscribe()                                # coalescing events, as in-process

Calls are typed: each one's answer is decoded into the records of engine/api.py. A console passes
`reconnect=True`: when the engine goes away it says "reconnecting" (an "engine" event), starts the
engine again, and carries on; a call made meanwhile fails with a TransientError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import api
from .calls import EngineCalls, EngineUnavailable, returns
from .errors import FerryError, PermanentError
from .events import Event, EventBus, Subscription
from .protocol import ProtocolError, SOCKET_NAME, frame, hello, read_frame, running_pid, short_path, stopped_marker
from .logs import logger

if TYPE_CHECKING:    # a command line imports only what its answers need (api's records load on use)
    import subprocess

    from .config import SiteConfig
    from .workspace import Workspace

__all__ = ["EngineUnavailable", "RemoteEngine", "RemoteSerial", "connect", "engine_pid_alive", "spawn_engine"]

log = logger("ferry.remote")

START_TIMEOUT_S = 30.0     # an engine that has not opened its socket by then did not start


class Opener(Protocol):
    """Another way to the engine than this machine's socket (engine/remote_ssh.py: over SSH). `open`
    gives a (reader, writer) pair to the engine's socket, starting the engine first when `autostart`;
    `where` names that engine in messages."""

    where: str

    async def open(self, autostart: bool) -> tuple[Any, Any]: ...

    async def close(self) -> None: ...


def _event_data(kind: str, data: Any) -> Any:
    if kind in ("created", "state"):
        return api.convert(data, api.TaskInfo)
    if kind == "progress":
        return api.convert(data, api.Progress)
    if kind == "log":
        return tuple(data)
    return data


def spawn_engine(ws: Workspace) -> subprocess.Popen:
    """Start the workspace's engine service, detached from this process and its terminal."""
    import subprocess
    import sys
    import threading
    ws.ensure()
    out = open(ws.logs_dir / "engine.out", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ferry.engine.service", "--workspace", str(ws.root)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                close_fds=True, cwd="/")
    finally:
        out.close()
    # Reaped when it ends (a console that started it may outlive it): no zombie engine.
    threading.Thread(target=proc.wait, name="ferry-engine-reaper", daemon=True).start()
    return proc


# What a connect meets when no engine listens, or one that is going away (killed, stopping: the
# kernel may still queue a connection on a socket whose process is being torn down).
_GONE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)


class RemoteEngine(EngineCalls):
    def __init__(self, ws: Workspace, *, client: str = "cli", autostart: bool = True, reconnect: bool = False,
                 socket_path: Path | None = None, site: SiteConfig | None = None,
                 opener: Opener | None = None, fetch_site: bool = True) -> None:
        self.workspace = ws
        # A console lays its views out from the site, asked at each connect; a command line asks
        # `get_site()` when it needs it (a site of 1,000 hosts is decoded for nothing otherwise).
        self.fetch_site = fetch_site
        self.opener = opener
        self.kind = client
        self.autostart = autostart
        self.reconnect = reconnect
        self.socket_path = socket_path or ws.root / SOCKET_NAME
        self.site: SiteConfig | None = site     # the engine's, once connected
        self.engine_pid: int | None = None
        # An engine under a service manager (systemd) is restarted by it; one stopped on purpose
        # (`ferry engine stop`) stays stopped: a console then waits for it instead of starting one.
        self.managed = False
        self.stopped_on_purpose = False
        self.state = "connecting"
        self._connected = asyncio.Event()     # set once first connected
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._held: dict[tuple, tuple[str, Any]] = {}     # _call_held's answers: (digest, value)
        self._pending: dict[int, asyncio.Future] = {}
        self._bus = EventBus()
        self._subscribed = False
        self._serials: dict[int, RemoteSerial] = {}
        self._read_task: asyncio.Task | None = None
        self._closing = False
        self.spawned: subprocess.Popen | None = None

    # ------------------------------------------------------------------ connection

    @property
    def engine_state(self) -> str:
        return self.state

    @property
    def where(self) -> str:
        """The engine, for messages: its workspace, or the --engine target it is reached through."""
        return self.opener.where if self.opener else str(self.workspace.root)

    async def start(self) -> None:
        await self._connect(first=True)

    async def _open(self) -> None:
        if self.opener is not None:
            reader, writer = await self.opener.open(self.autostart)
        else:
            with short_path(self.socket_path) as where:
                reader, writer = await asyncio.open_unix_connection(where, limit=1 << 20)
        writer.write(frame(api.encode(hello(self.kind))))
        await writer.drain()
        raw = await asyncio.wait_for(read_frame(reader), 30)
        msg = api.decode(raw) if raw else None
        if not isinstance(msg, dict):
            writer.close()
            raise EngineUnavailable(f"the engine of {self.where} closed the connection",
                                    f"see {self.workspace.logs_dir / 'ferry.log'}")
        if msg.get("op") == "refused":
            writer.close()
            raise PermanentError(str(msg.get("message")), str(msg.get("hint", "")))
        self._reader, self._writer = reader, writer
        self.engine_pid = msg.get("pid")
        self.managed = bool(msg.get("managed"))
        self.stopped_on_purpose = False

    async def _connect(self, *, first: bool) -> None:
        try:
            await self._open()
        except _GONE:
            if not self.autostart or (not first and (self.stopped_on_purpose or self.managed
                                                     or stopped_marker(self.workspace).exists())):
                raise EngineUnavailable(f"no engine runs for workspace {self.workspace.root}",
                                        "start it with `ferry engine start`") from None
            await self._start_engine()
        self._read_task = asyncio.create_task(self._read_loop(), name="ferry-remote-reader")
        if self._subscribed:
            await self._send({"op": "subscribe"})
        if self.fetch_site:
            self.site = await self._call("get_site", api.SiteConfig)
        self.state = "running"
        self._connected.set()
        self._bus.publish(Event("engine", data="running"))

    async def _start_engine(self) -> None:
        """Start the engine (detached) and wait for its socket; another front end may start it at the
        same moment: whichever engine gets the workspace lock serves both."""
        self.spawned = proc = spawn_engine(self.workspace)
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                await self._open()
                return
            except _GONE:
                pass
            code = proc.poll()
            if code is not None and code != 0:
                out = self.workspace.logs_dir / "engine.out"
                last = ""
                with contextlib.suppress(OSError):
                    lines = [x for x in out.read_text(errors="replace").splitlines() if x.strip()]
                    last = lines[-1] if lines else ""
                if "already runs" not in last:
                    raise PermanentError(f"the engine of {self.workspace.root} did not start: {last or f'exit {code}'}",
                                         f"see {out}")
                # Another engine holds the workspace (starting, or still stopping): wait for its
                # socket, and start one again only once no engine holds the workspace.
                if running_pid(self.workspace) is None:
                    self.spawned = proc = spawn_engine(self.workspace)
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"the engine of {self.workspace.root} did not open its socket in "
                                        f"{START_TIMEOUT_S:.0f} s", f"see {self.workspace.logs_dir / 'ferry.log'}")
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 1.5)

    async def _read_loop(self) -> None:
        reader = self._reader
        try:
            while True:
                raw = await read_frame(reader)
                if raw is None:
                    break
                msg = api.decode(raw)
                op = msg.get("op")
                if op == "event":
                    if msg["type"] == "engine" and msg.get("data") in ("draining", "stopping", "stopped"):
                        self.stopped_on_purpose = True
                    self._bus.publish(Event(msg["type"], msg.get("task_id"), _event_data(msg["type"], msg.get("data")),
                                            msg.get("ts") or time.time()))
                elif op in ("result", "error"):
                    fut = self._pending.pop(msg.get("id"), None)
                    if fut and not fut.done():
                        fut.set_result(msg)
                elif op == "serial":
                    chan = self._serials.get(msg.get("ch"))
                    if chan is not None:
                        chan._got(base64.b64decode(msg.get("data") or ""))
                elif op == "serial_close":
                    chan = self._serials.pop(msg.get("ch"), None)
                    if chan is not None:
                        chan._ended(str(msg.get("reason") or "closed by the engine"))
        except (ProtocolError, ConnectionError, ValueError) as e:
            log.warning("engine connection: %s", e)
        except asyncio.CancelledError:
            return
        self._lost()
        if self.reconnect and not self._closing:
            asyncio.create_task(self._reconnect_loop(), name="ferry-remote-reconnect")

    def _lost(self) -> None:
        self.state = "reconnecting" if self.reconnect and not self._closing else "disconnected"
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable(f"the engine went away (workspace {self.where})",
                                                    "`ferry engine status`; its tasks go on when it starts again"))
        self._pending.clear()
        for chan in self._serials.values():
            chan._ended("the engine went away")
        self._serials.clear()
        if self._writer:
            self._writer.close()
        self._writer = None
        if not self._closing:
            self._bus.publish(Event("engine", data=self.state))

    async def _reconnect_loop(self) -> None:
        delay = 0.2
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._connect(first=False)
                log.info("reconnected to the engine (pid %s)", self.engine_pid)
                return
            except FerryError as e:
                log.info("reconnecting to the engine: %s", e)
            except OSError as e:
                log.info("reconnecting to the engine: %s", e)
            delay = min(2.0, delay * 2)

    async def close(self) -> None:
        self._closing = True
        if self._read_task:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._writer:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self.opener is not None:
            await self.opener.close()
        self.state = "stopped"

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._writer is None and not self._connected.is_set() and not self._closing:
            # A view asking while the first connect is under way (over SSH it takes a while) waits
            # for it rather than being told the engine went away.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), START_TIMEOUT_S)
        if self._writer is None:
            raise EngineUnavailable(f"the engine went away (workspace {self.where})",
                                    "it is restarting: try again in a moment" if self.reconnect else
                                    "`ferry engine status`; its tasks go on when it starts again")
        self._writer.write(frame(api.encode(msg)))
        await self._writer.drain()

    async def _call(self, method: str, type: Any = None, **args: Any) -> Any:
        msg = await self._exchange({"method": method, "args": args})
        value = msg.get("value")
        type = returns(method) if type is None else type
        return value if type is Any else api.convert(value, type)

    async def _call_held(self, method: str, **args: Any) -> Any:
        """As _call, for a call asked again and again whose answer is mostly the same (the VM list a
        console polls): the engine is told the digest of the answer held, and answers "unchanged"
        (nothing to send, nothing to decode: the held answer, the same object, is returned) or
        anew. Answers are immutable records in tuples or lists nobody changes."""
        key = (method, tuple(sorted(args.items())))
        digest, value = self._held.get(key, ("", None))
        msg = await self._exchange({"method": method, "args": args, "unless": digest})
        if msg.get("unchanged") and digest:
            return value
        value = api.convert(msg.get("value"), returns(method))
        if msg.get("digest"):
            self._held[key] = (msg["digest"], value)
        return value

    async def vm_list(self, *, recycled: bool = False) -> list[api.VMView]:
        return await self._call_held("vm_list", recycled=recycled)

    async def _exchange(self, call: dict[str, Any]) -> dict[str, Any]:
        """Send a call frame (method, args, ...) and wait for its answer; an error answer raises."""
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            await self._send({"op": "call", "id": cid, **call})
        except (ConnectionError, OSError):
            self._forget(cid, fut)
            raise EngineUnavailable(f"the engine went away (workspace {self.where})",
                                    "`ferry engine status`; its tasks go on when it starts again") from None
        except BaseException:
            self._forget(cid, fut)
            raise
        msg = await fut
        if msg["op"] == "error":
            raise api.error_from_wire(msg.get("error") or {})
        return msg

    async def _subscribe_now(self) -> None:
        try:
            await self._send({"op": "subscribe"})
        except (FerryError, ConnectionError, OSError):
            pass        # the connection is lost: the next connect subscribes

    def _forget(self, cid: int, fut: asyncio.Future) -> None:
        """A call that failed on its way out: its answer is not awaited any more (and an error the
        lost connection set on it meanwhile is taken, never reported as unretrieved)."""
        self._pending.pop(cid, None)
        if fut.done() and not fut.cancelled():
            fut.exception()
        else:
            fut.cancel()

    def subscribe(self) -> Subscription:
        if not self._subscribed:
            self._subscribed = True
            if self._writer is not None:    # else the connect subscribes (once: a second one is refused)
                asyncio.ensure_future(self._subscribe_now())
        return self._bus.subscribe()

    # ------------------------------------------------------------------ streams

    async def open_serial(self, name: str) -> "RemoteSerial":
        """The serial console of the running VM, as EngineClient.open_serial gives it in-process."""
        ch = next(self._ids)
        chan = self._serials[ch] = RemoteSerial(self, ch, name)     # before the call: bytes follow its answer
        try:
            await self._call("serial_open", name=name, ch=ch)
        except BaseException:
            self._serials.pop(ch, None)
            raise
        return chan


class RemoteSerial:
    """A VM's serial console through the engine service: `await read()` (b"" once it ended, `reason`
    says why), `await write(data)`, `await close()`."""

    def __init__(self, engine: RemoteEngine, ch: int, name: str) -> None:
        self.engine, self.ch, self.name = engine, ch, name
        self.reason = ""
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._done = False

    def _got(self, data: bytes) -> None:
        if data and not self._done:
            self._queue.put_nowait(data)

    def _ended(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self.reason = reason
            self._queue.put_nowait(b"")

    async def read(self) -> bytes:
        data = await self._queue.get()
        if not data:
            self._queue.put_nowait(b"")      # stays ended for later reads
        return data

    async def write(self, data: bytes) -> None:
        if self._done:
            raise PermanentError(f"the serial console of {self.name} is closed ({self.reason})",
                                 "open it again once the VM runs")
        await self.engine._send({"op": "serial", "ch": self.ch, "data": base64.b64encode(data).decode()})

    async def close(self) -> None:
        if self.engine._serials.pop(self.ch, None) is not None:
            with contextlib.suppress(FerryError, OSError):
                await self.engine._send({"op": "serial_close", "ch": self.ch})
        self._ended("closed")
        self._queue = asyncio.Queue()       # what came meanwhile is not read: closed is closed
        self._queue.put_nowait(b"")


async def connect(ws: Workspace, *, client: str = "cli", autostart: bool = True, reconnect: bool = False,
                  opener: Opener | None = None, fetch_site: bool = True) -> RemoteEngine:
    """The workspace's engine, started (detached) when none runs and `autostart`; through `opener`
    when given (`ferry --engine`). Without `fetch_site`, `.site` stays None (`get_site()` asks)."""
    engine = RemoteEngine(ws, client=client, autostart=autostart, reconnect=reconnect, opener=opener,
                          fetch_site=fetch_site)
    try:
        await engine.start()
    except BaseException:
        await engine.close()     # the SSH connection of an opener, when it was made
        raise
    return engine


def engine_pid_alive(pid: int | None) -> bool:
    """Whether the engine process runs (a zombie, ended but not yet reaped, does not)."""
    from .helpers import pid_running
    return bool(pid) and pid_running(pid)
