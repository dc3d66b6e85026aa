"""The migration tests' source server (issue 13): a Debian 12 system the harness builds with
mmdebstrap (tests/harness/debsource.py), imported as a lab VM and booted from its own disk with the
live image's kernel (Ferry's boot-disk path). Real packages, real QEMU (TCG), real sshd, nginx,
cron and dnsmasq; checked over SSH with its host key pinned and over HTTP from the lab network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess

import pytest

from harness.debsource import (ALICE_FILES, CRON_BOOTED, CRON_FILE, CRON_TEXT, NETWORK_FILE, PAGE_SHA256,
                               import_source, source_image, start_source)
from harness.cli import ferry
from harness.lab import ok
from harness.netlab import netlab_workspace
from harness.qemu import image_cache
from harness.waiting import until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("qemu-system-x86_64", "mmdebstrap", "dnsmasq")),
    reason="needs root (mmdebstrap's chroot, namespaces, taps), qemu-system-x86_64, mmdebstrap and dnsmasq "
           "(scripts/bootstrap.sh install)")]


@pytest.fixture(scope="module")
def source():
    image = source_image(image_cache())
    with contextlib.closing(netlab_workspace("fdsrc-", site="dsrc")) as lab_up:
        ws, lab = next(lab_up)      # the lab goes down when this closes, however the setup ended
        import_source(ws, "src01", image)
        yield start_source(ws, lab, "src01", image)


def out(source, command: str) -> str:
    r = source.ssh(command)
    assert r.returncode == 0, f"{command}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode()


def test_the_source_boots_debian_12_from_its_disk_with_the_live_kernel(source):
    facts = out(source, ". /etc/os-release; echo $ID $VERSION_ID; uname -r; findmnt -no SOURCE,FSTYPE /; "
                        "cat /sys/block/vda/vda1/start; cat /etc/fstab; ls /lib/modules; hostname").split("\n")
    assert facts[0] == "debian 12"
    assert facts[1] == source.image.kernel_release
    assert facts[2].split() == ["/dev/vda1", "ext4"]
    assert facts[3] == "2048"                                   # one MBR partition at 1 MiB
    assert f"UUID={source.image.fs_uuid} / ext4" in "\n".join(facts)
    assert source.image.kernel_release in facts
    assert facts[-2] == "debsource"


def test_root_logs_in_with_the_harness_key_and_only_a_pinned_host_key_is_accepted(source):
    assert out(source, "id -un; systemctl is-active ssh").split() == ["root", "active"]
    # the same login against another key for that address is refused by the client: the pin is real
    key = source.ws / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    stranger = source.ws / "stranger.known_hosts"
    stranger.write_text(f"{source.address} {key.with_suffix('.pub').read_text()}")
    r = source.ssh("true", known_hosts=stranger)
    assert r.returncode == 255 and b"Host key verification failed" in r.stderr


def test_nginx_serves_the_known_page_on_the_lab_network(source):
    assert hashlib.sha256(source.fetch("/")).hexdigest() == PAGE_SHA256
    assert out(source, "systemctl is-active nginx").strip() == "active"


def test_alices_files_have_their_content_owners_and_modes(source):
    lines = out(source, "; ".join(f"stat -c '%U %G %a' '{p}'; sha256sum < '{p}'" for p in ALICE_FILES)).splitlines()
    for i, (path, f) in enumerate(ALICE_FILES.items()):
        assert lines[2 * i] == f"{f.owner} {f.group} {f.mode:o}", path
        assert lines[2 * i + 1].split()[0] == f.sha256, path


def test_cron_runs_the_entries_of_its_cron_d_file(source):
    assert out(source, f"cat {CRON_FILE}").encode() == CRON_TEXT
    assert out(source, "systemctl is-active cron").strip() == "active"
    # the @reboot entry ran when cron started: cron reads cron.d and runs its jobs
    booted = until_sync(lambda: source.ssh(f"cat {CRON_BOOTED}").stdout.strip(), timeout=60,
                        what="cron's @reboot entry to write its file")
    since_boot = int(out(source, "date -u +%s")) - int(booted)
    uptime = float(out(source, "cut -d' ' -f1 /proc/uptime"))
    assert 0 <= since_boot <= uptime + 1


def test_vmware_tools_are_installed_and_ferrys_guest_agent_answers(source):
    status = out(source, "dpkg-query -W -f '${Package} ${Status}\\n' open-vm-tools qemu-guest-agent nginx")
    assert status.splitlines() == ["nginx install ok installed", "open-vm-tools install ok installed",
                                   "qemu-guest-agent install ok installed"]
    # vmtoolsd only runs under VMware: here it is installed and inactive, as on a VM just moved off it
    assert out(source, "test -x /usr/bin/vmtoolsd && systemctl is-enabled open-vm-tools").strip() == "enabled"
    assert source.ssh("systemctl is-active open-vm-tools").stdout.strip() == b"inactive"
    # the DHCP client asked by its MAC and got the static lease; the agent reports that address
    assert "ClientIdentifier=mac" in out(source, f"cat {NETWORK_FILE}")
    info = until_sync(lambda: (r := ok(source.ws, "vm", "agent", "info", source.name)).get("agent") == "running"
                      and r, timeout=60, what="the source's guest agent")
    assert any(ip.split("/")[0] == source.address for ip in info.get("ips") or ()), info


def test_ferry_assesses_the_debian_source_over_ssh_on_the_lab_network(source):
    """`ferry migration assess` of the real server: its facts over SSH from Ferry's machine (on the VM
    network through the lab's leg), the network check from the target host's address on that network
    (its migration address, D5), the VMware tools it carries found, a file-level recommendation."""
    ws, lab = source.ws, source.lab
    cfg = ws / "config.toml"
    cfg.write_text(cfg.read_text().replace(
        "[hosts.lab3]\n", f'[hosts.lab3]\nmigration_address = "{lab.vm_address("lab3")}"\n', 1))
    with (ws / "known_hosts").open("a") as f:       # its host keys pinned, as from a fingerprint checked
        f.write(source.image.known_hosts(source.address))
    plan = ws / "wave1.toml"
    plan.write_text(f"""
[wave]
name = "wave1"
[migrations.web01]
source = {{ address = "{source.address}", identity = "{source.image.identity}" }}
target = {{ host = "lab3", datastore = "shared", network = "lab" }}
# a TCG guest on a busy 2-core machine: bars it can meet
thresholds = {{ max_latency_ms = 50, max_jitter_ms = 50, min_bandwidth_mbit = 10 }}
""")
    r = ferry(ws, "plan", "apply", str(plan))
    assert r.code == 0, r.err
    r = ferry(ws, "migration", "assess", "web01")
    assert r.code == 0, r.err
    assert "web01 assessed: file-level" in r.out and "no blockers" in r.out, r.out
    m = ok(ws, "migration", "show", "web01")
    report = m["assessment"]["report"]
    facts = report["facts"]
    assert (facts["os_id"], facts["os_version"], facts["kernel"]) == ("debian", "12", source.image.kernel_release)
    assert {80, 22} <= {s["port"] for s in facts["services"]}                     # nginx, sshd
    tools = [f for f in report["findings"] if f["name"] == "hypervisor_tools"]
    assert tools and "VMware" in tools[0]["message"], report["findings"]
    assert report["recommendation"]["method"] == "file"
    nc = m["assessment"]["netcheck"]
    assert nc["lost"] == 0 and nc["bandwidth_mbit"] > 10 and nc["target"] == f"lab3 ({lab.vm_address('lab3')})"
