"""A QEMU guest agent (qemu-ga) client over any (ByteReader, ByteWriter) pair.

The agent answers one command at a time with no ids, and the channel may hold stale replies or
half a command from an earlier client; so every session starts (and restarts after a timeout)
with guest-sync-delimited: a 0xFF byte resets the agent's parser, and the reply is read after the
0xFF byte the agent puts before it.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import FerryError, PermanentError, TransientError
from ..transport.base import ByteReader, ByteWriter, Transport
from .qmp import LineReader, decode, encode

_DELIMITER = 0xFF


class AgentNotAnswering(TransientError):
    """The guest agent did not answer (not installed, not started yet, or the guest is busy)."""


class AgentUnavailable(PermanentError):
    """The VM has no guest-agent channel to connect to (not running, or started without one)."""


class AgentError(PermanentError):
    """The agent answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str, *, vm: str = "") -> None:
        where = f" in {vm}" if vm else ""
        super().__init__(f"guest agent{where}: {command} failed: {error_class}: {desc}",
                         "the guest refused or could not do it; see the description")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class GuestInfo:
    version: str
    commands: tuple[str, ...]      # enabled commands


@dataclass(frozen=True)
class GuestOSInfo:
    id: str
    name: str
    pretty_name: str
    version: str
    version_id: str
    kernel_release: str
    kernel_version: str
    machine: str


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str
    addresses: tuple[str, ...]     # "address/prefix"


@dataclass(frozen=True)
class GuestFilesystem:
    name: str
    mountpoint: str
    type: str
    used_bytes: int | None
    total_bytes: int | None
    disks: tuple[str, ...]         # guest device names, e.g. /dev/vda


@dataclass(frozen=True)
class GuestVcpu:
    logical_id: int
    online: bool
    can_offline: bool


@dataclass(frozen=True)
class GuestExecResult:
    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes


