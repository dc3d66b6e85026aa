"""The local transport: this machine, through asyncio subprocesses (argv, never a shell) and threads."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import stat as stat_mod
import tempfile
from typing import Sequence

from ..errors import CommandError, PermanentError, TransportError
from ..helpers import TASK_TAG, tagged
from .base import ByteReader, ByteWriter, FileStat, Process, RunResult, Transport

# StreamReader pauses the pipe at 2x this: enough to keep a fast stream busy, small enough to bound memory.
STREAM_LIMIT = 1 << 20


def _args(argv: Sequence) -> list[str | bytes]:
    if not argv:
        raise PermanentError("empty command", "pass the program and its arguments")
    return [os.fspath(a) for a in argv]


def describe_argv(argv: Sequence) -> str:
    """argv as an operator reads it in messages (shell-quoted, shortened)."""
    text = " ".join(shlex.quote(a if isinstance(a, str) else os.fsdecode(a)) for a in map(os.fspath, argv))
    return text if len(text) <= 120 else text[:117] + "..."


class StreamReaderAdapter(ByteReader):
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._r = reader

    async def read(self, n: int = 65536) -> bytes:
        return await self._r.read(n)

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._r.readexactly(n)   # one copy out of the stream's buffer
        except asyncio.IncompleteReadError as e:
            raise EOFError(f"stream ended after {len(e.partial)} of {n} bytes") from None


class StreamWriterAdapter(ByteWriter):
    def __init__(self, writer) -> None:
        self._w = writer

    def write(self, data: bytes) -> None:
        self._w.write(data)

    async def drain(self) -> None:
        await self._w.drain()

    async def close(self) -> None:
        try:
            if self._w.can_write_eof():
                self._w.write_eof()
            else:
                self._w.close()
        except (BrokenPipeError, ConnectionResetError):
            pass   # the reader went away first; its exit status tells the story


class _SocketReader(StreamReaderAdapter):
    def __init__(self, reader: asyncio.StreamReader, pair: "_SocketPair") -> None:
        super().__init__(reader)
        self._pair = pair

    async def read(self, n: int = 65536) -> bytes:
        data = await super().read(n)
        if not data:
            self._pair.read_eof = True
            self._pair.maybe_close()
        return data


class _SocketWriter(StreamWriterAdapter):
    def __init__(self, writer: asyncio.StreamWriter, pair: "_SocketPair") -> None:
        super().__init__(writer)
        self._pair = pair

    async def close(self) -> None:
        await super().close()
        self._pair.eof_sent = True
        self._pair.maybe_close()


class _SocketPair:
    """A UNIX socket is released once both directions have ended (as an SSH channel closes)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer, self.read_eof, self.eof_sent = writer, False, False

    def maybe_close(self) -> None:
        if self.read_eof and self.eof_sent:
            self.writer.close()


_REAPERS: set[asyncio.Future] = set()


def _reap(proc: asyncio.subprocess.Process) -> None:
    """Collect a killed child in the background (a cancelled caller cannot wait for it)."""
    task = asyncio.ensure_future(proc.wait())
    _REAPERS.add(task)
    task.add_done_callback(_REAPERS.discard)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)   # the whole group: a shell pipeline dies with its leader
    except (ProcessLookupError, PermissionError):
        pass


