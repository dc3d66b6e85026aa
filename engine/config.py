"""Site configuration: `config.toml` (read with tomllib, written with tomli-w), or the built-in lab.

Every problem is reported as one line naming the file, line, key, what is wrong and a hint.
Unknown keys are reported, not ignored.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import tomli_w

from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TRANSPORTS = ("ssh", "local")


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int | None
    key: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    description: str = ""


@dataclass(frozen=True)
class HostSpec:
    name: str
    cluster: str
    transport: str                 # "ssh" or "local"
    address: str | None = None     # ssh: address or ~/.ssh/config alias
    port: int | None = None
    user: str | None = None
    identity: str | None = None    # path to a private key file (never its contents)
    runtime: str = ""              # folder on the host for sockets, pid files, logs
    accel: str = "auto"            # auto (KVM if a guest really boots, else TCG), kvm or tcg
    cpu_model: str = "qemu64"      # QEMU -cpu for the host's VMs (the same on a cluster keeps migration possible)
    networks: tuple[str, ...] = ("default",)
    migration_address: str | None = None   # QEMU live migration and replication data; default: the management address

    @property
    def target(self) -> str:
        """How the operator names the host's endpoint, e.g. root@10.0.0.11:22 or local."""
        if self.transport == "local":
            return "local"
        s = self.address or self.name
        if self.user:
            s = f"{self.user}@{s}"
        if self.port:
            s = f"{s}:{self.port}"
        return s


@dataclass(frozen=True)
class NetworkSpec:
    """config.toml's [networks.NAME]: a layer-2 segment VM NICs join (a port group of a distributed
    switch, in the seed's words): a Linux bridge on each host it spans, optionally a VLAN of it.
    mode "user" is QEMU's user-mode networking (no bridge, no root needed, isolated per guest)."""
    name: str
    mode: str = "bridge"                    # "bridge" or "user"
    bridge: str = ""                        # the Linux bridge on each host (bridge mode)
    create: bool = True                     # Ferry creates the bridge where it is absent
    vlan: int | None = None                 # 1..4094: a port group on a VLAN-aware bridge
    mtu: int | None = None
    hosts: tuple[str, ...] = ()             # empty: every host of the site
    uplinks: dict[str, str] = field(default_factory=dict)   # host -> interface enslaved to the bridge

    def spans(self, host: str) -> bool:
        return not self.hosts or host in self.hosts


DEFAULT_NETWORK = NetworkSpec("default", mode="user")


@dataclass(frozen=True)
class LabSettings:
    """config.toml's [lab]: the addresses of the network lab (network namespaces on this machine), and
    whether this site is that lab (network = true: the engine brings it up, or adopts it, as it starts)."""
    subnet: str = "10.231.0.0/24"
    network: bool = False


@dataclass(frozen=True)
class DatastoreSpec:
    name: str
    path: str
    hosts: tuple[str, ...]

    @property
    def shared(self) -> bool:
        return len(self.hosts) > 1


@dataclass(frozen=True)
class EngineLimits:
    max_tasks: int = 4
    max_tasks_per_host: int = 2
    retries: int = 5
    group: str | None = None       # a group whose members may use the engine service besides its owner


@dataclass(frozen=True)
class ConsoleSettings:
    """config.toml's [console]: read-only mode, and keys remapped by binding id (without "ferry.")."""
    readonly: bool = False
    keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleSpec:
    """config.toml's [schedules.NAME]: what runs when (engine/ops/schedule.py)."""
    name: str
    at: str                        # as written: a cron expression or an alias (daily 02:00, hourly :30, ...)
    cron: str                      # the cron expression it means
    run: str                       # what it runs: a health checklist's name, "backup", ... (the ops layer says)
    catch_up: bool = True          # a slot missed while the engine was down runs once at its start


@dataclass(frozen=True)
class NotifySettings:
    """config.toml's [notify]: who is told of new critical and major alarms (engine/ops/notify.py)."""
    command: tuple[str, ...] = ()  # run with the alarm as JSON on stdin
    webhook: str | None = None     # POSTed the alarm as JSON
    retries: int = 5
    backoff_s: float = 2.0         # before the first retry; doubling
    timeout_s: float = 30.0


