"""The built-in host checks: one POSIX sh script per host per round (engine/ship.Program) gathers what
they all need, plugins of [[checks]] included, and each check is a small function of its sections
that returns a CheckResult. A check whose tool or file is not there is UNKNOWN and says so.

Sections of the script's output start with "<token> NAME" on a line of its own; the token is random
per run, so nothing a plugin or a host prints can start or end a section.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..ship import Program
from .healthconfig import PluginCheck, Thresholds
from .nagios import CheckResult, CheckState, PerfDatum, judge, parse_output, unknown

HOST_SCRIPT = Program("ferry-health", lang="sh", source=r"""
export LC_ALL=C
T=$1 G=$2 R=$3; shift 3
s() { printf '\n%s %s\n' "$T" "$1"; }
s cpus; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null
s loadavg; cat /proc/loadavg 2>/dev/null
s meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo 2>/dev/null
case ",$G," in *,platform,*)
  s qemu; qemu-system-x86_64 --version 2>/dev/null | head -n 1
  s systemd
  if [ -d /run/systemd/system ]; then systemctl list-units --state=failed --no-legend --plain 2>&1; echo "$T rc $?"
  else echo "$T none"; fi
  s chrony; command -v chronyc >/dev/null 2>&1 && chronyc -c tracking 2>/dev/null
  s ntpsync; [ -d /run/systemd/system ] && timedatectl show -p NTPSynchronized --value 2>/dev/null
  s vms
  for f in "$R"/vm-*.pid; do
    [ -e "$f" ] || continue
    p=; read -r p <"$f" 2>/dev/null
    [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$f" &&
      echo "${f##*/} $p"
  done;;
esac
case ",$G," in *,devices,*)
  s mdstat; if [ -r /proc/mdstat ]; then cat /proc/mdstat; else echo "$T none"; fi
  s smart
  if command -v smartctl >/dev/null 2>&1; then
    smartctl --scan 2>&1 | while read -r d x t rest; do
      case "$d" in /dev/*) ;; *) continue;; esac
      o=$(smartctl -H -d "$t" "$d" 2>&1); rc=$?
      printf 'dev %s %s %s\n' "$d" "$rc" "$(printf '%s\n' "$o" | grep -iE 'self-assessment|health status|unable|permission' | head -n 1)"
    done
  else echo "$T none"; fi;;
esac
case ",$G," in *,environment,*)
  s thermal
  for z in /sys/class/thermal/thermal_zone*; do
    [ -r "$z/temp" ] || continue
    t=; y=?; read -r t <"$z/temp" 2>/dev/null; read -r y <"$z/type" 2>/dev/null
    [ -n "$t" ] && echo "$y $t"
  done
  s sensors; if command -v sensors >/dev/null 2>&1; then sensors -u 2>/dev/null; else echo "$T none"; fi;;
esac
n=$1; shift
while [ "$n" -gt 0 ]; do
  s "ds $1"; if [ -d "$2" ]; then df -P -B1 -- "$2" 2>&1 | tail -n 1; else echo "$T missing"; fi
  shift 2; n=$((n - 1))
done
e=${TMPDIR:-/tmp}/ferry-health.$$
while [ "$#" -ge 3 ]; do
  s "plugin $1"
  if command -v timeout >/dev/null 2>&1; then timeout "$2" sh -c "$3" 2>"$e" </dev/null
  else sh -c "$3" 2>"$e" </dev/null; fi
  rc=$?
  s "plugin-rc $1"; echo "$rc"
  s "plugin-err $1"; head -c 2000 "$e" 2>/dev/null
  shift 3
done
rm -f "$e"
s time; date +%s.%N
s end
""")

_DF_RE = re.compile(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s+\S.*$")


def script_args(token: str, groups: list[str], runtime: str, datastores: list[tuple[str, str]],
                plugins: list[PluginCheck]) -> list[str]:
    """The script's arguments: token, groups, runtime folder, datastores (count, name path...), then
    each plugin as name, timeout, its command quoted for sh."""
    args = [token, ",".join(groups), runtime, str(len(datastores))]
    for name, path in datastores:
        args += [name, path]
    for p in plugins:
        args += [p.name, f"{p.timeout:g}", shlex.join(p.command)]
    return args


@dataclass
class HostOutput:
    """What the script printed on one host, by section, and when it ran (this machine's clock)."""
    sections: dict[str, list[str]]
    token: str
    t0: float
    t1: float
    rtt: float
    complete: bool = True
    notes: list[str] = field(default_factory=list)

    def lines(self, name: str) -> list[str] | None:
        return self.sections.get(name)

    def none(self, name: str) -> bool:
        """The section says the thing is not there (the script printed "<token> none")."""
        return self.sections.get(name) == [f"{self.token} none"]


def split_sections(text: str, token: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    mark = token + " "
    for line in text.splitlines():
        if line.startswith(mark) and line[len(mark):] not in ("none", "missing") and not line[len(mark):].startswith("rc "):
            current = out.setdefault(line[len(mark):], [])
        elif current is not None:
            current.append(line)
    for lines in out.values():
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
    return out


def _first(out: HostOutput, name: str) -> str | None:
    lines = out.lines(name)
    return lines[0].strip() if lines else None


def _pct(v: float) -> str:
    return f"{v:.1f}%"


# ------------------------------------------------------------------------------ the checks

def check_ssh(rtt: float, th: Thresholds, connect_s: float = 0.0) -> CheckResult:
    """The round trip of the check script on the host's connection (judged), and the time it took to
    connect when the connection was new (said, not judged: a round that connects to many hosts at once
    pays for the key exchanges)."""
    state = judge(rtt, th.warning, th.critical)
    new = connect_s >= 0.001
    return CheckResult(state, f"reachable, round trip {rtt * 1000:.0f} ms"
                       + (f" (connected in {connect_s * 1000:.0f} ms)" if new else ""),
                       perfdata=(PerfDatum("rtt", round(rtt, 4), "s", str(th.warning or ""), str(th.critical or ""), 0),
                                 PerfDatum("connect", round(connect_s, 4), "s", "", "", 0)),
                       alarm_type="health.ssh")


def cpus_of(out: HostOutput) -> int | None:
    c = _first(out, "cpus")
    return int(c) if c and c.isdigit() and int(c) > 0 else None


def check_load(out: HostOutput, th: Thresholds) -> CheckResult:
    cpus, load = cpus_of(out), (_first(out, "loadavg") or "").split()
    try:
        l1, l5, l15 = (float(x) for x in load[:3])
    except ValueError:
        return unknown("could not read /proc/loadavg" if not load else f"/proc/loadavg is garbled: {' '.join(load)}")
    if not cpus:
        return unknown("could not count the CPUs (nproc, getconf _NPROCESSORS_ONLN)")
    per = l5 / cpus
    state = judge(per, th.warning, th.critical)
    perf = (PerfDatum("load1", l1, "", "", "", 0), PerfDatum("load5", l5, "", "", "", 0),
            PerfDatum("load15", l15, "", "", "", 0),
            PerfDatum("load5_per_core", round(per, 3), "", str(th.warning or ""), str(th.critical or ""), 0))
    return CheckResult(state, f"load {l1:.2f} {l5:.2f} {l15:.2f} on {cpus} cores: {per:.2f} per core (5 min)",
                       perfdata=perf)


def check_memory(out: HostOutput, th: Thresholds) -> CheckResult:
    mem: dict[str, int] = {}
    for line in out.lines("meminfo") or []:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            mem[key] = int(parts[0]) * 1024
    if "MemTotal" not in mem or "MemAvailable" not in mem or not mem["MemTotal"]:
        return unknown("could not read MemTotal and MemAvailable from /proc/meminfo (a kernel before 3.14?)")
    pct = 100.0 * mem["MemAvailable"] / mem["MemTotal"]
    state = judge(pct, th.warning, th.critical)
    gib = 1 << 30
    return CheckResult(state, f"{mem['MemAvailable'] / gib:.1f} GiB of {mem['MemTotal'] / gib:.1f} GiB available "
                       f"({_pct(pct)})",
                       perfdata=(PerfDatum("available", round(pct, 2), "%", str(th.warning or ""),
                                           str(th.critical or ""), 0, 100),
                                 PerfDatum("available_bytes", mem["MemAvailable"], "B", "", "", 0, mem["MemTotal"])))


def check_datastore(out: HostOutput, host: str, name: str, path: str, th: Thresholds) -> CheckResult:
    """Present (the path exists on the host) and its space used against the thresholds."""
    lines = out.lines(f"ds {name}")
    if lines is None and f"ds {name}" not in out.sections:
        return unknown(f"no answer for datastore {name} from {host}")
    if lines == [f"{out.token} missing"] or (lines and lines[-1] == f"{out.token} missing"):
        return CheckResult(CheckState.CRITICAL, f"datastore {name}: {path} does not exist on {host}",
                           "create or mount it, or fix datastores." + name + ".path in config.toml",
                           alarm_type="datastore.missing")
    m = _DF_RE.search(lines[-1]) if lines else None
    if m is None:
        return unknown(f"datastore {name}: df said " + (lines[-1].strip() if lines else "nothing"))
    total, used, avail = (int(m.group(i)) for i in (1, 2, 3))
    pct = 100.0 * used / (used + avail) if used + avail else 0.0
    state = judge(pct, th.warning, th.critical)
    gib = 1 << 30
    return CheckResult(state, f"datastore {name}: {_pct(pct)} used, {avail / gib:.2f} GiB free of "
                       f"{total / gib:.2f} GiB ({path})",
                       perfdata=(PerfDatum(f"{name}_used", round(pct, 2), "%", str(th.warning or ""),
                                           str(th.critical or ""), 0, 100),
                                 PerfDatum(name, used, "B", "", "", 0, total)),
                       alarm_type="datastore.full")


def check_systemd(out: HostOutput, th: Thresholds) -> CheckResult:
    if out.none("systemd"):
        return unknown("systemd does not run on this host (no /run/systemd/system): no units to check")
    lines = out.lines("systemd") or []
    rc = next((ln.split()[-1] for ln in lines if ln.startswith(f"{out.token} rc ")), "0")
    units = [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith(out.token)]
    if rc not in ("0", "1") and not units:
        return unknown(f"systemctl failed (exit status {rc})", "\n".join(lines))
    state = judge(len(units), th.warning, th.critical)
    summary = (f"{len(units)} failed unit{'s' if len(units) != 1 else ''}: " + ", ".join(units[:8])
               + (" ..." if len(units) > 8 else "")) if units else "no failed units"
    return CheckResult(state, summary, "\n".join(units),
                       perfdata=(PerfDatum("failed", len(units), "", str(th.warning or ""), str(th.critical or ""), 0),))


def check_time(out: HostOutput, th: Thresholds) -> CheckResult:
    """The host's clock against this machine's (the script's last `date` against the moment its answer
    arrived here: good to the answer's one-way trip), and what chrony or timedatectl say where they run."""
    raw = _first(out, "time") or ""
    try:
        remote = float(raw)
    except ValueError:
        return unknown(f"could not read the host's clock (date +%s.%N said {raw!r})")
    offset = remote - out.t1
    notes = [f"offset from this machine's clock {offset:+.3f} s (the host's clock read at the end of the script, "
             f"this machine's when its answer came; round trip {out.rtt:.3f} s)"]
    state = judge(abs(offset), th.warning, th.critical)
    summary = f"clock offset {offset:+.3f} s from this machine"
    chrony = _first(out, "chrony")
    if chrony and chrony.count(",") >= 5:
        fields = chrony.split(",")
        try:
            notes.append(f"chrony: reference {fields[1] or fields[0]}, system time offset {float(fields[4]):+.6f} s")
        except ValueError:
            pass
    sync = _first(out, "ntpsync")
    if sync == "no":
        notes.append("timedatectl: NTPSynchronized=no")
        if state is CheckState.OK:
            state = CheckState.WARNING
        summary += ", not synchronised (timedatectl)"
    elif sync == "yes":
        summary += ", synchronised (timedatectl)"
    return CheckResult(state, summary, "\n".join(notes),
                       perfdata=(PerfDatum("offset", round(offset, 4), "s", str(th.warning or ""),
                                           str(th.critical or "")),))


def check_qemu(out: HostOutput) -> CheckResult:
    line = _first(out, "qemu")
    if not line:
        return CheckResult(CheckState.CRITICAL, "QEMU is not installed (no qemu-system-x86_64): VMs cannot run here",
                           "apt-get install qemu-system-x86")
    m = re.search(r"version\s+(\S+)", line)
    return CheckResult(CheckState.OK, f"QEMU {m.group(1) if m else line}", line)


def check_raid(out: HostOutput) -> CheckResult:
    if out.none("mdstat"):
        return CheckResult(CheckState.OK, "no software RAID on this host (no /proc/mdstat)")
    lines = out.lines("mdstat")
    if lines is None:
        return unknown("no answer about /proc/mdstat")
    arrays, degraded, name = [], [], None
    for line in lines:
        m = re.match(r"^(md\S+)\s*:", line)
        if m:
            name = m.group(1)
            arrays.append(name)
            continue
        st = re.search(r"\[([U_]+)\]\s*$", line)
        if st and name and "_" in st.group(1):
            degraded.append(f"{name} [{st.group(1)}]")
    if degraded:
        return CheckResult(CheckState.CRITICAL, "degraded: " + ", ".join(degraded), "\n".join(lines))
    if not arrays:
        return CheckResult(CheckState.OK, "no md arrays", "\n".join(lines))
    return CheckResult(CheckState.OK, f"{len(arrays)} md array{'s' if len(arrays) > 1 else ''}, none degraded: "
                       + ", ".join(arrays), "\n".join(lines))


def check_smart(out: HostOutput) -> CheckResult:
    if out.none("smart"):
        return unknown("smartctl is not installed: SMART health cannot be read (apt-get install smartmontools)")
    devs = [ln.split(None, 3) for ln in out.lines("smart") or [] if ln.startswith("dev ")]
    if not devs:
        return unknown("smartctl found no disks (smartctl --scan listed none: a VM, or not root?)")
    failing, unread, ok = [], [], []
    for d in devs:
        dev, rc = d[1], int(d[2]) if len(d) > 2 and d[2].isdigit() else 2
        said = d[3] if len(d) > 3 else ""
        if rc & 8:
            failing.append(f"{dev}: {said or 'failing'}")
        elif rc & 7:
            unread.append(f"{dev}: {said or f'smartctl exit status {rc}'}")
        else:
            ok.append(dev)
    details = "\n".join(" ".join(d[1:]) for d in devs)
    if failing:
        return CheckResult(CheckState.CRITICAL, "SMART says failing: " + "; ".join(failing), details)
    if unread and not ok:
        return unknown("SMART health could not be read: " + "; ".join(unread), details)
    return CheckResult(CheckState.WARNING if unread else CheckState.OK,
                       f"{len(ok)} disk{'s' if len(ok) != 1 else ''} healthy"
                       + (f"; not read: {'; '.join(unread)}" if unread else ""), details)


def temperatures(out: HostOutput) -> list[tuple[str, float]]:
    """(sensor, °C) from /sys/class/thermal and `sensors -u`."""
    temps: list[tuple[str, float]] = []
    for line in out.lines("thermal") or []:
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            temps.append((parts[0], int(parts[1]) / 1000.0))
    chip = label = ""
    for line in [] if out.none("sensors") else out.lines("sensors") or []:
        if not line.startswith(" ") and line.endswith(":"):
            label = line[:-1]
        elif not line.startswith(" ") and ":" not in line and line.strip():
            chip, label = line.strip(), ""
        else:
            m = re.match(r"^\s+temp\d+_input:\s*(-?[\d.]+)", line)
            if m:
                temps.append((f"{chip} {label}".strip(), float(m.group(1))))
    return temps


def check_temperature(out: HostOutput, th: Thresholds) -> CheckResult:
    temps = temperatures(out)
    if not temps:
        why = "no temperature sensors: no /sys/class/thermal zones" + (
            ", and lm-sensors (sensors) is not installed" if out.none("sensors") else ", and `sensors` reports none")
        return unknown(why)
    worst = max(temps, key=lambda t: t[1])
    state = judge(worst[1], th.warning, th.critical)
    perf = tuple(PerfDatum(re.sub(r"\s+", "_", name) or f"temp{i}", round(v, 1), "", str(th.warning or ""),
                           str(th.critical or "")) for i, (name, v) in enumerate(temps))
    return CheckResult(state, f"hottest {worst[0]} {worst[1]:.1f} °C ({len(temps)} sensors)",
                       "\n".join(f"{n}: {v:.1f} °C" for n, v in temps), perf)


def check_plugin(out: HostOutput, p: PluginCheck) -> CheckResult:
    """A [[checks]] plugin's run as Nagios reads it; a plugin that could not run is UNKNOWN with why."""
    if f"plugin-rc {p.name}" not in out.sections:
        return unknown(f"the plugin {p.command[0]} did not finish (the round's time ran out)")
    rc_text = _first(out, f"plugin-rc {p.name}") or ""
    rc = int(rc_text) if rc_text.isdigit() else 3
    text = "\n".join(out.lines(f"plugin {p.name}") or [])
    err = "\n".join(out.lines(f"plugin-err {p.name}") or []).strip()
    if rc == 124:
        return unknown(f"{p.command[0]} timed out after {p.timeout:g} s", err)
    if rc in (126, 127):
        last = err.splitlines()[-1] if err else ""
        return unknown(f"{p.command[0]} could not run on this host (exit status {rc})" + (f": {last}" if last else ""),
                       "is the plugin installed there? e.g. apt-get install monitoring-plugins-basic")
    r = parse_output(rc, text)
    if err and r.state is CheckState.UNKNOWN:
        return CheckResult(r.state, r.summary, "\n".join(x for x in (r.details, err) if x), r.perfdata)
    return r
