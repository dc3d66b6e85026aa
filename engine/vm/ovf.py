"""OVF / OVA packages of one VM: the OVF envelope, the SHA manifest, and export/import of the disks on a host.

A package is `<name>.ovf` + `<name>.mf` + one dynamic VHD per disk, either as a folder (OVF) or as one
tar archive whose members are in the DMTF order .ovf, .mf, disks (OVA). Big files are converted and hashed
on the host (qemu-img, sha256sum); only the descriptor and the manifest pass through Ferry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import posixpath
import re
import secrets
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Sequence

from ..errors import FerryError, PermanentError, Refused
from ..transport.base import RunResult, Transport
from .hostcmd import Tail, last_line, qemu_img_progress, watch
from .progress import ByteMeter, ProgressFn

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
FERRY_NS = "urn:ferry:ovf:1"
for _prefix, _uri in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("ferry", FERRY_NS)):
    ET.register_namespace(_prefix, _uri)

# qemu-img driver -> the ovf:format URI other tools write for it
FORMAT_URIS = {
    "vpc": "http://technet.microsoft.com/en-us/virtualserver/bb676673.aspx",
    "vmdk": "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    "qcow2": "http://www.gnome.org/~markmc/qcow-image-format.html",
    "raw": "http://en.wikipedia.org/wiki/Byte",
}
EXTENSIONS = {".vhd": "vpc", ".vmdk": "vmdk", ".qcow2": "qcow2", ".qcow": "qcow2", ".img": "raw", ".raw": "raw"}

# Ferry bus -> (CIM ResourceType, ResourceSubType, caption) of the controller its disks hang from
CONTROLLERS = {"virtio": (20, "virtio-blk", "virtio block"), "scsi": (6, "virtio-scsi", "SCSI controller"),
               "ide": (5, "PIIX4", "IDE controller")}
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_ETHERNET, RT_DISK, RT_OTHER_STORAGE = 3, 4, 5, 6, 10, 17, 20
HASH_TOOLS = {"SHA1": ("sha1sum", 40), "SHA256": ("sha256sum", 64), "SHA512": ("sha512sum", 128)}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# A file inside a package: one printable ASCII path component, so that it is the same name to tar,
# to the shell-free argv and in the manifest (and can never leave the folder it is extracted into).
FILE_RE = re.compile(r"^[A-Za-z0-9_(][ -.0-\[\]-~]{0,250}$")
MANIFEST_RE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
MAX_DESCRIPTOR = 16 << 20     # an .ovf is a few KiB; refuse to pull a huge "descriptor" into memory
MAX_MANIFEST = 1 << 20
VHD_MAX = 2040 << 30



@dataclass(frozen=True)
class OvfDisk:
    """One disk of the package."""
    name: str              # disk0; also the ovf:diskId and the imported <name>.qcow2
    file: str              # file name inside the package ("" for a blank disk to create on import)
    capacity: int          # virtual size in bytes
    bus: str = "virtio"    # virtio | scsi | ide
    format: str = "vpc"    # qemu-img driver of `file`: vpc (what Ferry exports) | vmdk | qcow2 | raw


@dataclass(frozen=True)
class OvfSpec:
    name: str
    cpus: int
    memory_mb: int
    disks: tuple[OvfDisk, ...]
    nics: tuple[str, ...] = ()     # network names
    os: str = "linux"
    is_template: bool = False


class Manifest(dict):
    """file name -> hex digest, as in the .mf; `algos` says which algorithm each digest is."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.algos: dict[str, str] = {}


# ------------------------------------------------------------------ the OVF envelope

def _check_spec(spec: OvfSpec) -> None:
    names, files = set(), set()
    for d in spec.disks:
        if not NAME_RE.match(d.name) or d.name in names:
            raise PermanentError(f"{spec.name}: disk name {d.name!r} is not valid or not unique",
                                 "use 1-63 letters, digits, '.', '_' or '-', one name per disk")
        if d.file and (not FILE_RE.match(d.file) or d.file.lower().endswith((".ovf", ".mf"))):
            raise PermanentError(f"{spec.name}: package file name {d.file!r} of {d.name} is not valid",
                                 "use a plain file name of printable ASCII without '/' or '\\'")
        if d.file and d.file in files:
            raise PermanentError(f"{spec.name}: two disks use the package file {d.file!r}",
                                 "give each disk its own file")
        if d.bus not in CONTROLLERS:
            raise PermanentError(f"{spec.name}: disk bus {d.bus!r} of {d.name} is not supported",
                                 f"use one of {', '.join(CONTROLLERS)}")
        if d.format not in FORMAT_URIS:
            raise PermanentError(f"{spec.name}: disk format {d.format!r} of {d.name} is not supported",
                                 f"use one of {', '.join(FORMAT_URIS)}")
        if d.capacity <= 0:
            raise PermanentError(f"{spec.name}: disk {d.name} has no size", "give every disk its virtual size")
        names.add(d.name)
        files.add(d.file)
    if spec.cpus < 1 or spec.memory_mb < 1:
        raise PermanentError(f"{spec.name}: needs at least 1 CPU and 1 MiB of memory",
                             "fix the VM's hardware before exporting it")


