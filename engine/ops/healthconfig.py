"""config.toml's health checks: [health] (attempts, intervals, severities, thresholds), [[checks]] (Nagios
plugins run on hosts) and [checklists.NAME] (what a checklist runs; the monthly one's advisories).

    [health]
    max_attempts = 3            # a problem is re-checked this often (SOFT) before it is HARD and raises an alarm
    retry_interval = 60         # seconds between those re-checks (shorter than the rounds of the schedules)
    timeout = 10                # seconds for one host's round trip
    parallel = 32               # hosts checked at once
    disabled = ["smart"]        # built-in checks not run
    severity = { critical = "critical", warning = "warning", unknown = "minor" }
    thresholds.datastore = { warning = "80", critical = "90" }     # Nagios ranges

    [[checks]]
    name = "root-disk"
    command = ["/usr/lib/nagios/plugins/check_disk", "-w", "20%", "-c", "10%", "-p", "/"]
    hosts = ["cna01"]           # or cluster = "prod"; neither: every host

    [checklists.monthly]
    advisories = ["QEMU 8.2.2: CVE-2024-26327, upgrade qemu-system-x86"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .nagios import Range, RangeError

SEVERITIES = ("critical", "major", "minor", "warning")

# Built-in checks (the check's name as `ferry health list` shows it, before any ":NAME"), their group,
# and the measure their thresholds judge.
BUILTIN = {
    "ssh": ("platform", "round trip of the check script over the host's transport, in seconds"),
    "load": ("platform", "5-minute load average per CPU core"),
    "memory": ("platform", "memory available, in % of the total"),
    "datastore": ("platform", "datastore space used, in %"),
    "systemd": ("platform", "failed systemd units"),
    "time": ("platform", "clock offset from this machine's, in seconds (absolute)"),
    "qemu": ("platform", "QEMU installed, and its version"),
    "vm-state": ("platform", "a VM's state as recorded vs its QEMU process"),
    "vm-io": ("platform", "a running VM paused on an I/O error (QMP query-status)"),
    "vm-agent": ("platform", "a running VM's guest agent answers"),
    "tasks": ("platform", "failed tasks (the last day) and stuck ones"),
    "backup": ("platform", "the newest management-data backup of each backup schedule is as recent as its last run"),
    "raid": ("devices", "software RAID (/proc/mdstat) degraded"),
    "smart": ("devices", "SMART health of the disks (smartctl)"),
    "temperature": ("environment", "temperatures (/sys/class/thermal, lm-sensors), in °C"),
    "alarms": ("alarms", "open alarms nobody acknowledged"),
    "advisory": ("advisories", "each advisory of the checklist, until acknowledged"),
}
GROUPS = ("platform", "devices", "environment", "alarms", "advisories")
DEFAULT_CHECKLISTS = {"daily": ("alarms", "platform", "devices"), "weekly": ("environment",),
                      "monthly": ("advisories",)}
DEFAULT_THRESHOLDS = {
    "ssh": ("1", "5"), "load": ("2", "4"), "memory": ("10:", "5:"), "datastore": ("80", "90"),
    "systemd": ("0", ""), "time": ("1", "5"), "temperature": ("75", "90"),
}
HEALTH_KEYS = {"max_attempts": "3", "retry_interval": "60", "timeout": "10", "parallel": "32",
               "disabled": '["smart"]', "severity": '{ critical = "critical", warning = "warning", unknown = "minor" }',
               "thresholds": '{ datastore = { warning = "80", critical = "90" } }', "stuck_after": "3600",
               "failed_window": "86400"}
CHECK_KEYS = {"name": '"root-disk"', "command": '["/usr/lib/nagios/plugins/check_disk", "-w", "20%", "-c", "10%"]',
              "hosts": '["cna01"]', "cluster": '"prod"', "max_attempts": "3", "timeout": "30",
              "severity": '{ critical = "major" }', "alarm": '"disk.space"'}
CHECKLIST_KEYS = {"checks": '["alarms", "platform", "devices"]', "advisories": '["QEMU: CVE-2024-26327, upgrade"]'}
THRESHOLD_KEYS = {"warning": '"80"', "critical": '"90"'}


@dataclass(frozen=True)
class Thresholds:
    warning: Range | None
    critical: Range | None


@dataclass(frozen=True)
class PluginCheck:
    """One [[checks]] entry: a Nagios plugin run on hosts over their transport."""
    name: str
    command: tuple[str, ...]
    hosts: tuple[str, ...] = ()        # empty and no cluster: every host
    cluster: str | None = None
    max_attempts: int | None = None
    timeout: float = 30.0
    severity: dict[str, str] = field(default_factory=dict)
    alarm: str | None = None           # the alarm type (default health.NAME)

    def runs_on(self, host: str, cluster: str) -> bool:
        if self.hosts:
            return host in self.hosts
        return self.cluster is None or self.cluster == cluster


@dataclass(frozen=True)
class Checklist:
    name: str
    checks: tuple[str, ...]            # groups (platform, devices, ...) and check names
    advisories: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSettings:
    max_attempts: int = 3
    retry_interval: float = 60.0
    timeout: float = 10.0
    parallel: int = 32
    disabled: tuple[str, ...] = ()
    severity: dict[str, str] = field(default_factory=lambda: {"critical": "critical", "warning": "warning",
                                                               "unknown": "minor"})
    thresholds: dict[str, Thresholds] = field(default_factory=dict)
    stuck_after: float = 3600.0
    failed_window: float = 86400.0
    checks: tuple[PluginCheck, ...] = ()
    checklists: dict[str, Checklist] = field(default_factory=dict)

    def threshold(self, check: str) -> Thresholds:
        if check in self.thresholds:
            return self.thresholds[check]
        w, c = DEFAULT_THRESHOLDS.get(check, ("", ""))
        return Thresholds(Range.parse(w) if w else None, Range.parse(c) if c else None)

    def checklist(self, name: str) -> Checklist | None:
        if name in self.checklists:
            return self.checklists[name]
        if name in DEFAULT_CHECKLISTS:
            return Checklist(name, DEFAULT_CHECKLISTS[name])
        return None

    def checklist_names(self) -> list[str]:
        return sorted({*DEFAULT_CHECKLISTS, *self.checklists})

    def plugin(self, name: str) -> PluginCheck | None:
        return next((p for p in self.checks if p.name == name), None)


def _severity_table(c: Any, path: tuple[str, ...], raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        c.problem(path, "must be a table of state = severity", 'for example: { unknown = "warning" }')
        return {}
    out = {}
    for state, sev in raw.items():
        if state not in ("critical", "warning", "unknown"):
            c.problem(path + (state,), "unknown state", "the states that raise alarms: critical, warning, unknown")
        elif sev not in SEVERITIES:
            c.problem(path + (state,), f"unknown severity {sev!r}", "one of: " + ", ".join(SEVERITIES))
        else:
            out[state] = sev
    return out


def _range(c: Any, path: tuple[str, ...], value: Any) -> Range | None:
    if value == "" or value is None:
        return None
    try:
        return Range.parse(value)
    except RangeError as e:
        c.problem(path, str(e), "a Nagios range: 10 (above 10), 10: (below 10), ~:10, 10:20 (outside), @10:20 (inside)")
        return None


def parse_health(c: Any, data: dict, hosts: dict, clusters: dict) -> HealthSettings:
    """[health], [[checks]] and [checklists.NAME] of config.toml (problems reported to the Checker `c`)."""
    raw = data.get("health", {})
    p = ("health",)
    if not isinstance(raw, dict):
        c.problem(p, "must be a table", "write [health] with max_attempts = 3")
        raw = {}
    c.table(raw, p, HEALTH_KEYS)
    d = HealthSettings()

    def positive(v: float) -> str | None:
        return None if v > 0 else f"must be more than 0, got {v}"
    max_attempts = c.get(raw, p, "max_attempts", int, d.max_attempts,
                         lambda v: None if 1 <= v <= 20 else f"must be 1 to 20, got {v}", "3")
    retry = c.get(raw, p, "retry_interval", (int, float), d.retry_interval, positive, "60")
    timeout = c.get(raw, p, "timeout", (int, float), d.timeout, positive, "10")
    parallel = c.get(raw, p, "parallel", int, d.parallel, lambda v: None if 1 <= v <= 1024 else
                     f"must be 1 to 1024, got {v}", "32")
    stuck = c.get(raw, p, "stuck_after", (int, float), d.stuck_after, positive, "3600")
    window = c.get(raw, p, "failed_window", (int, float), d.failed_window, positive, "86400")
    disabled = c.get(raw, p, "disabled", list, [], lambda v: None if all(isinstance(x, str) for x in v)
                     else "must be a list of check names", '["smart"]')
    for name in disabled:
        if name not in BUILTIN:
            c.problem(p + ("disabled",), f"no built-in check {name!r}", "built-in checks: " + ", ".join(BUILTIN))
    severity = dict(d.severity)
    if "severity" in raw:
        severity.update(_severity_table(c, p + ("severity",), raw["severity"]))
    thresholds: dict[str, Thresholds] = {}
    raw_t = raw.get("thresholds", {})
    if not isinstance(raw_t, dict):
        c.problem(p + ("thresholds",), "must be a table of check = { warning, critical }",
                  'for example: thresholds.datastore = { warning = "80", critical = "90" }')
        raw_t = {}
    for check, t in raw_t.items():
        tp = p + ("thresholds", check)
        if check not in DEFAULT_THRESHOLDS:
            c.problem(tp, "this check takes no thresholds", "checks with thresholds: " + ", ".join(DEFAULT_THRESHOLDS))
            continue
        if not isinstance(t, dict):
            c.problem(tp, "must be a table", f'for example: thresholds.{check} = {{ warning = "80", critical = "90" }}')
            continue
        c.table(t, tp, THRESHOLD_KEYS)
        w0, c0 = DEFAULT_THRESHOLDS[check]
        w = _range(c, tp + ("warning",), t.get("warning", w0))
        cr = _range(c, tp + ("critical",), t.get("critical", c0))
        thresholds[check] = Thresholds(w, cr)

    checks = _plugin_checks(c, data.get("checks", []), hosts, clusters)
    checklists = _checklists(c, data, {x.name for x in checks})
    return HealthSettings(max_attempts, float(retry), float(timeout), parallel, tuple(disabled), severity,
                          thresholds, float(stuck), float(window), tuple(checks), checklists)


def _plugin_checks(c: Any, raw: Any, hosts: dict, clusters: dict) -> list[PluginCheck]:
    if not isinstance(raw, list):
        c.problem(("checks",), "must be a list of tables", 'write [[checks]] with name and command')
        return []
    out: list[PluginCheck] = []
    for i, t in enumerate(raw):
        path = ("checks", str(i))
        if not isinstance(t, dict):
            c.problem(("checks",), "each [[checks]] entry must be a table", 'write [[checks]] with name and command')
            continue
        c.table(t, path, CHECK_KEYS, required=("name", "command"))
        name = c.get(t, path, "name", str, None, None, '"root-disk"')
        if name is not None and (not c.name(path + ("name",), name, "check") or name.split(":")[0] in BUILTIN):
            if name.split(":")[0] in BUILTIN:
                c.problem(path + ("name",), f"{name!r} is the name of a built-in check", "name it otherwise")
            name = None
        if name is not None and any(x.name == name for x in out):
            c.problem(path + ("name",), f"a second check named {name!r}", "each [[checks]] needs a name of its own")
            name = None
        command = c.get(t, path, "command", list, None,
                        lambda v: None if v and all(isinstance(x, str) and x for x in v) else
                        "must be a non-empty list of strings: the plugin and its arguments", CHECK_KEYS["command"])
        chosts = c.get(t, path, "hosts", list, [], lambda v: None if all(isinstance(x, str) for x in v) else
                       "must be a list of host names", '["cna01"]')
        for h in chosts:
            if h not in hosts:
                c.problem(path + ("hosts",), f"host {h!r} is not defined",
                          f"add [hosts.{h}] or use one of: {', '.join(hosts) or 'none defined'}")
        cluster = c.get(t, path, "cluster", str, None, None, '"prod"')
        if cluster is not None and cluster not in clusters:
            c.problem(path + ("cluster",), f"cluster {cluster!r} is not defined",
                      f"one of: {', '.join(clusters) or 'none defined'}")
        if chosts and cluster is not None:
            c.problem(path, "hosts and cluster both given", "name the hosts, or the cluster, not both")
        attempts = c.get(t, path, "max_attempts", int, None, lambda v: None if 1 <= v <= 20 else
                         f"must be 1 to 20, got {v}", "3")
        timeout = c.get(t, path, "timeout", (int, float), 30.0, lambda v: None if 0 < v <= 3600 else
                        f"must be more than 0 and at most 3600 seconds, got {v}", "30")
        severity = _severity_table(c, path + ("severity",), t["severity"]) if "severity" in t else {}
        alarm = c.get(t, path, "alarm", str, None, lambda v: None if v.strip() else "must not be empty",
                      '"disk.space"')
        if name and command:
            out.append(PluginCheck(name, tuple(command), tuple(chosts), cluster, attempts, float(timeout),
                                   severity, alarm))
    return out


def _checklists(c: Any, data: dict, plugins: set[str]) -> dict[str, Checklist]:
    out: dict[str, Checklist] = {}
    for name, t, path in c.entries(data, "checklists", "checklist"):
        c.table(t, path, CHECKLIST_KEYS)
        checks = c.get(t, path, "checks", list, list(DEFAULT_CHECKLISTS.get(name, ("platform",))),
                       lambda v: None if all(isinstance(x, str) for x in v) else "must be a list of names",
                       CHECKLIST_KEYS["checks"])
        for x in checks:
            if x not in GROUPS and x not in BUILTIN and x not in plugins:
                c.problem(path + ("checks",), f"no check or group {x!r}",
                          "groups: " + ", ".join(GROUPS) + "; or a built-in check, or a [[checks]] name")
        advisories = c.get(t, path, "advisories", list, [],
                           lambda v: None if all(isinstance(x, str) and x.strip() for x in v) else
                           "must be a list of texts", CHECKLIST_KEYS["advisories"])
        if advisories and "advisories" not in checks and "advisory" not in checks:
            checks = [*checks, "advisories"]
        out[name] = Checklist(name, tuple(checks), tuple(a.strip() for a in advisories))
    return out
