"""The OVF descriptor and the SHA manifest of a package: parsed and written as text, no host involved.

Ferry writes OVF 1.0 envelopes (its own settings in a FerrySection the others skip) and reads OVF 1.x/2.x
ones of one VM as Ferry, VMware and VirtualBox write them. Whatever is damaged, unsafe (a DOCTYPE,
a path out of the package) or not understood is a PermanentError naming the file and what to do.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import PermanentError

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

def check_spec(spec: OvfSpec) -> None:
    """Refuses a spec whose disks, files, buses, formats or hardware no package could carry."""
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
    check_spec(spec)

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