def build_ovf(spec: OvfSpec, *, sizes: dict[str, int] | None = None) -> str:
    """The OVF 1.x descriptor of `spec`; `sizes` (file name -> bytes) fills in the References' ovf:size."""
    _check_spec(spec)

    def o(n: str) -> str:
        return f"{{{OVF_NS}}}{n}"

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        el = ET.SubElement(parent, tag, {o(k): v for k, v in attrs.items()})
        if text is not None:
            el.text = text
        return el

    env = ET.Element(o("Envelope"), {o("version"): "1.0"})
    refs = sub(env, o("References"))
    file_ids: dict[str, str] = {}
    for d in spec.disks:
        if d.file:
            file_ids[d.name] = f"file{len(file_ids) + 1}"
            attrs = {"id": file_ids[d.name], "href": d.file}
            if sizes and d.file in sizes:
                attrs["size"] = str(sizes[d.file])
            sub(refs, o("File"), **attrs)

    section = sub(env, o("DiskSection"))
    sub(section, o("Info"), "Virtual disk information")
    for d in spec.disks:
        attrs = {"diskId": d.name, "capacity": str(d.capacity), "capacityAllocationUnits": "byte",
                 "format": FORMAT_URIS[d.format]}
        if d.name in file_ids:
            attrs["fileRef"] = file_ids[d.name]
        sub(section, o("Disk"), **attrs)

    networks = list(dict.fromkeys(spec.nics))
    section = sub(env, o("NetworkSection"))
    sub(section, o("Info"), "The logical networks the VM is connected to")
    for n in networks:
        sub(sub(section, o("Network"), name=n), o("Description"), f"The {n} network")

    vs = sub(env, o("VirtualSystem"), id=spec.name)
    sub(vs, o("Info"), "A virtual machine")
    sub(vs, o("Name"), spec.name)
    osec = sub(vs, o("OperatingSystemSection"), id="36" if spec.os.lower().startswith("linux") else "1")
    sub(osec, o("Info"), "The guest operating system")
    sub(osec, o("Description"), spec.os)

    hw = sub(vs, o("VirtualHardwareSection"))
    sub(hw, o("Info"), "Virtual hardware requirements")
    system = ET.SubElement(hw, o("System"))
    for tag, text in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                      ("VirtualSystemIdentifier", spec.name), ("VirtualSystemType", "qemu-kvm")):
        ET.SubElement(system, f"{{{VSSD_NS}}}{tag}").text = text
    ids = iter(range(1, 1 << 30))

    def item(**fields: str) -> str:
        iid = str(next(ids))
        el = ET.SubElement(hw, o("Item"))
        for k, v in sorted({**fields, "InstanceID": iid}.items()):   # the CIM schema orders them by name
            ET.SubElement(el, f"{{{RASD_NS}}}{k}").text = v
        return iid

    item(AllocationUnits="hertz * 10^6", Description="Number of virtual CPUs",
         ElementName=f"{spec.cpus} virtual CPU(s)", ResourceType=str(RT_CPU), VirtualQuantity=str(spec.cpus))
    item(AllocationUnits="byte * 2^20", Description="Memory size",
         ElementName=f"{spec.memory_mb} MB of memory", ResourceType=str(RT_MEMORY),
         VirtualQuantity=str(spec.memory_mb))
    controllers: dict[str, str] = {}
    for bus in dict.fromkeys(d.bus for d in spec.disks):
        rtype, subtype, caption = CONTROLLERS[bus]
        controllers[bus] = item(Address=str(len(controllers)), Description=f"{caption} ({bus} disks)",
                                ElementName=f"{bus}{len(controllers)}", ResourceSubType=subtype,
                                ResourceType=str(rtype))
    slots: dict[str, int] = {}
    for d in spec.disks:
        slot = slots.get(d.bus, 0)
        slots[d.bus] = slot + 1
        item(AddressOnParent=str(slot), ElementName=d.name, HostResource=f"ovf:/disk/{d.name}",
             Parent=controllers[d.bus], ResourceType=str(RT_DISK))
    for i, n in enumerate(spec.nics):
        item(AddressOnParent=str(i), AutomaticAllocation="true", Connection=n, Description=f"NIC on {n}",
             ElementName=f"ethernet{i}", ResourceSubType="virtio", ResourceType=str(RT_ETHERNET))

    ferry = ET.SubElement(vs, f"{{{FERRY_NS}}}FerrySection", {o("required"): "false"})
    sub(ferry, o("Info"), "Settings of Ferry, the console that exported this VM")
    ET.SubElement(ferry, f"{{{FERRY_NS}}}Template").text = "true" if spec.is_template else "false"

    ET.indent(env)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env, encoding="unicode") + "\n"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    found = _children(el, name)
    return found[0] if found else None


def _text(el: ET.Element | None, name: str) -> str | None:
    c = _child(el, name) if el is not None else None
    return (c.text or "").strip() if c is not None else None


def _units(text: str | None, *, file: str, what: str) -> int:
    """Bytes per unit of a DMTF programmatic unit ("byte * 2^20") or the older names ("MegaBytes")."""
    if not text:
        return 1
    t = text.strip().lower().replace(" ", "")
    named = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
             "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40, "tb": 1 << 40}
    if t in named:
        return named[t]
    m = re.fullmatch(r"bytes?\*(\d+)\^(\d+)", t)
    if m and int(m.group(2)) <= 64:
        return int(m.group(1)) ** int(m.group(2))
    raise PermanentError(f"{file}: unit {text!r} of the {what} is not understood",
                         "Ferry reads byte, byte * 2^N, KiloBytes, MegaBytes and GigaBytes")


def _int(text: str | None, *, file: str, what: str) -> int:
    try:
        value = int((text or "").strip())
    except ValueError:
        raise PermanentError(f"{file}: the {what} {text!r} is not a number",
                             "the descriptor may use a property (${...}) Ferry cannot resolve; edit it") from None
    if value < 0:
        raise PermanentError(f"{file}: the {what} is negative ({value})", "the descriptor is damaged")
    return value


def _disk_format(uri: str | None, href: str, *, file: str) -> str:
    u = (uri or "").lower()
    if "vmdk" in u:
        return "vmdk"
    if "bb676673" in u or "vhd" in u:
        return "vpc"
    if "qcow" in u:
        return "qcow2"
    if "wiki/byte" in u or u.endswith("/raw") or u == "raw":
        return "raw"
    ext = posixpath.splitext(href.lower())[1]
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise PermanentError(f"{file}: the format of {href} ({uri or 'not given'}) is not supported",
                         "Ferry imports VHD, VMDK, QCOW2 and raw disks; convert it first")


def _guess_os(osec: ET.Element | None) -> str:
    if osec is None:
        return "other"
    words = " ".join([_text(osec, "Description") or "", *osec.attrib.values()]).lower()
    if "win" in words:
        return "windows"
    linux = ("linux", "ubuntu", "debian", "centos", "rhel", "red hat", "fedora", "suse", "alma", "rocky", "oracle")
    if any(w in words for w in linux) or _attr(osec, "id") in ("36", "101", "102"):
        return "linux"
    return "other"


