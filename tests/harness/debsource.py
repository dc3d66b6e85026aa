"""The migration tests' source server: a real Debian 12 (bookworm) system, built here from Debian
packages with mmdebstrap, kept as a qcow2 disk in the image cache and booted as a lab VM.

What the server is (each fixed, so a migrated copy can be checked against it):
- systemd, udev, dbus, OpenSSH's sshd (root logs in with the harness's key only), nginx serving
  PAGE, cron running the entries of CRON_FILE, python3 (Ferry's replication agent runs on it),
  qemu-guest-agent, and open-vm-tools as a VMware guest has it (vmtoolsd does not start outside
  VMware, but the V2V step has a real package to remove);
- the live image's own kernel package, installed (so /lib/modules matches the kernel that boots
  it: engine/vm/hostops.py boots the root filesystem of a VM's first disk with the live image's
  kernel, ferry.root=/dev/vda1) with its initramfs, no bootloader;
- systemd-networkd asks DHCP on the first wired NIC (by MAC, so a static lease of the lab's
  dnsmasq gives it its address);
- the user alice (uid 1000) with ALICE_FILES;
- one partition (MBR) holding ext4, mounted by UUID in fstab; a 2 GiB disk.

Build phases (once per recipe version; under a lock, so parallel test workers build it once):
1. the live image (built or cached) names its kernel package; its .deb from the live image's cache;
2. mmdebstrap --variant=minbase with PACKAGES and that kernel package into a folder; the packages
   it downloads are kept in <cache>/debsource/debs for the next build;
3. the folder is customised (users, files, keys, units) here, in Python and chroot;
4. a sparse raw disk gets an MBR and an ext4 made from the folder (mke2fs -d, no mount, no loop
   device), then becomes disk.qcow2; manifest.json is written last and the folder renamed into
   place: a half-built image never sits under its final name.

The version hashes this file, the kernel package and the harness's public key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ferry.engine.platform.netlab import NetLab

from .lab import ok
from .waiting import until_sync

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "nginx", "cron", "python3",
            "qemu-guest-agent", "open-vm-tools")
DISK_SIZE = 2 << 30
PART_START = 1 << 20            # the partition starts at 1 MiB, as fdisk puts it
HOSTNAME = "debsource"
PAGE_PATH = "/var/www/html/index.html"
PAGE = (b"<!doctype html>\n<html><head><title>Ferry migration source</title></head>\n"
        b"<body><h1>debsource</h1><p>Served by nginx on a Debian 12 server that Ferry migrates.</p></body>"
        b"</html>\n")
PAGE_SHA256 = hashlib.sha256(PAGE).hexdigest()
ALICE = "alice"
ALICE_UID = 1000
CRON_FILE = "/etc/cron.d/ferry-source"
CRON_DIR = "/var/lib/ferry-source"
CRON_BOOTED = f"{CRON_DIR}/booted"      # written by cron's @reboot entry: cron runs and reads cron.d
CRON_TICKS = f"{CRON_DIR}/ticks"        # a line a minute: data that changes between sync rounds
CRON_TEXT = (b"# Ferry's migration source: proof that cron runs, and a file that keeps changing.\n"
             b"SHELL=/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
             # (a % in a crontab command ends it: escaped)
             b"@reboot root date -u +\\%s > " + CRON_BOOTED.encode() + b"\n"
             b"* * * * * root date -u +\\%s >> " + CRON_TICKS.encode() + b"\n")
NETWORK_FILE = "/etc/systemd/network/20-wired.network"


def _blob(n: int, seed: bytes) -> bytes:
    """n bytes nobody can guess or compress: a SHA-256 counter stream."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n])


@dataclass(frozen=True)
class SourceFile:
    content: bytes
    owner: str
    group: str
    mode: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


