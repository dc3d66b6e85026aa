"""The assessment of a migration source: facts collected from this very machine (locally and over a
loopback sshd: the same facts both ways), hypervisor tools and licence daemons found for real, Windows
sources said in one line, and the rules (findings, recommendation, estimate) over facts built here."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.engine import api
from ferry.engine.migration.assess import (METHODS, PHASES, Assessment, BlockDevice, FcHost, Filesystem, Hypervisor,
                                           Method, PciDisplay, Severity, SourceFacts, Thresholds, ToolFound,
                                           UsbDevice, Workload, assess, collect, estimate, findings, recommend,
                                           report_markdown)
from ferry.engine.transport import LocalTransport
from harness.sshd import SshServer

GIB = 1 << 30


def os_release_id() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("ID="):
            return line[3:].strip('"')
    raise AssertionError("no ID in /etc/os-release")


def same(f: SourceFacts) -> tuple:
    """What must be the same whichever way the facts came (figures that move, like used bytes or load,
    left out)."""
    return (f.windows, f.system, f.os_id, f.os_version, f.os_name, f.kernel, f.arch, f.boot, f.devices,
            [(x.mountpoint, x.type, x.source, x.size) for x in f.filesystems],
            f.workload.cpus, f.workload.cpu_model, f.workload.mem_total, f.hypervisor.detected,
            f.hypervisor.vendor, f.usb, f.fc_hosts, f.displays, f.volume_groups, f.logical_volumes)


# ---------------------------------------------------------------- collected for real


async def test_facts_of_this_machine_locally_and_over_ssh_are_what_it_says_itself(sshd_factory, tmp_path):
    site = sshd_factory.site(tmp_path, 1)
    sshd = site.servers["ssh1"]
    pool = site.pool()
    try:
        here = await collect(LocalTransport("here"), sample_s=0.2)
        far = await collect(pool.get("ssh1"), sample_s=0.2)
    finally:
        await pool.close()

    assert here.host == "here" and far.host == "ssh1"
    assert here.windows is None and here.system == "Linux"
    assert here.arch == platform.machine()
    assert here.kernel == os.uname().release
    assert here.os_id == os_release_id()
    assert here.boot == ("uefi" if os.path.isdir("/sys/firmware/efi") else "bios")
    st = os.statvfs("/")
    root = next(f for f in here.filesystems if f.mountpoint == "/")
    assert root.size == st.f_blocks * st.f_frsize > 0 and root.type not in ("tmpfs", "proc")
    assert here.workload.cpus == len(os.sched_getaffinity(0))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert here.workload.mem_total == int(meminfo["MemTotal"].split()[0]) * 1024
    assert here.workload.load1 is not None and here.workload.io_sample_s is not None
    assert sshd.port in {s.port for s in here.services} and sshd.port in {s.port for s in far.services}
    assert here.used_bytes() > 0 and here.block_bytes() >= root.size
    assert same(far) == same(here)
    # one round trip: the whole collection takes the I/O sample and little more
    assert here.elapsed_s < 5 and far.elapsed_s < 5, (here.elapsed_s, far.elapsed_s)

    a = assess(here, bandwidth_bps=1e9)
    md = report_markdown(a)
    assert "# Assessment of here" in md and here.kernel in md and f"| / | {root.type} |" in md
    assert api.decode(api.encode(a), Assessment) == a


async def test_hypervisor_tools_and_a_licence_daemon_are_found_running_and_installed(tmp_path, monkeypatch):
    """A vmtoolsd that runs (a copy of sleep under that name) and a hasplmd on the PATH: what the
    collector reports, and the findings they make."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    shutil.copy(shutil.which("sleep"), bin_ / "vmtoolsd")
    (bin_ / "hasplmd").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "hasplmd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    tools = subprocess.Popen([bin_ / "vmtoolsd", "60"])
    try:
        facts = await collect(LocalTransport("vm1"), sample_s=0.1)
    finally:
        tools.kill()
        tools.wait()
    assert ToolFound("vmtoolsd", "VMware", f"running, at {bin_}/vmtoolsd") in facts.hypervisor.tools
    assert ToolFound("hasplmd", "Sentinel HASP/LDK licence manager", f"at {bin_}/hasplmd") in facts.licences
    assert "hasplmd" in facts.licence_looked_for and "MAC address" in facts.licence_looked_for
    found = {f.name: f for f in findings(facts)}
    assert found["hypervisor_tools"].severity == Severity.INFO
    assert "VMware" in found["hypervisor_tools"].message and "V2V" in found["hypervisor_tools"].hint
    assert found["licence_binding"].severity == Severity.WARNING and "hasplmd" in found["licence_binding"].message
    md = report_markdown(assess(facts))
    assert f"| vmtoolsd | VMware | running, at {bin_}/vmtoolsd |" in md and "licence_binding" in md


