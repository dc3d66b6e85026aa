"""`ferry vm ...`, `ferry template ...`, `ferry lab image build` and `ferry lab up|down|status`:
headless VM and lab commands."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ferry.engine import api, fmt
from ferry.engine.api import AgentReport, AgentState, VMState, VMView
from ferry.engine.errors import FerryError, PermanentError, Refused
from ferry.engine.taskmodel import TaskInfo
from ferry.engine.textsafe import line as safe
from ferry.engine.vm.model import parse_memory_mib, resumed_text
from ferry.engine.workspace import Workspace

from ferry.console.actions import cli_help
from ferry.console.cli import (EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _Progress, _ask, _on_loop, _print_json, _table,
                               run_foreground)


def _typed_confirmation(args, name: str, action: str) -> str:
    """The name typed by the operator (or given with --confirm); refuses when neither is possible."""
    if args.confirm is not None:
        return args.confirm
    if not sys.stdin.isatty():
        raise PermanentError(f"{action} {name} needs its name typed to confirm, and there is no terminal to ask on",
                             f"pass --confirm {name}")
    typed = input(f"{action} {name}: type its name to confirm: ").strip()
    if typed != name:
        raise PermanentError(f"the typed name {typed!r} is not {name!r}; nothing was done", "type the name exactly")
    return typed


VM_COLUMNS = ["NAME", "KIND", "HOST", "STATE", "CPUS", "MEM", "DISKS", "SIZE", "ORIGIN"]


def _state(v: VMView) -> str:
    """A VM's state as the lists show it: an unfinished one with the task it waits for."""
    state = f"{v.state.symbol} {v.state}"
    return state + (f" (task {v.busy})" if v.unfinished and v.busy else "")


def _vm_row(v: VMView, agents: bool = False) -> list[str]:
    row = [v.name, v.kind, v.host, _state(v), str(v.cpus), f"{v.memory_mb}M", str(len(v.disks)), fmt.size(v.disk_bytes),
           v.origin]
    if agents:
        a = v.agent if v.state is VMState.RUNNING else None     # "-": it does not run
        ips = _reachable(a.ips) if a else []
        row += [a.agent if a else "-", ", ".join(ips) or "-"]
    return row


def _reachable(ips) -> list[str]:
    """The addresses worth a column: without prefix, loopback or IPv6 link-local ones (`vm show` and
    `vm agent info` list them all)."""
    import ipaddress
    out = []
    for a in ips:
        try:
            ip = ipaddress.ip_interface(a).ip
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local):
            out.append(str(ip))
    return out


def _agent_not_asked(v: VMView) -> AgentReport:
    """The agent of a VM that does not run: not asked, and the record says so (`--json` has an agent
    record for every VM whose agents were asked, never null)."""
    return AgentReport(v.name, AgentState.NOT_RUNNING, time.time(),
                       reason=f"{v.name} is {v.state}, so its guest agent cannot answer")


async def _with_agents(client, vms: list[VMView]) -> list[VMView]:
    """The VMs, each with what its agent answered (or why not), asked all at once."""
    async def ask(v: VMView) -> VMView:
        if v.state is not VMState.RUNNING:
            return v.with_(agent=_agent_not_asked(v))
        try:
            return v.with_(agent=await client.vm_agent(v.name))
        except FerryError as e:
            return v.with_(agent=AgentReport(v.name, AgentState.UNKNOWN, time.time(), reason=e.message))
    import asyncio
    return list(await asyncio.gather(*(ask(v) for v in vms)))


def _stamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts is not None else "-"


