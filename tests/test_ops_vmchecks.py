"""A lab VM paused for real, as the health checks see it (engine/ops/health.py: vm-state, vm-io, vm-agent).

One VM of the folder lab, its disk on a small tmpfs datastore. Paused on request (`vm.pause`): recorded
paused, its checks OK, no alarm; paused outside Ferry (a bare QMP stop): vm-state says so. Then a real
I/O error: the datastore filled, the guest writes through its agent until QEMU stops it (werror=enospc,
QEMU's default for virtio disks): vm-io is CRITICAL, hard after max_attempts, its alarm raised; the space
freed and the VM resumed (`vm.resume`), the next round finds it OK and the alarm cleared by itself."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.engine.client import EngineClient
from ferry.engine.config import dump_config, lab_document
from ferry.engine.errors import Refused
from ferry.engine.ops.healthmodel import HealthCheck
from ferry.engine.ops.model import AlarmInfo
from ferry.engine.vm.service import VMService
from ferry.engine.workspace import Workspace
from harness.lab import lab_workspace, ok
from harness.qemu import MiB, kill_all
from harness.waiting import until

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")

VM = "io1"


@dataclass
class Lab:
    ws: Path
    small: Path          # datastore "small" of lab1: a 40 MiB tmpfs, VM's disk (32 MiB, thin qcow2) on it


@pytest.fixture(scope="module")
def lab():
    gen = lab_workspace("fvio-")
    ws = next(gen)
    small = ws / "small"
    small.mkdir()
    mounted = False
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "ferry-vmio-test", str(small)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs datastore here ({r.stderr.strip()}): needs root")
        mounted = True
        doc = lab_document(ws)
        doc["datastores"]["small"] = {"path": str(small), "hosts": ["lab1"]}
        # two attempts, re-checked at once: a problem is hard within one `health run`
        doc["health"] = {"max_attempts": 2, "retry_interval": 0.05, "timeout": 10}
        for path in [h["runtime"] for h in doc["hosts"].values()] + [d["path"] for d in doc["datastores"].values()]:
            Path(path).mkdir(parents=True, exist_ok=True)
        (ws / "config.toml").write_text(dump_config(doc))
        made = ok(ws, "vm", "create", VM, "--host", "lab1", "--disk", "32M:virtio:small", "--memory", "128M")
        assert made["disks"][0].startswith(str(small))
        assert ok(ws, "vm", "start", VM)["agent"] is True
        yield Lab(ws, small)
    finally:
        kill_all(ws)            # the QEMU that holds the disk on the tmpfs
        if mounted:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)
        gen.close()


class Engine:
    """An in-process engine on the lab's workspace (its config.toml)."""

    def __init__(self, lab: Lab) -> None:
        self.client = EngineClient.open(Workspace.resolve(lab.ws), adopt=False)

    async def __aenter__(self) -> EngineClient:
        await self.client.start()
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


async def health(c: EngineClient) -> dict:
    """A health round of lab1's checks (soft problems re-checked until hard): its result."""
    info = await c.wait_task(await c.health_run(host="lab1"), timeout=120)
    assert info.state == "succeeded", (info.error, info.hint)
    return info.result


async def vm_checks(c: EngineClient) -> dict[str, HealthCheck]:
    """The VM's checks by kind (vm-state, vm-io, vm-agent)."""
    return {x.check.split(":")[0]: x for x in await c.health_list("lab1") if x.check.endswith(f":{VM}")}


async def vm_task(c: EngineClient, kind: str) -> dict:
    info = await c.wait_task(await c.vm_task(kind, {"vm": VM}), timeout=60)
    assert info.state == "succeeded", (info.error, info.hint)
    return info.result


async def qmp_status(c: EngineClient) -> str:
    svc = VMService.of(c.engine)
    async with await svc.qmp(await svc.spec(VM)) as q:
        return (await q.execute("query-status"))["status"]


async def status_is(c: EngineClient, want: str) -> bool:
    return await qmp_status(c) == want


async def vm_alarms(c: EngineClient) -> dict[str, AlarmInfo]:
    return {a.type: a for a in await c.alarms() if a.object == f"vm:{VM}"}


