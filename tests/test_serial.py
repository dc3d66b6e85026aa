"""A VM's serial console (ttyS0), read and typed into through the engine service and in the console:
real QEMU (TCG), the live image's login prompt, a real shell answering."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from ferry.engine.errors import Refused
from ferry.engine.remote import connect
from ferry.engine.workspace import Workspace
from harness.lab import lab_workspace, ok
from harness.pilot import until as pilot_until
from harness.waiting import until

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


@pytest.fixture(scope="module")
def ws():
    for root in lab_workspace("fser-", network=True):
        ok(root, "vm", "create", "tty1", "--host", "lab1", "--memory", "128M")
        ok(root, "vm", "start", "tty1")
        ok(root, "vm", "create", "tty2", "--host", "lab1", "--memory", "128M")
        yield root


class Screen:
    """What a serial console printed so far, read in the background of the waits."""

    def __init__(self, chan) -> None:
        self.chan = chan
        self.text = b""

        self.seen = 0

    async def wait_for(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Waits for `needle` in what came after the last one waited for."""
        async def more() -> bool:
            if needle not in self.text[self.seen:]:
                try:
                    self.text += await asyncio.wait_for(self.chan.read(), 0.5)
                except asyncio.TimeoutError:
                    pass
            return needle in self.text[self.seen:]
        await until(more, timeout=timeout, what=f"{needle!r} on the serial console (so far: {self.text[-300:]!r})")
        self.seen = self.text.index(needle, self.seen) + len(needle)
        return self.text


async def test_serial_console_through_the_engine_service_logs_in_and_runs_a_command(ws: Path):
    engine = await connect(Workspace(ws), client="cli")
    try:
        chan = await engine.open_serial("tty1")
        screen = Screen(chan)
        # The prompt printed before anyone was attached comes from the serial log.
        await screen.wait_for(b"tty1 login: ")
        await chan.write(b"root\r")
        await screen.wait_for(b" # ")
        await chan.write(b"echo ferry-$((6*7))\r")
        await screen.wait_for(b"ferry-42\r\n")      # the shell's answer, not the echoed command
        # One console at a time: a second one is refused while this one is open.
        with pytest.raises(Refused) as e:
            await engine.open_serial("tty1")
        assert "already open" in e.value.message
        await chan.write(b"exit\r")                 # back to the login prompt for the next one
        await screen.wait_for(b"login: ", timeout=30)
        await chan.close()
        assert await chan.read() == b""
        # Closed, it can be opened again.
        again = await engine.open_serial("tty1")
        await again.close()
    finally:
        await engine.close()


async def test_a_stopped_vm_or_one_started_without_a_serial_socket_is_refused_in_one_line(ws: Path):
    engine = await connect(Workspace(ws), client="cli")
    try:
        with pytest.raises(Refused) as e:
            await engine.open_serial("tty2")
        assert e.value.message == "VM tty2 is not running, so its serial console is silent"
        assert e.value.hint == "start it first: ferry vm start tty2"
        # A VM started before Ferry gave VMs a serial socket has none: moved away here, and back.
        sock = next((ws / "lab").rglob("*.ttyS0"))
        sock.rename(sock.with_suffix(".away"))
        try:
            with pytest.raises(Refused) as e:
                await engine.open_serial("tty1")
            assert "\n" not in e.value.message and "started before" in e.value.message
            assert e.value.hint == "restart it to get one: ferry vm shutdown tty1, then ferry vm start tty1"
        finally:
            sock.with_suffix(".away").rename(sock)
    finally:
        await engine.close()


def status(app) -> str:
    """The serial screen's status line."""
    from textual.widgets import Static
    return str(app.screen.query_one("#serial-status", Static).render())


