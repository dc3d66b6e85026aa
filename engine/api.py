"""The engine's one door: the typed records every front end receives, and the codec that carries them.

Every record is a frozen dataclass; one codec (msgspec) turns records into JSON and back, for the
wire between the engine service and its clients, and for the CLI's `--json` (so what a script reads
is exactly what the console gets). A front end never reads a record through string keys.

The calls themselves are the methods of `Engine` clients: `engine.local.LocalEngine` runs the engine
in the calling process (tests, and the service itself); `engine.remote.RemoteEngine` reaches the
engine service over its UNIX socket. Both have the methods listed in `CALLS`, with the same types.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import (CommandError, ConfigError, FerryError, HostKeyError, PermanentError, Refused, TaskCancelled,
                     TransientError, TransportError)

if TYPE_CHECKING:
    from .config import ConfigProblem, SiteConfig
    from .gc import Leftover
    from .hostfacts import DatastoreUsage, HostFacts
    from .migration.netcheck import NetCheck, NetThresholds
    from .migration.model import (FinalNetwork, Finding, Method, Migration, MigrationSpec, MigrationState,
                                  PlanApplied, PlanCheck, SourceSpec, TargetSpec)
    from .ops.model import (AlarmInfo, AlarmState, EventInfo, ScheduleInfo, ScheduleRun, Severity,
                            SilenceInfo)
    from .ops.healthmodel import HealthCheck, HealthResult
    from .ops.backupmodel import BackupInfo, BackupList, BackupResult
    from .ops.metricsmodel import HostMetrics, MetricPoint, MetricSeries, VMMetrics
    from .ops.nagios import CheckState
    from .platform.labops import LabDhcp, LabHost, LabStatus
    from .records import AuditEntry, EngineStatus, HostKey, Submitted, TaskLogEntry, TrackedFile
    from .taskmodel import Progress, TaskInfo
    from .taskstate import FINAL_STATES, TaskState
    from .vm.model import (AgentReport, AgentState, CPUHotAdd, DiskSpec, GuestFilesystem, MissingVM, NicSpec,
                           OrphanProcess, Passthrough, ReconcileReport, TimeSync, UnreachableHost, VMKind, VMSpec,
                           VMState, VMView)
    from .vm.prechecks import Refusal, VMActionCheck

# The records (in records.py and elsewhere in the engine), imported when first asked for (`api.TaskInfo`,
# `from ferry.engine.api import VMView`): a command line that lists tasks pays for neither the VM model,
# nor the store, nor the host transports it never decodes, and one that prints the engine's --json text
# for no record at all (issue 11: a command adds <= 50 ms).
_LAZY = {
    "SiteConfig": ".config", "ConfigProblem": ".config", "Leftover": ".gc", "DatastoreUsage": ".hostfacts", "HostFacts": ".hostfacts",
    "Progress": ".taskmodel", "TaskInfo": ".taskmodel", "TaskState": ".taskstate", "FINAL_STATES": ".taskstate",
    **dict.fromkeys(("TaskLogEntry", "TrackedFile", "AuditEntry", "Submitted", "HostKey", "EngineStatus"), ".records"),
    **dict.fromkeys(("AgentReport", "AgentState", "CPUHotAdd", "DiskSpec", "GuestFilesystem", "MissingVM", "NicSpec",
                     "OrphanProcess", "Passthrough", "ReconcileReport", "TimeSync", "UnreachableHost", "VMKind",
                     "VMSpec", "VMState", "VMView"), ".vm.model"),
    "Refusal": ".vm.prechecks", "VMActionCheck": ".vm.prechecks",
    "LabDhcp": ".platform.labops", "LabHost": ".platform.labops", "LabStatus": ".platform.labops",
    **dict.fromkeys(("FinalNetwork", "Finding", "Method", "Migration", "MigrationSpec", "MigrationState",
                     "PlanApplied", "PlanCheck", "SourceSpec", "TargetSpec"), ".migration.model"),
    "NetCheck": ".migration.netcheck", "NetThresholds": ".migration.netcheck",
    **dict.fromkeys(("AlarmInfo", "AlarmState", "EventInfo", "ScheduleInfo", "ScheduleRun", "Severity", "SilenceInfo"),
                    ".ops.model"),
    "HealthCheck": ".ops.healthmodel", "HealthResult": ".ops.healthmodel", "CheckState": ".ops.nagios",
    **dict.fromkeys(("BackupInfo", "BackupList", "BackupResult"), ".ops.backupmodel"),
    **dict.fromkeys(("MetricPoint", "MetricSeries", "HostMetrics", "VMMetrics"), ".ops.metricsmodel"),
}


def __getattr__(name: str) -> Any:
    if name == "VERSION":
        value: Any = _version()
    elif name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __package__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["AuditEntry", "DatastoreUsage", "EngineStatus", "HostFacts", "HostKey", "Leftover", "Progress",
           "SiteConfig", "Submitted", "TaskInfo", "TaskLogEntry", "TaskState", "TrackedFile", "VMSpec", "VMState",
           "VMView", "VMKind", "DiskSpec", "NicSpec", "Passthrough", "AgentState", "AgentReport", "GuestFilesystem",
           "ReconcileReport", "OrphanProcess", "MissingVM", "UnreachableHost", "TimeSync", "CPUHotAdd",
           "VMActionCheck", "Refusal", "LabDhcp", "LabHost", "LabStatus", "ConfigProblem", "FinalNetwork", "Finding",
           "Method", "Migration", "MigrationSpec", "MigrationState", "PlanApplied", "PlanCheck", "SourceSpec",
           "TargetSpec", "NetCheck", "NetThresholds", "AlarmInfo", "AlarmState", "EventInfo", "ScheduleInfo",
           "ScheduleRun", "Severity", "SilenceInfo", "HealthCheck", "HealthResult", "CheckState", "BackupInfo", "BackupList", "BackupResult", "MetricPoint", "MetricSeries", "HostMetrics", "VMMetrics", "FINAL_STATES", "encode", "decode", "to_builtins", "convert", "dumps", "dumps_as",
           "VERSION", "PROTOCOL"]

PROTOCOL = 3     # the wire protocol's version; raised whenever a frame's shape changes (2: serial frames, 3: --json answers)
VERSION: str     # this installation's version, read when first asked for (module __getattr__)


def _version() -> str:
    """This installation's version (the handshake compares it), read from its dist-info as
    importlib.metadata would find it: that module alone costs a command line ~15 ms of imports."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info") and name.split("-", 1)[0].lower() == "ferry":
                try:
                    with open(os.path.join(entry or ".", name, "METADATA"), encoding="utf-8") as f:
                        for line in f:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                            if not line.strip():
                                break    # the headers end here
                except OSError:
                    pass
    from importlib import metadata   # an egg, a zip: the general way
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:    # run from a checkout that was never installed
        return "0+unknown"


