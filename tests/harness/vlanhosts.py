"""Two hosts joined by an uplink, for VLANs that leave their host (tests/test_networks.py).

Network namespaces: hosts PFX-hA and PFX-hB, whose `eth1` are the two ends of one veth (the wire
between them), and four stand-ins for VM NICs, PFX-a10 / PFX-a20 on hA and PFX-b10 / PFX-b20 on
hB: each a namespace holding `eth0` (192.168.50.x/24), whose veth peer on its host carries the tap
name Ferry gives that NIC. Ferry's own scripts (engine/vm/nics.py bridges_script, attach_script)
then run in each host namespace, as Ferry runs them on a host before and after QEMU starts.

VLANs need 802.1Q in the kernel (sub-interfaces) or bridge VLAN filtering. Where this machine's
kernel has both, the scenario runs here; where it lacks them (this project's test machines have
neither), it runs inside a QEMU guest booting the live image's Debian kernel (which has both, as
modules), with this machine's iproute2 and the live image's busybox: the same namespaces and
scripts, a real kernel, only not this one. The guest prints the results on its serial console.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ferry.engine.config import NetworkSpec
from ferry.engine.vm.nics import NicPlan, attach_script, bridges_script, tap_name

from .qemu import image_cache

BRIDGE = "br-x"
UPLINK = "eth1"
SUBNET = "192.168.50"
PORTS = {"a10": ("hA", 10, 1), "a20": ("hA", 20, 2), "b10": ("hB", 10, 3), "b20": ("hB", 20, 4)}
# (from, to): each VLAN crosses the wire; nothing reaches another VLAN, on its own host or across
PINGS = (("a10", "b10"), ("a20", "b20"), ("a10", "b20"), ("b10", "b20"), ("a10", "a20"))
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def networks(mtu: int | None = None) -> dict[int, NetworkSpec]:
    """Networks v10 and v20: VLANs 10 and 20 of br-x, uplink eth1 on both hosts."""
    return {v: NetworkSpec(f"v{v}", bridge=BRIDGE, vlan=v, mtu=mtu, hosts=("hA", "hB"),
                           uplinks={"hA": UPLINK, "hB": UPLINK}) for v in (10, 20)}


def plans(host: str, nets: dict[int, NetworkSpec]) -> list[NicPlan]:
    """The NICs of `host`'s stand-ins as Ferry plans them (a stand-in's name is its VM's id)."""
    return [NicPlan(0, nets[vlan], "", tap_name(port, 0), UPLINK)
            for port, (h, vlan, _) in PORTS.items() if h == host]


@dataclass(frozen=True)
class Scenario:
    """A run: its namespaces' prefix and its files (name -> text; scenario.sh runs it in their folder,
    with `ip`, `bridge`, `ping` and `sh` on PATH, and deletes its namespaces as it ends)."""
    prefix: str
    files: dict[str, str]


def scenario(prefix: str, *, adopted: bool, mtu: int | None = None) -> Scenario:
    """It prints lines `FV <what> ...`: each Ferry script's exit code and stderr, the pings' exit
    codes, each host's br-x filtering, the VLANs on its uplink, eth1.V's bridge and MTU. adopted:
    each host's br-x is there before Ferry comes (the operator's, holding eth1, VLAN filtering
    off); else Ferry makes it. `mtu`: the networks' MTU."""
    nets = networks(mtu)
    files = {}
    ns = {name: f"{prefix}-{name}" for name in ("hA", "hB", *PORTS)}
    sh = ["set -u", f"trap 'for n in {' '.join(ns.values())}; do ip netns del $n 2>/dev/null; done' EXIT",
          *(f"ip netns add {n}" for n in ns.values()),
          f"ip link add {UPLINK} netns {ns['hA']} type veth peer name {UPLINK} netns {ns['hB']}"]
    for host in ("hA", "hB"):
        sh += [f"ip -n {ns[host]} link set lo up", f"ip -n {ns[host]} link set {UPLINK} up"]
        if adopted:
            sh += [f"ip -n {ns[host]} link add {BRIDGE} type bridge stp_state 0",
                   f"ip -n {ns[host]} link set {UPLINK} master {BRIDGE}", f"ip -n {ns[host]} link set {BRIDGE} up"]
    for port, (host, _, ip) in PORTS.items():
        sh += [f"ip link add {tap_name(port, 0)} netns {ns[host]} type veth peer name eth0 netns {ns[port]}",
               f"ip -n {ns[port]} addr add {SUBNET}.{ip}/24 dev eth0", f"ip -n {ns[port]} link set eth0 up",
               f"ip -n {ns[port]} link set lo up"]
    for host in ("hA", "hB"):
        files[f"{host}-bridges.sh"] = bridges_script(host, plans(host, nets))
        files[f"{host}-attach.sh"] = attach_script(plans(host, nets))
        for step in ("bridges", "attach"):
            sh += [f"ip netns exec {ns[host]} sh ./{host}-{step}.sh 2>{host}-{step}.err; "
                   f"echo \"FV script {host} {step} $? $(tr '\\n' ' ' <{host}-{step}.err)\""]
    for i, (a, b) in enumerate(PINGS):
        # one reply ends a ping; one that should get none waits 3 s (busybox's -W is 10 s unless told)
        wait = 10 if PORTS[a][1] == PORTS[b][1] else 3
        sh.append(f"(ip netns exec {ns[a]} ping -c 1 -W {wait} -w {wait} {SUBNET}.{PORTS[b][2]} >/dev/null 2>&1; "
                  f"echo \"FV ping {a} {b} $?\") >ping{i} &")
    sh += ["wait", *(f"cat ping{i}" for i in range(len(PINGS)))]
    for host in ("hA", "hB"):
        sys_ = f"ip netns exec {ns[host]} cat /sys/class/net"
        sh += [f"echo \"FV filtering {host} $({sys_}/{BRIDGE}/bridge/vlan_filtering 2>/dev/null || echo none)\"",
               f"echo \"FV uplink-vlans {host} $(ip netns exec {ns[host]} bridge -j vlan show dev {UPLINK} 2>/dev/null)\""]
        for v in (10, 20):
            sh.append(f"echo \"FV sub {host} {v} $({sys_}/{UPLINK}.{v}/mtu 2>/dev/null || echo 0) "
                      f"$(ip netns exec {ns[host]} readlink /sys/class/net/{UPLINK}.{v}/master 2>/dev/null)\"")
    files["scenario.sh"] = "\n".join(sh) + "\n"
    return Scenario(prefix, files)