class GuestAgent:
    """One connection to a guest agent. Commands are serialised: the agent handles one at a time."""

    def __init__(self, reader: ByteReader, writer: ByteWriter, *, name: str = "VM") -> None:
        self.name = name
        self._lines = LineReader(reader)
        self._writer = writer
        self._lock = asyncio.Lock()
        self._synced = False

    @classmethod
    async def open(cls, transport: Transport, path: str, *, name: str = "VM",
                   timeout: float = 5.0) -> "GuestAgent":
        """Connects to the agent's chardev socket on a host and synchronises with the agent."""
        try:
            reader, writer = await asyncio.wait_for(transport.open_unix(path), timeout)
        except asyncio.TimeoutError:
            raise AgentNotAnswering(f"cannot reach the guest-agent socket of {name} on {transport.host}",
                                    "the host may be unreachable") from None
        except FerryError as e:
            raise AgentUnavailable(f"{name} has no guest-agent channel to connect to: {e.message}",
                                   "is the VM running, and was it started with a guest-agent channel?") from None
        agent = cls(reader, writer, name=name)
        try:
            await agent.sync(timeout=timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        try:
            await self._writer.close()
        except (OSError, FerryError):
            pass

    async def __aenter__(self) -> "GuestAgent":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ protocol

    def _not_answering(self, what: str, timeout: float) -> AgentNotAnswering:
        return AgentNotAnswering(f"the guest agent in {self.name} is not answering ({what} within {timeout:g} s)",
                                 "is qemu-guest-agent installed and running in the guest? it may still be booting")

    async def sync(self, *, timeout: float = 5.0) -> None:
        """Resets the channel: the agent drops partial input and we drop stale replies."""
        async with self._lock:
            await self._sync(timeout)

    async def _sync(self, timeout: float) -> None:
        token = random.randrange(1, 2**31)
        self._lines.discard_buffered()
        fallback_sent = False
        try:
            await self._send(bytes([_DELIMITER]) + encode(
                {"execute": "guest-sync-delimited", "arguments": {"id": token}}))
            async with asyncio.timeout(timeout):
                while True:
                    line = await self._lines.readline()
                    if line is None:
                        raise self._closed()
                    # Whatever precedes the agent's 0xFF is stale output or half a reply.
                    if (cut := line.rfind(bytes([_DELIMITER]))) >= 0:
                        line = line[cut + 1:]
                    msg = decode(line) or {}
                    # A reply to an older sync (ours or an earlier client's) carries another token.
                    if msg.get("return") == token:
                        self._synced = True
                        return
                    err = msg.get("error") or {}
                    if (not fallback_sent and err.get("class") == "CommandNotFound"
                            and "guest-sync-delimited" in err.get("desc", "")):
                        # Agents older than guest-sync-delimited: plain guest-sync, same token.
                        await self._send(encode({"execute": "guest-sync", "arguments": {"id": token}}))
                        fallback_sent = True
        except TimeoutError:
            raise self._not_answering("no reply to guest-sync-delimited", timeout) from None

    def _closed(self) -> AgentNotAnswering:
        return AgentNotAnswering(f"the guest-agent channel of {self.name} closed",
                                 "the VM may have stopped; reconnect when it runs")

    async def _send(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, EOFError) as e:
            raise AgentNotAnswering(f"cannot write to the guest-agent channel of {self.name}: {e}",
                                    "the VM may have stopped; reconnect when it runs") from None

    async def _issue(self, command: str, arguments: dict[str, Any] | None, sync_timeout: float) -> None:
        """Send one command on a synchronised stream (under the lock). Until its reply is read
        the stream is out of step; a timeout or cancel leaves it so, and the next command syncs."""
        if not self._synced:
            await self._sync(sync_timeout)
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._synced = False
        await self._send(encode(message))

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = 30.0, sync_timeout: float = 5.0) -> Any:
        """Runs an agent command and returns its "return" value (AgentError on an error reply)."""
        async with self._lock:
            await self._issue(command, arguments, sync_timeout)
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        line = await self._lines.readline()
                        if line is None:
                            raise self._closed()
                        reply = decode(line)
                        if reply is not None and ("return" in reply or "error" in reply):
                            break
            except TimeoutError:
                raise self._not_answering(f"no reply to {command}", timeout) from None
            self._synced = True
        if "error" in reply:
            err = reply["error"]
            raise AgentError(command, err.get("class", "GenericError"), err.get("desc", "no description"),
                             vm=self.name)
        return reply.get("return")

    async def execute_no_reply(self, command: str, arguments: dict[str, Any] | None = None, *,
                               grace: float = 1.0, sync_timeout: float = 5.0) -> None:
        """For commands that answer only on failure (guest-shutdown, guest-suspend-*)."""
        async with self._lock:
            await self._issue(command, arguments, sync_timeout)
            try:
                async with asyncio.timeout(grace):
                    line = await self._lines.readline()
            except TimeoutError:
                return        # silence is success
            reply = decode(line) if line else None
            if reply and "error" in reply:
                self._synced = True
                err = reply["error"]
                raise AgentError(command, err.get("class", "GenericError"), err.get("desc", "no description"),
                                 vm=self.name)

    # ------------------------------------------------------------ commands

    async def ping(self, *, timeout: float = 5.0) -> None:
        await self.execute("guest-ping", timeout=timeout, sync_timeout=timeout)

    async def info(self) -> GuestInfo:
        r = await self.execute("guest-info")
        return GuestInfo(r.get("version", ""),
                         tuple(c["name"] for c in r.get("supported_commands", []) if c.get("enabled")))

    async def osinfo(self) -> GuestOSInfo:
        r = await self.execute("guest-get-osinfo")
        return GuestOSInfo(r.get("id", ""), r.get("name", ""), r.get("pretty-name", ""), r.get("version", ""),
                           r.get("version-id", ""), r.get("kernel-release", ""), r.get("kernel-version", ""),
                           r.get("machine", ""))

    async def network_interfaces(self) -> list[GuestInterface]:
        r = await self.execute("guest-network-get-interfaces")
        return [GuestInterface(i.get("name", ""), i.get("hardware-address", ""),
                               tuple(f"{a['ip-address']}/{a.get('prefix', '')}" for a in i.get("ip-addresses", [])))
                for i in r]

    async def filesystems(self) -> list[GuestFilesystem]:
        r = await self.execute("guest-get-fsinfo")
        return [GuestFilesystem(f.get("name", ""), f.get("mountpoint", ""), f.get("type", ""),
                                f.get("used-bytes"), f.get("total-bytes"),
                                tuple(d.get("dev", "") for d in f.get("disk", []) if d.get("dev")))
                for f in r]

    async def fsfreeze_status(self) -> str:
        """"thawed" or "frozen"."""
        return await self.execute("guest-fsfreeze-status")

    async def fsfreeze_freeze(self, *, timeout: float = 60.0) -> int:
        """Freezes the guest's filesystems; returns how many. The agent thaws all if it fails."""
        return await self.execute("guest-fsfreeze-freeze", timeout=timeout)

    async def fsfreeze_thaw(self, *, timeout: float = 60.0) -> int:
        return await self.execute("guest-fsfreeze-thaw", timeout=timeout)

    async def shutdown(self, mode: str = "powerdown") -> None:
        """Asks the guest to power down ("powerdown"), "halt" or "reboot"; no reply on success."""
        if mode not in ("powerdown", "halt", "reboot"):
            raise PermanentError(f"unknown shutdown mode {mode!r}", "use powerdown, halt or reboot")
        await self.execute_no_reply("guest-shutdown", {"mode": mode})

    async def set_time(self, ns: int | None = None) -> None:
        """Sets the guest clock (nanoseconds since the epoch, default: the host's now)."""
        await self.execute("guest-set-time", {"time": time.time_ns() if ns is None else int(ns)})

    async def vcpus(self) -> list[GuestVcpu]:
        r = await self.execute("guest-get-vcpus")
        return [GuestVcpu(v["logical-id"], bool(v["online"]), bool(v.get("can-offline", False))) for v in r]

    async def set_vcpus(self, online: dict[int, bool]) -> int:
        """Brings vCPUs on- or offline by logical id; returns how many the agent handled."""
        return await self.execute("guest-set-vcpus", {"vcpus": [
            {"logical-id": cpu, "online": state} for cpu, state in sorted(online.items())]})

    async def exec(self, path: str, args: Sequence[str] = (), *, input: bytes | None = None,
                   timeout: float = 60.0, poll: float = 0.1) -> GuestExecResult:
        """Runs a program in the guest and collects its exit status and output."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        pid = (await self.execute("guest-exec", arguments))["pid"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            st = await self.execute("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return GuestExecResult(st.get("exitcode"), st.get("signal"),
                                       base64.b64decode(st.get("out-data", "")),
                                       base64.b64decode(st.get("err-data", "")))
            if loop.time() > deadline:
                raise self._not_answering(f"{path} still running after", timeout)
            await asyncio.sleep(poll)

    async def write_file(self, path: str, data: bytes, *, append: bool = False) -> None:
        """Writes a file in the guest through the agent (no network needed)."""
        handle = await self.execute("guest-file-open", {"path": path, "mode": "a" if append else "w"})
        try:
            for i in range(0, len(data), 48 * 1024):
                await self.execute("guest-file-write", {
                    "handle": handle, "buf-b64": base64.b64encode(data[i:i + 48 * 1024]).decode()})
        finally:
            await self.execute("guest-file-close", {"handle": handle})

    async def read_file(self, path: str, *, limit: int = 16 << 20) -> bytes:
        handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        parts: list[bytes] = []
        try:
            while sum(map(len, parts)) < limit:
                r = await self.execute("guest-file-read", {"handle": handle, "count": 48 * 1024})
                parts.append(base64.b64decode(r.get("buf-b64", "")))
                if r.get("eof") or not r.get("count"):
                    break
        finally:
            await self.execute("guest-file-close", {"handle": handle})
        return b"".join(parts)
