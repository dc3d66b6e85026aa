"""`ferry`: with no subcommand opens the console; subcommands are headless, for scripts.

Expected failures print one line (what, and a hint) and exit non-zero; never a traceback.
Exit codes: 0 done, 1 failed, 2 bad configuration or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from ferry.engine.errors import ConfigError, FerryError, PermanentError, Refused
from ferry.engine.textsafe import SafeStream, line as safe, raw_stream
from ferry.engine.workspace import Workspace

if TYPE_CHECKING:
    from ferry.engine.taskmodel import TaskInfo

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
T = TypeVar("T")


class _OnUse:
    """A module imported when first used: `ferry tasks --json` prints the engine's text and needs
    neither the records, nor their formatting, nor the catalogue of actions (a command adds <= 50 ms)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib
        return getattr(importlib.import_module(self._name), attr)


api, fmt = _OnUse("ferry.engine.api"), _OnUse("ferry.engine.fmt")

# `--engine TARGET` and `--engine-command CMD` of this command line: the engine of another machine.
_ATTACH: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("ferry_attach", default=None)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _table(rows: list[list[str]], headers: list[str]) -> str:
    rows = [[safe(x) for x in r] for r in rows]   # cells hold names and facts from hosts and guests
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- client plumbing

def _opener(ws: Workspace):
    """How to reach the engine given by --engine (over SSH), or None for this workspace's own."""
    attach = _ATTACH.get()
    if attach is None:
        return None
    from ferry.engine.remote_ssh import SshEngineLink
    return SshEngineLink(ws, attach[0], command=attach[1])


async def _with_client(ws: Workspace, fn: Callable[[Any], Awaitable[int]]) -> int:
    """Run `fn` with the workspace's engine service (started, detached, when none runs), or with the
    engine of another machine (--engine)."""
    from ferry.engine.remote import connect

    client = await connect(ws, client="cli", opener=_opener(ws), fetch_site=False)
    try:
        return await fn(client)
    finally:
        await client.close()


def _on_loop(ws: Workspace, fn: Callable[[Any], Awaitable[T]]) -> T:
    """`fn` with the engine, on an event loop: a command that follows a task (events, waits)."""
    import asyncio
    return asyncio.run(_with_client(ws, fn))


def _ask(ws: Workspace, fn: Callable[[Any], Awaitable[T]]) -> T:
    """`fn`, which awaits only the engine's calls, with the workspace's engine: over one blocking
    connection when it runs on this machine (no event loop to start and no asyncio to import: a
    command adds <= 50 ms to its work, issue 11), else as _on_loop does (it starts the engine, or
    reaches one over SSH)."""
    if _ATTACH.get() is None:
        from ferry.engine.calls import BlockingEngine, run_now
        client = BlockingEngine.connect(ws, client="cli")
        if client is not None:
            try:
                return run_now(fn(client))
            finally:
                client.close()
    return _on_loop(ws, fn)


