"""`ferry plan check|apply FILE` and `ferry migration list|show`: server migration projects (issue 13).

The engine reads the plan file (it runs on this machine, the workspace's): the path is sent absolute,
and the problems it finds are shown with the path as it was typed."""

from __future__ import annotations

import dataclasses
import os
import sys

from ferry.engine import api, fmt
from ferry.engine.errors import ConfigError, Refused
from ferry.engine.textsafe import line as safe
from ferry.engine.workspace import Workspace

from ferry.console.cli import EXIT_CONFIG, EXIT_OK, _ask, _table, cli_help

MIGRATION_COLUMNS = ["NAME", "WAVE", "STATE", "ROUND", "LAST-SYNC", "SOURCE", "TARGET", "METHOD"]


def _as_typed(problems, path: str, typed: str) -> list:
    """The problems of the plan file `path` (absolute), naming it as the operator typed it."""
    return [dataclasses.replace(p, file=typed) if p.file == path else p for p in problems]


def _refused(e: Refused) -> int:
    print(f"ferry: {safe(e)}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_plan_check(args, ws: Workspace) -> int:
    path = os.path.abspath(args.file)

    async def go(client) -> int:
        found = await client.plan_check(path)
        found = dataclasses.replace(found, file=args.file, problems=tuple(_as_typed(found.problems, path, args.file)))
        if args.json:
            print(api.dumps(found))
        elif found.problems:
            print("\n".join(str(p) for p in found.problems), file=sys.stderr)
        else:
            print(f"{args.file}: {len(found.migrations)} migrations in wave {found.wave}, no problems")
        return EXIT_CONFIG if found.problems else EXIT_OK
    return _ask(ws, go)


def cmd_plan_apply(args, ws: Workspace) -> int:
    path = os.path.abspath(args.file)

    async def go(client) -> int:
        try:
            done = await client.plan_apply(path, dry_run=args.dry_run)
        except ConfigError as e:
            problems = _as_typed(e.problems, path, args.file)
            if args.json:
                print(api.dumps({"ok": False, "problems": problems}))
            else:
                print("\n".join(str(p) for p in problems), file=sys.stderr)
            return EXIT_CONFIG
        except Refused as e:
            return _refused(e)
        done = dataclasses.replace(done, file=args.file)
        if args.json:
            print(api.dumps(done))
            return EXIT_OK
        would = "would be " if done.dry_run else ""
        for what, names in ((would + "created", done.created), (would + "updated", done.updated),
                            ("unchanged", done.unchanged)):
            for name in names:
                print(f"{name}: {what}")
        print(f"{args.file}: wave {done.wave}: {len(done.created)} created, {len(done.updated)} updated, "
              f"{len(done.unchanged)} unchanged" + (" (dry run: nothing applied)" if done.dry_run else ""))
        return EXIT_OK
    return _ask(ws, go)


def _row(m: api.Migration) -> list[str]:
    t = m.spec.target
    return [m.name, m.wave, f"{m.state.symbol} {m.state}", str(m.round), fmt.stamp(m.last_sync) if m.last_sync else "-",
            m.spec.source.target, f"{t.host}/{t.datastore}", str(m.spec.method)]


def cmd_migration_list(args, ws: Workspace) -> int:
    async def go(client) -> int:
        items = await client.migration_list(wave=args.wave)
        if args.json:
            print(api.dumps(items))
        elif not items:
            print(f"no migrations in wave {args.wave}" if args.wave else "no migrations yet (ferry plan apply FILE)")
        else:
            print(_table([_row(m) for m in items], MIGRATION_COLUMNS))
        return EXIT_OK
    return _ask(ws, go)


def _show(m: api.Migration) -> str:
    s, t, f = m.spec.source, m.spec.target, m.spec.final
    lines = [
        f"migration  {m.name} (wave {m.wave})",
        f"state      {m.state.symbol} {m.state}, round {m.round}, last sync {fmt.stamp(m.last_sync)}",
        f"source     {s.target}" + (f" (key {s.identity})" if s.identity else ""),
        f"target     host {t.host}, datastore {t.datastore}, network {t.network}, "
        f"cpus {t.cpus or 'as the source'}, memory {f'{t.memory_mib}M' if t.memory_mib else 'as the source'}, "
        f"disks {', '.join(fmt.size(d) for d in t.disks) or 'as the source'}",
        f"method     {m.spec.method}" + (", relayed by Ferry" if m.spec.relay else ""),
        f"sync       {'every ' + fmt.duration(m.spec.sync_interval_s) if m.spec.sync_interval_s else 'on demand'}",
        f"services   {', '.join(m.spec.services) or '-'}",
        f"excludes   {', '.join(m.spec.excludes) or '-'}",
        f"final      {f.address or 'the source address'}" + (f", gateway {f.gateway}" if f.gateway else "")
        + (f", dns {', '.join(f.dns)}" if f.dns else ""),
    ]
    if m.target:
        pt = m.target
        lines.append(f"receiver   {pt.vm} on {pt.host} at {pt.address}" + (f"/{pt.prefix}" if pt.prefix else "")
                     + f", SSH port {pt.ssh_port}, key {pt.fingerprint} (pinned), {pt.method}-level")
        lines += [f"  disk     {d.name} {d.device} {fmt.size(d.size)}" + (f" <- {d.source}" if d.source else "")
                  for d in pt.disks]
        lines += [f"  part     {p.device} {p.fstype} {fmt.size(p.size)} label {p.label}"
                  + (f" for {p.source}" if p.source else "") for p in pt.partitions]
    lines += [f"  round    {r.round} {r.label}: {r.moved}, {r.duration_s:.1f} s ({fmt.stamp(r.ended)})"
              for r in m.rounds[-5:]]
    if m.changed:
        lines.append(f"changed    {m.changed.said} since the last round (measured {fmt.stamp(m.changed.at)})")
    if m.predicted_final_sync_s is not None:
        lines.append(f"final sync about {fmt.duration(m.predicted_final_sync_s)} predicted")
    if m.predicted_downtime_s is not None or m.measured_downtime_s is not None:
        parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:g} s"
                          for k, v in (m.predicted_downtime_parts or {}).items() if v is not None)
        said = [f"{m.measured_downtime_s:g} s measured"] if m.measured_downtime_s is not None else []
        if m.predicted_downtime_s is not None:
            said.append(f"about {m.predicted_downtime_s:g} s predicted ({parts})")
        lines.append("downtime   " + ", ".join(said))
    if m.override:
        lines.append(f"override   {m.override}")
    lines += [f"blocker    {b.name}: {b.message}" + (f" (hint: {b.hint})" if b.hint else "") for b in m.blockers]
    lines += [f"warning    {w.name}: {w.message}" + (f" (hint: {w.hint})" if w.hint else "") for w in m.warnings]
    lines.append(f"updated    {fmt.stamp(m.updated)} (created {fmt.stamp(m.created)})")
    return "\n".join(lines)


