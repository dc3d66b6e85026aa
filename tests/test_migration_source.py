"""The source's side of a cutover (engine/migration/source.py) on the real Debian source server
(tests/harness/debsource.py) booted as a lab VM: nginx stopped and started again, the source parked
off its service address at a park address of the lab's VM network (Ferry reconnects there with the
source's pinned host key), and the go-live timer (a systemd transient timer on the source) that puts
it back by itself unless Ferry disarms it.

Ferry reaches the source from this machine through the lab's leg on the VM network; the harness's own
SSH and HTTP go from the lab's switch namespace, another machine on that network. The park address
is a static lease of the lab's DHCP for a MAC no NIC has: the lab hands that address to nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil

import pytest

from ferry.engine.config import HostSpec
from ferry.engine.errors import Refused
from ferry.engine.migration import source as src_side
from ferry.engine.migration.model import SOURCE_DIR
from ferry.engine.transport.ssh import SshTransport
from harness.debsource import PAGE_SHA256, import_source, source_image, start_source
from harness.netlab import netlab_workspace
from harness.qemu import image_cache
from harness.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("qemu-system-x86_64", "mmdebstrap", "dnsmasq")),
    reason="needs root (mmdebstrap's chroot, namespaces, taps), qemu-system-x86_64, mmdebstrap and dnsmasq "
           "(scripts/bootstrap.sh install)")]

NAME = "web01"
NOBODY_MAC = "02:fe:00:00:00:01"        # a locally administered MAC no NIC of the lab has


@pytest.fixture(scope="module")
def lab_source():
    image = source_image(image_cache())
    with contextlib.closing(netlab_workspace("fsrcc-", site="srccut")) as lab_up:
        ws, lab = next(lab_up)
        import_source(ws, "src01", image)
        source = start_source(ws, lab, "src01", image)
        with (ws / "known_hosts").open("a") as f:      # its host keys pinned, as `ferry migration trust` does
            f.write(image.known_hosts(source.address))
        park = f"{lab.reserve(NOBODY_MAC)}/{lab.vm_network.prefixlen}"
        yield source, park


def transport(source) -> SshTransport:
    """Ferry's SSH to the source at its service address, as service.source_transport makes it."""
    spec = HostSpec(source.address, "", "ssh", address=source.address, port=22, user="root",
                    identity=str(source.image.identity))
    return SshTransport(spec, known_hosts=[source.ws / "known_hosts"], ssh_config_paths=[], use_agent=False,
                        connect_timeout=5)


async def out(t, command: str) -> str:
    r = await t.sh(command)
    assert r.exit_status == 0, f"{command}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode()


async def serves(source) -> bool:
    try:
        return hashlib.sha256(await asyncio.to_thread(source.fetch, "/", timeout=15)).hexdigest() == PAGE_SHA256
    except RuntimeError:
        return False


async def answers_ssh(source) -> bool:
    """The harness's SSH login at the service address, from another machine of the network."""
    return (await asyncio.to_thread(source.ssh, "true", timeout=30)).returncode == 0


async def parked_at(tp, park: str, source, iface: str) -> None:
    """The park address answers SSH (Ferry's, pinned key), the service address is gone from the interface
    and answers nobody."""
    addrs = await out(tp, f"ip -o -4 addr show dev {iface}")
    assert f" {park} " in addrs and f" {source.address}/" not in addrs, addrs
    assert not await answers_ssh(source)