class _Progress:
    """One live progress line on stderr when it is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        text = safe(text)[:118]   # the item is a file name; the only control character is our \r
        err = raw_stream(sys.stderr)
        err.write("\r" + text.ljust(self.width))
        err.flush()
        self.width = len(text)

    def done(self) -> None:
        if self.enabled and self.width:
            err = raw_stream(sys.stderr)
            err.write("\r" + " " * self.width + "\r")
            err.flush()
            self.width = 0


async def run_foreground(client, task_id: int, *, as_json: bool, describe: Callable[[TaskInfo], str] | None = None) -> int:
    """Follow a task of this process until it ends, with a live progress line; print its result."""
    from ferry.engine.taskmodel import FINAL_STATES, TaskState
    import asyncio
    line = _Progress(sys.stderr.isatty() and not as_json)
    sub = client.subscribe()
    told = None
    try:
        while True:
            info = await client.get_task(task_id)
            if info.state in FINAL_STATES:
                break
            if info.state in (TaskState.WAITING, TaskState.PAUSED) and told != info.state:
                line.done()
                if info.state == TaskState.WAITING:
                    print(f"task {task_id} waits for confirmation: "
                          f"{safe(info.waiting.get('prompt')) if info.waiting else ''} (`ferry task confirm {task_id} TEXT`, "
                          "or in the console)",
                          file=sys.stderr)
                else:
                    print(f"task {task_id} is paused; it goes on here when resumed (ctrl-c leaves it paused)",
                          file=sys.stderr)
            told = info.state
            for ev in await sub.wait(timeout=0.5):
                if ev.type == "progress" and ev.task_id == task_id:
                    line.show(f"[{task_id}] " + fmt.progress_line(ev.data))
                elif ev.type == "log" and ev.task_id == task_id and ev.data[0] in ("warning", "error"):
                    line.done()
                    print(f"{ev.data[0]}: {safe(ev.data[1])}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        line.done()
        print(f"ferry: stopped following task {task_id}; it goes on in the engine (hint: `ferry task resume "
              f"{task_id}` follows it again, `ferry task pause {task_id}` pauses it)", file=sys.stderr)
        raise
    finally:
        sub.close()
        line.done()
    info = await client.get_task(task_id)
    if as_json:
        _print_json({"task": info.id, "state": str(info.state), **(info.result or {}),
                     **({"error": info.error, "hint": info.hint} if info.error else {})})
    elif info.state == TaskState.SUCCEEDED:
        print(describe(info) if describe else f"task {task_id} succeeded")
    if info.state == TaskState.SUCCEEDED:
        return EXIT_OK
    if not as_json:
        msg = f"ferry: task {task_id} {info.state}" + (f": {safe(info.error)}" if info.error else "")
        print(msg + (f" (hint: {safe(info.hint)})" if info.hint else ""), file=sys.stderr)
    return EXIT_FAIL


# --------------------------------------------------------------------------- commands

def cmd_console(args, ws: Workspace) -> int:
    site = ws.load_config()  # an invalid config stops here with the one-line errors
    opener = None
    if _ATTACH.get() is not None:
        # The views are laid out from the site of the engine over there: ask it first (a refused
        # host key or an engine that cannot start is said here, before the screen opens).
        async def site_of(client) -> Any:
            return await client.get_site()
        site = _on_loop(ws, site_of)
        opener = _opener(ws)
    from ferry.console.app import run_console   # imported only here: headless commands never load textual
    return run_console(ws, site, theme=args.theme, opener=opener, readonly=args.readonly)


def cmd_init(args, ws: Workspace) -> int:
    if ws.config_path.exists() and not args.force:
        raise PermanentError(f"{ws.config_path} already exists", "pass --force to overwrite it")
    lab = None
    if args.network_lab:
        # the lab first: config.toml names its key, which must exist; its host keys go to known_hosts
        async def up(client) -> Any:
            return await client.lab_up()
        try:
            lab = _ask(ws, up)
        except Refused as e:
            print(f"ferry: {safe(e)}", file=sys.stderr)
            return EXIT_CONFIG
    path = ws.write_lab_config(force=args.force, network=lab is not None, subnet=lab.subnet if lab else None)

    async def go(client) -> int:
        await client.audit("config.init", str(path), {"force": args.force, "network_lab": args.network_lab}, "ok")
        return EXIT_OK
    _ask(ws, go)
    print(f"wrote the {'network ' if lab else ''}lab configuration to {path}"
          + (f" (hosts {', '.join(f'{h.name} {h.address}' for h in lab.hosts)}, over SSH)" if lab else ""))
    return EXIT_OK


def cmd_config_check(args, ws: Workspace) -> int:
    try:
        site = ws.load_config()
    except ConfigError as e:
        if args.json:
            _print_json({"ok": False, "problems": [p.__dict__ for p in e.problems]})
        else:
            print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    summary = {"ok": True, "file": site.source or "<built-in lab>", "site": site.name,
               "clusters": len(site.clusters), "hosts": len(site.hosts), "datastores": len(site.datastores)}
    if args.json:
        _print_json(summary)
    else:
        print(f"{summary['file']}: ok — site {site.name}, {len(site.clusters)} clusters, "
              f"{len(site.hosts)} hosts, {len(site.datastores)} datastores")
    return EXIT_OK


def cmd_hosts(args, ws: Workspace) -> int:
    async def go(client) -> int:
        facts = await client.hosts_facts(timeout=args.timeout)
        site = await client.get_site()
        if args.json:
            _print_json([{**api.to_builtins(f), "cluster": site.hosts[n].cluster} for n, f in facts.items()])
            return EXIT_OK
        rows = []
        for name, f in facts.items():
            spec = site.hosts[name]
            if not f.reachable:
                rows.append([name, spec.cluster, spec.transport, "✖ no", f.error or "", "", "", "", "", "", "", ""])
                continue
            ds = ", ".join(f"{d.name} {fmt.size(d.free)} free" if d.total else f"{d.name} ?" for d in f.datastores)
            nets = ", ".join(n.name + {True: "", False: " (missing)", None: " (?)"}[n.present] for n in f.networks)
            rows.append([name, spec.cluster, spec.transport, "✔ yes", f.os_name or "?", f.kernel or "?",
                         str(f.cpus or "?"), f"{fmt.size(f.mem_available)}/{fmt.size(f.mem_total)}",
                         f"{f.load1:.2f}" if f.load1 is not None else "?", ds or "-", nets or "-",
                         f.qemu_version or "none"])
        print(_table(rows, ["HOST", "CLUSTER", "VIA", "REACH", "OS", "KERNEL", "CPUS", "MEM FREE/TOTAL",
                            "LOAD", "DATASTORES", "NETWORKS", "QEMU"]))
        for name, f in facts.items():
            if not f.reachable and f.hint:
                print(f"{name}: {safe(f.error)} (hint: {safe(f.hint)})", file=sys.stderr)
            for n in f.networks if f.reachable else ():
                if n.problem:
                    print(f"{name}: {safe(n.problem)}" + (f" (hint: {safe(n.hint)})" if n.hint else ""),
                          file=sys.stderr)
        return EXIT_OK if all(f.reachable for f in facts.values()) else EXIT_FAIL
    return _ask(ws, go)


def _ask_trust(args, name: str, info: Any) -> int | None:
    """Show the key `name` presents and ask the operator; an exit code when nothing is to be recorded."""
    who = f"{name} ({info.endpoint})" + (f" via jump host {info.jump}" if info.jump else "")
    print(safe(f"{who} presents {info.key_type} key {info.fingerprint}"))
    if info.status == "trusted":
        print("already trusted")
        return EXIT_OK
    if info.status == "changed":
        print(f"WARNING: this key differs from the one recorded ({', '.join(info.old_fingerprints)}).\n"
              "It may be a reinstalled host, or someone intercepting the connection.")
    if args.fingerprint and args.fingerprint != info.fingerprint:
        raise PermanentError(f"{name} presents {info.fingerprint}, not {args.fingerprint}",
                             "check the fingerprint on the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
    if not (args.yes or args.fingerprint):
        if not sys.stdin.isatty():
            raise PermanentError("refusing to trust a key without confirmation",
                                 f"pass --fingerprint {info.fingerprint} (checked on the host) or --yes")
        if input("Trust this key? Type yes: ").strip() != "yes":
            print("not trusted")
            return EXIT_FAIL
    return None


def _trusted(where: Any, info: Any, again: str) -> int:
    print(f"trusted: recorded in {where}")
    if info.jump:
        print(f"this was the key of jump host {info.jump}; run `{again}` again for the host itself")
    return EXIT_OK


def cmd_hosts_trust(args, ws: Workspace) -> int:
    async def go(client) -> int:
        (await client.get_site()).host(args.host)     # an unknown name is said as config.toml would
        info = await client.host_key(args.host)
        code = _ask_trust(args, args.host, info)
        if code is not None:
            return code
        await client.trust_host(args.host, info.fingerprint)
        attach = _ATTACH.get()
        where = f"the known_hosts of the engine on {attach[0]}" if attach else ws.known_hosts_path
        return _trusted(where, info, f"ferry hosts trust {args.host}")
    return _ask(ws, go)


def cmd_engine_trust(args, ws: Workspace) -> int:
    """Trust the SSH host key of an --engine target, in this workspace's known_hosts (no engine needed)."""
    import asyncio

    from ferry.engine.remote_ssh import SshEngineLink
    attach = _ATTACH.get()
    target = args.target or (attach[0] if attach else None)
    if not target:
        raise PermanentError("which engine's host?", "ferry engine trust [user@]host[:port] (or a host of config.toml)")

    async def go() -> int:
        link = SshEngineLink(ws, target)
        try:
            info = await link.host_key()
            code = _ask_trust(args, link.parsed.host, info)
            if code is not None:
                return code
            await link.trust(info)
        finally:
            await link.close()
        return _trusted(ws.known_hosts_path, info, f"ferry engine trust {target}")
    return asyncio.run(go())


