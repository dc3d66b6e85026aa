"""Programs Ferry ships to a host and runs there: the replication agent, the host-facts script, the
secure-delete wipe, the killer of a task's helper processes. One way for them all:

- A program is its source, shipped with each run (nothing is installed on a host), either a POSIX sh
  script or a Python 3 program that needs the standard library only. It runs as `sh -c SOURCE NAME ARGS`;
  Python through a small sh prologue that finds the interpreter (below), then as `python3 -S -c`.
- The command goes through the host's Transport (or the OpenSSH client), which quotes it for the
  remote shell the same way for all (transport.openssh.remote_command).
- A source travels on the command line when it is small. sshd hands the whole command to the login
  shell as one argument, which Linux caps at 128 KiB, so a large program (the agent, about 90 KB
  before quoting) is shipped on stdin instead: a boot line on the command line reads its length and
  its source, then the program has stdin to itself.
- A host without python3 (exit status 127 from the prologue) is one error, the same for every program.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from .errors import PermanentError
from .transport.base import RunResult, Transport
from .transport.openssh import remote_command
from .vm.hostcmd import watch

# The largest command line (quoted, arguments aside) a program may take; past it, ship it on stdin.
MAX_COMMAND = 64 << 10
MISSING = 127   # the shell's status for a command not found; the prologue's when there is no python3

# The system's python3 when there is one (predictable and quick to start: a version-manager shim on
# PATH can cost 100 ms per start), else whatever PATH offers. $0 is the program's name, $1 its code.
PYTHON_PROLOGUE = ('p=/usr/bin/python3; [ -x "$p" ] || p=$(command -v python3) || exit 127; '
                   'c=$1; shift; exec "$p" -S -c "$c" "$@"')

# The code on the command line of a program shipped on stdin: reads "<length>\n<source>", then runs
# the source as the main module. Its name stays visible in the process's command line (the agent
# finds its kin by it). Unbuffered os.read: nothing that follows the source is swallowed by a buffer.
BOOT = """import os
def r(n):
    b = b''
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            raise SystemExit(2)
        b += c
    return b
h = b''
while not h.endswith(b'\\n'):
    h += r(1)
exec(compile(r(int(h)), %r, 'exec'), {'__name__': '__main__'})
"""


def missing_python(host: str) -> PermanentError:
    return PermanentError(f"{host}: python3 is not installed",
                          "Ferry needs python3 (standard library only) on the host: apt-get install python3-minimal")


@dataclass(frozen=True)
class Program:
    """A program shipped to a host with each run of it."""
    name: str               # ferry-facts: its $0, in ps, in tracebacks
    source: str
    lang: str = "python"    # "python" (python3 -S, standard library only) or "sh" (POSIX sh)
    on_stdin: bool = False  # shipped on stdin ahead of what the program reads (see preamble)

    def __post_init__(self) -> None:
        if self.lang not in ("python", "sh") or (self.on_stdin and self.lang != "python"):
            raise ValueError(f"{self.name}: a program is python or sh, and only python comes on stdin")
        size = len(remote_command(self.argv()))
        if size > MAX_COMMAND:
            raise ValueError(f"{self.name}: a command line of {size} bytes is over {MAX_COMMAND}: ship it on_stdin")

    def argv(self, *args: str, python: str | None = None) -> list[str]:
        """The command that runs the program with args on a host; python: an interpreter known to be
        there (this process's own, for a program run on this machine) instead of looking for one."""
        code = BOOT % self.name if self.on_stdin else self.source
        if self.lang == "sh":
            return ["sh", "-c", code, self.name, *args]
        if python is not None:
            return [python, "-S", "-c", code, *args]
        return ["sh", "-c", PYTHON_PROLOGUE, self.name, code, *args]

    def preamble(self) -> bytes:
        """What a program shipped on stdin reads first: its length, then its source."""
        if not self.on_stdin:
            return b""
        data = self.source.encode()
        return b"%d\n" % len(data) + data

    async def run(self, t: Transport, *args: str, timeout: float | None,
                  on_out: Callable[[str], None] | None = None,
                  on_err: Callable[[str], None] | None = None) -> RunResult:
        """Run the program on t's host to its end: what it said and its exit status. on_out/on_err get
        its output as it comes (a long wipe's progress). No python3 there is a PermanentError."""
        if self.on_stdin:
            raise ValueError(f"{self.name} reads its source from stdin: start it, write its preamble")
        argv = self.argv(*args)
        if on_out is None and on_err is None:
            r = await t.run(argv, timeout=timeout)
        else:
            async with asyncio.timeout(timeout):
                r = await watch(t, argv, on_out=on_out, on_err=on_err)
        if r.exit_status == MISSING and self.lang == "python":
            raise missing_python(t.host)
        return r
