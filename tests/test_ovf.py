"""OVF / OVA export and import with real qemu-img, tar and sha256sum: the disks come back byte for byte,
the package is laid out as other tools expect, and a damaged or incomplete package is refused cleanly.
The descriptor and the manifest alone (no host) are tested in test_ovfxml.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from ferry.engine.errors import PermanentError
from ferry.engine.transport.local import LocalTransport
from ferry.engine.vm.ovf import export_package, import_package, read_package
from ferry.engine.vm.ovfxml import OvfDisk, OvfSpec, parse_manifest
from harness.ovfsamples import vmware_ovf
from harness.qemu import raw_sha256, sha256

MiB = 1 << 20
# not a whole number of CHS cylinders: a VHD read by its geometry would lose the last sectors
SIZE0 = 33 * MiB + 7 * 512
SIZE1 = 8 * MiB


def make_qcow2(path: Path, size: int) -> str:
    """A qcow2 with random data at the start, in the middle and in the very last sectors; returns the
    SHA256 of its whole raw content."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset in (0, size // 2, size - 3 * 512):
            f.seek(offset)
            f.write(os.urandom(min(MiB, size - offset)))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    digest = sha256(raw)
    raw.unlink()
    return digest


def virtual_size(image: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True, capture_output=True)
    return json.loads(out.stdout)["virtual-size"]


@pytest.fixture
def t() -> LocalTransport:
    return LocalTransport("lab1")


@pytest.fixture
def vm(tmp_path):
    """A stopped VM: two disks on two buses, two NICs."""
    src = tmp_path / "src"
    src.mkdir()
    digests = {"disk0": make_qcow2(src / "disk0.qcow2", SIZE0), "disk1": make_qcow2(src / "disk1.qcow2", SIZE1)}
    spec = OvfSpec(name="web01", cpus=2, memory_mb=1536,
                   disks=(OvfDisk("disk0", "web01-disk0.vhd", SIZE0),
                          OvfDisk("disk1", "web01-disk1.vhd", SIZE1, "scsi")),
                   nics=("lan", "dmz"))
    paths = {"disk0": str(src / "disk0.qcow2"), "disk1": str(src / "disk1.qcow2")}
    return spec, paths, digests


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []

    def __call__(self, done: int, total: int, item: str) -> None:
        self.calls.append((done, total, item))

    def check(self) -> None:
        assert self.calls, "no progress was reported"
        totals = {t for _, t, _ in self.calls}
        assert len(totals) == 1, f"the total changed on the way: {sorted(totals)}"
        done = [d for d, _, _ in self.calls]
        assert done == sorted(done), "progress went back"
        fractions = [d / t for d, t, _ in self.calls if t]
        assert all(0 <= f <= 1 for f in fractions)
        assert fractions[-1] == 1
        assert len({round(f, 2) for f in fractions}) > 3, "progress came in one jump"


def check_disks(made: dict[str, str], vm, tmp_path: Path) -> None:
    spec, paths, digests = vm
    assert set(made) == {"disk0", "disk1"}
    for name, path in made.items():
        image = Path(path)
        assert image.name == f"{name}.qcow2"
        assert virtual_size(image) == virtual_size(Path(paths[name]))
        assert raw_sha256(image) == digests[name]
        subprocess.run(["qemu-img", "compare", "-q", paths[name], path], check=True)


async def test_ovf_folder_round_trip(t, vm, tmp_path):
    spec, paths, _ = vm
    out = tmp_path / "exports" / "web01"
    (tmp_path / "exports").mkdir()
    progress = Progress()
    result = await export_package(t, spec, paths, str(out), ova=False, progress=progress)
    progress.check()

    assert result["path"] == str(out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["web01-disk0.vhd", "web01-disk1.vhd", "web01.mf", "web01.ovf"]
    assert list((tmp_path / "exports").iterdir()) == [out], "the staging folder was left behind"
    mf = parse_manifest((out / "web01.mf").read_text(), file="web01.mf")
    assert mf == {n: sha256(out / n) for n in ("web01.ovf", "web01-disk0.vhd", "web01-disk1.vhd")}
    assert result["files"] == mf
    assert result["bytes"] == sum((out / n).stat().st_size for n in files)
    # the VHDs are dynamic and state the exact size, whatever the CHS geometry
    assert virtual_size(out / "web01-disk0.vhd") == SIZE0

    dest = tmp_path / "vms" / "web02"
    progress = Progress()
    got, made = await import_package(t, str(out / "web01.ovf"), str(dest), name="web02", progress=progress)
    progress.check()
    assert got.name == "web02"
    assert (got.cpus, got.memory_mb, got.nics) == (2, 1536, ("lan", "dmz"))
    assert [(d.name, d.capacity, d.bus) for d in got.disks] == [("disk0", SIZE0, "virtio"), ("disk1", SIZE1, "scsi")]
    check_disks(made, vm, tmp_path)
    assert sorted(p.name for p in dest.iterdir()) == ["disk0.qcow2", "disk1.qcow2"]


async def test_ova_round_trip(t, vm, tmp_path):
    spec, paths, _ = vm
    ova = tmp_path / "web01.ova"
    progress = Progress()
    result = await export_package(t, spec, paths, str(ova), ova=True, progress=progress)
    progress.check()
    assert result["path"] == str(ova) and result["bytes"] == ova.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "web01.ova"], "temporary files were left behind"

    with tarfile.open(ova) as tar:
        members = tar.getmembers()
        # DMTF order: descriptor first, then manifest, then the disks; plain names, plain ustar headers
        assert [m.name for m in members] == ["web01.ovf", "web01.mf", "web01-disk0.vhd", "web01-disk1.vhd"]
        assert all(m.isfile() and not m.pax_headers for m in members)
        ovf_text = tar.extractfile("web01.ovf").read().decode()
        manifest = tar.extractfile("web01.mf").read().decode()
        for m in members:
            if m.name != "web01.mf":
                assert f"SHA256({m.name})= {hashlib.sha256(tar.extractfile(m).read()).hexdigest()}\n" in manifest
    with open(ova, "rb") as f:
        assert f.read(512)[257:262] == b"ustar"

    read, text = await read_package(t, str(ova))
    assert text == ovf_text
    assert read == spec

    dest = tmp_path / "datastore" / "web01"
    dest.mkdir(parents=True)       # the engine makes the VM's folder before filling it
    got, made = await import_package(t, str(ova), str(dest))
    assert got == spec
    check_disks(made, vm, tmp_path)
    assert sorted(p.name for p in dest.iterdir()) == ["disk0.qcow2", "disk1.qcow2"], "the import left files behind"


