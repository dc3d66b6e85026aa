"""`ferry backup now [--remote NAME]|list|prune [--dry-run]|restore ID [--confirm ID]`: management-data
backups (issue 14, F5). Every command takes --json.

now, list and prune go to the engine. restore is done here, by this process, with the engine stopped
(as `ferry engine stop` stops it, refused while its tasks are not idle) and its lock held, so nothing
has state.db open while it is replaced; the engine is started again afterwards when it ran before.
"""

from __future__ import annotations

import sys
import time

from ferry.engine import api, fmt
from ferry.engine.errors import Refused
from ferry.engine.workspace import Workspace

from ferry.console.cli import _ATTACH, EXIT_FAIL, EXIT_OK, _ask, _table

LIST_COLUMNS = ["ID", "WHERE", "KIND", "TIME", "SIZE", "CHECKSUM"]
STOP_WAIT_S = 90.0


def _row(b: api.BackupInfo) -> list[str]:
    return [b.id, b.where, b.kind, fmt.stamp(b.created), fmt.size(b.size), b.check_text]


def _problems(problems) -> None:
    for p in problems:
        print(f"ferry: {p}", file=sys.stderr)


def cmd_backup_now(args, ws: Workspace) -> int:
    async def go(client) -> int:
        r = await client.backup_now(args.remote)
        if args.json:
            print(api.dumps(r))
            return EXIT_OK
        b = r.backup
        print(f"backup {b.id}: {b.path} ({fmt.size(b.size)}, sha256 {b.sha256[:16]}…) in {r.seconds:.1f} s")
        for u in r.uploaded:
            print(f"  uploaded to {u.where}: {u.path} (SHA-256 checked on the server)")
        for p in r.pruned:
            print(f"  pruned {p.where} {p.id} (past its [backup.keep])")
        return EXIT_OK
    return _ask(ws, go)


def cmd_backup_list(args, ws: Workspace) -> int:
    async def go(client) -> int:
        r = await client.backup_list()
        if args.json:
            print(api.dumps(r))
        elif not r.backups:
            print("no backups yet (ferry backup now makes one)")
        else:
            print(_table([_row(b) for b in r.backups], LIST_COLUMNS))
        _problems(r.problems)
        return EXIT_FAIL if r.problems else EXIT_OK
    return _ask(ws, go)


def cmd_backup_prune(args, ws: Workspace) -> int:
    async def go(client) -> int:
        r = await client.backup_prune(args.dry_run)
        if args.json:
            print(api.dumps(r))
        elif not r.backups:
            print("nothing to prune: every kind is within its [backup.keep]")
        else:
            verb = "would prune" if args.dry_run else "pruned"
            for b in r.backups:
                print(f"{verb} {b.where} {b.id} ({fmt.stamp(b.created)}, {fmt.size(b.size)})")
        _problems(r.problems)
        return EXIT_FAIL if r.problems else EXIT_OK
    return _ask(ws, go)


# --------------------------------------------------------------------------- restore

def _confirmed(args) -> None:
    """The typed confirmation: --confirm ID, or the id typed at the terminal; refused otherwise."""
    typed = args.confirm
    if typed is None:
        if not sys.stdin.isatty():
            raise Refused(f"restoring backup {args.id} replaces this workspace's state: it needs a typed "
                          "confirmation", f"ferry backup restore {args.id} --confirm {args.id}")
        print(f"Restore backup {args.id}? The engine stops, the current state is backed up first "
              "(kind before-restore), then state.db, config.toml, known_hosts and themes/ are replaced.",
              file=sys.stderr)
        typed = input("Type the backup's id to restore it: ").strip()
    if typed != args.id:
        raise Refused(f"the confirmation {typed!r} is not the backup's id {args.id!r}: nothing was restored",
                      f"ferry backup restore {args.id} --confirm {args.id}")


async def _stop_idle_engine(ws: Workspace) -> bool:
    """Stop the workspace's engine when its tasks are idle (refused otherwise): whether one ran."""
    import asyncio

    from ferry.engine import remote
    from ferry.engine.taskmodel import ACTIVE_STATES
    try:
        client = await remote.connect(ws, client="cli", autostart=False, fetch_site=False)
    except remote.EngineUnavailable:
        return False
    try:
        busy = [t for t in await client.list_tasks(limit=500) if t.state in ACTIVE_STATES]
        if busy:
            t = busy[0]
            raise Refused(f"the engine's tasks are not idle: task {t.id} ({t.title}) is {t.state}"
                          + (f" (+{len(busy) - 1} more)" if len(busy) > 1 else ""),
                          "wait for them to end (ferry tasks), or cancel them, then restore")
        st = await client.status()
        await client.stop_engine(now=False)
    finally:
        await client.close()
    deadline = time.monotonic() + STOP_WAIT_S
    while remote.engine_pid_alive(st.pid):
        if time.monotonic() > deadline:
            raise Refused(f"the engine (pid {st.pid}) did not stop within {STOP_WAIT_S:.0f} s",
                          "ferry engine status; ferry engine stop --now, then restore")
        await asyncio.sleep(0.05)
    return True


async def _start_engine(ws: Workspace) -> None:
    from ferry.engine import remote
    client = await remote.connect(ws, client="cli", fetch_site=False)
    await client.close()


def cmd_backup_restore(args, ws: Workspace) -> int:
    import asyncio

    from ferry.engine.ops import backup as _backup
    if _ATTACH.get() is not None:
        raise Refused("`ferry backup restore` works on this machine's workspace, not on the engine of another",
                      "run it on the engine's machine, without --engine")
    _confirmed(args)
    site = ws.load_config()
    if args.remote:
        asyncio.run(_backup.fetch(ws.root, site, args.id, args.remote))
    info = _backup.find_local(ws.root, site, args.id)      # refused now, before the engine stops
    if info.verified is not True:
        raise Refused(f"backup {args.id} does not match its checksum: {info.problem}",
                      "pick another backup (ferry backup list)")
    ran = asyncio.run(_stop_idle_engine(ws))
    try:
        report = _backup.restore(ws.root, site, args.id)
    finally:
        if ran:
            asyncio.run(_start_engine(ws))
    if args.json:
        print(api.dumps({"restored": report.restored, "before": report.before, "files": list(report.files),
                         "engine_restarted": ran}))
    else:
        print(f"restored backup {report.restored.id} ({', '.join(report.files)}); the state before it is "
              f"backup {report.before.id}" + ("; engine started again" if ran else ""))
    return EXIT_OK


def add_parsers(sub) -> None:
    s = sub.add_parser("backup", help="management-data backups: make one now, list, prune, restore")
    a = s.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    t = a.add_parser("now", help="back up state.db, config.toml, known_hosts and themes now (kind manual)")
    t.add_argument("--remote", metavar="NAME", help="also upload it to [backup.remote.NAME], verified there")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_backup_now)
    t = a.add_parser("list", help="the backups here and on each remote: kind, time, size, checksum verified")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_backup_list)
    t = a.add_parser("prune", help="remove the backups past [backup.keep] (oldest first)")
    t.add_argument("--dry-run", action="store_true", help="only say what would go")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_backup_prune)
    t = a.add_parser("restore", help="put a backup back (the engine stops; the current state is backed up first)")
    t.add_argument("id", metavar="ID", help="the backup's id, as ferry backup list shows it")
    t.add_argument("--confirm", metavar="ID", help="the backup's id again: the typed confirmation")
    t.add_argument("--remote", metavar="NAME", help="the backup is on [backup.remote.NAME]: fetched first")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_backup_restore)