def parse_ovf(text: str, *, file: str) -> OvfSpec:
    """The VM described by an OVF 1.x/2.x descriptor (Ferry's, VMware's or VirtualBox's)."""
    if re.search(r"<!(DOCTYPE|ENTITY)", text):
        raise PermanentError(f"{file}: the descriptor declares a DOCTYPE or entities, which an OVF never needs",
                             "refusing it for safety; re-export the VM from its source")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise PermanentError(f"{file}: not valid XML ({e})",
                             "the package is damaged or the file is not an OVF descriptor") from None
    if _local(root.tag) != "Envelope":
        raise PermanentError(f"{file}: not an OVF descriptor (its root element is {_local(root.tag)}, not Envelope)",
                             "point Ferry at the .ovf or .ova of the package")
    if [el for el in root.iter() if _local(el.tag) == "VirtualSystemCollection"]:
        raise PermanentError(f"{file}: the package holds a collection of several virtual machines",
                             "Ferry imports one VM per package; export the VMs one by one")
    systems = _children(root, "VirtualSystem")
    if len(systems) != 1:
        raise PermanentError(f"{file}: the descriptor has {len(systems)} virtual systems, not one",
                             "Ferry imports packages of exactly one VM")
    vs = systems[0]
    name = _text(vs, "Name") or _attr(vs, "id")
    if not name:
        raise PermanentError(f"{file}: the virtual system has no name", "import it with a name of your own")
    hw = _child(vs, "VirtualHardwareSection")
    if hw is None:
        raise PermanentError(f"{file}: {name} has no VirtualHardwareSection", "the descriptor is incomplete")

    references = _child(root, "References")
    refs = {_attr(f, "id"): f for f in (_children(references, "File") if references is not None else [])}
    disks_by_id = {}
    for section in _children(root, "DiskSection"):
        for d in _children(section, "Disk"):
            disks_by_id[_attr(d, "diskId")] = d
    items = []
    for el in hw:
        if _local(el.tag) in ("Item", "StorageItem", "EthernetPortItem"):
            items.append({_local(c.tag): (c.text or "").strip() for c in el})

    def one(rtype: int, what: str) -> dict[str, str]:
        found = [i for i in items if i.get("ResourceType") == str(rtype)]
        if not found:
            raise PermanentError(f"{file}: {name} has no {what} item (ResourceType {rtype})",
                                 "the descriptor is incomplete; add it or re-export the VM")
        return found[0]

    cpus = _int(one(RT_CPU, "CPU").get("VirtualQuantity"), file=file, what="number of CPUs")
    mem = one(RT_MEMORY, "memory")
    mem_bytes = _int(mem.get("VirtualQuantity"), file=file, what="memory size") * _units(
        mem.get("AllocationUnits") or mem.get("VirtualQuantityUnits") or "byte * 2^20", file=file, what="memory")
    memory_mb = -(-mem_bytes // (1 << 20))
    if cpus < 1 or memory_mb < 1:
        raise PermanentError(f"{file}: {name} has {cpus} CPUs and {memory_mb} MiB of memory",
                             "the descriptor is damaged; a VM needs at least 1 CPU and some memory")

    buses = {}
    for i in items:
        rtype, subtype = i.get("ResourceType"), (i.get("ResourceSubType") or "").lower()
        if rtype == str(RT_IDE):
            buses[i.get("InstanceID")] = "ide"
        elif rtype == str(RT_SCSI):
            buses[i.get("InstanceID")] = "scsi"
        elif rtype == str(RT_OTHER_STORAGE):   # SATA/AHCI/NVMe elsewhere: IDE is what every guest can boot from
            buses[i.get("InstanceID")] = "virtio" if "virtio" in subtype else "ide"

    disks: list[OvfDisk] = []
    used_ids: list[str] = []
    attached = []
    for i in items:
        if i.get("ResourceType") != str(RT_DISK) or not i.get("HostResource"):
            continue
        m = re.fullmatch(r"(?:ovf:)?/disk/(.+)", i["HostResource"])
        if not m:
            raise PermanentError(f"{file}: disk resource {i['HostResource']!r} is not supported",
                                 "Ferry reads disks given as ovf:/disk/<id>")
        attached.append((m.group(1), buses.get(i.get("Parent"), "virtio")))
    attached_ids = {a for a, _ in attached}
    attached += [(d, "virtio") for d in disks_by_id if d not in attached_ids]   # in the package, not on a bus
    for disk_id, bus in attached:
        if disk_id in used_ids:
            continue
        d = disks_by_id.get(disk_id)
        if d is None:
            raise PermanentError(f"{file}: {name} uses disk {disk_id!r}, which is not in the DiskSection",
                                 "the descriptor is damaged")
        used_ids.append(disk_id)
        href = ""
        if _attr(d, "fileRef"):
            f = refs.get(_attr(d, "fileRef"))
            if f is None or not _attr(f, "href"):
                raise PermanentError(f"{file}: disk {disk_id!r} refers to file {_attr(d, 'fileRef')!r}, "
                                     "which is not in the References", "the descriptor is damaged")
            href = _attr(f, "href")
            if href.startswith("./"):
                href = href[2:]
            if not FILE_RE.match(href):
                raise PermanentError(f"{file}: disk file {href!r} is not a plain file name in the package",
                                     "Ferry imports only files inside the package (no paths or URLs)")
            if _attr(f, "compression") or _attr(f, "chunkSize"):
                raise PermanentError(f"{file}: disk file {href} is compressed or split in chunks",
                                     "re-export the VM without compression and without chunks")
        capacity = _int(_attr(d, "capacity"), file=file, what=f"capacity of disk {disk_id}") * _units(
            _attr(d, "capacityAllocationUnits"), file=file, what=f"capacity of disk {disk_id}")
        capacity = -(-capacity // 512) * 512     # disks are whole sectors
        fmt = _disk_format(_attr(d, "format"), href, file=file) if href else "qcow2"
        disk_name = disk_id if NAME_RE.match(disk_id) else f"disk{len(disks)}"
        while disk_name in {x.name for x in disks}:
            disk_name = f"disk{len(disks)}-{secrets.token_hex(2)}"
        disks.append(OvfDisk(disk_name, href, capacity, bus, fmt))

    nics = tuple(i.get("Connection") or "default" for i in items if i.get("ResourceType") == str(RT_ETHERNET))
    osec = _child(vs, "OperatingSystemSection")
    ferry = vs.find(f"{{{FERRY_NS}}}FerrySection")
    if ferry is not None:
        os_name = _text(osec, "Description") or "linux"
        template = (_text(ferry, "Template") or "").lower() == "true"
    else:
        os_name, template = _guess_os(osec), False
    return OvfSpec(name=name, cpus=cpus, memory_mb=memory_mb, disks=tuple(disks), nics=nics, os=os_name,
                   is_template=template)


# ------------------------------------------------------------------ the manifest

def manifest_text(digests: dict[str, str]) -> str:
    """The .mf lines for SHA256 digests: `SHA256(file)= hex`."""
    return "".join(f"SHA256({name})= {digest.lower()}\n" for name, digest in digests.items())


def parse_manifest(text: str, *, file: str) -> dict[str, str]:
    """file name -> hex digest of a .mf (SHA1, SHA256 or SHA512 lines); the algorithms are in `.algos`."""
    out = Manifest()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = MANIFEST_RE.match(line.strip())
        if not m or len(m.group(3)) != HASH_TOOLS[m.group(1)][1]:
            raise PermanentError(f"{file}: line {n} is not a manifest line ({line.strip()[:60]!r})",
                                 "expected 'SHA256(file)= hex' lines; the manifest is damaged")
        algo, name, digest = m.group(1), m.group(2).strip(), m.group(3).lower()
        if name in out and (out[name], out.algos[name]) != (digest, algo):
            raise PermanentError(f"{file}: {name} is listed twice with different digests",
                                 "the manifest is damaged or tampered with")
        out[name] = digest
        out.algos[name] = algo
    if not out:
        raise PermanentError(f"{file}: the manifest lists no file", "the manifest is damaged")
    return out


# ------------------------------------------------------------------ running things on the host

async def _run(t: Transport, argv: Sequence[str], message: str, hint: str, *, timeout: float = 600) -> RunResult:
    r = await t.run(argv, timeout=timeout)
    if not r.ok:
        raise PermanentError(f"{message} on {t.host}: {last_line(r)}", hint)
    return r


async def _hash_file(t: Transport, path: str, algo: str, on_bytes: Callable[[int], None]) -> str:
    """Digest of a (big) file, computed on the host; dd in front of the hash tool reports the bytes read."""
    tool, length = HASH_TOOLS[algo]
    script = ('export LC_ALL=C; { dd if="$1" bs=4M status=progress; echo "ferry-dd-status $?" >&2; } | '
              + tool)
    r = await watch(t, ["sh", "-c", script, "sh", path],
                     on_err=Tail(r"(\d+) bytes", lambda n: on_bytes(int(n))))
    digest = r.stdout.split()[0].decode("ascii", "replace").lower() if r.stdout.split() else ""
    if not r.ok or b"ferry-dd-status 0" not in r.stderr or len(digest) != length:
        raise PermanentError(f"cannot compute the {algo} of {path} on {t.host}: {last_line(r)}",
                             "check that the file is readable and that the host has dd and " + tool)
    return digest


async def _image_info(t: Transport, image: str, *, fmt: str | None = None) -> dict:
    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), image]
    r = await _run(t, argv, f"cannot read the disk image {_shown(image)}",
                   "check the path, and that no running VM holds the image", timeout=120)
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise PermanentError(f"qemu-img info {_shown(image)} on {t.host} gave no JSON",
                             "check the qemu-img version on the host") from None


