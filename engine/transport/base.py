"""The transport interface: how the engine reaches a host (local subprocess or SSH)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RunResult:
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mode: int          # full st_mode (type bits + permissions)
    mtime_ns: int
    uid: int
    gid: int

    @property
    def is_dir(self) -> bool:
        import stat
        return stat.S_ISDIR(self.mode)


class ByteReader(abc.ABC):
    @abc.abstractmethod
    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b'' at end of stream."""

    async def readexactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read(n - len(buf))
            if not chunk:
                raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def readall(self) -> bytes:
        parts = []
        while chunk := await self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)


class ByteWriter(abc.ABC):
    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until the peer has room (backpressure)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Send end-of-file."""


class Process(abc.ABC):
    """A process started on a host, with byte streams and backpressure."""

    stdin: ByteWriter
    stdout: ByteReader
    stderr: ByteReader

    @abc.abstractmethod
    async def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; returns the exit status (negative signal number if killed)."""

    @abc.abstractmethod
    async def kill(self) -> None: ...


class Transport(abc.ABC):
    """One host. All methods raise TransportError (transient) when the host cannot be reached."""

    kind: str = "?"

    def __init__(self, host: str) -> None:
        self.host = host

    @abc.abstractmethod
    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = 60.0, check: bool = False) -> RunResult:
        """Run argv (no shell on the local side; safely quoted for ssh) and collect its output."""

    async def sh(self, script: str, *, input: bytes | None = None,
                 timeout: float | None = 60.0, check: bool = False) -> RunResult:
        """Run a POSIX shell script on the host."""
        return await self.run(["sh", "-c", script], input=input, timeout=timeout, check=check)

    @abc.abstractmethod
    async def start(self, argv: Sequence[str]) -> Process:
        """Start argv with byte streams."""

    @abc.abstractmethod
    async def read_file(self, path: str) -> bytes: ...

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Write atomically (temp file + rename) and durably (fsync)."""

    @abc.abstractmethod
    async def stat(self, path: str) -> FileStat | None:
        """lstat; None when the path does not exist."""

    @abc.abstractmethod
    async def listdir(self, path: str) -> list[str]: ...

    @abc.abstractmethod
    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None: ...

    @abc.abstractmethod
    async def remove(self, path: str) -> None:
        """Remove a file (not a directory); missing is not an error."""

    @abc.abstractmethod
    async def open_unix(self, path: str):
        """Connect to a UNIX socket on the host; returns (ByteReader, ByteWriter)."""

    async def close(self) -> None:
        """Release pooled connections."""