async def test_paused_on_request_is_not_a_problem_and_a_pause_outside_ferry_is_named(lab):
    async with Engine(lab) as c:
        await health(c)
        checks = await vm_checks(c)
        assert [checks[k].state for k in ("vm-state", "vm-io", "vm-agent")] == ["OK", "OK", "OK"]
        assert checks["vm-io"].summary == "QMP status running"
        agent_checked = checks["vm-agent"].last_checked

        await vm_task(c, "vm.pause")
        assert await qmp_status(c) == "paused"
        assert (await c.vm_get(VM)).state == "paused"
        await health(c)
        checks = await vm_checks(c)
        assert (checks["vm-state"].state, checks["vm-io"].state) == ("OK", "OK")
        assert checks["vm-state"].summary.startswith("paused, QEMU pid ") and checks["vm-state"].summary.endswith(
            ", as recorded")
        assert checks["vm-io"].summary == "paused on request, not on an I/O error (QMP status paused)"
        # a paused guest's agent cannot answer: not asked (its check as it was), no alarm for a pause asked for
        assert checks["vm-agent"].state == "OK" and checks["vm-agent"].last_checked == agent_checked
        assert await vm_alarms(c) == {}
        for kind, said in (("vm.start", "is paused"), ("vm.pause", "is already paused")):
            with pytest.raises(Refused) as e:
                await c.vm_task(kind, {"vm": VM})
            assert (e.value.message, e.value.hint) == (f"{VM} {said}", f"continue it: ferry vm resume {VM}")

        await vm_task(c, "vm.resume")
        assert await qmp_status(c) == "running" and (await c.vm_get(VM)).state == "running"

        # Paused behind Ferry's back (a bare QMP stop): recorded running, so vm-state says what happened.
        svc = VMService.of(c.engine)
        async with await svc.qmp(await svc.spec(VM)) as q:
            await q.execute("stop")
        r = await health(c)
        checks = await vm_checks(c)
        st = checks["vm-state"]
        assert (st.state, st.hard) == ("WARNING", True)
        assert st.summary == "paused, though recorded running: paused outside Ferry (QMP status paused)"
        assert checks["vm-io"].state == "OK"
        assert f"health.vm-state on vm:{VM}" in r["raised"]
        assert (await vm_alarms(c))["health.vm-state"].severity == "warning"
        await vm_task(c, "vm.resume")
        r = await health(c)
        assert f"health.vm-state on vm:{VM}" in r["resolved"] and await vm_alarms(c) == {}
        assert (await vm_checks(c))["vm-state"].state == "OK"


def leave_free(path: Path, free: int) -> None:
    """A file 'filler' on the filesystem at `path`, sized so that about `free` bytes stay free."""
    f = path / "filler"
    f.unlink(missing_ok=True)
    vfs = os.statvfs(path)
    with open(f, "wb") as out:
        out.write(b"\x5a" * max(0, vfs.f_bavail * vfs.f_frsize - free))


async def test_a_vm_paused_on_an_io_error_is_critical_raises_and_clears_when_resumed(lab):
    async with Engine(lab) as c:
        assert await qmp_status(c) == "running"
        leave_free(lab.small, 2 * MiB)
        # The guest writes 12 MiB of its disk: the qcow2 grows into the full datastore, QEMU gets ENOSPC
        # and stops the VM (io-error). Started through the agent without waiting: the guest halts mid-write.
        svc = VMService.of(c.engine)
        spec = await svc.spec(VM)
        async with await svc.agent(spec) as ga:
            pid = (await ga.execute("guest-exec", {"path": "/bin/sh", "capture-output": True, "arg": [
                "-c", "dd if=/dev/urandom of=/dev/vda bs=1M count=12 oflag=direct"]}))["pid"]
        await until(lambda: status_is(c, "io-error"), timeout=120, every=0.2,
                    what="QEMU to stop the VM on its I/O error")

        r = await health(c)
        checks = await vm_checks(c)
        io = checks["vm-io"]
        assert (io.state, io.hard, io.attempt) == ("CRITICAL", True, 2)
        assert io.summary == "paused on an I/O error (QMP status io-error)"
        assert "free space on its datastore" in io.details and f"ferry vm resume {VM}" in io.details
        hist = await c.health_history(f"vm-io:{VM}", "lab1", limit=2)
        assert [(h.state, h.state_type, h.attempt) for h in hist[::-1]] == [("CRITICAL", "SOFT", 1),
                                                                            ("CRITICAL", "HARD", 2)]
        assert f"health.vm-io on vm:{VM}" in r["raised"]
        alarm = (await vm_alarms(c))["health.vm-io"]
        assert (alarm.severity, alarm.state, alarm.details["host"]) == ("critical", "active", "lab1")
        assert "paused on an I/O error" in alarm.summary
        # recorded running, and its QEMU runs: the record is right, the I/O error is vm-io's to say;
        # the agent of a halted guest is not asked, so it adds no alarm of its own
        assert checks["vm-state"].state == "OK"
        assert set(await vm_alarms(c)) == {"health.vm-io"}
        shown = await asyncio.to_thread(ok, lab.ws, "alarms")
        assert any(a["type"] == "health.vm-io" and a["object"] == f"vm:{VM}" and a["severity"] == "critical"
                   for a in shown), shown

        # Resolved for real: space freed on the datastore, the VM resumed; QEMU retries the failed writes.
        (lab.small / "filler").unlink()
        assert (await vm_task(c, "vm.resume"))["was"] == "io-error"
        async with await svc.agent(spec) as ga:      # the guest runs again, and its write completed
            async def exited() -> dict | None:
                st = await ga.execute("guest-exec-status", {"pid": pid})
                return st if st.get("exited") else None
            done = await until(exited, timeout=120, every=0.2, what="the guest's dd to finish")
        assert done["exitcode"] == 0, done
        r = await health(c)
        checks = await vm_checks(c)
        assert (checks["vm-io"].state, checks["vm-io"].summary) == ("OK", "QMP status running")
        assert checks["vm-agent"].state == "OK"
        assert f"health.vm-io on vm:{VM}" in r["resolved"]
        assert await vm_alarms(c) == {}
        cleared = next(a for a in await c.alarms(all=True) if a.id == alarm.id)
        assert cleared.state == "cleared" and cleared.cleared_by == "engine"