def _shown(image: str) -> str:
    if image.startswith("json:"):
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(image[5:])["file"]["filename"]
    return image


async def _convert(t: Transport, argv: list[str], capacity: int, meter: ByteMeter, label: str, message: str) -> None:
    r = await qemu_img_progress(t, ["convert", *argv], lambda f: meter.show(int(capacity * f), label))
    if not r.ok:
        raise PermanentError(f"{message} on {t.host}: {last_line(r)}",
                             "check the free space and that the image is not in use")


async def _rmtree(t: Transport, path: str) -> None:
    with contextlib.suppress(FerryError):
        await t.run(["rm", "-rf", "--", path], timeout=600)


def _split(out: str) -> tuple[str, str]:
    out = posixpath.normpath(out)
    return posixpath.dirname(out) or ".", posixpath.basename(out)


# ------------------------------------------------------------------ export

async def check_out(t: Transport, name: str, out: str, *, ova: bool) -> str:
    """The normalised path a package of VM `name` would be written to, once nothing there would be
    overwritten or mixed in; Refused (naming the path and the host) otherwise."""
    if not FILE_RE.match(f"{name}.ovf"):
        raise Refused(f"{name!r} cannot name the files of a package",
                      "export under a plain name of printable ASCII without '/' or '\\'")
    parent, base = _split(out)
    out = posixpath.join(parent, base)
    if ova and not base.lower().endswith(".ova"):
        raise Refused(f"{out}: an OVA package must be a file named *.ova", f"for example {out}.ova")
    pst = await t.stat(parent)
    if pst is None or not pst.is_dir:
        raise Refused(f"folder {parent} does not exist on {t.host}", "create it first, or choose another path")
    st = await t.stat(out)
    if st is not None and (ova or not st.is_dir):
        raise Refused(f"{out} already exists on {t.host}", "choose another path or move the old one away")
    if st is not None and await t.listdir(out):
        raise Refused(f"folder {out} on {t.host} is not empty",
                      "export into a new or empty folder, so no file of another package is mixed in")
    return out