def cmd_migration_show(args, ws: Workspace) -> int:
    async def go(client) -> int:
        m = await client.migration_get(args.name)
        print(api.dumps(m) if args.json else _show(m))
        return EXIT_OK
    return _ask(ws, go)


def cmd_migration_assess(args, ws: Workspace) -> int:
    from ferry.console.cli.vm import _run_task

    def describe(info) -> str:
        r = info.result or {}
        if r.get("windows"):
            return safe(f"{r['migration']}: {r['windows']}")
        parts = [f"{r.get('migration')} assessed: {r.get('reason') or 'no method recommended'}"]
        if r.get("estimate_s") is not None:
            parts.append(f"the initial copy takes about {fmt.duration(r['estimate_s'])} at the measured bandwidth")
        if r.get("network"):
            parts.append(f"network {r['network']}")
        parts.append(f"{len(r.get('blockers', []))} blocker(s): {', '.join(r['blockers'])}" if r.get("blockers")
                     else "no blockers")
        if r.get("warnings"):
            parts.append(f"warnings: {', '.join(r['warnings'])}")
        return safe("; ".join(parts) + f" (ferry migration report {r.get('migration')})")
    return _run_task(ws, "migration.assess", {"migration": args.name}, args.json, describe)


def cmd_migration_netcheck(args, ws: Workspace) -> int:
    """Measure the network again (a task), or with --override record the operator's reason to go on."""
    async def override(client) -> int:
        try:
            m = await client.migration_override(args.name, args.override)
        except Refused as e:
            return _refused(e)
        if args.json:
            print(api.dumps(m))
        else:
            print(safe(f"{m.name}: the network check is overridden ({m.override}); recorded in the audit log"))
        return EXIT_OK
    if args.override is not None:
        return _ask(ws, override)
    from ferry.console.cli.vm import _run_task

    def describe(info) -> str:
        r = info.result or {}
        verdict = "passed" if r.get("passed") else \
            f"blockers: {', '.join(r['blockers'])}" if r.get("blockers") else "below its bars, overridden"
        return safe(f"{r.get('network') or 'not measured'} ({verdict})")
    return _run_task(ws, "migration.netcheck", {"migration": args.name}, args.json, describe)