async def test_serial_console_in_the_console_shows_the_prompt_and_takes_keys_until_the_vm_stops(ws: Path):
    from ferry.console.app import FerryApp
    from ferry.console.dialogs.serial import SerialScreen, SerialTerminal
    engine = await connect(Workspace(ws), client="console")
    app = FerryApp(engine)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("3")
            await pilot_until(pilot, lambda: (v := app.vms_view.cursor_vm()) is not None and v.name == "tty1",
                              what="the cursor on tty1 in the VMs view")
            await pilot.press("a")
            await pilot_until(pilot, lambda: isinstance(app.screen, SerialScreen), what="the serial console")
            term = app.screen.query_one(SerialTerminal)
            await pilot_until(pilot, lambda: term.text.rstrip().endswith("tty1 login:"), timeout=30,
                              what="the login prompt on screen")
            assert "connected" in status(app)
            await pilot.press(*"root", "enter")
            await pilot_until(pilot, lambda: term.lines[-1].endswith(" # "), timeout=30, what="a shell prompt")
            # q and ctrl+c are the guest's here (not Ferry's quit): the shell gets them, the console stays.
            await pilot.press("q", "ctrl+c")
            await pilot_until(pilot, lambda: "q^C" in term.text, what="ctrl+c reached the guest")
            await pilot.press(*"echo ferry-$((6*7))", "enter")
            await pilot_until(pilot, lambda: "\nferry-42\n" in term.text, timeout=30, what="the shell's answer")
            await pilot.press(*"echo abcd", "backspace", "backspace", "enter")
            await pilot_until(pilot, lambda: "\nab\n" in term.text, timeout=30, what="backspace reached the guest")
            await pilot.press("ctrl+d")                 # logs out: getty asks again
            await pilot_until(pilot, lambda: term.text.rstrip().endswith("tty1 login:"), timeout=30,
                              what="the login prompt again")
            await pilot.press("ctrl+right_square_bracket")
            await pilot_until(pilot, lambda: not isinstance(app.screen, SerialScreen), what="back to the VMs")
            assert app.current_view == "vms"
            # Open again, and the VM stops underneath: the screen says so.
            await pilot.press("a")
            await pilot_until(pilot, lambda: "connected" in status(app), timeout=30,
                              what="attached again (the first one was closed)")
            await engine.vm_task("vm.shutdown", {"vm": "tty1", "mode": "force"})
            await pilot_until(pilot, lambda: "disconnected (VM stopped)" in status(app),
                              timeout=30, what="the screen saying the VM stopped")
    finally:
        await engine.close()


async def test_serial_console_of_a_vm_on_an_ssh_host_goes_through_stream_local_forwarding(sshd_factory, tmp_path,
                                                                                          monkeypatch):
    import tomllib

    from ferry.engine.client import EngineClient
    from ferry.engine.config import dump_config
    from harness.qemu import image_cache, kill_all
    monkeypatch.setenv("FERRY_IMAGE_CACHE", str(image_cache()))
    site = sshd_factory.site(tmp_path, 1)
    doc = tomllib.loads(site.workspace.config_path.read_text())
    doc["hosts"]["ssh1"]["accel"] = "tcg"
    site.workspace.config_path.write_text(dump_config(doc))
    client = EngineClient(site.workspace, site.config(), transports=site.pool())
    await client.start()
    try:
        for kind, params in (("vm.create", {"name": "far1", "host": "ssh1", "cpus": 1, "memory_mb": 128, "disks": [],
                                            "nics": [], "boot": ["live"]}), ("vm.start", {"vm": "far1"})):
            info = await client.wait_task(await client.vm_task(kind, params), timeout=120)
            assert info.state == "succeeded", (kind, info.error)
        chan = await client.open_serial("far1")
        screen = Screen(chan)
        await screen.wait_for(b"far1 login: ")
        await chan.write(b"root\r")
        await screen.wait_for(b" # ")
        await chan.write(b"echo ferry-$((6*7))\r")
        await screen.wait_for(b"ferry-42\r\n")
        await chan.close()
    finally:
        await client.close()
        kill_all(site.servers["ssh1"].root)
