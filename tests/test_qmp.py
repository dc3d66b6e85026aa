"""The QMP and guest-agent clients against real QEMU processes (no guest OS needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from ferry.engine.errors import PermanentError, TransientError
from ferry.engine.platform.liveboot import LivePaths, launch, stop
from ferry.engine.platform.qga import AgentNotAnswering, AgentUnavailable, GuestAgent
from ferry.engine.platform.qmp import QMPClient, QMPDisconnected, QMPError, QMPTimeout
from ferry.engine.transport.local import LocalTransport
from harness.qemu import kill_pidfile

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


@pytest.fixture
def runtime_dir():
    d = tempfile.mkdtemp(prefix="ferry-q-", dir="/tmp")   # short: UNIX socket paths are limited
    yield d
    for pidfile in Path(d).glob("*.pid"):
        kill_pidfile(pidfile)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def transport() -> LocalTransport:
    return LocalTransport()


async def _qemu(transport, runtime_dir, name, *machine_args: str) -> LivePaths:
    """A QEMU daemon with a QMP socket and a guest-agent channel, but no guest to answer on it."""
    paths = LivePaths(runtime_dir, name)
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", *machine_args,
            "-chardev", f"socket,id=qmp0,path={paths.qmp},server=on,wait=off", "-mon", "chardev=qmp0,mode=control",
            "-daemonize", "-pidfile", paths.pidfile]
    await launch(transport, argv, paths)
    return paths


@pytest.fixture
async def vm(transport, runtime_dir) -> LivePaths:
    return await _qemu(transport, runtime_dir, "none", "-machine", "none")


async def test_capabilities_and_status(transport, vm):
    async with await QMPClient.open(transport, vm.qmp, name="none") as qmp:
        assert qmp.version["major"] >= 6
        assert (await qmp.execute("query-status"))["status"] == "running"
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"stop", "cont", "query-status"} <= names


async def test_error_replies_carry_the_qmp_class(transport, vm):
    async with await QMPClient.open(transport, vm.qmp, name="none") as qmp:
        with pytest.raises(QMPError) as err:
            await qmp.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound" and isinstance(err.value, PermanentError)
        assert "no-such-command" in err.value.message and err.value.hint
        with pytest.raises(QMPError) as err:
            await qmp.execute("device_del", {"id": "nope"})
        assert err.value.error_class == "DeviceNotFound" and "nope" in err.value.desc
        # The connection is still good after errors.
        assert (await qmp.execute("query-status"))["running"] is True


async def test_stop_and_cont_produce_events(transport, vm):
    async with await QMPClient.open(transport, vm.qmp, name="none") as qmp:
        with qmp.subscribe("STOP", "RESUME") as sub:
            await qmp.execute("stop")
            assert (await sub.get(timeout=5)).name == "STOP"
            assert (await qmp.execute("query-status"))["status"] == "paused"
            await qmp.execute("cont")
            resumed = await sub.get(timeout=5)
        assert resumed.name == "RESUME" and resumed.timestamp > 0
        assert [e.name for e in qmp.recent_events][-2:] == ["STOP", "RESUME"]
        # Several commands in flight at once each get their own answer.
        results = await asyncio.gather(*(qmp.execute("query-status") for _ in range(5)),
                                       qmp.execute("query-name"))
        assert all(r["status"] == "running" for r in results[:5]) and results[5] == {}


async def test_timeouts_and_disconnects(transport, vm):
    pid = int(Path(vm.pidfile).read_text())
    async with await QMPClient.open(transport, vm.qmp, name="none") as qmp:
        # A QEMU that cannot answer (frozen with SIGSTOP) times out as a retryable error...
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(QMPTimeout) as err:
                await qmp.execute("query-status", timeout=0.5)
            assert isinstance(err.value, TransientError)
        finally:
            os.kill(pid, signal.SIGCONT)
        # ...and the late answer to it does not confuse the next command.
        assert (await qmp.execute("query-status", timeout=5))["status"] == "running"
        with pytest.raises(QMPTimeout):
            await qmp.wait_event("BLOCK_JOB_READY", timeout=0.2)

        sub = qmp.subscribe()
        await stop(transport, vm.pidfile)
        # QEMU says why it goes, then the connection ends and every waiter hears about it.
        shutdown = await sub.get(timeout=5)
        assert shutdown.name == "SHUTDOWN" and shutdown.data["reason"] == "host-signal"
        with pytest.raises(QMPDisconnected):
            await sub.get(timeout=5)
        with pytest.raises(QMPDisconnected):
            await qmp.execute("query-status")


async def test_a_socket_that_is_not_qmp_is_refused_quickly(transport, runtime_dir):
    paths = await _qemu(transport, runtime_dir, "pc", "-machine", "pc", "-S",
                        "-chardev", f"socket,id=qga0,path={runtime_dir}/pc.qga,server=on,wait=off",
                        "-device", "virtio-serial-pci,id=vser0",
                        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
    with pytest.raises(QMPTimeout, match="no QMP greeting"):
        await QMPClient.open(transport, paths.qga, name="pc", timeout=0.5)


async def test_agent_absent_is_a_clear_error(transport, runtime_dir):
    # The channel exists but no guest runs (-S: never started), as with a VM whose agent is missing.
    qga = f"{runtime_dir}/pc.qga"
    await _qemu(transport, runtime_dir, "pc", "-machine", "pc", "-S",
                "-chardev", f"socket,id=qga0,path={qga},server=on,wait=off",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
    with pytest.raises(AgentNotAnswering) as err:
        await GuestAgent.open(transport, qga, name="pc", timeout=0.5)
    assert isinstance(err.value, TransientError) and "not answering" in err.value.message
    # No channel at all (VM not running, or started without one) is permanent.
    with pytest.raises(AgentUnavailable) as err:
        await GuestAgent.open(transport, f"{runtime_dir}/missing.qga", name="gone", timeout=0.5)
    assert isinstance(err.value, PermanentError) and err.value.hint