def cmd_vm_list(args, ws: Workspace) -> int:
    async def go(client) -> int:
        vms = await client.vm_list(recycled=args.recycled)
        if args.templates:
            vms = [v for v in vms if v.is_template]
        if args.agents and not args.recycled:
            vms = await _with_agents(client, vms)
        if args.json:
            print(api.dumps(vms))
            return EXIT_OK
        if not vms:
            print("the recycle bin is empty" if args.recycled else "no VMs yet (ferry vm create NAME --host HOST)")
            return EXIT_OK
        if args.recycled:
            rows = [[v.name, v.kind, v.host, _state(v), _stamp(v.recycled), _stamp(v.purge_at)] for v in vms]
            print(_table(rows, ["NAME", "KIND", "HOST", "STATE", "DELETED", "PURGED AFTER"]))
        else:
            agents = args.agents
            print(_table([_vm_row(v, agents) for v in vms], VM_COLUMNS + (["AGENT", "IPS"] if agents else [])))
        return EXIT_OK
    return _on_loop(ws, go) if args.agents and not args.recycled else _ask(ws, go)


def cmd_vm_show(args, ws: Workspace) -> int:
    async def go(client) -> int:
        v = await client.vm_get(args.name)
        v = v.with_(agent=await client.vm_agent(args.name) if v.state is VMState.RUNNING else _agent_not_asked(v))
        if args.json:
            print(api.dumps(v))
            return EXIT_OK
        print(safe(f"{v.name}  ({v.kind}, id {v.id[:8]})  {v.state.symbol} {v.state} "
                   f"on {v.host}" + (f", pid {v.pid}" if v.pid else "")))
        print(safe(f"  cpus {v.cpus} (up to {v.max_cpus}), memory {v.memory_mb} MiB, boot {','.join(v.boot)}"))
        for d in v.disks:
            print(safe(f"  {d.name}: {fmt.size(d.size)} {d.bus} on {d.datastore} {d.path}"
                       + (f" (linked to {d.backing})" if d.backing else "")))
        for i, n in enumerate(v.nics):
            print(safe(f"  nic{i}: network {n.network}" + (f" mac {n.mac}" if n.mac else "")))
        for pt in v.passthrough:
            print(safe(f"  passthrough {pt.kind} {pt.address}"))
        if v.agent and v.state is VMState.RUNNING:      # of one that does not run, the state says it
            print("\n".join("  " + line for line in _agent_lines(v.agent)))
        return EXIT_OK
    return _ask(ws, go)


def _run_task(ws: Workspace, kind: str, params: dict[str, Any], as_json: bool, describe=None) -> int:
    async def go(client) -> int:
        try:
            tid, again = await client.vm_task_or_attach(kind, params)
        except Refused as e:      # the engine's precheck: no task was made
            print(f"ferry: {safe(e)}", file=sys.stderr)
            return EXIT_CONFIG
        if again:
            print(f"ferry: task {tid} already does this and had not finished; it goes on from where it stopped",
                  file=sys.stderr)
        return await run_foreground(client, tid, as_json=as_json, describe=describe)
    return _on_loop(ws, go)


def _done(text: str):
    def describe(info: TaskInfo) -> str:
        return safe(text.format(**(info.result or {}), task=info.id))
    return describe


def _memory(text: str) -> int:
    try:
        return parse_memory_mib(text)
    except PermanentError as e:
        raise argparse.ArgumentTypeError(f"{e.message} ({e.hint})") from None


def _disk_args(args) -> list[dict]:
    out = []
    for text in args.disk or []:
        parts = text.split(":")
        d: dict[str, Any] = {"size": parts[0]}
        for extra in parts[1:]:
            if extra in ("virtio", "scsi", "ide"):
                d["bus"] = extra
            elif extra:
                d["datastore"] = extra
        out.append(d)
    return out


def cmd_vm_create(args, ws: Workspace) -> int:
    params: dict[str, Any] = {"name": args.name, "host": args.host, "cpus": args.cpus, "memory_mb": args.memory,
                              "disks": _disk_args(args), "nics": [{"network": n} for n in (args.network or ["default"])],
                              "boot": args.boot.split(",")}
    if args.max_cpus:
        params["max_cpus"] = args.max_cpus
    if args.passthrough:
        params["passthrough"] = [dict(zip(("kind", "address"), p.split(":", 1))) for p in args.passthrough]
    return _run_task(ws, "vm.create", params, args.json, _done("created {vm} on {host}"))


