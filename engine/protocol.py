"""The engine service's wire: length-prefixed JSON frames over a UNIX socket in the workspace.

A frame is 4 bytes of big-endian length and that many bytes of JSON (engine.api's codec). The
client speaks first with a hello (its version); the engine answers with its own, or refuses.
Then calls and their answers, and, once subscribed, events, all as frames:

    -> {"op": "hello", "version": V, "protocol": P, "client": "cli"|"console"}
    <- {"op": "hello", "version": V, "protocol": P, "pid": N}  |  {"op": "refused", "message", "hint"}
    -> {"op": "call", "id": 7, "method": "get_task", "args": {"task_id": 3}}
    <- {"op": "result", "id": 7, "value": ...}  |  {"op": "error", "id": 7, "error": {...}}
    -> {"op": "subscribe"}
    <- {"op": "event", "type": "progress", "task_id": 3, "data": ..., "ts": ...}

A VM's serial console is a stream, not a call: the client picks a channel number (unique on its
connection) and opens it with a call; once the result came, bytes flow both ways in serial frames
(base64), until either side closes the channel (the engine's close says why it ended):

    -> {"op": "call", "id": 8, "method": "serial_open", "args": {"name": "web1", "ch": 1}}
    <- {"op": "result", "id": 8, "value": {"ch": 1}}      (or an error: not running, open elsewhere)
    <- {"op": "serial", "ch": 1, "data": "<base64>"}      what the guest printed
    -> {"op": "serial", "ch": 1, "data": "<base64>"}      what the operator typed
    -> {"op": "serial_close", "ch": 1}
    <- {"op": "serial_close", "ch": 1, "reason": "web1 stopped"}

The engine reads the VM's port only as fast as this connection takes what it sends (it waits for
each frame to drain), so a slow console slows only the guest's serial output, never the engine.
"""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import PermanentError

if TYPE_CHECKING:    # not imported here: a command line's blocking client (engine/calls.py) starts no loop
    import asyncio
    import socket    # (nor the socket module's enums: see calls.BlockingEngine.connect)

MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")
SOCKET_NAME = "engine.sock"
LOCK_NAME = "engine.lock"      # held by the workspace's one engine for its whole life
PID_NAME = "engine.pid"
UNIX_PATH_MAX = 107


class ProtocolError(PermanentError):
    """The other side sent something that is not a frame of this protocol."""


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's JSON bytes, or None at a clean end of stream."""
    import asyncio
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("the connection broke inside a frame header") from None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes is larger than the limit of {MAX_FRAME}",
                            "is something other than Ferry listening on this socket?")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the connection broke inside a frame") from None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes | None:
    """read_frame over a blocking socket: the next frame's JSON bytes, or None at a clean end."""
    head = _recv_exactly(sock, 4)
    if not head:
        return None
    if len(head) < 4:
        raise ProtocolError("the connection broke inside a frame header")
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes is larger than the limit of {MAX_FRAME}",
                            "is something other than Ferry listening on this socket?")
    data = _recv_exactly(sock, n)
    if len(data) < n:
        raise ProtocolError("the connection broke inside a frame")
    return data


def frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"a frame of {len(data)} bytes is larger than the limit of {MAX_FRAME}")
    return _LEN.pack(len(data)) + data


@contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A path to `path` that fits a UNIX socket address (107 bytes): itself when short enough, else
    through /proc/self/fd of its folder, held open meanwhile."""
    text = str(path)
    if len(text.encode()) <= UNIX_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket, from the kernel."""
    import socket
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def user_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def in_group(uid: int, gid: int, group: str) -> bool:
    """Whether the user `uid` (whose process runs with primary group `gid`) belongs to `group`."""
    import grp
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    return gid == g.gr_gid or user_name(uid) in g.gr_mem


def paths(ws: Any) -> tuple[Path, Path, Path]:
    """The workspace's engine socket, lock and pid file."""
    return ws.root / SOCKET_NAME, ws.root / LOCK_NAME, ws.root / PID_NAME


def stopped_marker(ws: Any) -> Path:
    """Written when the engine is told to stop, removed when one serves again: a front end whose
    engine went away starts no other one while it is there (the engine was stopped on purpose), even
    when the engine's last event never reached it."""
    return ws.root / "engine.stopped"


def running_pid(ws: Any) -> int | None:
    """The pid of the engine that holds this workspace's lock (-1: held, pid not written yet), or
    None when no engine runs."""
    import fcntl
    _, lock, pidfile = paths(ws)
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def hello(client: str) -> dict[str, Any]:
    from .api import PROTOCOL, VERSION
    return {"op": "hello", "version": VERSION, "protocol": PROTOCOL, "client": client}
