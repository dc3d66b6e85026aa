"""Migration plan files (wave1.toml): read, check against the site, apply to the store.

A plan is one wave: [wave] name (required) and description, [defaults] merged under each migration
(a key a migration gives itself wins; in source, target and final key by key), and
[migrations.NAME] tables. Every problem is one line `FILE:LINE: key: problem (hint: ...)`, as
config.toml's are (config.Checker); a problem in [defaults] is reported once, at its own line.

Applying is one transaction of the store (two Ferry processes may apply at once): new migrations are
inserted as planned; a changed one still planned or assessed takes the new spec (an assessed one goes
back to planned: its assessment was of another spec); a changed one further along refuses the whole
plan, and nothing is applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config import Checker, ConfigProblem, SiteConfig, read_toml
from ..errors import ConfigError, PermanentError
from ..vm.model import parse_size
from .netcheck import NetThresholds
from .model import (CutoverSpec, FinalNetwork, Method, MigrationSpec, MigrationState, PlanApplied, PlanCheck, SourceSpec,
                    TargetSpec, SPEC_CHANGE)

if TYPE_CHECKING:
    from ..store import Store

TOP_KEYS = {"wave": '{ name = "wave1" }', "defaults": '{ target = { host = "lab1" } }',
            "migrations": "{ web01 = { ... } }"}
WAVE_KEYS = {"name": '"wave1"', "description": '"web tier"'}
MIGRATION_KEYS = {"method": '"auto"', "excludes": '["/tmp/*"]', "services": '["nginx"]', "sync_interval": '"6h"',
                  "relay": "false", "source": '{ address = "10.231.1.50" }',
                  "target": '{ host = "lab1", datastore = "shared", network = "lab" }',
                  "final": '{ address = "10.231.1.50/24", gateway = "10.231.1.1" }',
                  "thresholds": '{ max_latency_ms = 2, min_bandwidth_mbit = 100 }',
                  "cutover": '{ park_address = "10.231.1.99/24", confirm_within = "30m" }'}
SOURCE_KEYS = {"address": '"10.231.1.50"', "port": "22", "user": '"root"', "identity": '"/root/.ssh/id_ed25519"'}
TARGET_KEYS = {"host": '"lab1"', "datastore": '"shared"', "network": '"lab"', "cpus": "2", "memory": '"2G"',
               "disks": '["20G", "50G"]'}
FINAL_KEYS = {"address": '"10.231.1.50/24"', "gateway": '"10.231.1.1"', "dns": '["10.231.1.1"]'}
# The network check's bars (E3; the source notes' by default: no loss, < 2 ms, > 100 Mbit/s)
THRESHOLD_KEYS = {"max_loss_pct": "0", "max_latency_ms": "2", "max_jitter_ms": "1", "min_bandwidth_mbit": "100"}
# The cutover: where the source waits off its service address (Ferry's control path to it until go-live),
# how long its go-live timer gives Ferry to confirm, and the TCP ports the service check tries on the target.
CUTOVER_KEYS = {"park_address": '"10.231.1.99/24"', "confirm_within": '"30m"', "check_ports": "[22, 80]"}
SECTIONS = {"source": SOURCE_KEYS, "target": TARGET_KEYS, "final": FINAL_KEYS, "thresholds": THRESHOLD_KEYS,
            "cutover": CUTOVER_KEYS}

_INTERVAL_RE = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SERVICE_RE = re.compile(r"^[A-Za-z0-9@._:-]+$")
_DUPLICATE_RE = re.compile(r"Cannot declare \((.*)\) twice")


def parse_interval(value: str | int) -> int:
    """'30m', '6h', '1d', '1h30m', '0' (or a number of seconds) -> seconds; ValueError otherwise."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    text = value.strip().lower()
    if text == "0":
        return 0
    if not text or _INTERVAL_RE.sub("", text):
        raise ValueError(f"is not an interval: {value!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in _INTERVAL_RE.findall(text))


# ---------------------------------------------------------------------------- checks of one value

def _size(v: str | int) -> str | None:
    try:
        n = parse_size(v)
    except PermanentError:
        return f"is not a size: {v!r}"
    return None if n > 0 else f"must be more than 0, got {v!r}"


def _memory(v: str | int) -> str | None:
    bad = _size(v)
    if bad:
        return bad
    n = parse_size(v) if isinstance(v, str) else v << 20    # a plain number is MiB, as --memory takes it
    if n % (1 << 20):
        return f"is not a whole number of MiB: {v!r}"
    return None if 64 <= n >> 20 <= 1 << 20 else f"must be from 64M to 1T, got {v!r}"


def _disks(v: list) -> str | None:
    if not v:
        return "must list at least one size (or leave it out: the source's disks)"
    for x in v:
        if not isinstance(x, (str, int)) or isinstance(x, bool):
            return f"must be a list of sizes, got {x!r}"
        bad = _size(x)
        if bad:
            return bad
    return None


def _interval(v: str | int) -> str | None:
    try:
        parse_interval(v)
    except ValueError as e:
        return str(e)
    return None


def _method(v: str) -> str | None:
    return None if v in tuple(Method) else f"must be \"file\", \"block\" or \"auto\", got {v!r}"


def _strings(pattern: re.Pattern | None, what: str) -> Callable[[list], str | None]:
    def check(v: list) -> str | None:
        for x in v:
            if not isinstance(x, str) or not x.strip():
                return f"must be a list of {what}, got {x!r}"
            if pattern is not None and not pattern.match(x):
                return f"{x!r} is not {what[:-1] if what.endswith('s') else what}"
        return None
    return check


def _ip(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"is not an IP address: {v!r}"
    return None


def _interface(v: str) -> str | None:
    try:
        ipaddress.ip_interface(v)
    except ValueError:
        return f"is not an address with its prefix: {v!r}"
    return None if "/" in v else f"needs its prefix: {v!r}"


def _ips(v: list) -> str | None:
    for x in v:
        bad = _ip(x) if isinstance(x, str) else f"is not an IP address: {x!r}"
        if bad:
            return bad
    return None


def _confirm_within(v: str | int) -> str | None:
    bad = _interval(v)
    if bad:
        return bad
    n = parse_interval(v)
    return None if 60 <= n <= 86400 else f"must be from 1m to 1d, got {v!r}"


def _ports(v: list) -> str | None:
    for x in v:
        if not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= 65535:
            return f"must be a list of port numbers from 1 to 65535, got {x!r}"
    return None


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _not_negative(v: float) -> str | None:
    return "must be 0 or more" if v < 0 else None


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"must be a port number from 1 to 65535, got {v}"


def _cpus(v: int) -> str | None:
    return None if 1 <= v <= 64 else f"must be from 1 to 64, got {v}"


def _abs_path(v: str) -> str | None:
    return None if v.startswith(("/", "~")) else f"must be an absolute path, got {v!r}"


# ---------------------------------------------------------------------------- the plan

class _Plan:
    """The checks of one plan document, with [defaults] merged under each migration."""

    def __init__(self, c: Checker, data: dict, site: SiteConfig, check_files: bool) -> None:
        self.c, self.site, self.check_files = c, site, check_files
        self.defaults = data.get("defaults", {}) if isinstance(data.get("defaults", {}), dict) else {}

    def pick(self, mig: dict, mpath: tuple[str, ...], section: str | None, key: str) -> tuple[dict, tuple[str, ...]]:
        """The table a key of a migration is read from, and its path: the migration's own when it
        gives the key, else [defaults]' (when that gives it), else the migration's (absent)."""
        own = mig.get(section, {}) if section else mig
        if isinstance(own, dict) and key in own:
            return own, mpath + ((section,) if section else ())
        theirs = self.defaults.get(section, {}) if section else self.defaults
        if isinstance(theirs, dict) and key in theirs:
            return theirs, ("defaults",) + ((section,) if section else ())
        return (own if isinstance(own, dict) else {}), mpath + ((section,) if section else ())

    def get(self, mig: dict, mpath: tuple[str, ...], section: str | None, key: str, kind: Any, default: Any = None,
            check: Callable[[Any], str | None] | None = None) -> Any:
        table, path = self.pick(mig, mpath, section, key)
        example = (SECTIONS[section] if section else MIGRATION_KEYS)[key]
        return self.c.get(table, path, key, kind, default, check, example)

    def require(self, mig: dict, mpath: tuple[str, ...], section: str, key: str) -> bool:
        table, path = self.pick(mig, mpath, section, key)
        if key in table:
            return True
        self.c.problem(mpath + (section,), f"missing required key {key!r}",
                       f"add: {key} = {SECTIONS[section][key]}; or give it in [defaults]")
        return False

    def tables(self, data: dict, path: tuple[str, ...]) -> bool:
        """Unknown keys of a migration (or of [defaults]) and of its source/target/final tables."""
        self.c.table(data, path, MIGRATION_KEYS)
        ok = True
        for section, keys in SECTIONS.items():
            if section in data:
                if isinstance(data[section], dict):
                    self.c.table(data[section], path + (section,), keys)
                else:
                    self.c.problem(path + (section,), "must be a table", f"for example: {section} = {MIGRATION_KEYS[section]}")
                    ok = False
        return ok

    def migration(self, name: str, mig: dict) -> MigrationSpec | None:
        mpath = ("migrations", name)
        if not self.tables(mig, mpath):
            return None
        g = self.get
        before = len(self.c.problems)
        method = g(mig, mpath, None, "method", str, "auto", _method)
        excludes = g(mig, mpath, None, "excludes", list, [], _strings(None, "patterns"))
        services = g(mig, mpath, None, "services", list, [], _strings(_SERVICE_RE, "service names"))
        interval = g(mig, mpath, None, "sync_interval", (str, int), 0, _interval)
        relay = g(mig, mpath, None, "relay", bool, False)

        has_address = self.require(mig, mpath, "source", "address")
        address = g(mig, mpath, "source", "address", str, None, _nonempty)
        port = g(mig, mpath, "source", "port", int, 22, _port)
        user = g(mig, mpath, "source", "user", str, "root", _nonempty)
        identity = g(mig, mpath, "source", "identity", str, None, _abs_path)
        if identity and self.check_files and not Path(identity).expanduser().is_file():
            _, path = self.pick(mig, mpath, "source", "identity")
            self.c.problem(path + ("identity",), f"key file {identity} does not exist",
                           "point it at a private key file on the engine's machine, or remove it to use "
                           "ssh-agent and ~/.ssh/config")

        has_host = self.require(mig, mpath, "target", "host")
        has_ds = self.require(mig, mpath, "target", "datastore")
        host = g(mig, mpath, "target", "host", str, None)
        datastore = g(mig, mpath, "target", "datastore", str, None)
        network = g(mig, mpath, "target", "network", str, None)
        cpus = g(mig, mpath, "target", "cpus", int, None, _cpus)
        memory = g(mig, mpath, "target", "memory", (str, int), None, _memory)
        disks = g(mig, mpath, "target", "disks", list, [], _disks)
        network = self.placement(mig, mpath, host, datastore, network)

        final_address = g(mig, mpath, "final", "address", str, None, _interface)
        gateway = g(mig, mpath, "final", "gateway", str, None, _ip)
        dns = g(mig, mpath, "final", "dns", list, [], _ips)
        if final_address and gateway and ipaddress.ip_address(gateway) not in ipaddress.ip_interface(final_address).network:
            _, path = self.pick(mig, mpath, "final", "gateway")
            self.c.problem(path + ("gateway",), f"{gateway} is not in {ipaddress.ip_interface(final_address).network}",
                           "a gateway the target reaches on its own network")

        park = g(mig, mpath, "cutover", "park_address", str, None, _interface)
        confirm = g(mig, mpath, "cutover", "confirm_within", (str, int), "30m", _confirm_within)
        ports = g(mig, mpath, "cutover", "check_ports", list, None, _ports)

        limits = {k: g(mig, mpath, "thresholds", k, (int, float), None, _not_negative) for k in THRESHOLD_KEYS}
        thresholds = NetThresholds(**{k: float(v) for k, v in limits.items() if v is not None})

        if len(self.c.problems) > before or not (has_address and has_host and has_ds) or not network:
            return None
        return MigrationSpec(
            source=SourceSpec(address, port, user, identity),
            target=TargetSpec(host, datastore, network, cpus,
                              None if memory is None else (memory if isinstance(memory, int) else parse_size(memory) >> 20),
                              tuple(parse_size(d) for d in disks)),
            method=Method(method), excludes=tuple(excludes), services=tuple(services),
            sync_interval_s=parse_interval(interval), relay=relay,
            final=FinalNetwork(final_address, gateway, tuple(dns)), thresholds=thresholds,
            cutover=CutoverSpec(park, parse_interval(confirm), None if ports is None else tuple(ports)))

    def placement(self, mig: dict, mpath: tuple[str, ...], host: str | None, datastore: str | None,
                  network: str | None) -> str | None:
        """The target's host, datastore and network against the site; the network it joins (the
        host's first when the plan names none), None when something is wrong."""
        site, c = self.site, self.c
        if host is None:
            return None
        if host not in site.hosts:
            _, path = self.pick(mig, mpath, "target", "host")
            c.problem(path + ("host",), f"host {host!r} is not a host of this site",
                      f"hosts in {site.source or 'the built-in lab'}: {', '.join(site.hosts) or 'none'}")
            return None
        ok = True
        if datastore is not None and host not in getattr(site.datastores.get(datastore), "hosts", ()):
            _, path = self.pick(mig, mpath, "target", "datastore")
            known = ", ".join(d.name for d in site.datastores_of(host)) or "none"
            what = "is not a datastore of this site" if datastore not in site.datastores else f"is not on host {host!r}"
            c.problem(path + ("datastore",), f"datastore {datastore!r} {what}", f"datastores of {host}: {known}")
            ok = False
        networks = site.networks_of(host)
        if network is None:
            network = networks[0] if networks else None
        elif network not in networks:
            _, path = self.pick(mig, mpath, "target", "network")
            what = ("is not a network of this site" if network != "default" and network not in site.networks
                    else f"does not reach host {host!r}")
            c.problem(path + ("network",), f"network {network!r} {what}",
                      f"networks of {host}: {', '.join(networks) or 'none'}")
            return None
        return network if ok else None


def check_plan(path: Path, site: SiteConfig, *, taken: dict[str, str] | None = None,
               check_files: bool = True) -> tuple[PlanCheck, dict[str, MigrationSpec]]:
    """Read and check a plan file against the site: (what was found, with every problem; the specs by
    name, empty when there is any problem). `taken`: the wave of each migration in the store."""
    file = str(path)
    try:
        text, data = read_toml(path)
    except ConfigError as e:
        return PlanCheck(file, None, (), tuple(_duplicate(p) for p in e.problems)), {}
    c = Checker(file, text)
    c.table(data, (), TOP_KEYS, required=("wave", "migrations"))
    wave = data.get("wave", {})
    if not isinstance(wave, dict):
        c.problem(("wave",), "must be a table", 'write [wave] with name = "wave1"')
        wave = {}
    c.table(wave, ("wave",), WAVE_KEYS, required=("name",) if "wave" in data else ())
    wave_name = c.get(wave, ("wave",), "name", str, None, example='"wave1"')
    if wave_name is not None and not c.name(("wave", "name"), wave_name, "wave"):
        wave_name = None
    c.get(wave, ("wave",), "description", str, "", example='"web tier"')

    plan = _Plan(c, data, site, check_files)
    if not isinstance(data.get("defaults", {}), dict):
        c.problem(("defaults",), "must be a table", 'write [defaults] with target = { host = "lab1" }')
    else:
        plan.tables(data.get("defaults", {}), ("defaults",))
    if "migrations" in data and data["migrations"] == {}:
        c.problem(("migrations",), "has no migration", "add [migrations.web01] with source.address")
    specs: dict[str, MigrationSpec] = {}
    names: list[str] = []
    for name, mig, mpath in c.entries(data, "migrations", "migration"):
        names.append(name)
        other = (taken or {}).get(name)
        if other is not None and other != wave_name:
            c.problem(mpath, f"the name {name!r} is used by a migration of wave {other!r}",
                      "choose another name (ferry migration list shows the names in use)")
        spec = plan.migration(name, mig)
        if spec is not None:
            specs[name] = spec
    # by line; a problem of [defaults] once, not once per migration that takes the key from there
    problems = tuple(sorted(dict.fromkeys(c.problems), key=lambda p: p.line or 0))
    return PlanCheck(file, wave_name, tuple(names), problems), ({} if problems else specs)


def _duplicate(p: ConfigProblem) -> ConfigProblem:
    """TOML's "Cannot declare ('migrations', 'web01') twice" said as a name used twice."""
    m = _DUPLICATE_RE.search(p.message)
    if not m:
        return p
    key = ".".join(part.strip().strip("'\"") for part in m.group(1).split(","))
    what = "migration name" if key.startswith("migrations.") and key.count(".") == 1 else "table"
    return ConfigProblem(p.file, p.line, key, f"{what} used twice",
                         "each migration needs a name of its own: rename or merge one of them")


async def check(store: Store, path: Path, site: SiteConfig) -> PlanCheck:
    """The plan file checked against the site and the migrations in the store."""
    taken = await store.call(store.migration_waves)
    return (await asyncio.to_thread(check_plan, path, site, taken=taken))[0]


async def apply(store: Store, path: Path, site: SiteConfig, *, dry_run: bool = False,
                actor: str | None = None) -> PlanApplied:
    """Check the plan (ConfigError with every problem) and apply it to the store in one transaction
    (Refused, and nothing applied, when it changes a migration past assessed or of another wave)."""
    taken = await store.call(store.migration_waves)
    found, specs = await asyncio.to_thread(check_plan, path, site, taken=taken)
    if found.problems:
        raise ConfigError(list(found.problems))
    assert found.wave is not None
    from .. import api
    out = await store.call(store.migration_apply, found.wave, {n: api.to_builtins(s) for n, s in specs.items()},
                           spec_change={str(k): str(v) for k, v in SPEC_CHANGE.items()},
                           planned=str(MigrationState.PLANNED), file=found.file, dry_run=dry_run, actor=actor)
    return PlanApplied(found.file, found.wave, tuple(out["created"]), tuple(out["updated"]),
                       tuple(out["unchanged"]), dry_run)