async def export_package(t: Transport, spec: OvfSpec, disk_paths: dict[str, str], out: str, *, ova: bool,
                         progress: ProgressFn | None = None, stage: str | None = None, state: dict | None = None,
                         save: Callable[[dict], Awaitable[None]] | None = None,
                         keep: Callable[[], bool] | None = None) -> dict:
    """Write `spec` and its disks (converted to dynamic VHD) as an OVF folder or an .ova file at `out`.

    The package is made in a staging folder next to `out` (named `stage`, or a new random name), one
    step at a time (convert each disk, hash
    each disk, write the descriptor and the manifest, tar them for an OVA), and moved into place at the
    end. After each durable step `save` gets the state of the export; given back as `state`, it lets an
    interrupted export go on from there (when the staging folder is intact and the VM's disks have not
    changed since), else the export starts over. An interruption for which `keep()` is true (a pause)
    keeps the staging folder; anything else removes it. Progress counts each disk's virtual size once
    per step, so its total is known from the start and never changes.

    Returns {"path": out, "files": {file: sha256}, "bytes": size of the package}."""
    _check_spec(spec)
    out = await check_out(t, spec.name, out, ova=ova)
    parent, base = _split(out)
    missing = [d.name for d in spec.disks if d.name not in disk_paths]
    if missing:
        raise PermanentError(f"{spec.name}: no image given for disk(s) {', '.join(missing)}",
                             "internal: pass the image path of every disk")

    sources = {}
    disks = []
    marks: dict[str, list[int]] = {}      # disk -> [size, mtime] of its image: has it changed since?
    for d in spec.disks:
        info = await _image_info(t, disk_paths[d.name])
        sources[d.name] = (disk_paths[d.name], info.get("format") or "qcow2")
        if int(info["virtual-size"]) > VHD_MAX:
            raise PermanentError(f"{disk_paths[d.name]} ({int(info['virtual-size']) >> 30} GiB) is larger than a VHD "
                                 "can hold (2040 GiB)", "move this VM with block replication instead of a package")
        disks.append(replace(d, capacity=int(info["virtual-size"]), format="vpc"))
        sst = await t.stat(disk_paths[d.name])
        marks[d.name] = [sst.size, sst.mtime_ns] if sst else [0, 0]
    spec = replace(spec, disks=tuple(disks))

    ovf_name, mf_name = f"{spec.name}.ovf", f"{spec.name}.mf"
    capacity = sum(d.capacity for d in spec.disks)
    meter = ByteMeter(progress, capacity * (3 if ova else 2))     # convert, hash (and tar) each disk once

    old = state or {}
    stage = posixpath.join(parent, stage) if stage else posixpath.join(parent, f".{base}.ferry-tmp-{secrets.token_hex(4)}")
    sst = await t.stat(stage)
    again = bool(sst and sst.is_dir and old.get("stage") == stage and old.get("out") == out and old.get("ova") == ova
                 and old.get("sources") == marks)
    if sst is not None and not again:
        await _rmtree(t, stage)          # left by an earlier run that can no longer be trusted
    if not again:
        await t.mkdir(stage, parents=False, mode=0o755)
    sizes: dict[str, int] = dict(old.get("sizes") or {}) if again else {}       # VHD file -> bytes, once converted
    digests: dict[str, str] = dict(old.get("digests") or {}) if again else {}   # VHD file -> sha256, once hashed

    async def checkpoint() -> None:
        if save is not None:
            await save({"stage": stage, "out": out, "ova": ova, "sources": marks, "sizes": sizes,
                        "digests": digests})

    try:
        await checkpoint()
        for d in spec.disks:
            src, fmt = sources[d.name]
            dst = posixpath.join(stage, d.file)
            label = f"converting {d.name} to {d.file}"
            done = await t.stat(dst)
            if d.file in sizes and done is not None and done.size == sizes[d.file]:
                meter.advance(d.capacity, f"{label}: done before")
                continue
            sizes.pop(d.file, None)
            digests.pop(d.file, None)
            await _convert(t, ["-f", fmt, "-O", "vpc", "-o", "subformat=dynamic,force_size=on", src, dst],
                           d.capacity, meter, label, f"cannot convert {src} to {d.file}")
            await _run(t, ["sync", "--", dst], f"cannot flush {d.file} to disk", "check the folder's filesystem")
            vst = await t.stat(dst)
            sizes[d.file] = vst.size if vst else 0
            meter.advance(d.capacity, f"converted {d.name}")
            await checkpoint()
        for d in spec.disks:
            label = f"hashing {d.file}"
            if d.file not in digests:
                # bytes of the VHD, counted in the disk's virtual size like every step
                digests[d.file] = await _hash_file(
                    t, posixpath.join(stage, d.file), "SHA256",
                    lambda n, d=d, label=label: meter.show(_scaled(n, sizes[d.file], d.capacity), label))
                await checkpoint()
            meter.advance(d.capacity, label)
        ovf = build_ovf(spec, sizes=sizes).encode("utf-8")
        await t.write_file(posixpath.join(stage, ovf_name), ovf)
        files = {ovf_name: hashlib.sha256(ovf).hexdigest(), **{d.file: digests[d.file] for d in spec.disks}}
        mf = manifest_text(files).encode("ascii")
        await t.write_file(posixpath.join(stage, mf_name), mf)
        total_bytes = len(ovf) + len(mf) + sum(sizes.values())

        if ova:
            part = posixpath.join(stage, f".{base}.part")

            async def tar_size() -> None:
                pst = await t.stat(part)
                meter.show(_scaled(pst.size if pst else 0, total_bytes, capacity), f"writing {base}")

            members = [ovf_name, mf_name, *(d.file for d in spec.disks)]
            # pax (not plain ustar) so that disks over 8 GiB fit; without per-file time records, a package of
            # small files is byte-for-byte ustar
            r = await watch(t, ["tar", "--format=posix", "--pax-option=delete=atime,delete=ctime,delete=mtime",
                                 "--owner=0", "--group=0", "--numeric-owner", "--no-recursion",
                                 "-C", stage, "-cf", part, "--", *members], poll=tar_size)
            if not r.ok:
                raise PermanentError(f"cannot write {out} on {t.host}: {last_line(r)}", "check the free space")
            pst = await t.stat(part)
            total_bytes = pst.size if pst else total_bytes
            await _run(t, ["mv", "-n", "-T", "--", part, out], f"cannot move the finished package to {out}",
                       "check the permissions of the folder")
            if await t.stat(part) is not None:
                raise PermanentError(f"{out} appeared on {t.host} while the package was written",
                                     "choose another path or move the other file away")
            await _rmtree(t, stage)
        else:
            await _run(t, ["mv", "-T", "--", stage, out], f"cannot move the finished package to {out}",
                       "the folder must be new or empty; check its permissions")
        meter.show(meter.total, "done")
    except asyncio.CancelledError:
        if keep is None or not keep():
            await asyncio.shield(_rmtree(t, stage))
        raise
    except BaseException:
        await asyncio.shield(_rmtree(t, stage))
        raise
    return {"path": out, "files": files, "bytes": total_bytes}


def _scaled(n: int, of: int, to: int) -> int:
    """n bytes of `of`, as the same share of `to`."""
    return n * to // of if of > 0 else 0


# ------------------------------------------------------------------ reading a package

@dataclass(frozen=True)
class _Member:
    raw: str       # the name as tar stores it (what to ask tar for)
    name: str      # without a leading ./
    kind: str      # '-' regular file, 'd', 'l', 'h', ...
    size: int


@dataclass(frozen=True)
class _Package:
    path: str                      # what the operator named
    kind: str                      # "ova" | "ovf"
    ovf: str                       # the .ovf: member name (ova) or file path (ovf)
    members: dict[str, _Member]    # ova: regular members by name