def cmd_migration_trust(args, ws: Workspace) -> int:
    from ferry.console.cli import _ask_trust, _trusted

    async def go(client) -> int:
        info = await client.migration_source_key(args.name)
        code = _ask_trust(args, f"the source of {args.name}", info)
        if code is not None:
            return code
        await client.trust_migration_source(args.name, info.fingerprint)
        return _trusted(ws.known_hosts_path, info, f"ferry migration trust {args.name}")
    return _ask(ws, go)


def cmd_migration_report(args, ws: Workspace) -> int:
    async def go(client) -> int:
        try:
            text = await client.migration_report(args.name)
        except Refused as e:
            return _refused(e)
        if args.json:
            print(api.dumps((await client.migration_get(args.name)).assessment))
        elif args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"{args.name}: the assessment report is in {args.out}")
        else:
            print(text, end="")
        return EXIT_OK
    return _ask(ws, go)


def cmd_migration_sync(args, ws: Workspace) -> int:
    from ferry.console.cli.vm import _run_task

    def describe(info) -> str:
        r = info.result or {}
        return safe(f"{r.get('migration')}: {r.get('line')}; now {r.get('state')}")
    return _run_task(ws, "migration.sync", {"migration": args.name}, args.json, describe)


def cmd_migration_prepare(args, ws: Workspace) -> int:
    from ferry.console.cli.vm import _run_task

    def describe(info) -> str:
        r = info.result or {}
        parts = [f"{r.get('migration')}: target {r.get('vm')} runs on {r.get('host')} as receiver at "
                 f"{r.get('address')} (SSH host key {r.get('fingerprint')}, pinned)"]
        if r.get("method") == "block":
            parts.append(f"block-level: {len(r.get('disks', []))} disk(s) mapped 1:1 to the source's, left raw")
        else:
            parts += [f"{p['device']} ext4 {fmt.size(p['size'])} label {p['label']}"
                      + (f" for {p['source']}" if p.get("source") else "") for p in r.get("partitions", [])]
            if r.get("merged"):
                parts.append(f"{', '.join(r['merged'])} copied into the first partition")
        return safe("; ".join(parts))
    params = {"migration": args.name}
    if args.address:
        params["address"] = args.address
    if args.gateway:
        params["gateway"] = args.gateway
    return _run_task(ws, "migration.prepare", params, args.json, describe)