def cmd_vm_simple(args, ws: Workspace) -> int:
    kind, params, text = {
        "start": ("vm.start", {"discard_state": getattr(args, "discard_state", False)}, "{vm} runs on {host}"),
        "stop": ("vm.shutdown", {"mode": "force" if getattr(args, "force", False) else "powerdown",
                                 "timeout": getattr(args, "timeout", 120)}, "{vm} is stopped"),
        "reboot": ("vm.shutdown", {"mode": "reboot"}, "{vm} rebooted"),
        "hibernate": ("vm.hibernate", {}, "{vm} hibernated ({state_file})"),
        "pause": ("vm.pause", {}, "{vm} is paused on {host}: its guest halted, its memory kept (ferry vm resume "
                                  "{vm} continues it)"),
        "resume": ("vm.resume", {}, _resumed),
        "restore": ("vm.restore", {}, "{vm} restored from the recycle bin"),
    }[args.vm_command]
    return _run_task(ws, kind, {"vm": args.name, **params}, args.json, _done(text) if isinstance(text, str) else text)


def _resumed(info: TaskInfo) -> str:
    """What a resume did, by the state QEMU had the guest in (QMP query-status)."""
    r = info.result or {}
    return safe(resumed_text(str(r.get("vm")), str(r.get("host")), str(r.get("was"))))


def cmd_vm_move(args, ws: Workspace) -> int:
    params: dict[str, Any] = {"vm": args.name, "to": args.to}
    if args.bandwidth:
        params["bandwidth_mib"] = args.bandwidth

    def describe(info: TaskInfo) -> str:
        r = info.result or {}
        if not r.get("live"):
            return safe(f"{r.get('vm')} is now on {r.get('to')} (it was not running: nothing to copy)")
        moved = f"{r['bytes'] >> 20} MiB of memory in {r['total_ms'] / 1000:.1f} s, " if r.get("bytes") else ""
        down = f"the guest stopped for {r['downtime_ms']} ms" if r.get("downtime_ms") is not None else "done"
        return safe(f"{r.get('vm')} moved from {r.get('from')} to {r.get('to')} while running: {moved}{down}")
    return _run_task(ws, "vm.move", params, args.json, describe)


def cmd_vm_clone(args, ws: Workspace) -> int:
    params = {"src": args.src, "names": [args.name], "as_template": bool(getattr(args, "as_template", False)),
              "datastore": args.datastore, "overrides": _overrides(args), **_target(args)}
    return _run_task(ws, "vm.clone", params, args.json, _describe_made)


def _target(args) -> dict[str, Any]:
    """--host: the copies go to another host than their source's (on a datastore both share)."""
    return {"host": args.host} if getattr(args, "host", None) else {}


def _overrides(args) -> dict[str, Any]:
    o: dict[str, Any] = {}
    for key, attr in (("cpus", "cpus"), ("memory_mb", "memory"), ("disk_size", "disk_size"), ("network", "network")):
        value = getattr(args, attr, None)
        if value is not None:
            o[key] = value
    return o


def _describe_made(info: TaskInfo) -> str:
    r = info.result or {}
    names = ", ".join(m["vm"] for m in r.get("made", []))
    return safe(f"made {names} from {r.get('src')}" + (" (linked clones)" if r.get("linked") else "")
                + (" while it was running" if r.get("from_running") else ""))


def cmd_template_deploy(args, ws: Workspace) -> int:
    from ferry.engine.vm.model import expand_pattern
    names = expand_pattern(args.name, args.count) if args.count > 1 or "#" in args.name or "{n" in args.name \
        else [args.name]
    params = {"src": args.template, "names": names, "linked": args.linked, "deploy": True,
              "datastore": args.datastore, "overrides": _overrides(args), **_target(args)}
    return _run_task(ws, "vm.clone", params, args.json, _describe_made)


def cmd_template_clone(args, ws: Workspace) -> int:
    params = {"src": args.src, "names": [args.name], "as_template": True, "datastore": args.datastore,
              "overrides": _overrides(args)}
    return _run_task(ws, "vm.clone", params, args.json, _describe_made)


