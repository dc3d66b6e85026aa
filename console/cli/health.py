"""`ferry health run [CHECKLIST] [--host HOST]`, `ferry health list`, `ferry health history CHECK`: health checks
(issue 14, F2), with Nagios' states and soft/hard attempts. Every command takes --json."""

from __future__ import annotations

from ferry.engine import api, fmt
from ferry.engine.workspace import Workspace

from ferry.console.cli import EXIT_OK, _ask, _on_loop, _table, run_foreground

LIST_COLUMNS = ["HOST", "CHECK", "STATE", "TYPE", "ATTEMPT", "LAST-CHECKED", "SUMMARY"]
HISTORY_COLUMNS = ["TIME", "HOST", "CHECK", "STATE", "TYPE", "ATTEMPT", "SUMMARY"]


def _describe(info: api.TaskInfo) -> str:
    r = info.result or {}
    what = r.get("checklist") or f"host {r.get('host')}"
    states = ", ".join(f"{n} {s}" for s, n in (r.get("states") or {}).items() if n) or "no checks"
    hosts, rounds = r.get("hosts", 0), r.get("rounds", 1)
    lines = [f"health {what}: {r.get('checks', 0)} checks on {hosts} host{'s' if hosts != 1 else ''} in "
             f"{r.get('seconds') or 0:.1f} s ({rounds} round{'s' if rounds != 1 else ''}): {states}"]
    for p in r.get("problems", []):
        kind = "HARD" if p["hard"] else f"SOFT {p['attempt']}/{p['max_attempts']}"
        lines.append(f"  {api.CheckState(p['state']).symbol} {p['host'] or '(site)'} {p['check']} ({kind}): {p['summary']}")
    for a in r.get("raised", []):
        lines.append(f"  alarm raised: {a}")
    for a in r.get("resolved", []):
        lines.append(f"  alarm cleared: {a}")
    return "\n".join(lines)


def cmd_health_run(args, ws: Workspace) -> int:
    async def go(client) -> int:
        tid = await client.health_run(args.checklist, args.host)
        if args.detach:
            print(api.dumps({"task": tid}) if args.json else f"task {tid}: health run started (ferry task {tid})")
            return EXIT_OK
        return await run_foreground(client, tid, as_json=args.json, describe=_describe)
    return _on_loop(ws, go)


def cmd_health_list(args, ws: Workspace) -> int:
    async def go(client) -> int:
        items = await client.health_list(args.host)
        if args.problems:
            items = [c for c in items if c.state.problem]
        if args.json:
            print(api.dumps(items))
        elif not items:
            print("no problems" if args.problems and not args.host else
                  "no check results yet (ferry health run runs the daily checklist)")
        else:
            print(_table([[c.where, c.check, c.state.symbol, c.state_type, f"{c.attempt}/{c.max_attempts}",
                           fmt.stamp(c.last_checked), c.summary] for c in items], LIST_COLUMNS))
        return EXIT_OK
    return _ask(ws, go)


def cmd_health_history(args, ws: Workspace) -> int:
    async def go(client) -> int:
        items = await client.health_history(args.check, args.host, args.limit)
        if args.json:
            print(api.dumps(items))
        elif not items:
            print(f"no results of {args.check}" + (f" on {args.host}" if args.host else "")
                  + " (ferry health list names the checks)")
        else:
            print(_table([[fmt.stamp(r.ts), r.host or "(site)", r.check, r.state.symbol, r.state_type,
                           str(r.attempt), r.summary] for r in items], HISTORY_COLUMNS))
        return EXIT_OK
    return _ask(ws, go)


def add_parsers(sub) -> None:
    s = sub.add_parser("health", help="health checks: run a checklist, the state of every check, a check's history")
    a = s.add_subparsers(dest="health_command", metavar="ACTION", required=True)
    t = a.add_parser("run", help="run a checklist (default daily) or every check of one host, as a task")
    t.add_argument("checklist", nargs="?", help="daily, weekly, monthly, or a [checklists.NAME] of config.toml")
    t.add_argument("--host", metavar="HOST", help="only this host (alone: all its checks)")
    t.add_argument("--detach", action="store_true", help="do not follow the task until it ends")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_health_run)
    t = a.add_parser("list", help="the current state of every check: state, SOFT/HARD, attempt, summary")
    t.add_argument("--host", metavar="HOST", help="only this host's checks")
    t.add_argument("--problems", action="store_true", help="only checks that are not OK")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_health_list)
    t = a.add_parser("history", help="the newest results of a check, newest first")
    t.add_argument("check", help="a check's name as ferry health list shows it (a trailing * matches a prefix)")
    t.add_argument("--host", metavar="HOST", help="only on this host")
    t.add_argument("--limit", type=int, default=50)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_health_history)