@dataclass(frozen=True)
class Outcome:
    """What a run printed, read back."""
    scripts: dict[tuple[str, str], tuple[int, str]]     # (host, bridges|attach) -> (exit code, stderr)
    pings: dict[tuple[str, str], bool]                  # (from, to) -> a reply came
    filtering: dict[str, str]                           # host -> br-x's vlan_filtering ('none': no such file)
    uplink_vlans: dict[str, list[int]]                  # host -> VLANs on eth1 (filtering bridge)
    sub: dict[tuple[str, int], tuple[int, str]]         # (host, vlan) -> eth1.V's MTU and bridge (0, '': none)


def parse(text: str) -> Outcome:
    scripts, pings, filtering, vlans, subs = {}, {}, {}, {}, {}
    for line in text.splitlines():
        f = line.strip().split(" ", 4)
        if f[0] != "FV" or len(f) < 3:
            continue
        if f[1] == "script":
            scripts[(f[2], f[3])] = (int(f[4].split(" ", 1)[0]), f[4].partition(" ")[2].strip())
        elif f[1] == "ping":
            pings[(f[2], f[3])] = f[4] == "0"
        elif f[1] == "filtering":
            filtering[f[2]] = f[3] if len(f) > 3 else ""
        elif f[1] == "uplink-vlans":
            shown = json.loads(line.strip().split(" ", 3)[3] if len(f) > 3 else "[]")
            vlans[f[2]] = sorted(v["vlan"] for d in shown for v in d.get("vlans", []))
        elif f[1] == "sub":
            mtu, _, master = f[4].partition(" ")
            subs[(f[2], int(f[3]))] = (int(mtu), os.path.basename(master.strip()))
    return Outcome(scripts, pings, filtering, vlans, subs)


