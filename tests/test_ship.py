"""Programs shipped to a host (engine/ship.py), against real parts: a local host and OpenSSH sshd on
loopback, a real sh and python3. What goes in comes out byte for byte, a large program comes on stdin,
and a host without python3 says so in one way for every program."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ferry.engine.config import DatastoreSpec, HostSpec
from ferry.engine.errors import PermanentError
from ferry.engine.helpers import stop_helpers
from ferry.engine.hostfacts import gather_facts
from ferry.engine.ship import MAX_COMMAND, Program
from ferry.engine.transport import LocalTransport

ARGS = ["two words", "it's", 'say "hi"', "$HOME", "`id`", "$(id)", "back\\slash", "line\nbreak", "", "*",
        "; rm -rf /", "-n", "--", "grüße ☃"]

ECHO_PY = Program("ferry-echo", "import json, sys; print(json.dumps([__name__, sys.argv[1:]]))")
ECHO_SH = Program("ferry-echo", lang="sh", source='printf "%s\\0" "$0" "$@"')


@pytest.fixture(params=["local", "ssh"])
async def transport(request, sshd_factory, tmp_path):
    """This machine, or an ssh host on loopback."""
    pool = sshd_factory.site(tmp_path / "site", 1).pool() if request.param == "ssh" else None
    yield pool.get("ssh1") if pool else LocalTransport("lab1")
    if pool:
        await pool.close()


async def test_a_program_gets_its_arguments_byte_for_byte(transport):
    r = await ECHO_PY.run(transport, *ARGS, timeout=30)
    assert r.ok and json.loads(r.stdout) == ["__main__", ARGS]
    r = await ECHO_SH.run(transport, *ARGS, timeout=30)
    assert r.ok and r.stdout.split(b"\0")[:-1] == [b"ferry-echo", *(a.encode() for a in ARGS)]


async def test_a_large_program_comes_on_stdin_and_keeps_its_name_in_ps(transport):
    """Larger than a command line can carry; stdin is its own after its source (the agent's case)."""
    source = ("import hashlib, os, sys\n" + "# padding\n" * 20000 +
              "print(os.getpid(), __name__, sys.argv[1:], flush=True)\n"
              "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), flush=True)\n")
    assert len(source) > 2 * MAX_COMMAND
    with pytest.raises(ValueError, match="ship it on_stdin"):
        Program("ferry-big", source)
    big = Program("ferry-big", source, on_stdin=True)
    data = os.urandom(3 << 20)
    proc = await transport.start(big.argv("an arg"))
    proc.stdin.write(big.preamble() + data[:1000])
    await proc.stdin.drain()
    first = b""
    while not first.endswith(b"\n"):
        first += await proc.stdout.read(1)
    pid, name, args = first.decode().split(" ", 2)
    assert (name, args) == ("__main__", "['an arg']\n")
    assert b"ferry-big" in Path(f"/proc/{pid}/cmdline").read_bytes()   # sshd runs on this machine too
    proc.stdin.write(data[1000:])
    await proc.stdin.close()
    rest = await proc.stdout.readall()
    assert await proc.wait() == 0
    assert rest.decode().strip() == hashlib.sha256(data).hexdigest()


class HostWithoutPython(LocalTransport):
    """This machine as a host where /usr/bin/python3 is not executable and PATH is `path` (real
    processes in a mount namespace of their own: needs root and unshare)."""

    def __init__(self, host: str, tmp: Path, path: str) -> None:
        super().__init__(host)
        self.blank = tmp / "not-python"
        self.blank.write_bytes(b"")
        self.blank.chmod(0o644)
        self.path = path

    def _wrap(self, argv):
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /usr/bin/python3 && PATH=$1 && shift && exec "$@"',
                str(self.blank), self.path, *argv]

    async def run(self, argv, **kw):
        return await super().run(self._wrap(argv), **kw)

    async def start(self, argv):
        return await super().start(self._wrap(argv))


def _bin(tmp: Path, *tools: str) -> str:
    """A folder for PATH with only these tools; python3 a copy of the system's (the mount hides the
    file /usr/bin/python3 names, whatever path leads to it)."""
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for tool in tools:
        if tool == "python3":
            shutil.copy(os.path.realpath("/usr/bin/python3"), d / tool)
        else:
            (d / tool).symlink_to(shutil.which(tool))
    return str(d)


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare")
                                or not os.path.exists("/usr/bin/python3"),
                                reason="a host without python3 is made with a mount namespace over /usr/bin/python3: "
                                       "needs root, unshare and that file")


@needs_root
async def test_a_host_without_python3_says_so_for_every_program(tmp_path):
    t = HostWithoutPython("lab1", tmp_path, _bin(tmp_path, "sh", "uname", "df", "cat", "grep", "nproc", "tail"))
    for run in (lambda: ECHO_PY.run(t, "x", timeout=30), lambda: stop_helpers(t, "t1-abcdef")):
        with pytest.raises(PermanentError) as e:
            await run()
        assert e.value.message == "lab1: python3 is not installed"
        assert "python3-minimal" in e.value.hint
    # a shell program still runs there
    facts = await gather_facts(t, HostSpec("lab1", "lab", "local"), [DatastoreSpec("one", str(tmp_path), ("lab1",))])
    assert facts.reachable and facts.error is None and facts.kernel == os.uname().release
    assert facts.datastores[0].error is None and facts.datastores[0].free > 0


@needs_root
async def test_python3_elsewhere_on_path_is_found(tmp_path):
    t = HostWithoutPython("lab1", tmp_path, _bin(tmp_path, "sh", "python3"))
    r = await ECHO_PY.run(t, "x", timeout=30)
    assert r.ok and json.loads(r.stdout) == ["__main__", ["x"]]