def _engine_over_ssh(args, ws: Workspace) -> int:
    """`ferry --engine TARGET engine ACTION`: the same command, run over there; its output relayed."""
    import asyncio
    action = args.engine_command
    if action == "start" and args.foreground:
        raise PermanentError("--foreground runs the engine in this process, not over SSH",
                             "run `ferry engine start --foreground` on that machine itself")
    argv = ["engine", action, *(["--json"] if getattr(args, "json", False) else []),
            *(["--now"] if action == "stop" and args.now else []),
            *(["--user", args.user] if action == "unit" and args.user else [])]

    async def go() -> int:
        link = _opener(ws)
        try:
            r = await link.run_remote(argv, timeout=None)   # a stop waits for the tasks' checkpoints
        finally:
            await link.close()
        sys.stdout.write(r.stdout.decode("utf-8", "replace"))
        sys.stderr.write(r.stderr.decode("utf-8", "replace"))
        return r.exit_status
    return asyncio.run(go())


def _task_row(t: TaskInfo) -> list[str]:
    from ferry.engine.taskmodel import TaskState
    p = t.progress
    return [str(t.id), t.kind, f"{t.state.symbol} {t.state}", f"{fmt.bar(p.fraction, 10)} {fmt.percent(p.fraction)}",
            fmt.rate(p.rate) if t.state == TaskState.RUNNING else "-",
            fmt.duration(p.eta) if t.state == TaskState.RUNNING else "-", t.title]


def _json_tasks(text: str, everything: bool) -> str:
    """`ferry tasks --json` from the engine's --json of list_tasks (api.dumps of its records): the same
    choice of tasks as the text output, and the same bytes as api.dumps of those records (a re-dump of
    api.dumps' output with its options is that output again)."""
    from ferry.engine.api import FINAL_STATES
    if everything:
        return text
    final = {str(s) for s in FINAL_STATES}
    tasks = json.loads(text)
    tasks = [t for t in tasks if t["state"] not in final] + [t for t in tasks if t["state"] in final][:20]
    tasks.sort(key=lambda t: -t["id"])
    return json.dumps(tasks, indent=2, sort_keys=True)


def cmd_tasks(args, ws: Workspace) -> int:
    async def go(client) -> int:
        # Through the engine: it first marks the tasks of Ferry processes that died as interrupted.
        if args.json:
            print(_json_tasks(await client.as_json(client.list_tasks, limit=args.limit), args.all))
            return EXIT_OK
        from ferry.engine.taskmodel import FINAL_STATES, TaskState
        tasks = await client.list_tasks(limit=args.limit)
        if not args.all:
            tasks = [t for t in tasks if t.state not in FINAL_STATES] + [t for t in tasks if t.state in FINAL_STATES][:20]
            tasks.sort(key=lambda t: -t.id)
        if args.json:
            print(api.dumps(tasks))
        elif not tasks:
            print("no tasks")
        else:
            print(_table([_task_row(t) for t in tasks], ["ID", "KIND", "STATE", "PROGRESS", "RATE", "ETA", "TITLE"]))
            stopped = [t.id for t in tasks if t.state == TaskState.INTERRUPTED]
            if stopped:
                print(f"interrupted: {', '.join(map(str, stopped))} (their Ferry process stopped mid-task): "
                      "`ferry task resume ID` goes on from the last checkpoint, `ferry task cancel ID` rolls back")
        return EXIT_OK
    return _ask(ws, go)


