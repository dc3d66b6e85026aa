"""The VM list of a site whose hosts do not all answer: a dead host's VMs keep their recorded states
(a VM recorded running is not declared missing because its host cannot be asked), and the dead host
is not asked again on every list, only every DOWN_RECHECK_S in the background."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from ferry.engine.client import EngineClient
from ferry.engine.vm import service as vm_service
from ferry.engine.workspace import Workspace
from harness.waiting import until


class Refuser:
    """A TCP port on loopback that takes each connection and closes it at once (an SSH host whose
    sshd is broken): counts the connections Ferry made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()
        self.server = await asyncio.start_server(take, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def record(ws: Path, name: str, host: str, state: str) -> None:
    from ferry.engine.store import Store
    s = Store(ws / "state.db")
    try:
        vid = uuid.uuid4().hex
        spec = {"id": vid, "name": name, "host": host, "cpus": 1, "memory_mb": 256,
                "disks": [{"name": "disk0", "datastore": "none", "path": f"/nonexistent/{vid}/disk0.qcow2",
                           "size": 1 << 30}], "nics": [], "boot": ["disk"]}
        s.vm_insert(id=vid, name=name, kind="vm", host=host, state=state, spec=spec)
    finally:
        s.close()


@pytest.fixture
async def dead_site(tmp_path: Path, monkeypatch):
    refuser = Refuser()
    port = await refuser.start()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "config.toml").write_text(
        '[site]\nname = "t"\n\n[clusters.c]\n\n'
        f'[hosts.dead]\ncluster = "c"\ntransport = "ssh"\naddress = "127.0.0.1"\nport = {port}\n')
    record(ws, "up1", "dead", "running")
    record(ws, "st1", "dead", "stopped")
    w = Workspace(ws)
    client = EngineClient(w, w.load_config())
    await client.start()
    try:
        yield client, refuser
    finally:
        await client.close()
        await refuser.stop()


async def test_a_dead_hosts_vms_keep_their_recorded_states(dead_site):
    client, refuser = dead_site
    states = {v.name: v.state.value for v in await client.vm_list()}
    assert states == {"up1": "running", "st1": "stopped"}, states
    assert refuser.connections >= 1          # it was asked


async def test_a_dead_host_is_asked_again_only_after_the_recheck_interval(dead_site, monkeypatch):
    client, refuser = dead_site
    await client.vm_list()
    asked = refuser.connections
    for _ in range(3):
        await client.vm_list()
    assert refuser.connections == asked, "the dead host was asked on every list"
    monkeypatch.setattr(vm_service, "DOWN_RECHECK_S", 0.0)
    states = {v.name: v.state.value for v in await client.vm_list()}   # answers at once, asks behind
    assert states["up1"] == "running"
    await until(lambda: refuser.connections > asked, what="the dead host asked again in the background")


async def test_a_vm_list_asked_again_unchanged_is_not_sent_again(tmp_path):
    """A console polls the VM list; the engine answers "unchanged" to a list the console holds, which
    then keeps the very list it has (nothing sent, nothing decoded); a change is sent."""
    from ferry.engine.remote import connect
    ws = Workspace(tmp_path / "ws")
    client = await connect(ws, client="console")
    try:
        record(ws.root, "a1", "lab1", "stopped")
        first = await client.vm_list()
        assert [v.name for v in first] == ["a1"]
        assert await client.vm_list() is first
        record(ws.root, "a2", "lab1", "stopped")
        again = await client.vm_list()
        assert [v.name for v in again] == ["a1", "a2"] and again is not first
        assert await client.vm_list(recycled=True) == []
    finally:
        await client.close()