def cmd_convert(args, ws: Workspace) -> int:
    return _run_task(ws, "vm.convert", {"vm": args.name, "to": args.to}, args.json,
                     _done("{vm} is now a {kind}"))


def cmd_vm_delete(args, ws: Workspace) -> int:
    mode = "secure" if args.secure else "delayed" if args.delayed else "normal"
    typed = _typed_confirmation(args, args.name, "delete" + ("" if mode == "normal" else f" ({mode})"))
    params: dict[str, Any] = {"vm": args.name, "mode": mode, "confirm": typed}
    if args.keep_days is not None:
        params["keep_days"] = args.keep_days
    text = "{vm} moved to the recycle bin" if mode == "delayed" else "{vm} deleted (" + mode + ")"
    return _run_task(ws, "vm.delete", params, args.json, _done(text))


def cmd_vm_purge(args, ws: Workspace) -> int:
    if args.expired:
        params = {"vm": "*expired*"}
    else:
        if not args.name:
            raise PermanentError("purge needs a name or --expired", "ferry vm purge NAME, or ferry vm purge --expired")
        params = {"vm": args.name, "confirm": _typed_confirmation(args, args.name, "purge")}
    return _run_task(ws, "vm.purge", params, args.json,
                     lambda info: f"purged: {', '.join((info.result or {}).get('purged', [])) or 'nothing'}")


def cmd_vm_export(args, ws: Workspace) -> int:
    out = args.out
    ova = args.format == "ova" if args.format else out.endswith(".ova")
    return _run_task(ws, "vm.export", {"vm": args.name, "out": out, "ova": ova}, args.json,
                     _done("{vm} exported to {path}"))


def cmd_vm_import(args, ws: Workspace) -> int:
    params = {"path": args.path, "host": args.host, "name": args.name, "datastore": args.datastore,
              "as_template": args.as_template}
    return _run_task(ws, "vm.import", params, args.json, _done("imported {vm} on {host}"))


def cmd_vm_agent(args, ws: Workspace) -> int:
    async def go(client) -> int:
        if args.agent_command == "timesync":
            sync = await client.vm_timesync(args.name)
            if args.json:
                print(api.dumps(sync))
                return EXIT_OK
            before, after = sync.offset_before_s, sync.offset_after_s
            print(f"{sync.vm}: guest clock set from the host"
                  + (f"; it was {before:+.3f} s off" if before is not None else "")
                  + (f", now {after:+.3f} s" if after is not None else ""))
            return EXIT_OK
        if args.agent_command == "cpus":
            added = await client.vm_cpu_hotadd(args.name, args.cpus)
            if args.json:
                print(api.dumps(added))
                return EXIT_OK
            print(f"{added.vm}: {added.cpus} vCPUs" + (f", {added.online_in_guest} online in the guest"
                                                      if added.online_in_guest is not None else ""))
            return EXIT_OK
        report = await client.vm_agent(args.name)
        if args.json:
            print(api.dumps(report))
        else:
            head, *rest = _agent_lines(report)
            print("\n".join([f"{report.vm}: {head}"] + ["  " + line for line in rest]))
        return EXIT_OK if report.running else EXIT_FAIL
    return _ask(ws, go)


def _agent_lines(a: AgentReport) -> list[str]:
    """The guest agent's state, then what it reports, labelled (vm agent info, vm show); each a line,
    whatever the guest wrote into its OS name, mounts or version."""
    return [safe(text) for text in _agent_text(a)]


def _agent_text(a: AgentReport) -> list[str]:
    head = f"guest agent {a.agent}" + (f" (version {a.version})" if a.version else "")
    head += f", asked at {fmt.clock(a.checked_at)}"
    if not a.running:
        return [head] + ([a.reason] if a.reason else [])
    rows = [("OS", a.os or "-")]
    kernel = fmt.guest_kernel(a.os, a.kernel)
    if kernel:   # else the OS name already says it
        rows.append(("kernel", kernel))
    rows.append(("IPs", ", ".join(a.ips) or "none reported"))
    if a.cpu_percent is not None:
        rows.append(("CPU", f"{a.cpu_percent:.1f} % busy"))
    if a.mem_total:
        used = a.mem_used or 0
        rows.append(("memory", f"{fmt.size(used)} used of {fmt.size(a.mem_total)} ({100 * used / a.mem_total:.0f} %)"))
    disks = [f"{d.mount} {fmt.size(d.used)} of {fmt.size(d.total)}" for d in a.disks]
    rows.append(("disks", "; ".join(disks) or "no filesystems reported"))
    return [head] + [f"{k:<7} {v}" for k, v in rows]