@dataclass(frozen=True)
class SiteConfig:
    name: str
    clusters: dict[str, ClusterSpec]
    hosts: dict[str, HostSpec]
    datastores: dict[str, DatastoreSpec] = field(default_factory=dict)
    limits: EngineLimits = EngineLimits()
    production: bool = False
    theme: str | None = None
    source: str | None = None      # the config file, or None for the built-in lab
    console: ConsoleSettings = ConsoleSettings()
    networks: dict[str, NetworkSpec] = field(default_factory=dict)
    lab: LabSettings = LabSettings()
    timezone: str | None = None    # [site] timezone (IANA); None: this machine's
    schedules: dict[str, ScheduleSpec] = field(default_factory=dict)
    notify: NotifySettings = NotifySettings()
    health: Any = None             # engine/ops/healthconfig.HealthSettings: [health], [[checks]], [checklists.X]
    backup: Any = None             # engine/ops/backupconfig.BackupSettings: [backup], [backup.keep], [backup.remote.X]
    metrics: Any = None            # engine/ops/metricsconfig.MetricsSettings: [metrics]

    def network(self, name: str) -> NetworkSpec:
        """The network called `name` ("default": QEMU user mode unless config.toml says otherwise)."""
        from .errors import PermanentError
        if name in self.networks:
            return self.networks[name]
        if name == "default":
            return DEFAULT_NETWORK
        known = ", ".join(sorted({"default", *self.networks}))
        raise PermanentError(f"unknown network {name!r}", f"networks in this site: {known}")

    def networks_of(self, host: str) -> list[str]:
        """The networks a host's VMs may join: those it names, and those that span it."""
        names = list(self.hosts[host].networks) if host in self.hosts else []
        names += [n for n, spec in self.networks.items() if spec.spans(host) and n not in names]
        return names

    @property
    def is_lab(self) -> bool:
        return self.source is None

    def host(self, name: str) -> HostSpec:
        from .errors import PermanentError
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise PermanentError(f"unknown host {name!r}", f"hosts in this site: {known}") from None

    def hosts_in(self, cluster: str) -> list[HostSpec]:
        return [h for h in self.hosts.values() if h.cluster == cluster]

    def datastores_of(self, host: str) -> list[DatastoreSpec]:
        return [d for d in self.datastores.values() if host in d.hosts]


# ---------------------------------------------------------------- locating keys

_HEADER_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def _split_dotted(s: str) -> tuple[str, ...]:
    parts, cur, quote = [], "", None
    for ch in s:
        if quote:
            if ch == quote:
                quote = None
            else:
                cur += ch
        elif ch in "\"'":
            quote = ch
        elif ch == ".":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return tuple(parts)


class _Locator:
    """Finds the line of a table or key in TOML text (tomllib does not report positions)."""

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for lineno, line in enumerate(text.splitlines(), 1):
            m = _HEADER_RE.match(line)
            if m and not line.lstrip().startswith("[["):
                table = _split_dotted(m.group(1))
                self.tables.setdefault(table, lineno)
                continue
            m = _KEY_RE.match(line)
            if m:
                key = m.group(1).strip("\"'")
                self.keys.setdefault(table + (key,), lineno)

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.keys:
                return self.keys[path]
            if path in self.tables:
                return self.tables[path]
            path = path[:-1]
        return None


# ---------------------------------------------------------------- validation