def cmd_migration_test(args, ws: Workspace) -> int:
    from ferry.console.cli.vm import _run_task

    def describe(info) -> str:
        r = info.result or {}
        checks = [f"{s} {v}" for s, v in (r.get("services") or {}).items()] + \
                 [f"port {p} {'listens' if o else 'closed'}" for p, o in (r.get("ports") or {}).items()] + \
                 [f"{label} {r[k]} ({r.get(k + '_s')} s)" for k, label in (("tools", "hypervisor tools"),
                                                                            ("agent", "guest agent")) if r.get(k)]
        verdict = "passed: ready for cutover" if r.get("passed") else "FAILED"
        return safe(f"{r.get('migration')}: test launch {verdict}; the copy booted in {r.get('boot_s')} s"
                    + (f"; {', '.join(checks)}" if checks else "") + "; the copy is removed")
    return _run_task(ws, "migration.test", {"migration": args.name}, args.json, describe)


def _cutover_screen(s: dict) -> str:
    """The confirmation screen of a cutover, as text."""
    p = s["predicted_downtime"]
    parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:g} s" for k, v in p["parts"].items()
                      if v is not None)
    test = s.get("test") or {}
    lines = [
        f"cutover of {s['migration']} ({s['state']}, round {s['round']})",
        f"last sync       {fmt.duration(s['last_sync_age_s']) + ' ago' if s['last_sync_age_s'] is not None else 'never'}",
        f"changed since   {fmt.size(s['bytes_changed_since']) if s['bytes_changed_since'] is not None else 'not measured'}",
        f"downtime        about {p['total_s']:g} s predicted ({parts})"
        + ("" if p["boot_measured"] else "; boot time guessed: no test launch measured it"),
        "test launch     " + (("passed" if test.get("passed") else "FAILED") + f", booted in {test.get('boot_s')} s "
                               f"({fmt.stamp(test.get('at'))})" if test else "none"),
        f"network         {s.get('network') or 'not measured'}",
    ]
    lines += [f"blocker         {b['name']}: {b['message']}" for b in s["blockers"]]
    lines += [f"warning         {w['name']}: {w['message']}" for w in s["warnings"]]
    lines.append("steps:")
    lines += [f"  {i + 1:2}. {st['title']}  (rollback: {st['rollback']})" for i, st in enumerate(s["steps"])]
    return "\n".join(lines)


def cmd_migration_cutover(args, ws: Workspace) -> int:
    """Shows the confirmation screen, then runs the runbook once the migration's name is typed (or given
    with --confirm NAME)."""
    from ferry.console.cli.vm import _run_task

    async def screen(client) -> int:
        s = await client.migration_cutover_summary(args.name)
        if not args.json:
            print(safe(_cutover_screen(s)))
        typed = args.confirm
        if typed is None:
            if not sys.stdin.isatty():
                print(f"ferry: a cutover is confirmed by typing the migration's name (hint: ferry migration cutover "
                      f"{args.name} --confirm {args.name})", file=sys.stderr)
                return EXIT_CONFIG
            typed = input(f"type {args.name} to cut it over: ").strip()
        if typed != args.name:
            print(f"ferry: {typed!r} is not {args.name!r}: nothing was done", file=sys.stderr)
            return EXIT_CONFIG
        return EXIT_OK

    code = _ask(ws, screen)
    if code != EXIT_OK:
        return code

    def describe(info) -> str:
        r = info.result or {}
        p = r.get("predicted_downtime") or {}
        return safe(f"{r.get('migration')} is live at {r.get('address')}: downtime {r.get('measured_downtime_s')} s "
                    f"(predicted {p.get('total_s')} s); the source is parked with its services stopped "
                    f"(ferry migration finalize {r.get('migration')})")
    params = {"migration": args.name, "confirm": args.name}
    if args.pause_before:
        params["pause_before"] = list(dict.fromkeys(args.pause_before))
    return _run_task(ws, "migration.cutover", params, args.json, describe)


