"""Nagios plugin semantics: the four states, threshold ranges, performance data, a plugin's output.

- States by exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; any other code is UNKNOWN (the check
  could not run: never OK).
- Output: the first line is the summary, optionally `| perfdata`; further lines are the long output,
  and after the first `|` among them everything is more perfdata (Nagios 3 plugin API).
- Perfdata: `'label'=value[UOM];warn;crit;min;max`, space separated; quotes around a label with
  spaces, a quote in it doubled.
- Ranges (the Nagios development guidelines): `10` alerts outside 0..10, `10:` below 10, `~:10` above
  10, `10:20` outside 10..20, `@10:20` inside 10..20 (inclusive).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum


class CheckState(StrEnum):
    OK = "OK"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"
    UNKNOWN = "UNKNOWN"

    @property
    def code(self) -> int:
        return _CODES[self]

    @property
    def symbol(self) -> str:
        """Colour never stands alone (STYLE.md): the mark and the short word a table shows."""
        return _SYMBOLS[self]

    @property
    def problem(self) -> bool:
        return self is not CheckState.OK

    @property
    def rank(self) -> int:
        """How bad, for "the worst of": OK < WARNING < UNKNOWN < CRITICAL (as Icinga sorts them)."""
        return _RANKS[self]

    @classmethod
    def of_exit(cls, code: int) -> "CheckState":
        """A plugin's exit status as a state: 0..3, anything else UNKNOWN."""
        return _BY_CODE.get(code, cls.UNKNOWN)


_CODES = {CheckState.OK: 0, CheckState.WARNING: 1, CheckState.CRITICAL: 2, CheckState.UNKNOWN: 3}
_BY_CODE = {v: k for k, v in _CODES.items()}
_SYMBOLS = {CheckState.OK: "✔ OK", CheckState.WARNING: "◆ WARN", CheckState.CRITICAL: "✖ CRIT",
            CheckState.UNKNOWN: "? UNKNOWN"}
_RANKS = {CheckState.OK: 0, CheckState.WARNING: 1, CheckState.UNKNOWN: 2, CheckState.CRITICAL: 3}


class RangeError(ValueError):
    """A threshold that is not a Nagios range."""


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^(@)?(?:(~|{_NUM})?:)?({_NUM})?$")


@dataclass(frozen=True)
class Range:
    """A Nagios threshold range; `alerts(v)` says whether v is a problem under it."""
    start: float = 0.0
    end: float = math.inf
    inside: bool = False         # @: alert inside the range instead of outside
    text: str = ""

    @classmethod
    def parse(cls, text: str | int | float) -> "Range":
        t = str(text).strip()
        m = _RANGE_RE.match(t)
        if not t or m is None or t in ("@", ":", "@:") or (m.group(3) is None and ":" not in t):
            raise RangeError(f"{text!r} is not a Nagios range (e.g. 10, 10:, ~:10, 10:20, @10:20)")
        inside, lo, hi = m.group(1) is not None, m.group(2), m.group(3)
        start = -math.inf if lo == "~" else float(lo) if lo is not None else 0.0
        end = float(hi) if hi is not None else math.inf
        if start > end:
            raise RangeError(f"{text!r}: the start of a range must not be above its end")
        return cls(start, end, inside, t)

    def alerts(self, value: float) -> bool:
        within = self.start <= value <= self.end
        return within if self.inside else not within

    def __str__(self) -> str:
        return self.text


def judge(value: float, warning: Range | None, critical: Range | None) -> CheckState:
    """The state of a measured value: CRITICAL if its range alerts, else WARNING if that one does."""
    if critical is not None and critical.alerts(value):
        return CheckState.CRITICAL
    if warning is not None and warning.alerts(value):
        return CheckState.WARNING
    return CheckState.OK