def cmd_task_show(args, ws: Workspace) -> int:
    async def go(client) -> int:
        if args.json:     # the engine's --json of each part (api.dumps' output loads and dumps as itself)
            parts = [json.loads(await client.as_json(call, args.id))
                     for call in (client.get_task, client.task_log, client.task_files)]
            print(json.dumps({**parts[0], "log": parts[1], "files": parts[2]}, indent=2, sort_keys=True))
            return EXIT_OK
        from ferry.engine.taskmodel import TaskState
        t = await client.get_task(args.id)
        logs = await client.task_log(args.id)
        print(f"task {t.id}: {safe(t.title)}\n  kind      {t.kind}\n  state     {t.state.symbol} {t.state}"
              f"\n  progress  {safe(fmt.progress_line(t.progress, state=t.state))}\n  created   {fmt.stamp(t.created)} by {safe(t.created_by)}"
              f"\n  started   {fmt.stamp(t.started)}\n  finished  {fmt.stamp(t.finished)}\n  attempts  {t.attempts}")
        if t.error:
            print(f"  error     {safe(t.error)}" + (f"\n  hint      {safe(t.hint)}" if t.hint else ""))
        if t.state == TaskState.INTERRUPTED:
            print(f"  hint      its Ferry process stopped mid-task: `ferry task resume {t.id}` goes on from the "
                  f"last checkpoint, `ferry task cancel {t.id}` rolls back what it made")
        if t.result:
            print("  result    " + json.dumps(t.result, sort_keys=True, default=str))
        for f in await client.task_files(args.id):
            print(f"  {f.role:9} {safe(f.host)}:{safe(f.path)}")
        for entry in logs[-20:]:
            print(f"  {fmt.clock(entry.ts)} {entry.level:7} {safe(entry.message)}")
        return EXIT_OK
    return _ask(ws, go)


def cmd_task_confirm(args, ws: Workspace) -> int:
    """`ferry task confirm ID TEXT`: what a waiting task asked to be typed, given; it goes on."""
    info = _ask(ws, lambda client: client.confirm(args.id, args.text))
    print(api.dumps(info) if args.json else f"task {info.id}: confirmed -> {info.state}")
    return EXIT_OK


def cmd_task_control(args, ws: Workspace) -> int:
    from ferry.engine.taskmodel import FINAL_STATES, TaskState

    action = args.action
    # What this command waits for, so that what it prints (and its exit) is the task's new state.
    goal = {"pause": FINAL_STATES | {TaskState.PAUSED}}.get(action, FINAL_STATES)

    async def act(client) -> TaskInfo:
        info = await client.get_task(args.id)
        if action == "resume" and info.state in (TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING):
            # An engine that starts resumes the tasks a dead one left; this one may already have.
            if not args.json:
                print(f"task {info.id} is {info.state} in the engine; following it", file=sys.stderr)
            return info
        # The engine answers a pause or a cancel of a task it runs once the task has stopped (and,
        # cancelled, rolled back what it made).
        return await getattr(client, action)(args.id)

    async def settle(client) -> TaskInfo:
        # A task another process runs (a front end with an engine of its own) gets the request,
        # which its process applies within a second: wait for that here.
        if action == "cancel" and not args.json:
            print(f"task {args.id}: rolling back what it made…", file=sys.stderr)
        import asyncio
        deadline = time.monotonic() + 30 if action == "pause" else None
        info = await client.get_task(args.id)
        while info.state not in goal and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
            info = await client.get_task(args.id)
        return info

    info = _ask(ws, act)
    if action in ("pause", "cancel") and info.state not in goal:
        info = _on_loop(ws, settle)
    if action == "resume" and not info.state.final and not args.detach:
        # Follow it until it ends (ctrl-c stops following; the task goes on in the engine).
        return _on_loop(ws, lambda client: run_foreground(client, args.id, as_json=args.json))
    if args.json:
        print(api.dumps(info))
    else:
        print(f"task {info.id}: {action} -> {info.state}"
              + (" (requested: it stops at its next step)" if action != "resume" and info.state not in goal
                 else ""))
    return EXIT_OK


def cmd_probe(args, ws: Workspace) -> int:
    def describe(info: TaskInfo) -> str:
        r = info.result or {}
        lat = r.get("latency", {})
        text = (f"{r.get('host')}: latency min {lat.get('min_ms', 0):.2f} / avg {lat.get('avg_ms', 0):.2f} / "
                f"max {lat.get('max_ms', 0):.2f} ms, jitter {lat.get('jitter_ms', 0):.2f} ms "
                f"({lat.get('samples')} samples)")
        if r.get("upload_Bps"):
            text += (f"\n{r.get('host')}: throughput up {fmt.rate(r['upload_Bps'])} ({r['upload_mbit']:.0f} Mbit/s),"
                     f" down {fmt.rate(r['download_Bps'])} ({r['download_mbit']:.0f} Mbit/s) over {fmt.size(r['bytes'])}")
        return text

    async def go(client) -> int:
        tid = await client.start_probe(args.host, pings=args.pings, size_mib=args.size)
        return await run_foreground(client, tid, as_json=args.json, describe=describe)
    return _on_loop(ws, go)