def cmd_migration_rollback(args, ws: Workspace) -> int:
    """A running cutover is cancelled (its own rollback runs); otherwise the rollback task."""
    from ferry.console.cli.vm import _run_task

    async def cancel(client) -> int:
        tid = await client.migration_cancel_cutover(args.name, "rolled back by the operator")
        if tid is None:
            return -1
        print(f"{args.name}: cutover task {tid} cancelled; its rollback restores the source "
              f"(ferry task show {tid})")
        return EXIT_OK
    code = _ask(ws, cancel)
    if code != -1:
        return code
    return _run_task(ws, "migration.rollback", {"migration": args.name}, args.json,
                     lambda info: safe(f"{args.name} rolled back: the source runs as before at "
                                       f"{(info.result or {}).get('source')}"))


def cmd_migration_finalize(args, ws: Workspace) -> int:
    from ferry.console.cli.vm import _run_task
    params = {"migration": args.name, "keep_source_running": args.keep_source_running}
    return _run_task(ws, "migration.finalize", params, args.json,
                     lambda info: safe(f"{args.name} finalized: Ferry's files left the source, which "
                                       + ("shuts down" if (info.result or {}).get("source_stopped") else "keeps running")))


def add_parsers(sub) -> None:
    s = sub.add_parser("plan", help="migration plans: check or apply a wave's plan file (TOML)")
    ps = s.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    p = ps.add_parser("check", help="check a plan file against the site; one line per problem, exit 2 when any")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_check)
    p = ps.add_parser("apply", help="record the plan's migrations: new ones planned, changed ones updated")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_apply)

    s = sub.add_parser("migration", help="server migrations: list, show, assess, netcheck, report, trust")
    ms = s.add_subparsers(dest="migration_command", metavar="ACTION", required=True)
    m = ms.add_parser("list", help=cli_help("migration list"))
    m.add_argument("--wave", help="only this wave's")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_list)
    m = ms.add_parser("show", help="one migration: its plan and where it stands")
    m.add_argument("name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_show)
    m = ms.add_parser("assess", help=cli_help("migration assess"))
    m.add_argument("name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_assess)
    m = ms.add_parser("netcheck", help="measure the network again (a task); --override REASON goes on despite it (audited)")
    m.add_argument("name")
    m.add_argument("--override", metavar="REASON", help=cli_help("migration netcheck --override"))
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_netcheck)
    m = ms.add_parser("report", help=cli_help("migration report"))
    m.add_argument("name")
    m.add_argument("--out", metavar="FILE", help="write the Markdown report to FILE")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_report)
    m = ms.add_parser("trust", help="trust the SSH host key the migration's source presents")
    m.add_argument("name")
    m.add_argument("--fingerprint", help="the SHA256 fingerprint checked on the source (no question asked)")
    m.add_argument("--yes", action="store_true", help="trust what the source presents without asking")
    m.set_defaults(func=cmd_migration_trust)
    m = ms.add_parser("sync", help="a sync round: the receiver pulls from the source (the first round copies all)")
    m.add_argument("name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_sync)
    m = ms.add_parser("prepare", help="make the target VM and boot it as the receiver at a temporary address")
    m.add_argument("name")
    m.add_argument("--address", metavar="CIDR", help="the receiver's temporary address (default: DHCP)")
    m.add_argument("--gateway", metavar="ADDRESS", help="with --address: its default gateway")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_prepare)
    m = ms.add_parser("test", help="test launch: a throw-away copy of the target boots isolated and is checked")
    m.add_argument("name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_test)
    m = ms.add_parser("cutover", help="the cutover runbook, after a confirmation screen (type the name)")
    m.add_argument("name")
    m.add_argument("--confirm", metavar="NAME", help="the migration's name, typed: no question asked")
    m.add_argument("--pause-before", metavar="STEP", action="append",
                   help="stop before this step until the name is typed again (ferry task confirm ID NAME), "
                        "e.g. go_live to look at the target first; repeatable")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_cutover)
    m = ms.add_parser("rollback", help="back to the source: a running cutover is cancelled and rolled back")
    m.add_argument("name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_rollback)
    m = ms.add_parser("finalize", help="after go-live: Ferry's files leave the source, which shuts down")
    m.add_argument("name")
    m.add_argument("--keep-source-running", action="store_true", help="leave the (parked) source running")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migration_finalize)