class LocalProcess(Process):
    """A child process of this one; a stream given to another process (an fd) is None here."""

    def __init__(self, proc: asyncio.subprocess.Process, host: str, what: str) -> None:
        self._p, self._host, self._what = proc, host, what
        self.stdin = StreamWriterAdapter(proc.stdin) if proc.stdin else None
        self.stdout = StreamReaderAdapter(proc.stdout) if proc.stdout else None
        self.stderr = StreamReaderAdapter(proc.stderr) if proc.stderr else None

    async def wait(self, timeout: float | None = None) -> int:
        try:
            status = await asyncio.wait_for(self._p.wait(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise TransportError(f"{self._what} on {self._host} did not finish within {timeout:g} s",
                                 "the machine may be overloaded; kill it or wait longer") from None
        # The process and its output pipes are done (what it wrote stays readable): close the
        # transport now, while the loop runs, not in a garbage collection after it has closed.
        transport = getattr(self._p, "_transport", None)
        if transport is not None:
            transport.close()
        return status

    async def kill(self) -> None:
        if self._p.returncode is None:
            _killpg(self._p.pid)
        # asyncio's wait() returns only once the output pipes are closed too; a killed process
        # whose output nobody reads (the reader paused on a full buffer) would never get there.
        # So its pipes (stdin too) are closed now, while the loop runs; wait() reaps the process.
        # Not the whole subprocess transport: its close() polls the child (waitpid WNOHANG), and
        # when the child has just exited that reaps it under asyncio's child watcher, which then
        # logs "Unknown child process pid N, will report returncode 255" and loses the real status.
        transport = getattr(self._p, "_transport", None)
        if transport is not None:
            for fd in (0, 1, 2):
                pipe = transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()


class LocalTransport(Transport):
    """This machine. `host` is the Ferry host name (lab hosts are logical hosts on one machine)."""

    kind = "local"

    def __init__(self, host: str = "local") -> None:
        super().__init__(host)

    async def _spawn(self, argv: Sequence, stdin) -> asyncio.subprocess.Process:
        args = _args(argv)
        if TASK_TAG.get() and args and shutil.which(os.fsdecode(args[0])) is None:
            raise FileNotFoundError(args[0])   # said as plainly as when it runs untagged
        try:
            return await asyncio.create_subprocess_exec(
                *_args(tagged(args)), stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, limit=STREAM_LIMIT)
        except FileNotFoundError:
            raise CommandError(f"{os.fsdecode(args[0])}: command not found on {self.host}",
                               "install it or check the PATH", exit_status=127,
                               stderr=f"{os.fsdecode(args[0])}: command not found") from None
        except PermissionError:
            raise CommandError(f"{os.fsdecode(args[0])}: permission denied on {self.host}",
                               "check that it is executable", exit_status=126,
                               stderr=f"{os.fsdecode(args[0])}: permission denied") from None

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = 60.0, check: bool = False) -> RunResult:
        what = describe_argv(argv)
        try:
            proc = await self._spawn(argv, asyncio.subprocess.PIPE if input else asyncio.subprocess.DEVNULL)
        except CommandError as e:
            # Same shape as a shell on an ssh host would give: status 127/126 and a message on stderr.
            result = RunResult(e.exit_status or 127, b"", (e.stderr + "\n").encode())
            if check:
                raise
            return result
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(input or None)
        except (TimeoutError, asyncio.TimeoutError):
            _killpg(proc.pid)
            await proc.wait()
            raise TransportError(f"{what} on {self.host} timed out after {timeout:g} s",
                                 "the machine may be overloaded or the command hung; it was killed") from None
        except asyncio.CancelledError:
            _killpg(proc.pid)
            _reap(proc)
            raise
        # Done, its pipes read to the end: close the subprocess transport now, while the loop runs,
        # not in a garbage collection after it has closed (see LocalProcess.wait).
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
        result = RunResult(proc.returncode, out, err)
        if check and result.exit_status != 0:
            raise command_error(self.host, what, result)
        return result

    async def start(self, argv: Sequence[str]) -> Process:
        proc = await self._spawn(argv, asyncio.subprocess.PIPE)
        return LocalProcess(proc, self.host, describe_argv(argv))

    # ------------------------------------------------------------ files

    async def _files(self, what: str, path: str, fn, *args):
        try:
            return await asyncio.to_thread(fn, path, *args)
        except OSError as e:
            raise PermanentError(f"cannot {what} {path} on {self.host}: {e.strerror or e}",
                                 _hint(e)) from e

    async def read_file(self, path: str) -> bytes:
        return await self._files("read", path, _read)

    async def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        await self._files("write", path, write_atomic, data, mode)

    async def stat(self, path: str) -> FileStat | None:
        return await self._files("stat", path, _stat)

    async def listdir(self, path: str) -> list[str]:
        return await self._files("list", path, lambda p: sorted(os.listdir(p)))

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self._files("create directory", path, _mkdir, parents, mode)

    async def remove(self, path: str) -> None:
        await self._files("remove", path, _remove)

    async def open_unix(self, path: str):
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        except OSError as e:
            raise PermanentError(f"cannot connect to UNIX socket {path} on {self.host}: {e.strerror or e}",
                                 "is the service listening there (for QMP: is the VM running)?") from None
        pair = _SocketPair(writer)
        return _SocketReader(reader, pair), _SocketWriter(writer, pair)


def command_error(host: str, what: str, result: RunResult) -> CommandError:
    """run(check=True) failed: the message ends with the last line the command wrote to stderr."""
    lines = [l for l in result.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    last = lines[-1].strip() if lines else "no error output"
    return CommandError(f"{what} on {host} exited with status {result.exit_status}: {last}",
                        "see the command's error output (stderr) for details", exit_status=result.exit_status,
                        stderr=result.stderr.decode("utf-8", "replace"))


def _hint(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "check the path and that its parent folder exists"
    if isinstance(e, PermissionError):
        return "check the permissions of the path and the user Ferry runs as"
    if isinstance(e, IsADirectoryError):
        return "that path is a directory"
    return "check the path and the free space"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stat(path: str) -> FileStat | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return FileStat(path, st.st_size, st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid)


def _mkdir(path: str, parents: bool, mode: int) -> None:
    if parents:
        os.makedirs(path, mode=mode, exist_ok=True)
    else:
        os.mkdir(path, mode)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat_mod.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "it is a directory; remove() deletes files only", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".ferry-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode if mode is not None else 0o644 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads: ask /proc instead.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
