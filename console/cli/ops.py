"""`ferry alarms`, `ferry alarm ack|clear`, `ferry silence add|list|remove`, `ferry events`, `ferry schedules`:
operations (issue 14). Every command takes --json (the engine's records, as api.dumps gives them)."""

from __future__ import annotations

import argparse
import re
import time

from ferry.engine import api, fmt
from ferry.engine.workspace import Workspace

from ferry.console.cli import EXIT_OK, _ask, _table

ALARM_COLUMNS = ["ID", "SEVERITY", "STATE", "TYPE", "OBJECT", "COUNT", "LAST-SEEN", "SUMMARY", "NOTE"]
SILENCE_COLUMNS = ["ID", "MATCHERS", "EXPIRES", "BY", "REASON", "STATE"]
SCHEDULE_COLUMNS = ["NAME", "AT", "RUN", "NEXT", "LAST", "RESULT"]
EVENT_COLUMNS = ["ID", "TIME", "KIND", "ALARM", "OBJECT", "BY", "TEXT"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_arg(text: str) -> float:
    """A duration such as 2h, 30m, 1d, 1h30m, 90s (a bare number: seconds)."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", t)
        if not parts or "".join(a + b for a, b in parts) != t:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 2h, 30m, 1d, 1h30m)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than nothing")
    return seconds


def match_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key.strip() not in ("type", "object", "severity") or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=PATTERN with KEY type, object or severity "
                                         "(e.g. type=host.*, object=vm:web*, severity=critical)")
    return key.strip(), value.strip()


def _listing(args, items: list, empty: str, columns: list[str], row) -> int:
    """A list as --json, or as a table (`row` makes each line), or the line saying it is empty."""
    if args.json:
        print(api.dumps(items))
    elif not items:
        print(empty)
    else:
        print(_table([row(x) for x in items], columns))
    return EXIT_OK


def _alarm_row(a: api.AlarmInfo) -> list[str]:
    return [str(a.id), a.severity.symbol, str(a.state), a.type, a.object, str(a.count), fmt.stamp(a.last_seen),
            a.summary, a.note]


def cmd_alarms(args, ws: Workspace) -> int:
    async def go(client) -> int:
        return _listing(args, await client.alarms(all=args.all), "no alarms" if args.all else "no open alarms",
                        ALARM_COLUMNS, _alarm_row)
    return _ask(ws, go)


def _said(a: api.AlarmInfo, what: str) -> str:
    return f"alarm {a.id} ({a.type} on {a.object}) {what}"


def cmd_alarm_ack(args, ws: Workspace) -> int:
    async def go(client) -> int:
        a = await client.alarm_ack(args.id, args.comment or "")
        print(api.dumps(a) if args.json else _said(a, f"acknowledged by {a.acked_by}"))
        return EXIT_OK
    return _ask(ws, go)


def cmd_alarm_clear(args, ws: Workspace) -> int:
    async def go(client) -> int:
        a = await client.alarm_clear(args.id, args.reason)
        print(api.dumps(a) if args.json else _said(a, f"cleared by {a.cleared_by}: {a.clear_reason}"))
        return EXIT_OK
    return _ask(ws, go)


def _matchers(s: api.SilenceInfo) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(s.matchers.items()))


def _silence_state(s: api.SilenceInfo) -> str:
    if s.removed is not None:
        return f"removed by {s.removed_by}"
    return "active" if s.active else "expired"


def cmd_silence_add(args, ws: Workspace) -> int:
    async def go(client) -> int:
        s = await client.silence_add(dict(args.match), args.duration, args.reason)
        print(api.dumps(s) if args.json else f"silence {s.id} ({_matchers(s)}) until {fmt.stamp(s.expires)}")
        return EXIT_OK
    return _ask(ws, go)


def cmd_silence_list(args, ws: Workspace) -> int:
    async def go(client) -> int:
        return _listing(args, await client.silence_list(all=args.all),
                        "no silences" if args.all else "no active silences", SILENCE_COLUMNS,
                        lambda s: [str(s.id), _matchers(s), fmt.stamp(s.expires), s.created_by, s.reason,
                                   _silence_state(s)])
    return _ask(ws, go)


def cmd_silence_remove(args, ws: Workspace) -> int:
    async def go(client) -> int:
        s = await client.silence_remove(args.id)
        print(api.dumps(s) if args.json else f"silence {s.id} ({_matchers(s)}) removed")
        return EXIT_OK
    return _ask(ws, go)


def cmd_events(args, ws: Workspace) -> int:
    async def go(client) -> int:
        return _listing(args, await client.events(limit=args.limit), "no events", EVENT_COLUMNS,
                        lambda e: [str(e.id), fmt.stamp(e.ts), e.kind, "-" if e.alarm_id is None else str(e.alarm_id),
                                   e.object or "-", e.actor, e.text])
    return _ask(ws, go)


def _in_zone(ts: float | None, zone: str) -> str:
    """A time as the site's clock shows it (its schedules are in that zone)."""
    if ts is None:
        return "-"
    from datetime import datetime
    try:
        from zoneinfo import ZoneInfo
        return datetime.fromtimestamp(ts, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")
    except (ValueError, KeyError, OSError, ImportError):
        return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


def _last(s: api.ScheduleInfo) -> tuple[str, str]:
    if s.running:
        return _in_zone(s.last.started if s.last else None, s.timezone), "running"
    if s.last is None:
        return "-", "-"
    r = s.last
    return (_in_zone(r.started or r.slot, s.timezone),
            (r.result or "running") + (" (caught up)" if r.caught_up else ""))


def cmd_schedules(args, ws: Workspace) -> int:
    async def go(client) -> int:
        return _listing(args, await client.schedules(),
                        "no schedules (add [schedules.NAME] to config.toml: at = \"daily 02:00\", run = \"...\")",
                        SCHEDULE_COLUMNS, lambda s: [s.name, s.at, s.run, _in_zone(s.next_run, s.timezone), *_last(s)])
    return _ask(ws, go)


def add_parsers(sub) -> None:
    s = sub.add_parser("alarms", help="open alarms by severity (--all: with the cleared ones, history)")
    s.add_argument("--all", action="store_true", help="cleared alarms too")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_alarms)

    s = sub.add_parser("alarm", help="acknowledge or clear an alarm")
    a = s.add_subparsers(dest="alarm_command", metavar="ACTION", required=True)
    t = a.add_parser("ack", help="acknowledge an open alarm: someone is on it (audited)")
    t.add_argument("id", type=int)
    t.add_argument("--comment", metavar="TEXT", help="what is being done about it")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_alarm_ack)
    t = a.add_parser("clear", help="clear an open alarm by hand, with a reason (audited)")
    t.add_argument("id", type=int)
    t.add_argument("--reason", metavar="TEXT", required=True, help="why it is cleared by hand")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_alarm_clear)

    s = sub.add_parser("silence", help="silence alarms that match, for a while (listed, not notified)")
    a = s.add_subparsers(dest="silence_command", metavar="ACTION", required=True)
    t = a.add_parser("add", help="silence alarms matching every --match until --for has passed")
    t.add_argument("--match", type=match_arg, action="append", required=True, metavar="KEY=PATTERN",
                   help="type, object or severity = an exact value or a glob (type=host.*); repeatable")
    t.add_argument("--for", dest="duration", type=duration_arg, required=True, metavar="DURATION",
                   help="how long, e.g. 2h, 30m, 1d")
    t.add_argument("--reason", metavar="TEXT", required=True, help="why (kept with it, and audited)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_silence_add)
    t = a.add_parser("list", help="active silences (--all: expired and removed ones too)")
    t.add_argument("--all", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_silence_list)
    t = a.add_parser("remove", help="end a silence now")
    t.add_argument("id", type=int)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_silence_remove)

    s = sub.add_parser("events", help="what happened to alarms and silences, newest first")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("schedules", help="the schedules of config.toml: next run, last run and its result")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schedules)