# alice's files: path -> what a migrated copy must still have.
ALICE_FILES = {
    "/home/alice/notes.txt": SourceFile(b"Call Bob about the cutover window.\n", ALICE, ALICE, 0o644),
    "/home/alice/private/diary.txt": SourceFile(b"Only alice reads this.\n", ALICE, ALICE, 0o600),
    "/home/alice/data/blob.bin": SourceFile(_blob(1 << 20, b"alice-blob"), ALICE, ALICE, 0o640),
    "/home/alice/shared with root.txt": SourceFile(b"owned by root, in alice's home\n", "root", ALICE, 0o664),
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SourceImage:
    """A built source server: its disk and what a test pins and checks."""

    disk: Path                      # qcow2, DISK_SIZE virtual; copy it, never boot it in place
    version: str
    kernel_release: str             # the live image's kernel, whose modules the image holds
    identity: Path                  # the private key root's authorized_keys accepts
    host_keys: tuple[str, ...]      # "TYPE BASE64" of each of its sshd's host keys
    fs_uuid: str                    # the root filesystem's UUID (fstab names it)
    used_bytes: int                 # bytes of files in the root filesystem
    build_seconds: float
    packages: tuple[str, ...] = ()  # "name=version" of every installed package

    def known_hosts(self, address: str) -> str:
        """known_hosts lines pinning its host keys at address."""
        return "".join(f"{address} {key}\n" for key in self.host_keys)


# ------------------------------------------------------------------ the cache

def _root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "debsource"


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One build at a time per cache, across processes (the other workers wait, then find it built)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _identity(root: Path) -> Path:
    """The harness's key for root on the source (made once, kept in the cache)."""
    key = root / "id_ed25519"
    if not key.exists():
        tmp = root / f".id-{os.getpid()}"
        for p in (tmp, tmp.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ferry-debsource", "-f", str(tmp)],
                       check=True, capture_output=True)
        os.replace(tmp.with_suffix(".pub"), key.with_suffix(".pub"))
        os.replace(tmp, key)
    return key


def _load(directory: Path, identity: Path) -> SourceImage | None:
    try:
        m = json.loads((directory / "manifest.json").read_text())
        disk = directory / m["disk"]
        if disk.stat().st_size != m["disk_bytes"]:
            return None
        return SourceImage(disk=disk, version=m["version"], kernel_release=m["kernel_release"], identity=identity,
                           host_keys=tuple(m["host_keys"]), fs_uuid=m["fs_uuid"], used_bytes=m["used_bytes"],
                           build_seconds=m["build_seconds"], packages=tuple(m["packages"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_async(coro):
    """Runs a coroutine to its end from sync code, even when the caller's thread has a loop running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _kernel(cache_dir: Path) -> tuple[str, str, Path]:
    """The live image's kernel: its release, "package=version" and the .deb (fetched if the cache lost it)."""
    from ferry.engine.platform import debs
    from ferry.engine.platform.liveimage import build_live_image
    live = _run_async(build_live_image(cache_dir))
    spec = next((p for p in live.packages if p.startswith("linux-image-")), None)
    if spec is None:
        raise RuntimeError(f"the live image {live.version} names no kernel package")
    name, _, version = spec.partition("=")
    debs_dir = Path(cache_dir) / "liveimage" / "debs"
    pkg = debs.DebPackage(name, version, "amd64", "", 0)
    deb = _run_async(debs.fetch([pkg], debs_dir))[name]
    return live.kernel_release, spec, deb


_RECIPE_END = "# ------------------------------------------------------------------ as a lab VM"


def version_of(kernel_spec: str, public_key: bytes) -> str:
    """The recipe's hash: this file down to the lab helpers (what goes into the image and how it is
    built), the kernel package and the key root accepts."""
    h = hashlib.sha256(b"ferry-debsource\0")
    h.update(Path(__file__).read_text().partition(f"\n{_RECIPE_END}\n")[0].encode())
    h.update(kernel_spec.encode() + b"\0" + public_key)
    return h.hexdigest()[:16]


def source_image(cache_dir: Path, *, force: bool = False, progress: Progress | None = None) -> SourceImage:
    """The source server's disk for the live image in cache_dir (the cache the lab's VMs boot
    from): from the cache, else built (about a minute and ~150 MB of packages the first time)."""
    say = progress or (lambda _what: None)
    root = _root(cache_dir)
    with _lock(root):
        identity = _identity(root)
        release, kernel_spec, kernel_deb = _kernel(cache_dir)
        version = version_of(kernel_spec, identity.with_suffix(".pub").read_bytes())
        final = root / version
        if not force and (image := _load(final, identity)):
            return image
        work = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=root))
        try:
            _build(work, root / "debs", version, release, kernel_deb, identity, say)
            old = None
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}")
                os.rename(final, old)
            os.rename(work / "image", final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            # Earlier versions go (each is ~470 MB): a copy is taken right after this returns, so
            # only a build of another recipe (another checkout) could be left without its image.
            for stale in root.iterdir():
                if stale.is_dir() and stale != final and (stale / "manifest.json").exists():
                    shutil.rmtree(stale, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = _load(final, identity)
        if image is None:
            raise RuntimeError(f"the source image built in {final} is incomplete")
        say(f"source image {version} ready")
        return image


# ------------------------------------------------------------------ the build

def _sh(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed ({p.returncode}): {tail}")
    return p


def _build(work: Path, debs_dir: Path, version: str, release: str, kernel_deb: Path, identity: Path,
           say: Progress) -> None:
    t0 = time.monotonic()
    rootfs = work / "rootfs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    # apt (outside the chroot) hands a .deb's path to dpkg (inside): the path must be the same in
    # both, so the kernel's .deb sits at one path of the host's /tmp and the chroot's /tmp (which
    # mmdebstrap empties at the end).
    with tempfile.TemporaryDirectory(prefix="ferry-debsource-", dir="/tmp") as tmp:
        deb = Path(tmp) / kernel_deb.name
        shutil.copyfile(kernel_deb, deb)
        say(f"mmdebstrap {SUITE}: {', '.join(PACKAGES)} and {kernel_deb.name}")
        _sh(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
             f"--include={','.join(PACKAGES)}", f"--include={deb}",
             # the packages downloaded before are used again, and the new ones kept
             "--skip=essential/unlink",
             f'--setup-hook=mkdir -p "$1/var/cache/apt/archives/" "$1{tmp}" && cp {deb} "$1{deb}"',
             f"--setup-hook=sync-in {debs_dir} /var/cache/apt/archives/",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs_dir}",
             SUITE, str(rootfs)], "mmdebstrap", timeout=1800)
    bootstrap_s = time.monotonic() - t0
    say("customising the source server")
    packages = _customise(rootfs, identity)
    _prune(debs_dir, packages)
    host_keys = tuple(" ".join(p.read_text().split()[:2]) for p in sorted((rootfs / "etc/ssh").glob("ssh_host_*_key.pub")))
    used = _used_bytes(rootfs)
    fs_uuid = str(uuid.UUID(bytes=hashlib.sha256(f"fs-{version}".encode()).digest()[:16], version=4))
    (rootfs / "etc/fstab").write_text(f"# <file system> <mount point> <type> <options> <dump> <pass>\n"
                                      f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n")
    say("making the disk")
    out = work / "image"
    out.mkdir()
    raw = work / "disk.raw"
    _make_disk(raw, rootfs, fs_uuid, version)
    _sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], "qemu-img convert")
    raw.unlink()
    manifest = {
        "version": version, "suite": SUITE, "kernel_release": release, "disk": "disk.qcow2",
        "disk_bytes": (out / "disk.qcow2").stat().st_size, "virtual_size": DISK_SIZE,
        "fs_uuid": fs_uuid, "used_bytes": used, "host_keys": list(host_keys),
        "page_sha256": PAGE_SHA256, "packages": packages,
        "bootstrap_seconds": round(bootstrap_s, 1), "build_seconds": round(time.monotonic() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(out / "disk.qcow2", "rb") as f:
        os.fsync(f.fileno())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _put(rootfs: Path, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    p = rootfs / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)


def _ids(rootfs: Path, name: str) -> tuple[int, int]:
    """uid and gid of a user or group name in the rootfs (not the build machine's)."""
    def look(db: str, idx: int) -> int:
        for line in (rootfs / "etc" / db).read_text().splitlines():
            f = line.split(":")
            if f[0] == name:
                return int(f[idx])
        raise KeyError(f"{name} in /etc/{db}")
    return look("passwd", 2), look("group", 2)


def _customise(rootfs: Path, identity: Path) -> list[str]:
    """Makes the bootstrapped folder the server; returns its packages as "name=version"."""
    def chroot(*argv: str) -> str:
        return _sh(["chroot", str(rootfs), *argv], " ".join(argv[:2]), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                                           "LC_ALL": "C"}).stdout
    # The build machine's name and resolver must not travel with the image.
    _put(rootfs, "/etc/hostname", f"{HOSTNAME}\n".encode())
    _put(rootfs, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                               f"::1\tlocalhost ip6-localhost ip6-loopback\n".encode())
    _put(rootfs, "/etc/resolv.conf", b"")
    _put(rootfs, "/etc/default/locale", b"LANG=C.UTF-8\n")
    # The first boot (an empty /etc/machine-id: each copy gets its own) must not stop to ask for a
    # locale, a time zone and a root password on the serial console.
    (rootfs / "etc/systemd/system/systemd-firstboot.service").symlink_to("/dev/null")
    # DHCP on the first wired NIC, identified by its MAC (dnsmasq's static leases are by MAC).
    _put(rootfs, NETWORK_FILE, b"[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n\n"
                               b"[DHCPv4]\nClientIdentifier=mac\n")
    chroot("systemctl", "enable", "systemd-networkd.service")
    # root logs in with the harness's key only (sshd's default: prohibit-password).
    ssh = rootfs / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    _put(rootfs, "/root/.ssh/authorized_keys", identity.with_suffix(".pub").read_bytes(), 0o600)
    chroot("useradd", "--create-home", "--uid", str(ALICE_UID), "--user-group", "--shell", "/bin/bash", ALICE)
    for path, f in ALICE_FILES.items():
        uid, _ = _ids(rootfs, f.owner)
        _, gid = _ids(rootfs, f.group)
        parent = rootfs / Path(path).parent.relative_to("/")
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o750)
            os.chown(parent, *_ids(rootfs, ALICE))
        _put(rootfs, path, f.content, f.mode, uid, gid)
    _put(rootfs, PAGE_PATH, PAGE)
    _put(rootfs, CRON_FILE, CRON_TEXT)
    (rootfs / CRON_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    out = chroot("dpkg-query", "-W", "-f", "${Package}=${Version}\n")
    return sorted(out.split())


def _prune(debs_dir: Path, packages: list[str]) -> None:
    """Keeps only the downloaded .debs of this build's packages: the folder does not grow forever."""
    wanted = {f"{n}_{v.replace(':', '%3a')}_" for n, _, v in (p.partition("=") for p in packages)}
    for deb in debs_dir.glob("*.deb"):
        if not any(deb.name.startswith(w) for w in wanted):
            deb.unlink(missing_ok=True)


def _used_bytes(rootfs: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for n in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _make_disk(raw: Path, rootfs: Path, fs_uuid: str, version: str) -> None:
    """A sparse raw disk: an MBR with one Linux partition from PART_START to the end, holding an
    ext4 made from rootfs (mke2fs -d at an offset: no loop device, no mount)."""
    sectors = DISK_SIZE // 512
    start = PART_START // 512
    # CHS fields at their "use LBA" maximum, as modern partitioning tools write them.
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors - start)
    mbr = bytearray(512)
    mbr[440:444] = hashlib.sha256(f"mbr-{version}".encode()).digest()[:4]   # the disk signature
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(mbr)
    _sh(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", fs_uuid, "-E", f"offset={PART_START}", "-d", str(rootfs),
         str(raw), f"{(DISK_SIZE - PART_START) // 1024}k"], "mkfs.ext4", timeout=600)


# ------------------------------------------------------------------ as a lab VM

@dataclass(frozen=True)
class SourceVM:
    """The source server running as a lab VM on the `lab` network, at a static lease of the lab's
    DHCP. The harness's SSH and HTTP to it go from the lab's switch namespace (dnsmasq's), a machine
    on that network; Ferry reaches it from this machine through the lab's leg (NetLab.vm_leg)."""

    ws: Path
    lab: NetLab
    name: str
    address: str
    image: SourceImage
    boot_seconds: float             # from `ferry vm start` to the first SSH login

    @property
    def known_hosts(self) -> Path:
        return self.ws / f"{self.name}.known_hosts"

    def ssh_argv(self, command: str, *, known_hosts: Path | None = None) -> list[str]:
        return ["ip", "netns", "exec", self.lab.switch, "ssh", "-F", "/dev/null", "-i", str(self.image.identity),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}", "-o", "ConnectTimeout=5",
                "-o", "LogLevel=ERROR", f"root@{self.address}", command]

    def ssh(self, command: str, *, timeout: float = 60, known_hosts: Path | None = None
            ) -> subprocess.CompletedProcess:
        """`command` as root on the source over a real SSH connection, its host key pinned."""
        return subprocess.run(self.ssh_argv(command, known_hosts=known_hosts), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def fetch(self, path: str = "/", *, timeout: float = 30) -> bytes:
        """GET http://ADDRESS/path from the lab's switch namespace: the body (raises on an HTTP error)."""
        code = ("import sys, urllib.request\n"
                "sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=10).read())")
        p = subprocess.run(["ip", "netns", "exec", self.lab.switch, sys.executable, "-c", code,
                            f"http://{self.address}{path}"], capture_output=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"GET http://{self.address}{path}: {p.stderr.decode(errors='replace').strip()}")
        return p.stdout


def import_source(ws: Path, name: str, image: SourceImage, *, host: str = "lab1", datastore: str = "shared",
                  network: str = "lab", memory: str = "384M") -> Path:
    """A stopped VM `name` whose disk is a copy of the source image: made by `ferry vm create` with a
    disk of the image's size, whose file is replaced before its first start. Returns the disk's path."""
    made = ok(ws, "vm", "create", name, "--host", host, "--memory", memory, "--network", network,
              "--disk", f"{DISK_SIZE >> 20}M:virtio:{datastore}", "--boot", "disk")
    disk = Path(made["disks"][0])
    tmp = disk.with_name(f".{disk.name}.{os.getpid()}")
    shutil.copyfile(image.disk, tmp)
    os.replace(tmp, disk)
    return disk


def start_source(ws: Path, lab: NetLab, name: str, image: SourceImage, *, timeout: float = 300) -> SourceVM:
    """Starts the imported source on its lab host: its MAC gets a static lease first (so its address
    is known before it asks), then `ferry vm start`, then SSH is tried until root logs in."""
    mac = ok(ws, "vm", "show", name)["nics"][0]["mac"]
    address = lab.reserve(mac)
    probe = SourceVM(ws, lab, name, address, image, 0.0)
    probe.known_hosts.write_text(image.known_hosts(address))
    t0 = time.monotonic()
    ok(ws, "vm", "start", name)
    until_sync(lambda: probe.ssh("true", timeout=30).returncode == 0, timeout=timeout, every=1.0,
               what=f"root's SSH login on the source {name} at {address}")
    return SourceVM(ws, lab, name, address, image, time.monotonic() - t0)


if __name__ == "__main__":
    # `cd tests && python -m harness.debsource`: builds (or finds) the image in the tests' cache
    # and prints what it is.
    from .qemu import image_cache
    t0 = time.monotonic()
    built = source_image(image_cache(), progress=lambda what: print(what, file=sys.stderr))
    print(json.dumps({"disk": str(built.disk), "version": built.version, "kernel_release": built.kernel_release,
                      "disk_bytes": built.disk.stat().st_size, "used_bytes": built.used_bytes,
                      "build_seconds": built.build_seconds, "this_call_seconds": round(time.monotonic() - t0, 2),
                      "identity": str(built.identity), "host_keys": list(built.host_keys)}, indent=2))