async def test_with_no_tools_but_sh_every_section_says_why_it_is_unknown(tmp_path, monkeypatch):
    """A bare system (only sh on the PATH): what the shell and /proc, /sys give is still there; the rest
    is unknown with its reason, and nothing fails."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sh").symlink_to(shutil.which("sh"))
    monkeypatch.setenv("PATH", str(bin_))
    facts = await collect(LocalTransport("bare"), sample_s=0.1)
    assert facts.system == "Linux" and facts.windows is None
    assert facts.kernel == os.uname().release                    # from /proc/version
    assert "uname is missing" in facts.unknown["uname"]
    assert "lsblk" in facts.unknown["disks"] and facts.devices    # /sys/block instead
    assert "df" in facts.unknown["filesystems"]
    assert facts.boot == ("uefi" if os.path.isdir("/sys/firmware/efi") else "bios")
    assert facts.workload.pressure_io is not None or not os.path.exists("/proc/pressure/io")
    found = {f.name for f in findings(facts)}
    assert "filesystems_unknown" in found and "arch_unknown" in found
    rec = recommend(facts)
    assert rec.method == Method.BLOCK and "used space" in rec.reason and "not known" in rec.reason
    assert "## Not known" in report_markdown(assess(facts))


# ---------------------------------------------------------------- Windows, out of reach


async def test_a_windows_source_is_one_line_out_of_reach(tmp_path, monkeypatch):
    """Git for Windows' sh answers with uname MINGW64_NT: one line, one blocker, nothing else."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "uname").write_text("#!/bin/sh\ncase $1 in -s) echo MINGW64_NT-10.0-19045;; -r) echo 3.4.10;; "
                                "*) echo x86_64;; esac\n")
    (bin_ / "uname").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    facts = await collect(LocalTransport("win1"), sample_s=0.1)
    assert facts.windows == ("win1 is a Windows server (uname says MINGW64_NT-10.0-19045): Windows sources are out "
                             "of reach here, Ferry migrates Linux servers")
    assert facts.devices == [] and facts.filesystems == []
    a = assess(facts)
    assert [(f.name, f.severity) for f in a.findings] == [("windows", Severity.BLOCKER)]
    assert a.recommendation is None
    assert report_markdown(a).strip().splitlines()[-1] == facts.windows