async def _list_ova(t: Transport, path: str) -> list[_Member]:
    r = await t.run(["env", "LC_ALL=C", "tar", "--numeric-owner", "--quoting-style=escape", "-tvf", path],
                    timeout=600)
    if not r.ok:
        raise PermanentError(f"{path} on {t.host} is not a readable OVA (tar) archive: {last_line(r)}",
                             "the package is damaged or not an OVA")
    members = []
    for line in r.text().splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        kind, name = parts[0][:1], parts[5]
        if kind == "l":
            name = name.split(" -> ", 1)[0]
        elif kind == "h":
            name = name.split(" link to ", 1)[0]
        size = int(parts[2]) if parts[2].isdigit() else 0
        members.append(_Member(name, name[2:] if name.startswith("./") else name, kind, size))
    if not members:
        raise PermanentError(f"{path} on {t.host} is an empty archive", "the package is damaged or not an OVA")
    return members


async def _open(t: Transport, path: str) -> _Package:
    st = await t.stat(path)
    if st is None:
        raise PermanentError(f"{path} does not exist on {t.host}", "check the path of the package")
    if st.is_dir:
        ovfs = [n for n in await t.listdir(path) if n.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise PermanentError(f"folder {path} on {t.host} holds {len(ovfs)} .ovf files, not one",
                                 "name the .ovf file of the package")
        return _Package(path, "ovf", posixpath.join(path, ovfs[0]), {})
    if path.lower().endswith(".ovf"):
        return _Package(path, "ovf", path, {})
    if not path.lower().endswith(".ova"):
        raise PermanentError(f"{path} is neither an .ovf nor an .ova", "name the package's .ovf or .ova file")
    members = await _list_ova(t, path)
    first = members[0]
    if first.kind != "-" or not first.name.lower().endswith(".ovf") or not FILE_RE.match(first.name):
        raise PermanentError(f"{path}: the first member of the OVA is {first.name!r}, not the .ovf descriptor",
                             "an OVA starts with its .ovf (DMTF OVF); repack it with the .ovf first")
    seen: dict[str, _Member] = {}
    for m in members:
        if m.name in seen:
            raise PermanentError(f"{path}: the OVA holds {m.name} twice", "the package is damaged or tampered with")
        seen[m.name] = m
    return _Package(path, "ova", first.name, {m.name: m for m in members if m.kind == "-"})


async def _read_small(t: Transport, pkg: _Package, name: str, limit: int) -> bytes:
    """A small file of the package (descriptor, manifest), read into memory."""
    if pkg.kind == "ova":
        m = pkg.members[name]
        if m.size > limit:
            raise PermanentError(f"{pkg.path}: {name} is {m.size} bytes, too big for a descriptor or manifest",
                                 "the package is damaged or not an OVF package")
        r = await _run(t, ["tar", "-xOf", pkg.path, "--occurrence=1", "--no-wildcards", "--", m.raw],
                       f"cannot read {name} from {pkg.path}", "the package is damaged")
        return r.stdout
    st = await t.stat(name)
    if st is None:
        raise PermanentError(f"{name} does not exist on {t.host}", "check the path of the package")
    if st.size > limit:
        raise PermanentError(f"{name} is {st.size} bytes, too big for a descriptor or manifest",
                             "the package is damaged or not an OVF package")
    return await t.read_file(name)


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PermanentError(f"{file}: not UTF-8 text", "the package is damaged or not an OVF package") from None


def _ovf_label(pkg: _Package) -> str:
    return f"{pkg.path}: {pkg.ovf}" if pkg.kind == "ova" else pkg.ovf


async def read_package(t: Transport, path: str) -> tuple[OvfSpec, str]:
    """The VM an .ovf (or a folder holding one) or an .ova describes, and the descriptor's text."""
    pkg = await _open(t, path)
    text = _decode(await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR), _ovf_label(pkg))
    return parse_ovf(text, file=_ovf_label(pkg)), text


async def import_needs(t: Transport, path: str, *, disks: set[str] | None = None,
                       stage: str | None = None) -> tuple[OvfSpec, int]:
    """The VM a package describes, and the bytes its import writes in the datastore at most: each disk
    as qcow2 (no more than its file, which holds its data; a VMDK may be compressed, so its virtual
    size) and, for an OVA, the disk files extracted next to them while they are converted. `disks`:
    only those disks (what a resumed import still converts); `stage`: the folder an earlier run
    extracted into, whose files are replaced, not added to."""
    pkg = await _open(t, path)
    spec = parse_ovf(_decode(await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR), _ovf_label(pkg)), file=_ovf_label(pkg))
    need = 0
    for d in spec.disks:
        if disks is not None and d.name not in disks:
            continue
        if not d.file:
            need += 1 << 20             # a blank disk: its qcow2 header and tables
            continue
        if pkg.kind == "ova":
            size = pkg.members[d.file].size if d.file in pkg.members else 0
        else:
            st = await t.stat(posixpath.join(posixpath.dirname(pkg.ovf) or ".", d.file))
            size = st.size if st else 0
        need += (d.capacity if d.format == "vmdk" else min(size, d.capacity)) + (1 << 20)
        if pkg.kind == "ova":
            there = await t.stat(posixpath.join(stage, d.file)) if stage else None
            need += max(0, size - (there.size if there else 0))
    return spec, need


# ------------------------------------------------------------------ import

def _source_json(fmt: str, path: str) -> str:
    """A json: image spec that opens exactly one file with the given driver: no probing, no backing file,
    and a VHD's size as its footer states it (what the OVF capacity means), not its CHS geometry."""
    spec: dict = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "vpc":
        spec["force_size_calc"] = "current_size"
    if fmt == "qcow2":
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def _check_single_file(info: dict, path: str, label: str) -> None:
    """A disk from a package must not reach other files of the host (backing files, VMDK extents)."""
    data = (info.get("format-specific") or {}).get("data") or {}
    extents = [e.get("filename") for e in data.get("extents") or []]
    if info.get("backing-filename") or data.get("data-file") or any(
            posixpath.normpath(e or "") != posixpath.normpath(path) for e in extents):
        raise PermanentError(f"{label} refers to other files (backing file, data file or extents)",
                             "a package's disk must be self-contained; refusing it for safety")