async def test_a_parked_source_comes_back_by_itself_when_the_go_live_timer_fires(lab_source):
    source, park = lab_source
    t = transport(source)
    try:
        facts = await src_side.network_facts(t, NAME, source.address)
        iface = facts.interface
        # As a system without systemd's sysctl default has it (0: the kernel deletes the secondary
        # addresses of a subnet with its primary), and with a default route from the service address.
        await out(t, f"echo 0 > /proc/sys/net/ipv4/conf/{iface}/promote_secondaries; "
                     f"ip route replace default via {source.lab.dhcp_server} dev {iface} proto static "
                     f"src {source.address} metric 1024; systemctl stop cron")
        routes_before = await out(t, "ip -4 route show default")
        facts = await src_side.network_facts(t, NAME, source.address)
        assert (facts.address, facts.promote_secondaries) == (source.address, 0)
        assert facts.lease_s and facts.lease_s > 0      # the lab's source takes its address by DHCP
        assert [r.args() for r in facts.routes] == [
            f"default via {source.lab.dhcp_server} dev {iface} proto static src {source.address} metric 1024"]

        # nginx stopped (cron, of the plan too, was not running: it is not started afterwards either)
        stopped = await src_side.stop_services(t, NAME, ["nginx", "cron"])
        assert (stopped.manager, stopped.active, stopped.changed) == ("systemd", ("nginx",), ("nginx",))
        assert not await serves(source)
        again = await src_side.stop_services(t, NAME, ["nginx", "cron"])      # after a kill: the record stands
        assert (again.active, again.changed) == (("nginx",), ())

        with pytest.raises(Refused, match="no go-live timer"):
            await src_side.park(t, NAME, source.address, park)
        await src_side.arm(t, NAME, 120)       # (room for a busy machine: re-armed short once parked)
        rec, tp = await src_side.park(t, NAME, source.address, park)
        assert (rec.address, rec.park, rec.promote_secondaries) == (facts.cidr, park, 0)
        await parked_at(tp, park, source, iface)
        ip = park.split("/")[0]
        assert f"src {ip} " in await out(tp, "ip -4 route show default")        # the route kept, from the park
        rec2, tp2 = await src_side.park(tp, NAME, source.address, park)         # again, as after a kill
        assert rec2 == rec
        await src_side.arm(tp2, NAME, 10)                                       # arming again replaces the timer
        assert 0 < await src_side.armed(tp2, NAME) <= 10
        await tp2.close()
        await tp.close()

        # Ferry does nothing more: the source comes back when the timer fires
        await until(lambda: serves(source), timeout=120, every=1, what="the source serving its page again")
        t2 = transport(source)
        try:
            addrs = await out(t2, f"ip -o -4 addr show dev {iface}")
            assert f" {source.address}/" in addrs and f" {ip}/" not in addrs, addrs
            assert await out(t2, "ip -4 route show default") == routes_before
            assert (await out(t2, f"cat /proc/sys/net/ipv4/conf/{iface}/promote_secondaries")).strip() == "0"
            assert (await t2.sh("systemctl is-active nginx cron")).stdout.split() == [b"active", b"inactive"]
            assert await src_side.armed(t2, NAME) is None
            done = await src_side.restored(t2, NAME)
            assert done is not None and done.failures == 0, done
            await src_side.cleanup(t2, NAME)
            assert (await t2.sh(f"test -e {SOURCE_DIR}/{NAME}")).exit_status == 1
            await out(t2, "systemctl start cron")
        finally:
            await t2.close()
    finally:
        await t.close()


async def test_a_disarmed_timer_leaves_the_source_parked_and_a_rollback_brings_it_back_at_once(lab_source):
    source, park = lab_source
    t = transport(source)
    facts = await src_side.network_facts(t, NAME, source.address)
    iface = facts.interface
    assert (await src_side.stop_services(t, NAME, ["nginx"])).changed == ("nginx",)
    await src_side.arm(t, NAME, 120)
    _, tp = await src_side.park(t, NAME, source.address, park)
    await src_side.arm(tp, NAME, 15)
    fires_at = int(await out(tp, "date +%s")) + await src_side.armed(tp, NAME)
    assert await src_side.disarm(tp, NAME) is True                              # go-live confirmed
    assert await src_side.armed(tp, NAME) is None
    assert await src_side.disarm(tp, NAME) is False                             # again: nothing armed

    # past the time the timer would have fired, on the source's clock: still parked
    await until(lambda: _source_clock_past(tp, fires_at + 3), timeout=90, every=1,
                what="the source's clock past the disarmed timer's time")
    await parked_at(tp, park, source, iface)
    assert not await serves(source)
    assert await src_side.restored(tp, NAME) is None

    # the service address put back on its interface, as its DHCP client does when it rebinds its lease
    # (the target holds that address now): the park's guard takes it off again at once
    assert (await out(tp, f"systemctl is-active ferry-guard-{NAME}.service")).strip() == "active"
    await out(tp, f"ip addr add {facts.cidr} dev {iface} valid_lft 3600 preferred_lft 3600")
    await until(lambda: _said(tp, f"{SOURCE_DIR}/{NAME}/park.log", "taken off again"), timeout=60, every=1,
                what="the park's guard taking the renewed address off")
    await parked_at(tp, park, source, iface)

    await src_side.restore_now(tp, NAME)                                        # rollback
    t2 = transport(source)
    try:
        done = await src_side.wait_restored(t2, NAME, timeout=60)
        assert done.failures == 0
        assert await serves(source)
        addrs = await out(t2, f"ip -o -4 addr show dev {iface}")
        assert f" {source.address}/" in addrs and f" {park.split('/')[0]}/" not in addrs, addrs
        # the guard went with the park: the address restored stays
        assert (await t2.sh(f"systemctl is-active ferry-guard-{NAME}.service")).stdout.strip() != b"active"
        await asyncio.sleep(3)
        assert f" {source.address}/" in await out(t2, f"ip -o -4 addr show dev {iface}")
        await src_side.cleanup(t2, NAME)
    finally:
        await t2.close()
        await t.close()


async def _said(t, path: str, text: str) -> bool:
    return text in (await t.sh(f"cat {path}")).stdout.decode(errors="replace")


async def _source_clock_past(t, epoch: float) -> bool:
    return int(await out(t, "date +%s")) > epoch