async def test_a_source_without_a_posix_sh_is_out_of_reach(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # no sh at all, as on a Windows host
    facts = await collect(LocalTransport("win2"), sample_s=0.1)
    assert facts.windows and "no POSIX sh answers" in facts.windows and "out of reach" in facts.windows


class CmdExeServer(SshServer):
    """An sshd whose every session gets what cmd.exe answers to `sh -c ...`, as a Windows OpenSSH
    server does (there is no Windows here: the answer is cmd.exe's text and exit status, given by a
    forced command; the SSH path is real)."""

    def _write_config(self) -> Path:
        cmd = self.root / "cmd.exe"
        cmd.write_text("#!/bin/sh\nprintf \"'sh' is not recognized as an internal or external command,\\r\\n"
                       "operable program or batch file.\\r\\n\" >&2\nexit 1\n")
        cmd.chmod(0o755)
        cfg = super()._write_config()
        cfg.write_text(cfg.read_text() + f"ForceCommand {cmd}\n")
        return cfg


async def test_a_windows_openssh_server_is_one_line_out_of_reach(sshd_factory, tmp_path):
    server = CmdExeServer(tmp_path / "win", sshd_factory.user_key, sshd_factory.user_public)
    server.setup()
    sshd_factory.servers.append(server)
    server.start()
    pool = sshd_factory.site_of(tmp_path / "site", {"win3": server}).pool()
    try:
        facts = await collect(pool.get("win3"), sample_s=0.1)
    finally:
        await pool.close()
    assert facts.windows and facts.windows.startswith("win3 is a Windows server (its shell says: 'sh' is not recognized")
    assert "\r" not in facts.windows and "\n" not in facts.windows


# ---------------------------------------------------------------- rules over facts built here


def server(used: int = 10 * GIB, *, fstype: str = "ext4", **over) -> SourceFacts:
    """A typical Linux server: a 100 GiB disk, /boot 1 GiB and / 99 GiB, `used` bytes in use on /."""
    devices = [BlockDevice("sda", "disk", 100 * GIB),
               BlockDevice("sda1", "part", 1 * GIB, "ext4", "/boot", "b-uuid", "sda"),
               BlockDevice("sda2", "part", 99 * GIB, fstype, "/", "r-uuid", "sda"),
               BlockDevice("sdb", "disk", 50 * GIB)]                         # empty: not copied
    filesystems = [Filesystem("/dev/sda2", fstype, 97 * GIB, used, 97 * GIB - used, "/"),
                   Filesystem("/dev/sda1", "ext4", GIB, 0, GIB, "/boot")]
    base = SourceFacts("web01", system="Linux", os_id="debian", os_version="12", os_name="Debian GNU/Linux 12",
                       kernel="6.1.0-28-amd64", arch="x86_64", boot="bios", devices=devices, filesystems=filesystems,
                       workload=Workload(cpus=4, mem_total=8 * GIB, mem_available=6 * GIB, load1=0.5, load5=0.4,
                                         load15=0.3, io_busy=0.05, io_busiest="sda", io_sample_s=1.0))
    return replace(base, **over)


def names(fs) -> dict[str, Severity]:
    return {f.name: f.severity for f in fs}


def test_a_plain_server_has_no_findings_and_its_copy_units_are_its_partitions():
    f = server()
    assert findings(f) == []
    assert [d.name for d in f.copy_units()] == ["sda1", "sda2"] and f.block_bytes() == 100 * GIB
    assert f.used_bytes() == 10 * GIB


def test_recommendation_file_level_when_used_far_below_partitions_or_resizing_else_block():
    r = recommend(server(10 * GIB))
    assert r.method == Method.FILE
    assert r.reason == ("file-level: 10.0 GiB used is 10% of 100.0 GiB of partitions (below 50%): "
                        "only the data is copied")
    r = recommend(server(80 * GIB))
    assert r.method == Method.BLOCK and "80.0 GiB used is 80% of 100.0 GiB" in r.reason
    r = recommend(server(80 * GIB), resize=True)
    assert r.method == Method.FILE and "resizing is wanted" in r.reason
    r = recommend(server(10 * GIB, fstype="ntfs"), resize=True)
    assert r.method == Method.BLOCK and "ntfs on / cannot be recreated file by file" in r.reason
    assert recommend(server(40 * GIB), ratio=0.3).method == Method.BLOCK


def test_estimate_moves_used_bytes_file_level_and_partitions_block_level_at_the_measured_bandwidth():
    f = server(10 * GIB)
    e = estimate(f, Method.FILE, 1e9)
    assert e.bytes == 10 * GIB and e.seconds == pytest.approx(10 * GIB * 8 / 1e9)
    assert any("1000 Mbit/s" in a for a in e.assumptions) and any("used bytes" in a for a in e.assumptions)
    e = estimate(f, "block", 100e6)
    assert e.bytes == 100 * GIB and e.seconds == pytest.approx(100 * GIB * 8 / 100e6)
    assert any("free space included" in a for a in e.assumptions)
    a = assess(f, bandwidth_bps=1e9)
    assert a.estimate.method == Method.FILE and "Estimated initial copy (file-level): 10.0 GiB at 1000 Mbit/s" \
        in report_markdown(a)


def test_findings_name_blockers_and_warnings():
    assert names(findings(server(arch="aarch64"))) == {"non_x86": Severity.BLOCKER}
    assert names(findings(server(system="FreeBSD"))) == {"unsupported_os": Severity.BLOCKER}
    assert names(findings(server(fstype="btrfs"))) == {"filesystem_converted": Severity.WARNING}
    assert names(findings(server(fstype="zfs"))) == {"filesystem_converted": Severity.WARNING}
    ntfs = server(fstype="ntfs")
    assert names(findings(ntfs)) == {"filesystem_unsupported": Severity.WARNING}
    assert names(findings(ntfs, method="file")) == {"filesystem_unsupported": Severity.BLOCKER}
    assert findings(ntfs, method="block") == []
    assert names(findings(server(boot="uefi"))) == {"uefi": Severity.WARNING}
    hw = server(usb=[UsbDevice("1-1", "0529", "0001", "AKS", "HASP HL 3.25", "SafeNet/Aladdin HASP"),
                     UsbDevice("1-2", "0403", "6001", "FTDI", "FT232R")],
                fc_hosts=[FcHost("host3", "0x21000024ff3dbeef", "Online")],
                displays=[PciDisplay("0000:3b:00.0", "10de", "1eb8", "NVIDIA", True),
                          PciDisplay("0000:03:00.0", "102b", "0536", "Matrox", False)],
                licences=[ToolFound("lmgrd", "FlexNet (FlexLM) licence server", "running")],
                hypervisor=Hypervisor("vmware", tools=[ToolFound("vmtoolsd", "VMware", "running")]),
                filesystems=[*server().filesystems, Filesystem("nas:/export", "nfs4", 10 * GIB, GIB, 9 * GIB, "/srv")])
    got = findings(hw)
    assert names(got) == {"licence_dongle": Severity.WARNING, "usb_device": Severity.WARNING,
                          "fc_hba": Severity.WARNING, "gpu": Severity.WARNING, "licence_binding": Severity.WARNING,
                          "hypervisor_tools": Severity.INFO, "network_filesystem": Severity.WARNING}
    assert [f.severity for f in got] == sorted((f.severity for f in got), key=["blocker", "warning", "info"].index)
    assert hw.used_bytes() == 10 * GIB      # the NFS share's data is not this server's to move
    for f in got:
        assert "\n" not in f.message and f.hint


def test_utilisation_thresholds_are_configurable():
    busy = server(workload=Workload(cpus=4, load5=3.8, mem_total=8 * GIB, mem_available=GIB // 2,
                                    io_busy=0.85, io_busiest="sda", io_sample_s=1.0))
    got = {f.name: f for f in findings(busy)}
    assert set(got) == {"high_cpu", "high_memory", "high_io"}
    assert got["high_cpu"].message == "load 3.80 on 4 CPUs (0.95 per CPU, threshold 0.9)"
    assert "disk sda busy 85%" in got["high_io"].message
    assert findings(busy, Thresholds(load_per_cpu=1.0, memory_used=0.95, io_busy=0.9)) == []
    stalled = server(workload=Workload(cpus=4, pressure_io=40.0))
    assert names(findings(stalled)) == {"high_io": Severity.WARNING}
    assert findings(stalled, Thresholds(io_pressure=50)) == []


def test_the_report_has_its_sections_and_the_json_form_round_trips():
    a = assess(server(), bandwidth_bps=1e9)
    md = report_markdown(a)
    for heading in ("# Assessment of web01", "## Verdict", "## Findings", "## System", "## Disks and partitions",
                    "## Filesystems", "## Workload", "## Listening services", "## Hypervisor tools",
                    "## Special hardware and licences", "## Migration methods (E9)", "## Project phases (E10)"):
        assert heading in md, heading
    assert "| sda2 | part | 99.0 GiB | ext4 | / | r-uuid | sda |" in md
    assert "| fibre channel | online, offline | about 15 min | host and storage resources | yes | low |" in md
    assert [p.name for p in PHASES] == ["survey", "assessment", "planning", "test migration", "implementation",
                                        "acceptance"]
    assert [m.layer for m in METHODS] == ["database", "filesystem", "logical volume", "fibre channel", "storage"]
    assert "- [ ] back up the source" in md and "### acceptance" in md
    doc = api.to_builtins(a)
    assert doc["recommendation"]["method"] == "file" and doc["estimate"]["bytes"] == 10 * GIB
    assert api.decode(api.encode(a), Assessment) == a
    assert '"windows": null' in api.dumps(a.facts)


# What the script prints on an LVM server with a dongle, an FC HBA and a GPU, and without ss (the
# shapes this machine cannot show: lsblk 2.38's JSON, LVM 2.03's JSON report, /proc/net/tcp, sysfs).
LVM_SERVER = """\
@@uname
system Linux
release 5.14.0-427.el9.x86_64
machine x86_64
@@os-release
NAME="Rocky Linux"
VERSION_ID="9.4"
ID="rocky"
PRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"
@@boot
uefi
@@sysblock
disk sda 209715200 dev
part sda1 1228800 sda
part sda2 208484352 sda
disk dm-0 104857600 -
@@lsblk
{"blockdevices": [
  {"name":"sda", "type":"disk", "size":107374182400, "fstype":null, "mountpoint":null, "uuid":null, "pkname":null,
   "children": [
     {"name":"sda1", "type":"part", "size":629145600, "fstype":"vfat", "mountpoint":"/boot/efi", "uuid":"7B77-95E7", "pkname":"sda"},
     {"name":"sda2", "type":"part", "size":106744020992, "fstype":"LVM2_member", "mountpoint":null, "uuid":"pv-1", "pkname":"sda",
      "children": [
        {"name":"rl-root", "type":"lvm", "size":53687091200, "fstype":"xfs", "mountpoint":"/", "uuid":"r-1", "pkname":"sda2"},
        {"name":"rl-swap", "type":"lvm", "size":4294967296, "fstype":"swap", "mountpoint":"[SWAP]", "uuid":"s-1", "pkname":"sda2"}
      ]}
   ]},
  {"name":"sr0", "type":"rom", "size":1073741312, "fstype":null, "mountpoint":null, "uuid":null, "pkname":null}
]}
@@vgs
  {
      "report": [
          {
              "vg": [
                  {"vg_name":"rl", "vg_size":"106744020992", "vg_free":"48762060800", "pv_count":"1", "lv_count":"2"}
              ]
          }
      ]
  }
@@lvs
  {"report": [{"lv": [
      {"lv_name":"root", "vg_name":"rl", "lv_size":"53687091200", "lv_path":"/dev/rl/root"},
      {"lv_name":"swap", "vg_name":"rl", "lv_size":"4294967296", "lv_path":"/dev/rl/swap"}]}]}
@@df
Filesystem            Type         1-blocks       Used   Available Capacity Mounted on
devtmpfs              devtmpfs      4096000          0     4096000       0% /dev
/dev/mapper/rl-root   xfs       53660876800 5366087680 48294789120      10% /
/dev/sda1             vfat        627900416    7340032   620560384       2% /boot/efi
tmpfs                 tmpfs      1638400000    1048576  1637351424       1% /run
@@cpu
8
model name	: Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz
@@meminfo
MemTotal:       32617420 kB
MemAvailable:   30012344 kB
SwapTotal:       4194300 kB
SwapFree:        4194300 kB
@@loadavg
0.42 0.38 0.35 2/411 12345
@@pressure
@@diskstats
uptime 1000.00
   8       0 sda 100 0 2000 50 300 0 4000 70 0 100 120 0 0 0 0 0 0
 253       0 dm-0 100 0 2000 50 300 0 4000 70 0 100 120 0 0 0 0 0 0
@@diskstats2
uptime 1001.00
   8       0 sda 300 0 4048 70 500 0 12192 90 0 350 170 0 0 0 0 0 0
 253       0 dm-0 300 0 4048 70 500 0 12192 90 0 350 170 0 0 0 0 0 0
@@listen
@@proc-net-tcp
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0
   1: 0100007F:1F90 0200007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0 100 0 0 10 0
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
@@virt
sys_vendor Dell Inc.
product_name PowerEdge R640
@@tools
run aksusbd
path aksusbd /usr/sbin/aksusbd
pkg aksusbd ii
pkg hyperv-daemons un
@@usb
usb	1-1	1d6b	0002	09	Linux Foundation	2.0 root hub
usb	1-4	0529	0001	00	AKS	HASP HL 3.25
@@fc
fc host3 0x21000024ff3dbeef Online
@@pci
display 0000:03:00.0 0x030000 0x102b 0x0536
display 0000:3b:00.0 0x030200 0x10de 0x1eb8
@@end
"""


def test_the_parser_reads_lvm_sysfs_and_proc_net_tcp_as_the_tools_print_them():
    from ferry.engine.migration.assess import parse
    f = SourceFacts(**parse("db01", LVM_SERVER))
    assert (f.os_id, f.os_version, f.os_name, f.kernel, f.boot) == ("rocky", "9.4", "Rocky Linux 9.4 (Blue Onyx)",
                                                                     "5.14.0-427.el9.x86_64", "uefi")
    assert [(d.name, d.type, d.parent) for d in f.devices] == [
        ("sda", "disk", None), ("sda1", "part", "sda"), ("sda2", "part", "sda"), ("rl-root", "lvm", "sda2"),
        ("rl-swap", "lvm", "sda2")]                                  # the CD drive is not a disk of the server
    assert [d.name for d in f.copy_units()] == ["sda1", "sda2"] and f.block_bytes() == 629145600 + 106744020992
    assert [(v.name, v.lvs, v.free) for v in f.volume_groups] == [("rl", 2, 48762060800)]
    assert [(v.name, v.path) for v in f.logical_volumes] == [("root", "/dev/rl/root"), ("swap", "/dev/rl/swap")]
    assert [(x.mountpoint, x.type) for x in f.filesystems] == [("/", "xfs"), ("/boot/efi", "vfat")]
    assert f.used_bytes() == 5366087680 + 7340032
    w = f.workload
    assert (w.cpus, w.mem_total, w.load5) == (8, 32617420 * 1024, 0.38)
    assert (w.io_busiest, w.io_busy, w.io_sample_s) == ("sda", 0.25, 1.0)    # dm-0 has no device: not counted twice
    assert (w.read_bytes_per_s, w.write_bytes_per_s) == (2048 * 512, 8192 * 512)
    assert [(s.address, s.port) for s in f.services] == [("::", 22), ("127.0.0.1", 8080)]
    assert "ss is not installed" in f.unknown["services.process"]
    assert (f.hypervisor.vendor, f.hypervisor.product, f.hypervisor.tools) == ("Dell Inc.", "PowerEdge R640", [])
    assert [u.port for u in f.usb] == ["1-4"] and f.usb[0].dongle == "SafeNet/Aladdin HASP"
    assert [(d.vendor, d.compute) for d in f.displays] == [("Matrox", False), ("NVIDIA", True)]
    assert f.licences == [ToolFound("aksusbd", "Sentinel/HASP USB dongle daemon",
                                    "running, at /usr/sbin/aksusbd, package installed")]
    assert names(findings(f)) == {"uefi": Severity.WARNING, "licence_dongle": Severity.WARNING,
                                  "fc_hba": Severity.WARNING, "gpu": Severity.WARNING,
                                  "licence_binding": Severity.WARNING, "lvm": Severity.INFO}
    md = report_markdown(assess(f))
    assert "## LVM" in md and "| root | rl | 50.0 GiB | /dev/rl/root |" in md
