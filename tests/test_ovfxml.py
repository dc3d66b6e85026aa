"""The OVF descriptor and the SHA manifest, without a host: what Ferry writes reads back the same, what
other tools write reads as they meant it, and what no package could carry or nobody should trust is refused
with a message naming the file."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from ferry.engine.errors import PermanentError
from ferry.engine.vm.ovfxml import OvfDisk, OvfSpec, build_ovf, manifest_text, parse_manifest, parse_ovf
from harness.ovfsamples import VMWARE

GiB = 1 << 30


def test_descriptor_round_trip_and_escaping():
    spec = OvfSpec(name='a<b>&"c', cpus=4, memory_mb=4096,
                   disks=(OvfDisk("disk0", "a&b-disk0.vhd", 10 * 1024**3, "ide"),
                          OvfDisk("disk1", "", 512, "virtio", "qcow2")),
                   nics=("lan", "<dmz>"), os="windows", is_template=True)
    text = build_ovf(spec)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert "&lt;dmz&gt;" in text
    assert parse_ovf(text, file="x.ovf") == spec


def test_parses_a_vmware_descriptor():
    spec = parse_ovf(VMWARE, file="web.ovf")
    assert spec == OvfSpec(name="Web Server", cpus=2, memory_mb=4096,
                           disks=(OvfDisk("vmdisk1", "Web Server-disk1.vmdk", 16 * 1024**3, "scsi", "vmdk"),),
                           nics=("VM Network",), os="linux", is_template=False)


def test_parses_a_virtualbox_descriptor():
    text = (VMWARE.replace("byte * 2^20", "MegaBytes")
            .replace("<rasd:VirtualQuantity>4096<", "<rasd:VirtualQuantity>2048<")
            .replace("<rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>\n        <rasd:ResourceType>6<",
                     "<rasd:ResourceSubType>AHCI</rasd:ResourceSubType>\n        <rasd:ResourceType>20<")
            .replace('vmw:osType="ubuntu64Guest"', "").replace('ovf:id="94"', 'ovf:id="67"')
            .replace("<Info>The kind of installed guest operating system</Info>",
                     "<Info>The kind of installed guest operating system</Info><Description>WindowsXP</Description>"))
    spec = parse_ovf(text, file="vbox.ovf")
    assert spec.memory_mb == 2048 and spec.os == "windows"
    assert spec.disks[0].bus == "ide"      # SATA: Ferry has none; IDE boots any guest


@pytest.mark.parametrize("text, words", [
    ("<Envelope><oops", "not valid XML"),
    ("<html/>", "not an OVF descriptor"),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope/>', "DOCTYPE"),
    (VMWARE.replace("<rasd:ResourceType>3</rasd:ResourceType>", ""), "no CPU item"),
    (VMWARE.replace('ovf:fileRef="file1"', 'ovf:fileRef="file9"'), "not in the References"),
    (VMWARE.replace('ovf:href="Web Server-disk1.vmdk"', 'ovf:href="../../etc/shadow"'), "not a plain file name"),
    (VMWARE.replace('ovf:capacity="16"', 'ovf:capacity="${disk.size}"'), "not a number"),
])
def test_bad_descriptors_are_refused_naming_the_file(text, words):
    with pytest.raises(PermanentError) as e:
        parse_ovf(text, file="pkg.ova: web.ovf")
    assert e.value.message.startswith("pkg.ova: web.ovf: ") and words in e.value.message
    assert e.value.hint


def test_manifest_lines():
    digests = {"web01.ovf": "ab" * 32, "web01-disk0.vhd": "CD" * 32}
    text = manifest_text(digests)
    assert text == f"SHA256(web01.ovf)= {'ab' * 32}\nSHA256(web01-disk0.vhd)= {'cd' * 32}\n"
    parsed = parse_manifest(text, file="web01.mf")
    assert parsed == {k: v.lower() for k, v in digests.items()}

    older = parse_manifest(f"SHA1(a b.ovf)= {'1' * 40}\r\n\nSHA256 (disk.vmdk) = {'2' * 64}\n", file="old.mf")
    assert older == {"a b.ovf": "1" * 40, "disk.vmdk": "2" * 64}
    assert older.algos == {"a b.ovf": "SHA1", "disk.vmdk": "SHA256"}

    for garbage in ("hello\n", f"SHA256(x)= {'1' * 40}\n", f"MD5(x)= {'1' * 32}\n", ""):
        with pytest.raises(PermanentError, match="web01.mf: "):
            parse_manifest(garbage, file="web01.mf")


SPEC = OvfSpec(name="web01", cpus=2, memory_mb=1536,
               disks=(OvfDisk("disk0", "web01-disk0.vhd", 10 * GiB), OvfDisk("disk1", "web01-disk1.vhd", GiB, "scsi")),
               nics=("lan",))


@pytest.mark.parametrize("change, words", [
    (dict(disks=(OvfDisk("disk 0", "a.vhd", GiB),)), "disk name 'disk 0'"),
    (dict(disks=(OvfDisk("disk0", "a.vhd", GiB), OvfDisk("disk0", "b.vhd", GiB))), "not valid or not unique"),
    (dict(disks=(OvfDisk("disk0", "../a.vhd", GiB),)), "package file name '../a.vhd'"),
    (dict(disks=(OvfDisk("disk0", "web01.ovf", GiB),)), "package file name 'web01.ovf'"),
    (dict(disks=(OvfDisk("disk0", "a.vhd", GiB), OvfDisk("disk1", "a.vhd", GiB))), "two disks use"),
    (dict(disks=(OvfDisk("disk0", "a.vhd", GiB, "sata"),)), "disk bus 'sata'"),
    (dict(disks=(OvfDisk("disk0", "a.vhd", GiB, format="vdi"),)), "disk format 'vdi'"),
    (dict(disks=(OvfDisk("disk0", "a.vhd", 0),)), "disk disk0 has no size"),
    (dict(cpus=0), "at least 1 CPU"),
])
def test_a_spec_no_package_could_carry_is_refused(change, words):
    with pytest.raises(PermanentError) as e:
        build_ovf(replace(SPEC, **change))
    assert e.value.message.startswith("web01: ") and words in e.value.message
    assert e.value.hint


def test_references_carry_the_sizes_of_the_files():
    text = build_ovf(SPEC, sizes={"web01-disk0.vhd": 12345})
    assert re.search(r'<ovf:File ovf:id="file1" ovf:href="web01-disk0.vhd" ovf:size="12345"\s*/>', text)
    assert re.search(r'<ovf:File ovf:id="file2" ovf:href="web01-disk1.vhd"\s*/>', text)
    assert parse_ovf(text, file="web01.ovf") == SPEC


def test_units_and_formats_as_other_tools_write_them():
    text = (VMWARE.replace('ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30"',
                           'ovf:capacity="1000" ovf:capacityAllocationUnits="KiloBytes"')
            .replace("<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
                     "<rasd:AllocationUnits>GigaBytes</rasd:AllocationUnits>")
            .replace("<rasd:VirtualQuantity>4096<", "<rasd:VirtualQuantity>2<")
            .replace("http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized", "")
            .replace("Web Server-disk1.vmdk", "disk1.qcow2"))
    spec = parse_ovf(text, file="web.ovf")
    assert spec.memory_mb == 2048
    # 1000 KiB is not a whole number of sectors: a disk is, so it is rounded up
    assert spec.disks == (OvfDisk("vmdisk1", "disk1.qcow2", 1000 * 1024, "scsi", "qcow2"),)

    with pytest.raises(PermanentError, match=r"web.ovf: the format of disk1.iso \(not given\) is not supported"):
        parse_ovf(text.replace("disk1.qcow2", "disk1.iso"), file="web.ovf")
    with pytest.raises(PermanentError, match=r"unit 'byte \* 2\^70' of the capacity of disk vmdisk1"):
        parse_ovf(text.replace('"KiloBytes"', '"byte * 2^70"'), file="web.ovf")


def test_odd_disk_ids_and_disks_on_no_controller():
    """A disk id that is no file name gets one of Ferry's; a disk of the DiskSection that no item attaches
    is imported too (on virtio), not silently dropped."""
    extra = ('<Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="spare"/>\n'
             "  </DiskSection>")
    text = VMWARE.replace('ovf:diskId="vmdisk1"', 'ovf:diskId="vm disk/1"').replace(
        "ovf:/disk/vmdisk1", "ovf:/disk/vm disk/1").replace("</DiskSection>", extra)
    spec = parse_ovf(text, file="web.ovf")
    assert [(d.name, d.file, d.capacity, d.bus, d.format) for d in spec.disks] == [
        ("disk0", "Web Server-disk1.vmdk", 16 * GiB, "scsi", "vmdk"), ("spare", "", GiB, "virtio", "qcow2")]


@pytest.mark.parametrize("text, words", [
    (VMWARE.replace("<VirtualSystem ovf:id", "<VirtualSystemCollection><VirtualSystem ovf:id")
           .replace("</VirtualSystem>", "</VirtualSystem></VirtualSystemCollection>"), "a collection of several"),
    (VMWARE.replace("</VirtualSystem>", "</VirtualSystem><VirtualSystem ovf:id='b'/>"), "2 virtual systems"),
    (re.sub(r"<VirtualHardwareSection>.*</VirtualHardwareSection>", "", VMWARE, flags=re.S),
     "no VirtualHardwareSection"),
    (VMWARE.replace("ovf:/disk/vmdisk1", "ovf:/disk/nodisk"), "uses disk 'nodisk'"),
    (VMWARE.replace('ovf:href="Web Server-disk1.vmdk"', 'ovf:href="Web Server-disk1.vmdk" ovf:compression="gzip"'),
     "compressed or split"),
])
def test_packages_ferry_cannot_import_as_one_vm_are_refused(text, words):
    with pytest.raises(PermanentError) as e:
        parse_ovf(text, file="web.ovf")
    assert e.value.message.startswith("web.ovf: ") and words in e.value.message