def _size_arg(text: str) -> int:
    from ferry.engine.fmt import parse_rate
    try:
        return int(parse_rate(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _describe_replication(info: TaskInfo) -> str:
    r = info.result or {}
    verb = "resumed and finished" if r.get("resumed") else "finished"
    text = (f"round {r.get('round')} {verb}: {r.get('src')} → {r.get('dst')}: {r.get('items_changed')} of "
            f"{r.get('items_total')} {'chunks' if 'zero_chunks' in r else 'entries'} changed, "
            f"{fmt.size(r.get('bytes_sent'))} sent of {fmt.size(r.get('bytes_total'))} in "
            f"{fmt.duration(r.get('duration_s'))}")
    if r.get("verification"):
        text += f"\nverified: {r['verification']}"
    for note in r.get("notes", []):
        text += f"\nnote: {safe(note)}"
    return text


def cmd_replicate(args, ws: Workspace) -> int:
    params: dict[str, Any] = {"src": args.src, "dst": args.dst}
    if args.streams:
        params["streams"] = args.streams
    if args.stall_timeout:
        params["stall_timeout"] = args.stall_timeout
    if args.bwlimit:
        params["bwlimit"] = args.bwlimit
    if args.level == "files":
        params.update(excludes=args.exclude or [], system_excludes=args.system_excludes,
                      checksum=args.checksum, delete=args.delete, one_file_system=args.one_file_system)
    else:
        params.update(chunk_size=args.chunk_size, compress=args.compress, restart=args.restart)

    async def go(client) -> int:
        try:
            tid, resumed = await client.replicate(args.level, params, restart=args.restart)
        except Refused as e:            # the engine's precheck: no task was made
            print(f"ferry: {safe(e)}", file=sys.stderr)
            return EXIT_CONFIG
        except PermanentError as e:     # the job is run by a task of another Ferry process: follow it
            if args.restart or getattr(e, "task_id", None) is None:
                raise
            print(f"ferry: {e.message}; following it", file=sys.stderr)   # another front end started it
            tid, resumed = e.task_id, False
        if resumed and not args.json:
            print(f"resuming task {tid} from its checkpoint", file=sys.stderr)
        return await run_foreground(client, tid, as_json=args.json, describe=_describe_replication)
    return _on_loop(ws, go)


def cmd_gc(args, ws: Workspace) -> int:
    async def go(client) -> int:
        items = await client.gc(dry_run=args.dry_run)
        if args.json:
            print(api.dumps(items))
            return EXIT_OK
        if not items:
            print("nothing left behind by tasks")
            return EXIT_OK
        rows = []
        for i in items:
            status = ("kept: " + i.kept if i.kept else "failed: " + i.error if i.error
                      else "removed" if i.removed else "would remove")
            rows.append([i.host, i.path or "(record)", fmt.size(i.bytes) if i.bytes is not None else "?", i.what, status])
        print(_table(rows, ["HOST", "PATH", "SIZE", "WHAT", "STATUS"]))
        gone = [i for i in items if not i.kept and not i.error]
        total = fmt.size(sum(i.bytes or 0 for i in gone))
        print(f"{'would remove' if args.dry_run else 'removed'} {len(gone)} leftover(s), {total}"
              + (f"; kept {sum(1 for i in items if i.kept)} held by unfinished tasks" if any(i.kept for i in items) else ""))
        return EXIT_FAIL if any(i.error for i in items) else EXIT_OK
    return _ask(ws, go)


def cmd_audit(args, ws: Workspace) -> int:
    async def go(client) -> int:
        if args.json:
            print(await client.as_json(client.audit_log, limit=args.limit))
            return EXIT_OK
        rows = await client.audit_log(limit=args.limit)
        print(_table([[fmt.stamp(r.ts), r.actor, r.action, r.target, r.result] for r in rows],
                     ["WHEN", "WHO", "ACTION", "TARGET", "RESULT"]))
        return EXIT_OK
    return _ask(ws, go)


def _print_status(args, st: api.EngineStatus) -> None:
    if args.json:
        print(api.dumps({"running": True, **api.to_builtins(st)}))
    else:
        print(f"engine running: pid {st.pid}, version {st.version}, up {fmt.duration(time.time() - st.started)}\n"
              f"  workspace  {st.workspace} (site {st.site})\n  tasks      {st.tasks_active} active\n"
              f"  clients    {st.clients} attached\n  log        {st.log}"
              + ("\n  holding    interrupted tasks wait for `ferry task resume ID`" if st.hold else ""))


def cmd_engine(args, ws: Workspace) -> int:
    action = args.engine_command
    if _ATTACH.get() is not None:
        return _engine_over_ssh(args, ws)
    if action == "status":
        from ferry.engine.calls import BlockingEngine, run_now
        quick = BlockingEngine.connect(ws, client="cli")
        if quick is not None:
            try:
                if args.json:
                    st = json.loads(run_now(quick.as_json(quick.status)))
                    print(json.dumps({"running": True, **st}, indent=2, sort_keys=True))
                else:
                    _print_status(args, run_now(quick.status()))
            finally:
                quick.close()
            return EXIT_OK
    import asyncio

    from ferry.engine import remote, service
    if action == "unit":
        print(service.systemd_unit(ws, user=args.user))
        return EXIT_OK
    if action == "start" and args.foreground:
        return service.main(["--workspace", str(ws.root)] + (["--journal"] if args.journal else [])
                            + (["--hold"] if args.hold else []))
    if action == "start" and args.hold:
        os.environ["FERRY_ENGINE_HOLD"] = "1"      # for the engine this command starts

    async def go() -> int:
        if action == "start":
            pid = service.running_pid(ws)
            client = await remote.connect(ws, client="cli")
            try:
                st = await client.status()
            finally:
                await client.close()
            verb = "already runs" if pid else "started"
            if args.json:     # `ferry --engine` reads where the workspace is from this
                print(api.dumps({"running": True, **api.to_builtins(st)}))
            else:
                print(f"engine {verb}: pid {st.pid}, version {st.version}, workspace {st.workspace} (log: {st.log})")
            return EXIT_OK
        try:
            client = await remote.connect(ws, client="cli", autostart=False)
        except remote.EngineUnavailable:
            if args.json:
                print(json.dumps({"running": False, "workspace": str(ws.root)}))
            else:
                print(f"no engine runs for workspace {ws.root}")
            return EXIT_OK if action == "stop" else EXIT_FAIL
        try:
            st = await client.status()
            if action == "status":
                _print_status(args, st)
                return EXIT_OK
            await client.stop_engine(now=args.now)
        finally:
            await client.close()
        if st.tasks_active and not args.now:
            print(f"engine stopping: {st.tasks_active} task(s) stop at their next checkpoint and resume when it "
                  "starts again", file=sys.stderr)
        while remote.engine_pid_alive(st.pid):
            await asyncio.sleep(0.05)
        print(f"engine stopped (pid {st.pid})")
        return EXIT_OK
    return asyncio.run(go())


# Commands that work on this machine's own workspace (its config.toml, its image cache), never
# through an engine: under --engine they would change this machine while the operator means the
# engine's, so they are refused.
LOCAL_ONLY = {"init": "ferry init", "config": "ferry config check", "lab image": "ferry lab image build"}


def _local_only(args: argparse.Namespace) -> Refused | None:
    """A refusal for a command that works on this machine's workspace, asked of a far engine
    (`ferry lab up|down|status` go to the engine like any command; `lab image build` does not)."""
    command = getattr(args, "command", None)
    if command == "lab":
        command = f"lab {getattr(args, 'lab_command', '')}"
    if not args.engine or command not in LOCAL_ONLY:
        return None
    return Refused(f"`{LOCAL_ONLY[command]}` works on this machine's workspace, not on the engine of "
                   f"{args.engine}", "run it on that machine itself, or here without --engine")


# --------------------------------------------------------------------------- parser

# The options of `ferry` itself that take a value: the command word is the first word after them.
_VALUED = ("--workspace", "--theme", "--engine", "--engine-command")
_VM_COMMANDS = ("vm", "template", "lab")     # console/cli/vm.py's
_MIGRATION_COMMANDS = ("plan", "migration")  # console/cli/migration.py's
_OPS_COMMANDS = ("alarms", "alarm", "silence", "events", "schedules")   # console/cli/ops.py's
_HEALTH_COMMANDS = ("health",)                                          # console/cli/health.py's
_BACKUP_COMMANDS = ("backup",)                                          # console/cli/backup.py's
_METRICS_COMMANDS = ("metrics",)                                        # console/cli/metrics.py's


def _command_at(argv: list[str]) -> int | None:
    """Where the command `argv` names is (`tasks` in `--workspace W tasks --json`), None for none or help."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help", "--"):
            return None
        if word.startswith("--") and "=" not in word and any(v.startswith(word) for v in _VALUED):
            i += 2      # the option and its value (argparse takes an abbreviation of an option too)
        elif not word.startswith("-"):
            return i
        else:
            i += 1
    return None


class _Skipped:
    """The parser of a command the command line does not name: it takes every call and keeps
    nothing. argparse spends ~20 ms making the 50 parsers of every command; a command needs one."""

    def __getattr__(self, name: str) -> Any:
        return self._nothing

    def _nothing(self, *args: Any, **kw: Any) -> "_Skipped":
        return self


class _OnlyCommand:
    """The subcommands of `ferry`, of which only `wanted` is made (all of them when None)."""

    def __init__(self, sub: Any, wanted: str | None) -> None:
        self.sub, self.wanted = sub, wanted

    def add_parser(self, name: str, *, verb: str | None = None, **kw: Any) -> Any:
        """`verb`: the help line is the catalogue's for that CLI verb, shown only in `ferry`'s own help."""
        if self.wanted is None or name == self.wanted:
            if verb is not None and self.wanted is None and not isinstance(self.sub, _Skipped):
                kw["help"] = cli_help(verb)
            return self.sub.add_parser(name, **kw)
        return _Skipped()


def cli_help(verb: str) -> str:
    """The catalogue's help line of a CLI verb (console/actions.py, imported only when one is shown)."""
    from ferry.console.actions import cli_help
    return cli_help(verb)


def _columns() -> int:
    """shutil.get_terminal_size().columns, as argparse asks it, without importing shutil (it loads
    the compression modules: ~2 ms of every command)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with _Formatter (its subcommands' parsers are of its class)."""

    def __init__(self, *args: Any, formatter_class: Any = _Formatter, **kw: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kw)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; given the command line `argv`, only its command's parser is made (what
    `ferry` shows for help or a usage error does not change)."""
    p = _Parser(prog="ferry", description="Operator console for a KVM/QEMU platform and for "
                                "moving servers onto it. With no command, opens the console.")
    p.add_argument("--workspace", metavar="DIR", help="workspace folder (default: $FERRY_WORKSPACE, "
                   "else $XDG_STATE_HOME/ferry)")
    p.add_argument("--theme", help="console theme by name (dark, light, high-contrast, production, ...)")
    p.add_argument("--readonly", action="store_true", help="console without any action that changes something")
    p.add_argument("--engine", metavar="TARGET", help="attach to the engine of another machine over SSH: "
                   "[user@]host[:port] or a host of config.toml, optionally :/path/of/its/workspace "
                   "(host key checked against this workspace's known_hosts; `ferry engine trust TARGET`)")
    p.add_argument("--engine-command", metavar="CMD", dest="remote_ferry", help="the ferry command on that machine "
                   "(default: $FERRY_ENGINE_COMMAND, else ferry)")
    p.set_defaults(func=cmd_console)
    at = _command_at(argv) if argv is not None else None
    wanted = argv[at] if argv is not None and at is not None else None
    if wanted is not None and wanted not in _COMMANDS:
        wanted = None       # argparse says which commands there are: all of them are made
    task_action = None      # of `ferry task ACTION`: only its parser is made too
    if wanted == "task":
        after = _command_at(argv[at + 1:])
        task_action = argv[at + 1 + after] if after is not None else None
        task_action = task_action if task_action in ("show", "pause", "resume", "cancel", "confirm") else None
    sub = _OnlyCommand(p.add_subparsers(dest="command", metavar="COMMAND"), wanted)

    s = sub.add_parser("init", help="write the lab configuration to the workspace so it can be edited")
    s.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    s.add_argument("--network-lab", action="store_true", help="the network lab's: hosts are network namespaces "
                   "reached over SSH at their own addresses (brings the lab up; needs root)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("config", help="configuration commands")
    cs = s.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = cs.add_parser("check", help="validate config.toml; one line per problem, exit 2 when invalid")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_check)

    s = sub.add_parser("hosts", verb="hosts")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per host (default 10)")
    s.set_defaults(func=cmd_hosts)
    hs = s.add_subparsers(dest="hosts_command", metavar="SUBCOMMAND")
    t = hs.add_parser("trust", help="accept and record a host's SSH host key")
    t.add_argument("host")
    t.add_argument("--fingerprint", help="accept only this SHA256 fingerprint (checked on the host)")
    t.add_argument("--yes", action="store_true", help="accept without asking")
    t.set_defaults(func=cmd_hosts_trust)

    s = sub.add_parser("tasks", verb="tasks")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="include every finished task")
    s.add_argument("--limit", type=int, default=500)
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("task", help="show or control one task")
    ts = _OnlyCommand(s.add_subparsers(dest="task_command", metavar="ACTION", required=True), task_action)
    t = ts.add_parser("show", verb="task show")
    t.add_argument("id", type=int)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_task_show)
    for action in ("pause", "resume", "cancel"):
        t = ts.add_parser(action, verb=f"task {action}")
        t.add_argument("id", type=int)
        t.add_argument("--json", action="store_true")
        if action == "resume":
            t.add_argument("--detach", action="store_true", help="do not follow it until it ends")
        else:
            t.set_defaults(detach=True)
        t.set_defaults(func=cmd_task_control, action=action)
    t = ts.add_parser("confirm", help="confirm a task that waits for a typed confirmation (a cutover paused "
                      "before a step: the migration's name)")
    t.add_argument("id", type=int)
    t.add_argument("text", help="what the task asks to be typed")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_task_confirm)

    s = sub.add_parser("probe", verb="probe")
    s.add_argument("host")
    s.add_argument("--pings", type=int, default=20, help="round trips to time (default 20)")
    s.add_argument("--size", type=int, default=64, metavar="MiB", help="MiB streamed each way (default 64)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("replicate", help="copy a tree (files) or a disk (blocks) between hosts, resumable")
    rs = s.add_subparsers(dest="level", metavar="LEVEL", required=True)
    for level, text in (("files", "file-level copy of a directory tree (tar/rsync-like), incremental"),
                        ("blocks", "block-level copy of a device or image (dd-like), incremental")):
        r = rs.add_parser(level, help=text, description=text + ". SRC and DST are HOST:PATH, HOST a host of "
                          "the configuration or `local`. Running the same command again after an "
                          "interruption resumes from the checkpoint; after a success it runs an "
                          "incremental round.")
        r.add_argument("src", metavar="SRC")
        r.add_argument("dst", metavar="DST")
        r.add_argument("--streams", type=int, help="parallel streams (default: this machine's cores, 2 to 4)")
        r.add_argument("--bwlimit", type=_size_arg, metavar="RATE", help="bandwidth limit, e.g. 50M (MiB/s)")
        r.add_argument("--restart", action="store_true", help="start over instead of resuming")
        r.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                       help="fail (and retry) a stream an agent has said nothing on for this long (default 120)")
        r.add_argument("--json", action="store_true", help="print one JSON object with the round's figures")
        if level == "files":
            r.add_argument("--exclude", action="append", metavar="PATTERN",
                           help="skip matching paths ('/x' anchored at the root, 'x' any name, 'x/' dirs only)")
            r.add_argument("--system-excludes", action="store_true",
                           help="skip /proc /sys /dev /run /tmp /mnt /media lost+found and swap files (a live root)")
            r.add_argument("--checksum", action="store_true", help="compare contents, not size and mtime")
            r.add_argument("--delete", action=argparse.BooleanOptionalAction, default=True,
                           help="delete target entries the source does not have (default: yes)")
            r.add_argument("--one-file-system", action="store_true", help="do not cross filesystem boundaries")
        else:
            r.add_argument("--chunk-size", type=_size_arg, default=4 << 20, metavar="SIZE",
                           help="chunk size, e.g. 4M (default)")
            r.add_argument("--compress", action="store_true", help="compress chunks (for slow links)")
        r.set_defaults(func=cmd_replicate)

    s = sub.add_parser("gc", help="list and remove what tasks that are gone left behind, with sizes")
    s.add_argument("--dry-run", action="store_true", help="list only; remove nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("audit", verb="audit")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("engine", help="the engine service that runs the tasks of this workspace")
    es = s.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    e = es.add_parser("start", help="start it (every command that needs it starts it anyway)")
    e.add_argument("--foreground", action="store_true", help="run it in this process (systemd, debugging)")
    e.add_argument("--journal", action="store_true", help="with --foreground: also log to stderr")
    e.add_argument("--hold", action="store_true", help="leave interrupted tasks interrupted until resumed by hand "
                   "(after a crash that may come back); by default the engine resumes them as it starts")
    e.add_argument("--json", action="store_true", help="print its status as JSON once it runs")
    e.set_defaults(func=cmd_engine)
    e = es.add_parser("stop", help="stop it; running tasks stop at their next checkpoint and resume at the next start")
    e.add_argument("--now", action="store_true", help="do not wait for checkpoints (tasks resume from the last one)")
    e.set_defaults(func=cmd_engine, json=False)
    e = es.add_parser("status", help="whether it runs, its pid, version, tasks and clients")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_engine)
    e = es.add_parser("unit", help="print a systemd unit that runs it (see the README)")
    e.add_argument("--user", help="the user it runs as (default: the current one)")
    e.set_defaults(func=cmd_engine)
    e = es.add_parser("trust", help="accept and record the SSH host key of an --engine target")
    e.add_argument("target", nargs="?", metavar="TARGET", help="[user@]host[:port] or a host of config.toml "
                   "(default: the --engine target)")
    e.add_argument("--fingerprint", help="accept only this SHA256 fingerprint (checked on the host)")
    e.add_argument("--yes", action="store_true", help="accept without asking")
    e.set_defaults(func=cmd_engine_trust)

    if wanted is None or wanted in _VM_COMMANDS:
        from ferry.console.cli.vm import add_parsers
        add_parsers(sub)
    if wanted is None or wanted in _MIGRATION_COMMANDS:
        from ferry.console.cli.migration import add_parsers as add_migration_parsers
        add_migration_parsers(sub)
    if wanted is None or wanted in _OPS_COMMANDS:
        from ferry.console.cli.ops import add_parsers as add_ops_parsers
        add_ops_parsers(sub)
    if wanted is None or wanted in _HEALTH_COMMANDS:
        from ferry.console.cli.health import add_parsers as add_health_parsers
        add_health_parsers(sub)
    if wanted is None or wanted in _BACKUP_COMMANDS:
        from ferry.console.cli.backup import add_parsers as add_backup_parsers
        add_backup_parsers(sub)
    if wanted is None or wanted in _METRICS_COMMANDS:
        from ferry.console.cli.metrics import add_parsers as add_metrics_parsers
        add_metrics_parsers(sub)
    if wanted in (None, "completion"):
        from ferry.console.cli.completion import add_parser as add_completion
        add_completion(sub)
    return p


_COMMANDS = ("init", "config", "hosts", "tasks", "task", "probe", "replicate", "gc", "audit", "engine",
             *_VM_COMMANDS, *_MIGRATION_COMMANDS, *_OPS_COMMANDS, *_HEALTH_COMMANDS, *_BACKUP_COMMANDS, *_METRICS_COMMANDS,
             "completion")


def main(argv: list[str] | None = None) -> int:
    # Whatever a headless command prints passes through SafeStream: messages quote names and
    # facts from hosts and guests, and none of their control characters may reach the terminal.
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(argv).parse_args(argv)
        if args.func is cmd_console:
            sys.stdout, sys.stderr = real   # Textual escapes what it shows itself
        ws = Workspace.resolve(args.workspace)
        attached = _ATTACH.set((args.engine, args.remote_ferry) if args.engine else None)
        try:
            refusal = _local_only(args)
            if refusal is not None:
                print(f"ferry: {safe(refusal)}", file=sys.stderr)
                return EXIT_CONFIG
            return args.func(args, ws)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_CONFIG
        except FerryError as e:
            print(f"ferry: {safe(e)}", file=sys.stderr)
            return EXIT_FAIL
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader stopped reading (`ferry vm list --json | head`): no more to say, and nothing
            # left to flush at exit (which would raise again).
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), real[0].fileno())
            return EXIT_OK
        finally:
            _ATTACH.reset(attached)
    finally:
        sys.stdout, sys.stderr = real


if __name__ == "__main__":
    sys.exit(main())