@dataclass(frozen=True)
class _Verified:
    """A package whose descriptor matches its manifest, and the manifest's entries."""
    pkg: _Package
    spec: OvfSpec
    manifest: Manifest
    mf_name: str
    folder: str                    # an OVF package's folder (where its files are)
    sizes: dict[str, int]          # every file the manifest lists but the descriptor -> its size

    def mismatch(self, n: str) -> PermanentError:
        return PermanentError(f"{self.pkg.path}: {n} does not match its {self.manifest.algos[n]} in "
                              f"{self.mf_name} (package tampered or damaged)",
                              "get an intact copy of the package; nothing was imported")


async def _verified(t: Transport, path: str) -> _Verified:
    """Open a package and check its descriptor against its manifest, which must list every file."""
    pkg = await _open(t, path)
    label = _ovf_label(pkg)
    ovf_bytes = await _read_small(t, pkg, pkg.ovf, MAX_DESCRIPTOR)
    spec = parse_ovf(_decode(ovf_bytes, label), file=label)
    ovf_name = posixpath.basename(pkg.ovf)

    # the manifest: <stem>.mf, else the package's only .mf
    stem = posixpath.splitext(ovf_name)[0]
    if pkg.kind == "ova":
        names = list(pkg.members)
    else:
        names = await t.listdir(posixpath.dirname(pkg.ovf) or ".")
    mfs = [n for n in names if n.lower().endswith(".mf")]
    mf_name = f"{stem}.mf" if f"{stem}.mf" in mfs else (mfs[0] if len(mfs) == 1 else None)
    if mf_name is None:
        raise PermanentError(f"{path}: the package has no manifest ({stem}.mf)",
                             "a package without a manifest cannot be verified; export it again with its manifest")
    folder = posixpath.dirname(pkg.ovf) or "."
    mf_label = mf_name if pkg.kind == "ova" else posixpath.join(folder, mf_name)
    manifest = parse_manifest(_decode(await _read_small(t, pkg, mf_label, MAX_MANIFEST), f"{path}: {mf_name}"),
                              file=f"{path}: {mf_name}")
    needed = [ovf_name, *dict.fromkeys(d.file for d in spec.disks if d.file)]
    unlisted = [n for n in needed if n not in manifest]
    if unlisted:
        raise PermanentError(f"{path}: {', '.join(unlisted)} not listed in {mf_name}",
                             "every file of the package must be in its manifest; the package cannot be verified")
    for n in manifest:
        if not FILE_RE.match(n) or (pkg.kind == "ova" and n not in pkg.members) or (
                pkg.kind == "ovf" and n not in names):
            raise PermanentError(f"{path}: {n} is listed in {mf_name} but is not in the package",
                                 "the package is incomplete; copy it again")
    to_check = [n for n in manifest if n != ovf_name]
    if pkg.kind == "ova":
        sizes = {n: pkg.members[n].size for n in to_check}
    else:
        sizes = {}
        for n in to_check:
            st = await t.stat(posixpath.join(folder, n))
            if st is None or not stat.S_ISREG(st.mode):
                raise PermanentError(f"{path}: {n} is not a regular file", "the package is damaged")
            sizes[n] = st.size
    v = _Verified(pkg, spec, manifest, mf_name, folder, sizes)
    if getattr(hashlib, manifest.algos[ovf_name].lower())(ovf_bytes).hexdigest() != manifest[ovf_name]:
        raise v.mismatch(ovf_name)
    return v


def _files_of(v: _Verified, disks: list[OvfDisk]) -> list[str]:
    """The files of the package an import of these disks reads: theirs, and every file that belongs to
    no disk (verified all the same: the manifest vouches for the package as a whole)."""
    of_disks = {d.file for d in v.spec.disks if d.file}
    wanted = {d.file for d in disks if d.file}
    return [n for n in v.sizes if n in wanted or n not in of_disks]


async def _verify(t: Transport, v: _Verified, n: str, where: str, meter: ByteMeter, *, measured: bool = True) -> bool:
    """Does the file `n` at `where` have the size and the digest the manifest gives it?"""
    st = await t.stat(where)
    if st is None or not stat.S_ISREG(st.mode) or st.size != v.sizes[n]:
        return False
    lbl = f"verifying {n}"
    digest = await _hash_file(t, where, v.manifest.algos[n], lambda b: meter.show(b, lbl))
    if digest != v.manifest[n]:
        return False
    meter.advance(v.sizes[n], lbl, measured=measured)
    return True


async def _staged(t: Transport, v: _Verified, files: list[str], stage: str, meter: ByteMeter) -> str:
    """The folder holding the files, each verified against the manifest: an OVF package's own folder,
    or, for an OVA, `stage`, into which they are extracted (files an earlier run extracted there are
    kept when they match the manifest)."""
    path = v.pkg.path
    if v.pkg.kind != "ova":
        for n in files:
            if not await _verify(t, v, n, posixpath.join(v.folder, n), meter):
                await _check_regular(t, v, n, posixpath.join(v.folder, n))
                raise v.mismatch(n)
        return v.folder
    st = await t.stat(stage)
    if st is None:
        await t.mkdir(stage, parents=False, mode=0o700)
    elif not st.is_dir:
        await t.remove(stage)
        await t.mkdir(stage, parents=False, mode=0o700)
    extract = []
    for n in files:
        # Trusted only once it matches: whatever wrote it (a tar of a run that died) is not.
        if await _verify(t, v, n, posixpath.join(stage, n), meter, measured=False):
            meter.advance(v.sizes[n], "extracted", measured=False)
        else:
            extract.append(n)
    if not extract:
        return stage
    await _run(t, ["rm", "-f", "--", *(posixpath.join(stage, n) for n in extract)],
               f"cannot clear {stage}", "check the permissions of the datastore")
    meter.show(0, f"extracting {posixpath.basename(path)}")

    async def extracted() -> None:
        done = 0
        for n in extract:
            st = await t.stat(posixpath.join(stage, n))
            done += st.size if st else 0
        meter.show(done, f"extracting {posixpath.basename(path)}")

    r = await watch(t, ["tar", "-xf", path, "-C", stage, "--no-same-owner", "--no-same-permissions",
                        "--occurrence=1", "--no-wildcards", "--",
                        *(v.pkg.members[n].raw for n in extract)], poll=extracted)
    if not r.ok:
        raise PermanentError(f"cannot extract {path} on {t.host}: {last_line(r)}",
                             "check the free space; the package may be damaged")
    meter.advance(sum(v.sizes[n] for n in extract), "extracted")
    for n in extract:
        if not await _verify(t, v, n, posixpath.join(stage, n), meter):
            await _check_regular(t, v, n, posixpath.join(stage, n))
            raise v.mismatch(n)
    return stage


