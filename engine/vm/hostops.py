"""What Ferry does on one host for its VMs: qemu-img, datastore space, pid files, the QEMU command line."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from ..config import DatastoreSpec, HostSpec, SiteConfig
from ..errors import CommandError, Refused
from ..platform.liveboot import LiveDisk, LiveNic, LivePaths, LiveRole, is_running, live_boot_argv, read_pid
from ..platform.liveimage import LiveImage
from ..transport.base import RunResult, Transport
from .hostcmd import last_line, qemu_img_progress
from .model import VMSpec
from .nics import NicPlan, attach_script, bridges_script, plan as nic_plan

RECYCLE_DIR = ".recycle"


def image_cache_dir(workspace_cache: Path) -> Path:
    """Where the live image is built and kept: $FERRY_IMAGE_CACHE, else the workspace's cache."""
    env = os.environ.get("FERRY_IMAGE_CACHE")
    return Path(env) if env else workspace_cache / "live"


@dataclass
class HostOps:
    """One host of the site, as the VM code uses it."""

    spec: HostSpec
    t: Transport
    site: SiteConfig

    @property
    def name(self) -> str:
        return self.spec.name

    def paths(self, vm: VMSpec) -> LivePaths:
        return LivePaths(self.spec.runtime, vm.process_name)

    def datastore(self, name: str | None) -> DatastoreSpec:
        """The named datastore (it must be attached to this host), or the host's first local one."""
        attached = self.site.datastores_of(self.name)
        if not attached:
            raise Refused(f"host {self.name} has no datastore",
                                 f"add [datastores.NAME] with hosts = [\"{self.name}\"] to config.toml")
        if name is None:
            local = [d for d in attached if not d.shared]
            return (local or attached)[0]
        for d in attached:
            if d.name == name:
                return d
        raise Refused(f"datastore {name!r} is not attached to host {self.name}",
                             f"use one of: {', '.join(d.name for d in attached)}")

    def datastore_of_path(self, path: str) -> DatastoreSpec | None:
        for d in self.site.datastores_of(self.name):
            if PurePosixPath(path).is_relative_to(d.path):
                return d
        return None

    # -------------------------------------------------------------- commands

    async def run(self, argv: list[str], *, timeout: float | None = 120.0, what: str = "") -> str:
        r = await self.t.run(argv, timeout=timeout)
        if not r.ok:
            raise self._failed(what or argv[0], r)
        return r.text()

    def _failed(self, what: str, r: RunResult) -> CommandError:
        return CommandError(f"{what} failed on {self.name}: {last_line(r)}",
                            "the message above is the host's; fix its cause and retry",
                            exit_status=r.exit_status, stderr=r.stderr.decode("utf-8", "replace"))

    async def qemu_img(self, *args: str, timeout: float | None = 600.0) -> str:
        return await self.run(["qemu-img", *args], timeout=timeout, what=f"qemu-img {args[0]}")

    async def qemu_img_progress(self, args: list[str], report: Callable[[float], None]) -> None:
        """Runs qemu-img with -p, calling report(fraction) as it goes."""
        r = await qemu_img_progress(self.t, args, report)
        if not r.ok:
            raise self._failed(f"qemu-img {args[0]}", r)

    def check_nics(self, nics) -> None:
        """Refused for a NIC whose network is not on this host."""
        nic_plan(self.site, self.name, "", nics)

    def nics(self, vm: VMSpec) -> list[NicPlan]:
        return nic_plan(self.site, self.name, vm.id, vm.nics)

    async def ensure_bridges(self, plans: list[NicPlan]) -> None:
        """Before QEMU starts: the bridges its taps join exist (made where the network allows)."""
        if not any(p.tap for p in plans):
            return
        r = await self.t.sh(bridges_script(self.name, plans), timeout=60)
        if r.exit_status == 3:
            raise Refused(last_line(r), f"create the bridge on {self.name}, or allow Ferry to: "
                          "create = true in the network's section of config.toml")
        if not r.ok:
            raise self._failed("preparing the network bridges", r)

    async def attach_taps(self, plans: list[NicPlan]) -> None:
        """After QEMU made its taps: each joins its bridge (or its VLAN) and comes up."""
        if any(p.tap for p in plans):
            r = await self.t.sh(attach_script(plans), timeout=60)
            if not r.ok:
                raise self._failed("joining the VM's taps to their bridges", r)

    async def image_info(self, path: str) -> dict:
        return json.loads(await self.qemu_img("info", "--output=json", "-U", path, timeout=60))

    async def free_bytes(self, path: str) -> int:
        out = await self.run(["df", "-B1", "--output=avail", path], timeout=30, what="df")
        return int(out.split()[-1])

    async def ensure_space(self, ds: DatastoreSpec, needed: int, what: str) -> None:
        await self.t.mkdir(ds.path)
        free = await self.free_bytes(ds.path)
        if free < needed:
            raise Refused(
                f"datastore {ds.name} on {self.name} has {_gib(free)} free, {what} needs {_gib(needed)}",
                "free space on it, or choose another datastore (--datastore)")

    async def exists(self, path: str) -> bool:
        return await self.t.stat(path) is not None

    async def remove_tree(self, path: str) -> None:
        if path and path not in ("/", "") and len(PurePosixPath(path).parts) > 2:
            await self.run(["rm", "-rf", "--one-file-system", "--", path], timeout=300, what="rm")

    async def move(self, src: str, dst: str) -> None:
        await self.t.mkdir(str(PurePosixPath(dst).parent))
        await self.run(["mv", "-T", "--", src, dst], timeout=300, what="mv")

    # -------------------------------------------------------------- processes

    async def pid(self, vm: VMSpec) -> int | None:
        """The pid of the VM's QEMU if it runs, else None."""
        paths = self.paths(vm)
        pid = await read_pid(self.t, paths.pidfile)
        if pid is not None and await is_running(self.t, pid, paths.pidfile):
            return pid
        return None

    async def running_pidfiles(self) -> dict[str, int]:
        """vm-<short id> -> pid for every QEMU running from this host's runtime folder (none while the
        folder does not exist). A host that does not answer raises: nothing is known to run or not."""
        out: dict[str, int] = {}
        if await self.t.stat(self.spec.runtime) is None:
            return out
        names = await self.t.listdir(self.spec.runtime)
        for n in names:
            if n.startswith("vm-") and n.endswith(".pid"):
                pidfile = str(PurePosixPath(self.spec.runtime) / n)
                pid = await read_pid(self.t, pidfile)
                if pid is not None and await is_running(self.t, pid, pidfile):
                    out[n[:-4]] = pid
        return out

    async def live_image(self, image: LiveImage) -> LiveImage:
        """The image as the host sees it: local hosts use the cache; others get a copy in their runtime."""
        if self.spec.transport == "local":
            return image
        base = PurePosixPath(self.spec.runtime) / f"live-{image.version[:12]}"
        kernel, initrd = str(base / "vmlinuz"), str(base / "initrd")
        for local, remote in ((image.kernel, kernel), (image.initrd, initrd)):
            st = await self.t.stat(remote)
            if st is None or st.size != local.stat().st_size:
                await self.t.mkdir(str(base))
                # A name of its own: two VMs starting at once on a host without a copy each write one.
                tmp = f"{remote}.tmp-{secrets.token_hex(4)}"
                await self.t.write_file(tmp, local.read_bytes())
                await self.run(["mv", "-f", tmp, remote], what="mv")
        return LiveImage(Path(kernel), Path(initrd), image.version, image.kernel_release, image.size, image.packages)

    def argv(self, vm: VMSpec, image: LiveImage, accel: str, *, incoming: str | None = None,
             live: tuple[LiveRole, Mapping[str, object]] | None = None) -> list[str]:
        """The QEMU command line of a VM: the same for a spec, so a hibernated state file fits it.
        `live`: the live image's role and its parameters, whatever the boot order says (a migration's
        target boots as receiver)."""
        role, params = LiveRole.IDLE, {"hostname": vm.name}
        for entry in () if live else vm.boot:
            if entry == "disk" and vm.disks:
                # The live image's kernel boots the root filesystem of the first disk; with none
                # there, the guest falls back to the live system (and its agent) in a few seconds.
                role, params = LiveRole.BOOT_DISK, {**params, "root": "/dev/vda1" if vm.disks[0].bus == "virtio"
                                                    else "/dev/sda1", "root_wait": 3}
                break
            if entry == "live":
                break
        if live:
            role, params = live[0], {**params, **live[1]}
        disks = [LiveDisk(d.path, "qcow2", d.bus) for d in vm.disks]
        nics = [LiveNic(mac=p.mac, tap=p.tap) for p in self.nics(vm)]
        return live_boot_argv(image, paths=self.paths(vm), role=role, accel=accel, memory_mb=vm.memory_mb,
                              cpus=vm.cpus, maxcpus=max(vm.cpus, vm.max_cpus), params=params, disks=disks,
                              nics=nics, cpu=self.spec.cpu_model, incoming=incoming)


def vm_dir(ds: DatastoreSpec, name: str) -> str:
    return str(PurePosixPath(ds.path) / name)


def disk_path(ds: DatastoreSpec, vm_name: str, disk: str) -> str:
    return str(PurePosixPath(ds.path) / vm_name / f"{disk}.qcow2")


def recycle_path(ds: DatastoreSpec, vm_id: str, path: str) -> str:
    rel = PurePosixPath(path).relative_to(ds.path)
    return str(PurePosixPath(ds.path) / RECYCLE_DIR / vm_id / rel)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"