def kernel_has_vlans() -> tuple[bool, bool]:
    """(802.1Q sub-interfaces, bridge VLAN filtering) on this machine's kernel, tried in a namespace."""
    ns = f"fvk-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def works(*args: str) -> bool:
            return subprocess.run(["ip", "-n", ns, "link", "add", *args], capture_output=True).returncode == 0
        works("u0", "type", "veth", "peer", "name", "u1")
        return (works("link", "u0", "name", "u0.10", "type", "vlan", "id", "10"),
                works("b0", "type", "bridge", "vlan_filtering", "1"))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def run_here(run: Scenario, timeout: float = 120) -> str:
    """A scenario on this machine's kernel; its namespaces are gone after it, whatever happened."""
    try:
        with tempfile.TemporaryDirectory(prefix="fvlan-") as d:
            for name, text in run.files.items():
                Path(d, name).write_text(text)
            return subprocess.run(["sh", "./scenario.sh"], cwd=d, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PATH": _SBIN}).stdout
    finally:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for ns in listed:
            if ns.startswith(run.prefix + "-"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ------------------------------------------------------------------ in a guest with Debian's kernel

MODULES = ("bridge", "8021q", "veth")


def run_in_guest(runs: dict[str, Scenario], timeout: float = 300) -> dict[str, str]:
    """Scenarios (run name -> files) one after another in one QEMU guest booting the live image's
    Debian kernel; each run's console output by name."""
    from ferry.engine.platform.liveimage import build_live_image

    from .debsource import _kernel, _run_async

    live = _run_async(build_live_image(image_cache()))
    release, _, deb = _kernel(image_cache())
    buf = io.BytesIO()
    _overlay(buf, runs, _modules(deb, release))
    with tempfile.TemporaryDirectory(prefix="fvlan-") as d:
        initrd = Path(d, "initrd.gz")
        initrd.write_bytes(live.initrd.read_bytes() + gzip.compress(buf.getvalue(), 1))
        r = subprocess.run(
            [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256",
             "-kernel", str(live.kernel), "-initrd", str(initrd), "-append",
             "console=ttyS0 rdinit=/ferry-vlan/init quiet loglevel=1 panic=-1", "-display", "none",
             "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none"],
            capture_output=True, text=True, timeout=timeout, errors="replace")
    out, name = {}, None
    for line in r.stdout.splitlines():
        if m := re.match(r"FVRUN (\S+)", line.strip()):
            name = m.group(1)
            out[name] = ""
        elif name:
            out[name] += line.strip() + "\n"
    if set(out) != set(runs) or "FVEND" not in r.stdout:
        raise AssertionError(f"the guest did not run every scenario: {r.stdout[-3000:]} {r.stderr[-2000:]}")
    return out


def _modules(deb: Path, release: str) -> list[Path]:
    """MODULES and what they need, in loading order, from the kernel package: taken once into the
    image cache (a folder renamed into place when whole)."""
    from ferry.engine.platform.liveimage import _module_order

    final = image_cache() / "vlan-kernel" / release
    if not (final / "order").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=final.parent))
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True, capture_output=True)
            found, order, _ = _module_order(work / "deb/lib/modules" / release / "kernel", MODULES, ())
            (work / "mod").mkdir()
            for name in order:
                shutil.copyfile(found[name], work / "mod" / f"{name}.ko")
            (work / "mod/order").write_text("".join(f"{m}\n" for m in order))
            try:
                (work / "mod").rename(final)
            except OSError:      # another worker was first
                pass
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return [final / f"{m}.ko" for m in (final / "order").read_text().split()]


def _libraries(program: str) -> list[Path]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [Path(m.group(1)) for m in re.finditer(r"(/\S+) \(0x", out)]


def _overlay(buf: io.BytesIO, runs: dict[str, Scenario], modules: list[Path]) -> None:
    """A cpio archive laid over the live image's: /ferry-vlan with this machine's ip and bridge (run
    by their loader, with their libraries beside them), the modules, the runs and an init."""
    from ferry.engine.platform.cpio import CpioWriter

    cpio = CpioWriter(buf)
    for d in ("ferry-vlan", "ferry-vlan/bin", "ferry-vlan/libexec", "ferry-vlan/lib", "ferry-vlan/mod",
              "ferry-vlan/runs", *(f"ferry-vlan/runs/{name}" for name in runs)):
        cpio.add_dir(d)
    libs: dict[str, Path] = {}
    # dash as `sh`: busybox's shell would run its own `ip` applet whatever PATH says
    for tool, name in (("ip", "ip"), ("bridge", "bridge"), ("dash", "sh")):
        path = shutil.which(tool, path=_SBIN)
        assert path, f"{tool} is missing here"
        cpio.add_file(f"ferry-vlan/libexec/{tool}", Path(path).read_bytes(), 0o755)
        libs.update({p.name: p for p in _libraries(path)})
        loader = next(p for p in libs.values() if p.name.startswith("ld-linux"))
        cpio.add_file(f"ferry-vlan/bin/{name}", (
            f"#!/bin/sh\nexec /ferry-vlan/lib/{loader.name} --library-path /ferry-vlan/lib "
            f"/ferry-vlan/libexec/{tool} \"$@\"\n").encode(), 0o755)
    for name, p in libs.items():
        cpio.add_file(f"ferry-vlan/lib/{name}", p.resolve().read_bytes(), 0o755)
    for module in modules:
        cpio.add_file(f"ferry-vlan/mod/{module.name}", module.read_bytes())
    for run, scen in runs.items():
        for name, text in scen.files.items():
            cpio.add_file(f"ferry-vlan/runs/{run}/{name}", text.encode(), 0o755)
    init = ["#!/bin/sh", "export PATH=/ferry-vlan/bin:/bin:/sbin:/usr/bin:/usr/sbin",
            "/bin/busybox mkdir -p /proc /sys /dev /run/netns /tmp",
            "/bin/busybox mount -t proc proc /proc", "/bin/busybox mount -t sysfs sysfs /sys",
            "/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null",
            "/bin/busybox --install -s 2>/dev/null",
            *(f"insmod /ferry-vlan/mod/{m.name}" for m in modules)]
    for run in runs:
        init += [f"echo FVRUN {run}", f"(cd /ferry-vlan/runs/{run} && /ferry-vlan/bin/sh ./scenario.sh 2>&1)"]
    init += ["echo FVEND", "poweroff -f"]
    cpio.add_file("ferry-vlan/init", ("\n".join(init) + "\n").encode(), 0o755)
    cpio.close()