class Checker:
    """Collects the problems of one TOML document (config.toml, a migration plan), each located."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.loc = _Locator(text)
        self.problems: list[ConfigProblem] = []

    def problem(self, path: tuple[str, ...], message: str, hint: str = "") -> None:
        self.problems.append(ConfigProblem(self.file, self.loc.line(path), ".".join(path), message, hint))

    def table(self, data: dict, path: tuple[str, ...], allowed: dict[str, str], required: tuple[str, ...] = ()) -> None:
        """Report unknown and missing keys of one table. `allowed` maps key -> short description."""
        for key in data:
            if key not in allowed:
                self.problem(path + (key,), "unknown key",
                             f"allowed keys here: {', '.join(allowed)}")
        for key in required:
            if key not in data:
                self.problem(path, f"missing required key {key!r}", f"add: {key} = {allowed[key]}")

    def get(self, data: dict, path: tuple[str, ...], key: str, kind: type | tuple, default: Any = None,
            check: Callable[[Any], str | None] | None = None, example: str = "") -> Any:
        if key not in data:
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join({int: "an integer", str: "a string", bool: "true or false",
                                  list: "a list", dict: "a table"}[k] for k in kinds) if float not in kinds else "a number"
            self.problem(path + (key,), f"must be {names}, got {value!r}", f"for example: {key} = {example}" if example else "")
            return default
        if check:
            msg = check(value)
            if msg:
                self.problem(path + (key,), msg, f"for example: {key} = {example}" if example else "")
                return default
        return value

    def entries(self, data: dict, key: str, what: str) -> Iterator[tuple[str, dict, tuple[str, ...]]]:
        """(name, table, path) of each [key.NAME] table of `data` whose name is valid and that is a
        table (the others reported)."""
        raw = data.get(key, {})
        if not isinstance(raw, dict):
            self.problem((key,), f"must be a table of {what}s", f"write [{key}.NAME]")
            return
        for name, value in raw.items():
            path = (key, name)
            if not self.name(path, name, what):
                continue
            if not isinstance(value, dict):
                self.problem(path, "must be a table", f"write [{key}.{name}]")
                continue
            yield name, value, path

    def name(self, path: tuple[str, ...], name: str, what: str) -> bool:
        if NAME_RE.match(name):
            return True
        self.problem(path, f"{what} name {name!r} is not valid",
                     "use letters, digits, '.', '_' or '-' (up to 63), starting with a letter or digit")
        return False


_Checker = Checker     # its name before migration plans used it too


def _positive(v: int) -> str | None:
    return None if v >= 1 else f"must be at least 1, got {v}"


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"must be a port number from 1 to 65535, got {v}"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _abs_path(v: str) -> str | None:
    return None if v.startswith("/") or v.startswith("~") else f"must be an absolute path, got {v!r}"


TOP_KEYS = {"site": "{ name = \"dc1\" }", "engine": "{ max_tasks = 4 }", "clusters": "{ prod = {} }",
            "hosts": "{ cna01 = { ... } }", "datastores": "{ ds1 = { ... } }", "console": "{ readonly = true }",
            "networks": "{ prod = { bridge = \"br-prod\" } }", "lab": "{ subnet = \"10.231.0.0/24\" }",
            "schedules": "{ nightly = { at = \"daily 02:00\", run = \"backup\" } }",
            "notify": "{ command = [\"/usr/local/bin/page-oncall\"] }",
            "health": "{ max_attempts = 3 }", "checks": "[{ name = \"root-disk\", command = [...] }]",
            "checklists": "{ daily = { checks = [\"alarms\", \"platform\"] } }",
            "backup": "{ local_dir = \"/var/backup/ferry\" }", "metrics": "{ interval = 10 }"}
NETWORK_KEYS = {"mode": '"bridge"', "bridge": '"br-prod"', "create": "true", "vlan": "100", "mtu": "1500",
                "hosts": '["cna01", "cna02"]', "uplinks": '{ cna01 = "eth1" }'}
LAB_KEYS = {"subnet": '"10.231.0.0/24"', "network": "true"}
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SITE_KEYS = {"name": '"dc1"', "production": "true", "theme": '"dark"', "timezone": '"Europe/Berlin"'}
SCHEDULE_KEYS = {"at": '"daily 02:00"', "run": '"backup"', "catch_up": "true"}
NOTIFY_KEYS = {"command": '["/usr/local/bin/page-oncall", "--team", "ops"]', "webhook": '"https://hooks.example/ferry"',
               "retries": "5", "backoff": "2", "timeout": "30"}
ENGINE_KEYS = {"max_tasks": "4", "max_tasks_per_host": "2", "retries": "5", "group": '"ferry-ops"'}
CLUSTER_KEYS = {"description": '"production cluster"'}
HOST_KEYS = {"cluster": '"prod"', "transport": '"ssh"', "address": '"10.0.0.11"', "port": "22",
             "user": '"root"', "identity": '"~/.ssh/id_ed25519"', "runtime": '"/var/lib/ferry/run"',
             "accel": '"auto"', "cpu_model": '"qemu64"', "networks": '["default"]',
             "migration_address": '"10.1.0.11"'}
CONSOLE_KEYS = {"readonly": "true", "keys": '{ "tasks.cancel" = "C" }'}
DATASTORE_KEYS = {"path": '"/var/lib/ferry/datastore"', "hosts": '["cna01"]'}

DEFAULT_SSH_RUNTIME = "/var/lib/ferry/run"


def parse_config(data: dict, *, file: str, text: str = "", check_files: bool = True) -> SiteConfig:
    """Validate a parsed TOML document and build the site; raises ConfigError with every problem."""
    c = _Checker(file, text)
    c.table(data, (), TOP_KEYS, required=("site",))

    site = data.get("site", {})
    if not isinstance(site, dict):
        c.problem(("site",), "must be a table", "write [site] with name = \"dc1\"")
        site = {}
    c.table(site, ("site",), SITE_KEYS, required=("name",) if "site" in data else ())
    site_name = c.get(site, ("site",), "name", str, "", _nonempty, '"dc1"')
    production = c.get(site, ("site",), "production", bool, False, example="true")
    theme = c.get(site, ("site",), "theme", str, None, _nonempty, '"dark"')
    timezone = c.get(site, ("site",), "timezone", str, None, _zone, '"Europe/Berlin"')

    console = _console_settings(c, data.get("console", {}))

    eng = data.get("engine", {})
    limits = EngineLimits()
    if isinstance(eng, dict):
        c.table(eng, ("engine",), ENGINE_KEYS)
        limits = EngineLimits(
            max_tasks=c.get(eng, ("engine",), "max_tasks", int, limits.max_tasks, _positive, "4"),
            max_tasks_per_host=c.get(eng, ("engine",), "max_tasks_per_host", int, limits.max_tasks_per_host, _positive, "2"),
            retries=c.get(eng, ("engine",), "retries", int, limits.retries,
                          lambda v: None if v >= 0 else f"must be 0 or more, got {v}", "5"),
            group=c.get(eng, ("engine",), "group", str, None, _nonempty, '"ferry-ops"'),
        )
    else:
        c.problem(("engine",), "must be a table", "write [engine] with max_tasks = 4")

    clusters: dict[str, ClusterSpec] = {}
    raw_clusters = data.get("clusters", {})
    if not isinstance(raw_clusters, dict):
        c.problem(("clusters",), "must be a table of clusters", "write [clusters.prod]")
        raw_clusters = {}
    for cname, cdata in raw_clusters.items():
        path = ("clusters", cname)
        if not c.name(path, cname, "cluster"):
            continue
        if not isinstance(cdata, dict):
            c.problem(path, "must be a table", f"write [clusters.{cname}]")
            continue
        c.table(cdata, path, CLUSTER_KEYS)
        clusters[cname] = ClusterSpec(cname, c.get(cdata, path, "description", str, "", example='"prod"'))

    hosts: dict[str, HostSpec] = {}
    raw_hosts = data.get("hosts", {})
    if not isinstance(raw_hosts, dict):
        c.problem(("hosts",), "must be a table of hosts", "write [hosts.cna01]")
        raw_hosts = {}
    for hname, hdata in raw_hosts.items():
        path = ("hosts", hname)
        if not c.name(path, hname, "host") or hname == "local":
            if hname == "local":
                c.problem(path, "host name 'local' is reserved for this machine", "choose another name, e.g. lab1")
            continue
        if not isinstance(hdata, dict):
            c.problem(path, "must be a table", f"write [hosts.{hname}]")
            continue
        c.table(hdata, path, HOST_KEYS, required=("cluster", "transport"))
        cluster = c.get(hdata, path, "cluster", str, None, example='"prod"')
        if cluster is not None and cluster not in raw_clusters:
            known = ", ".join(raw_clusters) or "none defined"
            c.problem(path + ("cluster",), f"cluster {cluster!r} is not defined",
                      f"add [clusters.{cluster}] or use one of: {known}")
        transport = c.get(hdata, path, "transport", str, None,
                          lambda v: None if v in TRANSPORTS else f"must be \"ssh\" or \"local\", got {v!r}", '"ssh"')
        address = c.get(hdata, path, "address", str, None, _nonempty, '"10.0.0.11"')
        port = c.get(hdata, path, "port", int, None, _port, "22")
        user = c.get(hdata, path, "user", str, None, _nonempty, '"root"')
        identity = c.get(hdata, path, "identity", str, None, _abs_path, '"~/.ssh/id_ed25519"')
        runtime = c.get(hdata, path, "runtime", str, None, _abs_path, '"/var/lib/ferry/run"')
        accel = c.get(hdata, path, "accel", str, "auto",
                      lambda v: None if v in ("auto", "kvm", "tcg") else f"must be \"auto\", \"kvm\" or \"tcg\", got {v!r}",
                      '"auto"')
        cpu_model = c.get(hdata, path, "cpu_model", str, "qemu64",
                          lambda v: None if re.fullmatch(r"[A-Za-z0-9._-]+", v) else f"is not a QEMU CPU model name: {v!r}",
                          '"qemu64"')
        networks = c.get(hdata, path, "networks", list, ["default"],
                         lambda v: None if v and all(isinstance(x, str) and NAME_RE.match(x) for x in v)
                         else "must be a non-empty list of network names", '["default"]')
        migration_address = c.get(hdata, path, "migration_address", str, None, _nonempty, '"10.1.0.11"')
        if transport == "ssh" and address is None and "address" not in hdata:
            c.problem(path, "missing required key 'address' for transport \"ssh\"",
                      'add: address = "10.0.0.11" (an address, a DNS name or a ~/.ssh/config alias)')
        if transport == "local":
            for key in ("address", "port", "user", "identity"):
                if key in hdata:
                    c.problem(path + (key,), "not used with transport \"local\"", "remove it, or set transport = \"ssh\"")
        if identity and check_files:
            p = Path(identity).expanduser()
            if not p.is_file():
                c.problem(path + ("identity",), f"key file {identity} does not exist",
                          "point it at a private key file, or remove it to use ssh-agent and ~/.ssh/config")
        if cluster and transport:
            hosts[hname] = HostSpec(hname, cluster, transport, address, port, user, identity,
                                    runtime or DEFAULT_SSH_RUNTIME, accel or "auto", cpu_model or "qemu64",
                                    tuple(networks or ("default",)), migration_address)

    datastores: dict[str, DatastoreSpec] = {}
    raw_ds = data.get("datastores", {})
    if not isinstance(raw_ds, dict):
        c.problem(("datastores",), "must be a table of datastores", "write [datastores.ds1]")
        raw_ds = {}
    for dname, ddata in raw_ds.items():
        path = ("datastores", dname)
        if not c.name(path, dname, "datastore"):
            continue
        if not isinstance(ddata, dict):
            c.problem(path, "must be a table", f"write [datastores.{dname}]")
            continue
        c.table(ddata, path, DATASTORE_KEYS, required=("path", "hosts"))
        dpath = c.get(ddata, path, "path", str, None, _abs_path, '"/var/lib/ferry/datastore"')
        dhosts = c.get(ddata, path, "hosts", list, None,
                       lambda v: None if v and all(isinstance(x, str) for x in v) else "must be a non-empty list of host names",
                       '["cna01"]')
        if dhosts:
            for h in dhosts:
                if h not in raw_hosts:
                    c.problem(path + ("hosts",), f"host {h!r} is not defined",
                              f"add [hosts.{h}] or use one of: {', '.join(raw_hosts) or 'none defined'}")
        if dpath and dhosts:
            datastores[dname] = DatastoreSpec(dname, dpath, tuple(dhosts))

    networks = _networks(c, data.get("networks", {}), raw_hosts)
    for hname, hdata in raw_hosts.items():
        for n in hdata.get("networks", []) if isinstance(hdata, dict) and isinstance(hdata.get("networks"), list) else []:
            if isinstance(n, str) and n != "default" and n not in networks and n not in data.get("networks", {}):
                c.problem(("hosts", hname, "networks"), f"network {n!r} is not defined",
                          f"add [networks.{n}] with bridge = \"br-{n}\", or use \"default\" (QEMU user mode)")
            elif n in networks and not networks[n].spans(hname):
                c.problem(("hosts", hname, "networks"), f"network {n!r} does not span host {hname!r}",
                          f"add {hname!r} to networks.{n}.hosts, or remove {n!r} here")
    lab = _lab_settings(c, data.get("lab", {}))
    schedules = _schedules(c, data)
    notify = _notify(c, data.get("notify", {}))
    from .ops.healthconfig import parse_health
    health = parse_health(c, data, raw_hosts, raw_clusters)
    from .ops.backupconfig import parse_backup
    backup = parse_backup(c, data)
    from .ops.metricsconfig import parse_metrics
    metrics = parse_metrics(c, data)

    if c.problems:
        raise ConfigError(c.problems)
    return SiteConfig(site_name, clusters, hosts, datastores, limits, production, theme, file, console,
                      networks, lab, timezone, schedules, notify, health, backup, metrics)


def _networks(c: _Checker, raw: Any, raw_hosts: dict) -> dict[str, NetworkSpec]:
    """[networks.NAME]: bridge mode (a Linux bridge per host, optional VLAN, MTU, uplinks) or user mode."""
    if not isinstance(raw, dict):
        c.problem(("networks",), "must be a table of networks", "write [networks.prod] with bridge = \"br-prod\"")
        return {}
    out: dict[str, NetworkSpec] = {}
    for name, data in raw.items():
        path = ("networks", name)
        if not c.name(path, name, "network"):
            continue
        if not isinstance(data, dict):
            c.problem(path, "must be a table", f"write [networks.{name}] with bridge = \"br-{name}\"")
            continue
        c.table(data, path, NETWORK_KEYS)
        mode = c.get(data, path, "mode", str, "bridge",
                     lambda v: None if v in ("bridge", "user") else f"must be \"bridge\" or \"user\", got {v!r}",
                     '"bridge"')
        bridge = c.get(data, path, "bridge", str, "",
                       lambda v: None if IFNAME_RE.match(v) else
                       f"is not a Linux interface name (1-15 letters, digits, '.', '_', '-'): {v!r}", '"br-prod"')
        create = c.get(data, path, "create", bool, True, example="true")
        vlan = c.get(data, path, "vlan", int, None,
                     lambda v: None if 1 <= v <= 4094 else f"must be a VLAN id from 1 to 4094, got {v}", "100")
        mtu = c.get(data, path, "mtu", int, None,
                    lambda v: None if 68 <= v <= 65535 else f"must be an MTU from 68 to 65535, got {v}", "1500")
        nhosts = c.get(data, path, "hosts", list, [],
                       lambda v: None if all(isinstance(x, str) for x in v) else "must be a list of host names",
                       '["cna01", "cna02"]')
        for h in nhosts:
            if h not in raw_hosts:
                c.problem(path + ("hosts",), f"host {h!r} is not defined",
                          f"add [hosts.{h}] or use one of: {', '.join(raw_hosts) or 'none defined'}")
        uplinks = c.get(data, path, "uplinks", dict, {}, example='{ cna01 = "eth1" }')
        for h, dev in uplinks.items():
            if h not in raw_hosts or (nhosts and h not in nhosts):
                c.problem(path + ("uplinks", h), f"host {h!r} is not a host of this network",
                          f"uplinks name hosts the network spans: {', '.join(nhosts or raw_hosts) or 'none'}")
            elif not isinstance(dev, str) or not IFNAME_RE.match(dev):
                c.problem(path + ("uplinks", h), f"is not a Linux interface name: {dev!r}", 'for example: "eth1"')
        if mode == "bridge" and "bridge" not in data:
            c.problem(path, "missing required key 'bridge' for mode \"bridge\"",
                      f"add: bridge = \"br-{name}\" (created on each host where absent), or mode = \"user\"")
        if mode == "user":
            for key in ("bridge", "vlan", "uplinks", "mtu"):
                if key in data:
                    c.problem(path + (key,), "not used with mode \"user\"", "remove it, or set mode = \"bridge\"")
        out[name] = NetworkSpec(name, mode or "bridge", bridge or "", create, vlan, mtu, tuple(nhosts),
                                {str(k): str(v) for k, v in uplinks.items()})
    return out


def _zone(v: str) -> str | None:
    from .ops.schedule import zone_problem
    return zone_problem(v)


def _schedules(c: _Checker, data: dict) -> dict[str, ScheduleSpec]:
    """[schedules.NAME]: `at` (a cron expression or an alias), `run`, `catch_up`."""
    out: dict[str, ScheduleSpec] = {}
    for name, table, path in c.entries(data, "schedules", "schedule"):
        c.table(table, path, SCHEDULE_KEYS, required=("at", "run"))
        at = c.get(table, path, "at", str, None, _nonempty, '"daily 02:00"')
        run = c.get(table, path, "run", str, None, _nonempty, '"backup"')
        catch_up = c.get(table, path, "catch_up", bool, True, example="false")
        cron = None
        if at is not None:
            from .ops.schedule import ScheduleError, parse_at
            try:
                cron = parse_at(at)
            except ScheduleError as e:
                c.problem(path + ("at",), e.message, e.hint)
        if cron and run:
            out[name] = ScheduleSpec(name, at.strip(), cron, run.strip(), catch_up)
    return out


def _notify(c: _Checker, data: Any) -> NotifySettings:
    if not isinstance(data, dict):
        c.problem(("notify",), "must be a table", 'write [notify] with command = ["/usr/local/bin/page-oncall"]')
        return NotifySettings()
    c.table(data, ("notify",), NOTIFY_KEYS)
    p = ("notify",)
    command = c.get(data, p, "command", list, [],
                    lambda v: None if v and all(isinstance(x, str) and x for x in v) else
                    "must be a non-empty list of strings: the program and its arguments",
                    '["/usr/local/bin/page-oncall", "--team", "ops"]')
    webhook = c.get(data, p, "webhook", str, None,
                    lambda v: None if re.match(r"^https?://[^\s/]+", v) else f"is not an http(s) URL: {v!r}",
                    '"https://hooks.example/ferry"')
    retries = c.get(data, p, "retries", int, 5, lambda v: None if 0 <= v <= 20 else f"must be 0 to 20, got {v}", "5")
    backoff = c.get(data, p, "backoff", (int, float), 2.0,
                    lambda v: None if 0 <= v <= 600 else f"must be 0 to 600 seconds, got {v}", "2")
    timeout = c.get(data, p, "timeout", (int, float), 30.0,
                    lambda v: None if 0 < v <= 600 else f"must be more than 0 and at most 600 seconds, got {v}", "30")
    return NotifySettings(tuple(command), webhook, retries, float(backoff), float(timeout))


def _lab_settings(c: _Checker, data: Any) -> LabSettings:
    if not isinstance(data, dict):
        c.problem(("lab",), "must be a table", 'write [lab] with subnet = "10.231.0.0/24"')
        return LabSettings()
    c.table(data, ("lab",), LAB_KEYS)

    def subnet(v: str) -> str | None:
        try:
            net = ipaddress.IPv4Network(v)
        except ValueError:
            return f"is not an IPv4 network such as 10.231.0.0/24: {v!r}"
        if not net.is_private:
            return f"{v} is not a private range: the lab keeps to addresses nobody else uses"
        if net.num_addresses < 32:
            return f"{v} is too small for a lab: use a /27 or larger"
        return None
    return LabSettings(subnet=c.get(data, ("lab",), "subnet", str, LabSettings.subnet, subnet, '"10.231.0.0/24"'),
                       network=c.get(data, ("lab",), "network", bool, False, example="true"))


def _console_settings(c: _Checker, data: Any) -> ConsoleSettings:
    """[console]: readonly, and [console.keys] (binding id -> keys; `tasks.cancel = "C"` nests, and is
    read back as the id "tasks.cancel"). Whether an id names a binding is the console's to say."""
    if not isinstance(data, dict):
        c.problem(("console",), "must be a table", "write [console] with readonly = true")
        return ConsoleSettings()
    c.table(data, ("console",), CONSOLE_KEYS)
    readonly = c.get(data, ("console",), "readonly", bool, False, example="true")
    raw = c.get(data, ("console",), "keys", dict, {}, example='{ "tasks.cancel" = "C" }')
    keys: dict[str, str] = {}

    def walk(table: dict, prefix: tuple[str, ...]) -> None:
        for name, value in table.items():
            path = prefix + (name,)
            if isinstance(value, dict):
                walk(value, path)
            elif isinstance(value, str) and value.strip():
                keys[".".join(path[2:])] = value.strip()
            else:
                c.problem(path, f"must be a key such as \"C\" or \"ctrl+d\", got {value!r}",
                          "name keys as Textual does: a letter, f5, delete, ctrl+x; several with commas")
    walk(raw, ("console", "keys"))
    return ConsoleSettings(readonly=readonly, keys=keys)