def _num(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class PerfDatum:
    """One performance measure; value None: 'U' (the plugin could not determine it)."""
    label: str
    value: float | None
    uom: str = ""
    warn: str = ""
    crit: str = ""
    min: float | None = None
    max: float | None = None

    def __str__(self) -> str:
        label = self.label
        if re.search(r"[\s'=]", label):
            label = "'" + label.replace("'", "''") + "'"
        parts = ["U" if self.value is None else _num(self.value) + self.uom, self.warn, self.crit,
                 _num(self.min), _num(self.max)]
        while len(parts) > 1 and parts[-1] == "":
            parts.pop()
        return f"{label}={';'.join(parts)}"


_PERF_RE = re.compile(r"\s*('(?:[^']|'')*'|[^'=\s][^=\s]*)=(\S*)")
_VALUE_RE = re.compile(rf"^({_NUM})([^\d;\s]*)$")


def _float(text: str) -> float | None:
    try:
        return float(text) if text.strip() else None
    except ValueError:
        return None


def parse_perfdata(text: str) -> tuple[PerfDatum, ...]:
    """The measures of a perfdata string; a garbled one is left out (Nagios does the same)."""
    out = []
    pos = 0
    while pos < len(text):
        m = _PERF_RE.match(text, pos)
        if m is None:
            nxt = text.find(" ", pos + 1)
            if nxt < 0:
                break
            pos = nxt
            continue
        pos = m.end()
        label = m.group(1)
        if label.startswith("'"):
            label = label[1:-1].replace("''", "'")
        fields = (m.group(2).split(";") + [""] * 5)[:5]
        if fields[0] == "U":
            value, uom = None, ""
        else:
            vm = _VALUE_RE.match(fields[0])
            if vm is None:
                continue
            value, uom = float(vm.group(1)), vm.group(2)
        out.append(PerfDatum(label, value, uom, fields[1], fields[2], _float(fields[3]), _float(fields[4])))
    return tuple(out)


def format_perfdata(perf: tuple[PerfDatum, ...] | list[PerfDatum]) -> str:
    return " ".join(str(p) for p in perf)


@dataclass(frozen=True)
class CheckResult:
    """What one check found: its state, a one-line summary, the long output, its measures. A check
    that could not run is UNKNOWN, its summary the reason."""
    state: CheckState
    summary: str
    details: str = ""
    perfdata: tuple[PerfDatum, ...] = ()
    alarm_type: str | None = None     # the alarm this result raises when it is a hard problem (None: the check's)
    alarm_object: str | None = None   # kind:name (None: the check's)
    extra: dict = field(default_factory=dict)   # facts for the alarm's details

    @property
    def output(self) -> str:
        """As a plugin prints it: `SUMMARY | PERFDATA` then the long output."""
        first = self.summary + (f" | {format_perfdata(self.perfdata)}" if self.perfdata else "")
        return first + (f"\n{self.details}" if self.details else "")


def unknown(reason: str, details: str = "") -> CheckResult:
    return CheckResult(CheckState.UNKNOWN, reason, details)


def parse_output(exit_code: int, text: str) -> CheckResult:
    """A plugin's run read as Nagios does: the state from the exit code, summary, long output, perfdata."""
    state = CheckState.of_exit(exit_code)
    lines = text.rstrip("\n").splitlines()
    if not lines or not lines[0].strip():
        summary = f"the plugin printed nothing (exit status {exit_code})"
        return CheckResult(CheckState.UNKNOWN if state is CheckState.OK else state, summary,
                           "\n".join(lines[1:]).strip())
    summary, _, perf = lines[0].partition("|")
    long_lines, more_perf, in_perf = [], [], False
    for line in lines[1:]:
        if in_perf:
            more_perf.append(line)
        elif "|" in line:
            before, _, after = line.partition("|")
            long_lines.append(before)
            more_perf.append(after)
            in_perf = True
        else:
            long_lines.append(line)
    summary = summary.strip()
    if state is CheckState.UNKNOWN and exit_code not in _BY_CODE:
        summary = f"exit status {exit_code} (not a plugin's 0..3): {summary}"
    return CheckResult(state, summary, "\n".join(long_lines).strip(),
                       parse_perfdata(" ".join([perf, *more_perf])))