def rebuild_ova(src: Path, dst: Path, *, change=None, drop=(), order=None) -> None:
    """Copy an OVA member by member, changing a member's bytes, dropping members or reordering them."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = {m.name: (m, tin.extractfile(m).read()) for m in tin.getmembers()}
        for name in order or list(members):
            if name in drop:
                continue
            info, data = members[name]
            if change and name in change:
                data = change[name](data)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def flip(offset: int):
    def do(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] ^= 0xFF
        return bytes(b)
    return do


async def test_tampered_ova_is_refused_before_anything_is_made(t, vm, tmp_path):
    spec, paths, _ = vm
    good = tmp_path / "good.ova"
    await export_package(t, spec, paths, str(good), ova=True)
    bad = tmp_path / "web01.ova"
    rebuild_ova(good, bad, change={"web01-disk1.vhd": flip(4096)})

    dest = tmp_path / "vms" / "web01"
    with pytest.raises(PermanentError) as e:
        await import_package(t, str(bad), str(dest))
    assert "web01-disk1.vhd does not match its SHA256 in web01.mf" in e.value.message
    assert str(bad) in e.value.message and e.value.hint
    assert not dest.exists()
    assert not (tmp_path / "vms").exists() or not any((tmp_path / "vms").iterdir())

    dest.mkdir(parents=True)      # an existing (empty) folder stays empty
    with pytest.raises(PermanentError, match="does not match"):
        await import_package(t, str(bad), str(dest))
    assert list(dest.iterdir()) == []


async def test_tampered_descriptor_is_refused(t, vm, tmp_path):
    spec, paths, _ = vm
    out = tmp_path / "pkg"
    await export_package(t, spec, paths, str(out), ova=False)
    ovf = out / "web01.ovf"
    ovf.write_text(ovf.read_text().replace(">1536<", ">65536<"))
    dest = tmp_path / "vm"
    with pytest.raises(PermanentError, match=r"web01\.ovf does not match its SHA256 in web01\.mf"):
        await import_package(t, str(ovf), str(dest))
    assert not dest.exists()


async def test_package_without_manifest_is_refused(t, vm, tmp_path):
    spec, paths, _ = vm
    good = tmp_path / "good.ova"
    await export_package(t, spec, paths, str(good), ova=True)
    bare = tmp_path / "bare.ova"
    rebuild_ova(good, bare, drop={"web01.mf"})
    dest = tmp_path / "vm"
    with pytest.raises(PermanentError) as e:
        await import_package(t, str(bare), str(dest))
    assert "no manifest" in e.value.message and str(bare) in e.value.message
    assert "cannot be verified" in e.value.hint
    assert not dest.exists()

    out = tmp_path / "folder"
    await export_package(t, spec, paths, str(out), ova=False)
    (out / "web01.mf").unlink()
    with pytest.raises(PermanentError, match="no manifest"):
        await import_package(t, str(out), str(dest))      # a folder holding one .ovf is a package too
    assert not dest.exists()


async def test_manifest_must_cover_every_disk(t, vm, tmp_path):
    spec, paths, _ = vm
    out = tmp_path / "pkg"
    await export_package(t, spec, paths, str(out), ova=False)
    mf = out / "web01.mf"
    mf.write_text("".join(line for line in mf.read_text().splitlines(True) if "disk1" not in line))
    with pytest.raises(PermanentError, match="web01-disk1.vhd not listed in web01.mf"):
        await import_package(t, str(out / "web01.ovf"), str(tmp_path / "vm"))
    assert not (tmp_path / "vm").exists()


async def test_ova_must_start_with_its_descriptor(t, vm, tmp_path):
    spec, paths, _ = vm
    good = tmp_path / "good.ova"
    await export_package(t, spec, paths, str(good), ova=True)
    bad = tmp_path / "disk-first.ova"
    rebuild_ova(good, bad, order=["web01-disk0.vhd", "web01.ovf", "web01.mf", "web01-disk1.vhd"])
    with pytest.raises(PermanentError, match=r"first member of the OVA is 'web01-disk0.vhd'") as e:
        await read_package(t, str(bad))
    assert str(bad) in e.value.message
    with pytest.raises(PermanentError, match="first member"):
        await import_package(t, str(bad), str(tmp_path / "vm"))
    assert not (tmp_path / "vm").exists()


async def test_export_refuses_what_it_would_overwrite(t, vm, tmp_path):
    spec, paths, _ = vm
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PermanentError, match="is not empty"):
        await export_package(t, spec, paths, str(out), ova=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    await export_package(t, spec, paths, str(empty), ova=False)     # an empty folder is fine
    assert (empty / "web01.ovf").exists()

    ova = tmp_path / "web01.ova"
    ova.write_bytes(b"old")
    with pytest.raises(PermanentError, match="already exists"):
        await export_package(t, spec, paths, str(ova), ova=True)
    assert ova.read_bytes() == b"old"


async def test_failed_export_leaves_nothing(t, vm, tmp_path):
    spec, paths, _ = vm
    out = tmp_path / "out"
    out.mkdir()
    broken = tmp_path / "src" / "broken.qcow2"
    make_qcow2(broken, SIZE1)
    with open(broken, "r+b") as f:     # point the first L2 table at an unaligned offset: reading fails
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        f.write(struct.pack(">Q", (1 << 63) | 0x30200))
    broken_paths = dict(paths, disk1=str(broken))
    with pytest.raises(PermanentError) as e:
        await export_package(t, spec, broken_paths, str(out / "web01.ova"), ova=True)
    assert "broken.qcow2" in e.value.message and "lab1" in e.value.message
    assert list(out.iterdir()) == []      # disk0 was converted already: its staging folder is gone too

    with pytest.raises(PermanentError):
        await export_package(t, spec, broken_paths, str(out / "web01"), ova=False)
    assert list(out.iterdir()) == []


def make_ova(path: Path, ovf_name: str, ovf_text: str, disks: dict[str, Path], *, algo: str = "sha256") -> None:
    """An OVA as another tool makes it: descriptor, manifest, disks (GNU tar format, as VirtualBox writes)."""
    ovf = ovf_text.encode()
    digests = {ovf_name: hashlib.new(algo, ovf).hexdigest(),
               **{n: hashlib.new(algo, p.read_bytes()).hexdigest() for n, p in disks.items()}}
    mf = "".join(f"{algo.upper()}({n})= {d}\n" for n, d in digests.items()).encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in ((ovf_name, ovf), (ovf_name[:-4] + ".mf", mf)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, p in disks.items():
            tar.add(p, arcname=name)


async def test_imports_a_vmware_ova(t, tmp_path):
    """A streamOptimized VMDK, a file name with a space, a SHA1 manifest (older ovftool)."""
    digest = make_qcow2(tmp_path / "orig.qcow2", SIZE1)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(tmp_path / "orig.qcow2"), str(vmdk)], check=True)
    ova = tmp_path / "Web Server.ova"
    make_ova(ova, "Web Server.ovf", vmware_ovf(SIZE1 // MiB), {"Web Server-disk1.vmdk": vmdk}, algo="sha1")

    dest = tmp_path / "vms" / "web"
    spec, made = await import_package(t, str(ova), str(dest), name="web")
    assert spec.name == "web" and spec.memory_mb == 4096 and spec.nics == ("VM Network",)
    assert [(d.name, d.capacity, d.bus, d.format) for d in spec.disks] == [("vmdisk1", SIZE1, "scsi", "vmdk")]
    assert made == {"vmdisk1": str(dest / "vmdisk1.qcow2")}
    assert raw_sha256(dest / "vmdisk1.qcow2") == digest
    assert sorted(p.name for p in dest.iterdir()) == ["vmdisk1.qcow2"]


async def test_disk_reaching_other_host_files_is_refused(t, tmp_path):
    """A package's qcow2 with a backing file would copy a file of the host into the new VM."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"host secret" * 1000)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil), "1M"],
                   check=True)
    ova = tmp_path / "evil.ova"
    qcow2 = "http://www.gnome.org/~markmc/qcow-image-format.html"
    make_ova(ova, "evil.ovf", vmware_ovf(1, href="evil.qcow2", fmt=qcow2), {"evil.qcow2": evil})
    dest = tmp_path / "vm"
    with pytest.raises(PermanentError, match="evil.qcow2 refers to other files"):
        await import_package(t, str(ova), str(dest))
    assert not dest.exists()