def load_config(path: Path, *, check_files: bool = True) -> SiteConfig:
    """Read and validate config.toml; raises ConfigError."""
    text, data = read_toml(path)
    return parse_config(data, file=str(path), text=text, check_files=check_files)


def read_toml(path: Path) -> tuple[str, dict]:
    """A TOML file's text and document; raises ConfigError (one line: unreadable, not UTF-8, or the
    first syntax error with its line)."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([ConfigProblem(file, None, "", f"cannot read: {e.strerror}",
                                         "check the path and its permissions")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([ConfigProblem(file, line, "", "is not valid UTF-8", "save the file as UTF-8")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        m2 = re.search(r"\(at end of document\)", msg)
        if m2:
            line = text.count("\n") + 1
            msg = msg.replace(" (at end of document)", "")
        raise ConfigError([ConfigProblem(file, line, "", f"TOML syntax error: {msg}",
                                         "see https://toml.io for the syntax; strings need quotes")]) from None
    return text, data


def dump_config(data: dict) -> str:
    return tomli_w.dumps(data)


# ---------------------------------------------------------------- the lab

LAB_HOSTS = (("lab1", "lab"), ("lab2", "lab"), ("lab3", "lab-b"))


def lab_document(root: Path, *, network: bool = False, subnet: str = LabSettings.subnet) -> dict:
    """The built-in lab site on this machine, as a config document (what `ferry init` writes).
    network=True: the network lab's (`ferry init --network-lab`): the same hosts, clusters and
    datastores, each host a network namespace reached over SSH at its own address in `subnet`, with
    the lab's throw-away key; the VM network `lab` on their bridge br-lab (the lab makes it)."""
    lab = root / "lab"
    doc: dict[str, Any] = {
        "site": {"name": "lab"},
        "clusters": {"lab": {"description": "lab cluster on this machine"},
                     "lab-b": {"description": "second lab cluster on this machine"}},
        "hosts": {},
        "datastores": {},
    }
    for name, cluster in LAB_HOSTS:
        doc["hosts"][name] = {"cluster": cluster, "transport": "local", "runtime": str(lab / name / "run"),
                              "accel": "auto", "networks": ["default"]}
        doc["datastores"][f"{name}-local"] = {"path": str(lab / name / "datastore"), "hosts": [name]}
    doc["datastores"]["shared"] = {"path": str(lab / "shared"), "hosts": [h for h, _ in LAB_HOSTS]}
    if network:
        from .platform.labops import lab_of
        netlab = lab_of(root, subnet)
        for name, _ in LAB_HOSTS:
            doc["hosts"][name].update(transport="ssh", address=netlab.address(name), user="root",
                                      identity=str(netlab.identity))
        doc["networks"] = {"lab": {"bridge": "br-lab", "create": False, "hosts": [h for h, _ in LAB_HOSTS]}}
        doc["lab"] = {"subnet": subnet, "network": True}
    return doc


def lab_config(root: Path) -> SiteConfig:
    """The built-in lab of a workspace without config.toml: the network lab where Ferry can make it
    (root: three network namespaces reached over SSH, in a subnet of the workspace's own), else the
    folder lab (labops.network_lab_default says why)."""
    from .platform.labops import network_lab_default, workspace_subnet
    network = network_lab_default(root) is None
    doc = lab_document(root, network=True, subnet=workspace_subnet(root)) if network else lab_document(root)
    # the network lab's throw-away key is made when the engine brings the lab up
    cfg = parse_config(doc, file="<built-in lab>", check_files=not network)
    return replace(cfg, source=None)