async def _check_regular(t: Transport, v: _Verified, n: str, where: str) -> None:
    st = await t.stat(where)
    if st is None or not stat.S_ISREG(st.mode) or st.size != v.sizes[n]:
        raise PermanentError(f"{v.pkg.path}: {n} is not a regular file of {v.sizes[n]} bytes",
                             "the package is damaged")


async def _convert_disk(t: Transport, v: _Verified, d: OvfDisk, files_dir: str, part: str, meter: ByteMeter,
                        name: str) -> int:
    """One disk of the package written as qcow2 at `part` (a new file), at least as large as the
    descriptor says; returns its virtual size."""
    path = v.pkg.path
    if d.file:
        src = _source_json(d.format, posixpath.join(files_dir, d.file))
        _check_single_file(await _image_info(t, src), posixpath.join(files_dir, d.file), f"{path}: {d.file}")
        await _convert(t, ["-O", "qcow2", src, part], d.capacity, meter, f"converting {d.file}",
                       f"cannot convert {d.file} of {path} to qcow2")
    else:
        await _run(t, ["qemu-img", "create", "-q", "-f", "qcow2", part, str(d.capacity)],
                   f"cannot create blank disk {d.name} of {name}", "check the free space")
    size = int((await _image_info(t, part, fmt="qcow2"))["virtual-size"])
    if size < d.capacity:    # a VHD read by its geometry can be a little smaller than the OVF says
        await _run(t, ["qemu-img", "resize", "-q", "-f", "qcow2", part, str(d.capacity)],
                   f"cannot grow {d.name} of {name} to {d.capacity} bytes", "check the free space")
        size = d.capacity
    meter.advance(d.capacity, f"converted {d.name}")
    return size


def _work(v: _Verified) -> int:
    """The bytes an import goes through, whatever is left to do: each disk converted, each file
    verified (and extracted first, from an OVA)."""
    return sum(d.capacity for d in v.spec.disks) + sum(v.sizes.values()) * (2 if v.pkg.kind == "ova" else 1)


async def import_disks(t: Transport, path: str, parts: dict[str, str], *, stage: str,
                       progress: ProgressFn | None = None) -> OvfSpec:
    """For a task that makes a VM from a package: verify the package against its manifest, then write
    the named disks as qcow2, each to the new file `parts[disk name]` (the task flushes and renames
    them into place). An OVA's files are extracted into `stage` (kept for a resume, which trusts
    only those that match the manifest; removed at the end). Nothing is removed on failure: the
    task's rollback or resume does that. Progress counts the whole import; what is not redone (disks
    not named, files already extracted) advances it without being measured."""
    v = await _verified(t, path)
    by_name = {d.name: d for d in v.spec.disks}
    unknown = [n for n in parts if n not in by_name]
    if unknown:
        raise PermanentError(f"{path} has no disk {', '.join(unknown)} (the package changed since the import began?)",
                             "cancel the import (ferry task cancel) and import the package again")
    disks = [by_name[n] for n in parts]
    files = _files_of(v, disks)
    meter = ByteMeter(progress, _work(v))
    factor = 2 if v.pkg.kind == "ova" else 1
    meter.advance(sum(d.capacity for d in v.spec.disks if d.name not in parts)
                  + factor * sum(size for n, size in v.sizes.items() if n not in files), "already imported",
                  measured=False)
    files_dir = await _staged(t, v, files, stage, meter)
    for d in disks:
        await _convert_disk(t, v, d, files_dir, parts[d.name], meter, v.spec.name)
    if v.pkg.kind == "ova":
        await _rmtree(t, stage)
    return v.spec


async def import_package(t: Transport, path: str, dest_dir: str, *, name: str | None = None,
                         progress: ProgressFn | None = None) -> tuple[OvfSpec, dict[str, str]]:
    """Verify a package against its manifest, then convert its disks to dest_dir/<disk>.qcow2; on its own,
    outside a task: whatever it wrote is removed when it fails.

    Returns the spec (named `name` if given; capacities as imported) and {disk name: qcow2 path}."""
    v = await _verified(t, path)
    spec = replace(v.spec, name=name) if name else v.spec
    dest_dir = posixpath.normpath(dest_dir)
    targets = {d.name: posixpath.join(dest_dir, f"{d.name}.qcow2") for d in spec.disks}
    for target in targets.values():
        if await t.stat(target) is not None:
            raise PermanentError(f"{target} already exists on {t.host}",
                                 "import into another folder or under another name")
    meter = ByteMeter(progress, _work(v))
    made_dest = await t.stat(dest_dir) is None
    tmp = posixpath.join(dest_dir, f".ferry-import-{secrets.token_hex(4)}")
    created: list[str] = []
    try:
        if made_dest:
            await t.mkdir(dest_dir)
        files_dir = await _staged(t, v, list(v.sizes), tmp, meter)
        disks = []
        for d in spec.disks:
            target = targets[d.name]
            part = posixpath.join(dest_dir, f".{d.name}.qcow2.ferry-tmp")
            created.append(part)
            size = await _convert_disk(t, v, d, files_dir, part, meter, spec.name)
            await _run(t, ["mv", "-n", "-T", "--", part, target], f"cannot move {d.name} into place",
                       "check the permissions of the folder")
            created.append(target)
            if await t.stat(part) is not None:
                created.remove(target)
                raise PermanentError(f"{target} appeared on {t.host} during the import",
                                     "import into another folder or under another name")
            disks.append(replace(d, capacity=size))
        if v.pkg.kind == "ova":
            await _rmtree(t, tmp)
    except BaseException:
        async def undo() -> None:
            for p in created:
                with contextlib.suppress(FerryError):
                    await t.remove(p)
            await _rmtree(t, tmp)
            if made_dest:
                with contextlib.suppress(FerryError):
                    await t.run(["rmdir", "--", dest_dir])
        with contextlib.suppress(Exception):
            await asyncio.shield(undo())
        raise
    return replace(spec, disks=tuple(disks)), targets