def cmd_vm_reconcile(args, ws: Workspace) -> int:
    async def go(client) -> int:
        r = await client.vm_reconcile()
        if args.json:
            print(api.dumps(r))
            return EXIT_OK
        print(f"{r.running} recorded VM(s) running")
        for o in r.orphans:
            print(safe(f"orphan: {o.process} (pid {o.pid}) on {o.host} runs without a record"))
        for m in r.missing:
            print(safe(f"missing: {m.vm} on {m.host} was running and its QEMU is gone"))
        for u in r.unreachable:
            print(safe(f"unreachable: {u.host}: {u.error}"))
        return EXIT_OK
    return _ask(ws, go)


def cmd_lab_image_build(args, ws: Workspace) -> int:
    from ferry.engine.platform.liveimage import build_live_image
    from ferry.engine.vm.hostops import image_cache_dir

    line = _Progress(not args.json and sys.stderr.isatty())

    def report(step: str, fraction: float) -> None:
        line.show(f"{fraction * 100:5.1f}% {step[:70]}")

    import asyncio
    started = time.monotonic()
    try:
        image = asyncio.run(build_live_image(image_cache_dir(ws.ensure().cache_dir), force=args.force,
                                             progress=report))
    finally:
        line.done()
    info = {"version": image.version, "kernel": str(image.kernel), "initrd": str(image.initrd),
            "kernel_release": image.kernel_release, "size": image.size, "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        _print_json(info)
    else:
        print(f"live image {image.version[:12]} ({image.kernel_release}, {fmt.size(image.size)}) in {image.directory}")
    return EXIT_OK


def _lab_report(st, action: str | None) -> None:
    """A lab's state as lines: what the call changed, then a line per host."""
    if action:
        verb = {"up": "built or repaired", "down": "removed"}[action]
        print(f"{verb}: {', '.join(st.changed)}" if st.changed else f"{verb}: nothing (it was {action} already)")
    if action == "down":
        return
    if st.folders and action is None:
        print(f"{st.folders}; the network lab is not this site's")
        if not any(h.present for h in st.hosts):
            return
    rows = [[h.name, h.namespace if h.present else f"{h.namespace} (absent)", h.address,
             str(h.sshd) if h.sshd else "-", "✔ yes" if h.answers else "✖ no"] for h in st.hosts]
    print(_table(rows, ["HOST", "NAMESPACE", "ADDRESS", "SSHD", "ANSWERS"]))
    d = st.dhcp
    if d is not None:
        print(f"VM network {d.subnet}: DHCP " + (f"by dnsmasq (pid {d.pid}) at {d.address}, pool "
              f"{'-'.join(d.pool)}, {d.leases} lease(s), {d.static} static" if d.running else "not running"))
    print(f"lab {'up' if st.up else 'not up'}: subnet {st.subnet}, this machine {st.gateway}, folder {st.folder}"
          + ("" if st.configured else " (config.toml's site is not this lab: `ferry init --network-lab`)"))


def cmd_lab(args, ws: Workspace) -> int:
    """`ferry lab up|down|status`: the network lab of this workspace, built and run by its engine."""
    async def go(client) -> int:
        action = args.lab_command
        try:
            st = await {"up": client.lab_up, "down": client.lab_down, "status": client.lab_status}[action]()
        except Refused as e:     # no root: nothing was done
            print(f"ferry: {safe(e)}", file=sys.stderr)
            return EXIT_CONFIG
        if args.json:
            print(api.dumps(st))
        else:
            _lab_report(st, None if action == "status" else action)
        return EXIT_OK if st.up or action == "down" or st.folders else EXIT_FAIL
    return _ask(ws, go)


def add_parsers(sub) -> None:
    def common(p, *, name: bool = True) -> None:
        if name:
            p.add_argument("name")
        p.add_argument("--json", action="store_true")

    def hardware(p, default: bool) -> None:
        p.add_argument("--cpus", type=int, default=1 if default else None)
        p.add_argument("--memory", type=_memory, default=256 if default else None, metavar="SIZE",
                       help="MiB, or with a unit: 512M, 2G")
        p.add_argument("--network", action="append" if default else "store", metavar="NET")

    s = sub.add_parser("vm", help="VMs: list, create, start, stop, clone, export, import, delete, ...")
    vs = s.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    v = vs.add_parser("list", help=cli_help("vm list"))
    v.add_argument("--templates", action="store_true", help="templates only")
    v.add_argument("--recycled", action="store_true", help="the recycle bin")
    v.add_argument("--agents", action="store_true", help="ask the running VMs' guest agents: state and IPs")
    common(v, name=False)
    v.set_defaults(func=cmd_vm_list)
    v = vs.add_parser("show", help="one VM: hardware, disks, agent")
    common(v)
    v.set_defaults(func=cmd_vm_show)
    v = vs.add_parser("create", help=cli_help("vm create"))
    common(v)
    v.add_argument("--host", required=True)
    hardware(v, True)
    v.add_argument("--max-cpus", type=int, help="vCPUs it can grow to while running (default max(4, cpus))")
    v.add_argument("--disk", action="append", metavar="SIZE[:BUS][:DATASTORE]", help="e.g. 1G or 10G:scsi:shared")
    v.add_argument("--boot", default="disk,live", help="boot order from disk, cdrom, live (default disk,live)")
    v.add_argument("--passthrough", action="append", metavar="KIND:ADDRESS", help="usb:1d6b:0002, gpu:0000:01:00.0, disk:/dev/sdb")
    v.set_defaults(func=cmd_vm_create)
    for action in ("start", "stop", "reboot", "hibernate", "pause", "resume", "restore"):
        v = vs.add_parser(action, help=cli_help(f"vm {action}"))
        common(v)
        if action == "start":
            v.add_argument("--discard-state", action="store_true", help="boot fresh, dropping a hibernated state")
        if action == "stop":
            v.add_argument("--force", action="store_true", help=cli_help("vm stop --force"))
            v.add_argument("--timeout", type=float, default=120, help="seconds to wait for the guest (default 120)")
        v.set_defaults(func=cmd_vm_simple)
    v = vs.add_parser("move", help=cli_help("vm move"))
    common(v)
    v.add_argument("--to", required=True, metavar="HOST", help="the host to move to (it shares the VM's datastores)")
    v.add_argument("--bandwidth", type=int, metavar="MIB/S", help="cap the memory copy (default: as fast as it goes)")
    v.set_defaults(func=cmd_vm_move)
    v = vs.add_parser("clone", help=cli_help("vm clone"))
    v.add_argument("src")
    common(v)
    v.add_argument("--datastore")
    v.add_argument("--host", help="host of the copies (default: the source's; another needs a datastore both share)")
    v.add_argument("--as-template", action="store_true", help="the copy is a template (hardware may change)")
    hardware(v, False)
    v.add_argument("--disk-size", help="grow the first disk to this size")
    v.set_defaults(func=cmd_vm_clone)
    v = vs.add_parser("to-template", help="turn a stopped VM into a template")
    common(v)
    v.set_defaults(func=cmd_convert, to="template")
    v = vs.add_parser("delete", help=cli_help("vm delete"))
    common(v)
    g = v.add_mutually_exclusive_group()
    g.add_argument("--secure", action="store_true", help="overwrite and verify the disks before removing them")
    g.add_argument("--delayed", action="store_true", help="keep it in the recycle bin (restorable)")
    v.add_argument("--keep-days", type=float, help="days in the recycle bin before it is purged (default 7)")
    v.add_argument("--confirm", metavar="NAME", help="the VM's name, typed to confirm (for scripts)")
    v.set_defaults(func=cmd_vm_delete)
    v = vs.add_parser("purge", help="remove from the recycle bin for good")
    v.add_argument("name", nargs="?")
    v.add_argument("--expired", action="store_true", help="every VM whose time in the bin is over")
    v.add_argument("--confirm", metavar="NAME")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_vm_purge)
    v = vs.add_parser("export", help=cli_help("vm export"))
    common(v)
    v.add_argument("--out", required=True, help="absolute path on the VM's host: a folder, or a file ending .ova")
    v.add_argument("--format", choices=("ovf", "ova"))
    v.set_defaults(func=cmd_vm_export)
    v = vs.add_parser("import", help=cli_help("vm import"))
    v.add_argument("path")
    v.add_argument("--host", required=True)
    v.add_argument("--name")
    v.add_argument("--datastore")
    v.add_argument("--as-template", action="store_true")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_vm_import)
    v = vs.add_parser("agent", help="guest agent: status and info, time sync, CPU hot-add")
    v.add_argument("agent_command", choices=("info", "timesync", "cpus"))
    common(v)
    v.add_argument("--cpus", type=int, help="with `cpus`: the vCPU count to grow to")
    v.set_defaults(func=cmd_vm_agent)
    v = vs.add_parser("reconcile", help="compare running QEMU processes with the records")
    common(v, name=False)
    v.set_defaults(func=cmd_vm_reconcile)

    s = sub.add_parser("template", help="templates: convert, clone, deploy, delete")
    ts = s.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    t = ts.add_parser("list", help="templates")
    common(t, name=False)
    t.set_defaults(func=cmd_vm_list, templates=True, recycled=False, agents=False)
    t = ts.add_parser("convert", help=cli_help("template convert"))
    common(t)
    t.set_defaults(func=cmd_convert, to="template")
    t = ts.add_parser("to-vm", help="turn a template back into a VM (not while it has linked clones)")
    common(t)
    t.set_defaults(func=cmd_convert, to="vm")
    t = ts.add_parser("clone", help="copy a VM or template into a new template (hardware may change)")
    t.add_argument("src")
    common(t)
    t.add_argument("--datastore")
    hardware(t, False)
    t.add_argument("--disk-size")
    t.set_defaults(func=cmd_template_clone)
    t = ts.add_parser("deploy", help=cli_help("template deploy"))
    t.add_argument("template")
    common(t)
    t.add_argument("--count", type=int, default=1, help="how many; NAME is a pattern like web-## or web-{n:02}")
    t.add_argument("--full", dest="linked", action="store_false", help="full copies instead of linked clones")
    t.add_argument("--datastore")
    t.add_argument("--host", help="host of the copies (default: the source's; another needs a datastore both share)")

    hardware(t, False)
    t.add_argument("--disk-size", help="grow the first disk (full clones and linked ones alike)")
    t.set_defaults(func=cmd_template_deploy, linked=True)
    t = ts.add_parser("delete", help="delete a template (refused while it has linked clones)")
    common(t)
    t.add_argument("--confirm", metavar="NAME")
    t.set_defaults(func=cmd_vm_delete, secure=False, delayed=False, keep_days=None)

    s = sub.add_parser("lab", help="the lab on this machine")
    ls = s.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    i = ls.add_parser("image", help="the Ferry live image")
    iss = i.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = iss.add_parser("build", help="build (or find cached) the live image for the current recipe")
    b.add_argument("--force", action="store_true", help="build again even if cached")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_lab_image_build)
    for action, text in (("up", "build the network lab (namespaces with their own sshd), adopt it when it "
                                "runs, repair it when half made; its host keys trusted in known_hosts"),
                         ("down", "stop every process of the network lab and remove its namespaces and links"),
                         ("status", "each lab host: namespace, address, sshd pid, whether it answers")):
        u = ls.add_parser(action, help=text)
        u.add_argument("--json", action="store_true")
        u.set_defaults(func=cmd_lab)