# ---------------------------------------------------------------------------- codec

def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _msgspec() -> Any:
    """msgspec, imported on first use: importing it costs a command line ~15 ms, and `ferry tasks
    --json` needs none of it (the engine sends its --json text: `dumps_as`)."""
    global _encoder
    import msgspec
    import msgspec.json
    if _encoder is None:
        _encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="deterministic")
    return msgspec


_encoder: Any = None


def encode(obj: Any) -> bytes:
    """A record (or list, dict of records, or plain data) as JSON bytes."""
    if _encoder is None:
        _msgspec()
    return _encoder.encode(obj)


def decode(data: bytes, type: Any = Any) -> Any:
    """JSON bytes back into `type` (a record class, list[...] of them, ...); wrong shapes raise."""
    return _msgspec().json.decode(data, type=type)


def raw(data: bytes) -> Any:
    """JSON bytes already encoded, put into a message as they are (not encoded again)."""
    return _msgspec().Raw(data)


def to_builtins(obj: Any) -> Any:
    """A record as plain dicts, lists and strings (enums by value)."""
    return _msgspec().to_builtins(obj, enc_hook=_enc_hook, order="deterministic")


def convert(obj: Any, type: Any) -> Any:
    """Plain data (as from to_builtins or JSON) into `type`."""
    return _msgspec().convert(obj, type=type)


def dumps(obj: Any) -> str:
    """A record as indented JSON for people and scripts: the CLI's --json."""
    return json.dumps(to_builtins(obj), indent=2, sort_keys=True)


def dumps_as(value: Any, type: Any) -> str:
    """What a front end's --json prints of a call's answer `value`: dumps of the record it decodes
    (the wire's round trip, as `type`). The engine sends it when asked (a call frame's "json"), so a
    command line prints it without msgspec or the records."""
    return dumps(convert(decode(encode(to_builtins(value))), type))


# ---------------------------------------------------------------------------- errors on the wire

ERRORS: dict[str, type[FerryError]] = {c.__name__: c for c in (
    FerryError, PermanentError, TransientError, Refused, TransportError, TaskCancelled)}


def error_to_wire(e: FerryError) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": type(e).__name__, "message": e.message, "hint": e.hint,
                           "permanent": isinstance(e, PermanentError)}
    if isinstance(e, ConfigError):
        out["problems"] = to_builtins(e.problems)
    if isinstance(e, HostKeyError):
        out["host_key"] = {"host": e.host, "fingerprint": e.fingerprint, "changed": e.changed}
    if isinstance(e, CommandError):
        out["command"] = {"exit_status": e.exit_status, "stderr": e.stderr}
    task_id = getattr(e, "task_id", None)
    if task_id is not None:
        out["task_id"] = task_id
    return out


def error_from_wire(d: dict[str, Any]) -> FerryError:
    """The error the engine raised, as the same class (or the nearest one this side knows)."""
    from .config import ConfigProblem
    kind, message, hint = d.get("kind", "FerryError"), d.get("message", "?"), d.get("hint", "")
    if kind == "ConfigError":
        return ConfigError([convert(p, ConfigProblem) for p in d.get("problems", [])])
    if kind == "HostKeyError":
        k = d.get("host_key", {})
        return HostKeyError(message, hint, host=k.get("host", ""), fingerprint=k.get("fingerprint", ""),
                            changed=bool(k.get("changed")))
    if kind == "CommandError":
        c = d.get("command", {})
        return CommandError(message, hint, exit_status=c.get("exit_status"), stderr=c.get("stderr", ""))
    if kind == "TaskRunsElsewhere":
        e: FerryError = PermanentError(message, hint)
    else:
        cls = ERRORS.get(kind)
        if cls is None:     # a class only the engine knows: keep its family
            cls = PermanentError if d.get("permanent", True) else TransientError
        e = cls(message, hint)
    if "task_id" in d:
        e.task_id = d["task_id"]    # type: ignore[attr-defined]
    return e
