"""Health checks (F2), with Nagios' semantics: a round runs the checks of a checklist (or of a host), each a
CheckResult (OK, WARNING, CRITICAL, UNKNOWN, a summary, details, perfdata); every result is history.

Soft and hard states, as Nagios and Icinga have them: a problem found after OK is SOFT, attempt 1; it is
re-checked (every `retry_interval`, within the same task) and each further problem counts an attempt;
at `max_attempts` it is HARD and raises its alarm (CRITICAL -> critical, WARNING -> warning, UNKNOWN ->
minor; [health] severity). A hard problem stays hard until OK, and each round repeats its alarm (the
count goes up). OK after a hard problem resolves the alarm (cleared automatically); OK after a soft one
is a soft recovery: nothing was raised. A check that cannot run is UNKNOWN with the reason, never OK.

A host's checks come from one script per round (checks.py); a host that does not answer is CRITICAL on
its `ssh` check (alarm host.down on host:H, which suppresses the alarms of its VMs and of its other
checks) and its other checks keep their last state, unchecked. The site's own checks (tasks, alarms,
advisories) have host "".
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import FerryError, PermanentError, Refused
from ..tasks import JobAlreadyRunning, TaskContext, TaskKind, register
from ..taskstate import TaskState
from . import service as _service
from .checks import (HOST_SCRIPT, HostOutput, check_datastore, check_load, check_memory, check_plugin, check_qemu,
                     check_raid, check_smart, check_ssh, check_systemd, check_temperature, check_time, script_args,
                     split_sections)
from .healthconfig import BUILTIN, GROUPS, HealthSettings, PluginCheck
from .healthmodel import SITE, HealthCheck, HealthResult
from .nagios import CheckResult, CheckState, PerfDatum, format_perfdata, unknown

HISTORY_KEPT = 200          # results kept per (host, check)
KIND = "health.run"
VM_TIMEOUT = 5.0            # QMP and guest agent, per VM


def settings(site: Any) -> HealthSettings:
    return getattr(site, "health", None) or HealthSettings()


# ------------------------------------------------------------------------------ what a run covers

@dataclass(frozen=True)
class Scope:
    """The checks a run covers: groups and check names (a checklist's), on some hosts, with advisories."""
    checks: frozenset[str]
    hosts: tuple[str, ...]
    site_checks: bool               # the site's own (tasks, alarms, advisories): not with --host
    advisories: tuple[str, ...] = ()

    def wants(self, check: str, cfg: HealthSettings) -> bool:
        return check not in cfg.disabled and (check in self.checks or BUILTIN[check][0] in self.checks)

    def plugins(self, cfg: HealthSettings) -> list[PluginCheck]:
        return [p for p in cfg.checks if p.name in self.checks or "platform" in self.checks]


def scope_of(site: Any, checklist: str | None, host: str | None) -> Scope:
    """What `ferry health run [CHECKLIST] [--host HOST]` runs; Refused naming what exists."""
    cfg = settings(site)
    if host is not None and host not in site.hosts:
        raise Refused(f"unknown host {host!r}", "hosts in this site: " + (", ".join(sorted(site.hosts)) or "none"))
    hosts = (host,) if host else tuple(site.hosts)
    if checklist is None and host is not None:
        return Scope(frozenset(("platform", "devices", "environment")), hosts, False)
    name = checklist or "daily"
    cl = cfg.checklist(name)
    if cl is None:
        raise Refused(f"no checklist {name!r}", "checklists: " + ", ".join(cfg.checklist_names())
                      + " (add [checklists.NAME] to config.toml)")
    return Scope(frozenset(cl.checks), hosts, host is None, cl.advisories)


# ------------------------------------------------------------------------------ soft and hard, in the store

@dataclass
class Found:
    """One check's result with what its alarm would be."""
    host: str
    check: str
    result: CheckResult
    max_attempts: int
    alarm_type: str | None          # None: this check raises no alarm
    alarm_object: str
    details: dict = field(default_factory=dict)
    severity: dict[str, str] = field(default_factory=dict)


@dataclass
class AlarmAct:
    raise_: bool
    type: str
    object: str
    severity: str = ""
    summary: str = ""
    details: dict = field(default_factory=dict)


def advance(prev: dict | None, f: Found) -> tuple[dict, list[AlarmAct]]:
    """The check's next row after result `f` (Nagios' soft/hard rules), and the alarm acts it calls for."""
    r, acts = f.result, []
    raised = bool(prev and prev["alarm_raised"])
    old_key = (prev["alarm_type"], prev["alarm_object"]) if raised else None
    if not r.state.problem:
        attempt, hard = 1, True
        if old_key:
            acts.append(AlarmAct(False, *old_key, summary=f"{f.check} on {f.host or 'the site'} is OK: {r.summary}"))
        raised = False
    else:
        if prev is None or prev["state"] == CheckState.OK:
            attempt, hard = 1, False
        elif prev["hard"]:
            attempt, hard = prev["attempt"], True
        else:
            attempt, hard = prev["attempt"] + 1, False
        hard = hard or attempt >= f.max_attempts
        attempt = min(attempt, f.max_attempts)
        key = (r.alarm_type or f.alarm_type, r.alarm_object or f.alarm_object) if f.alarm_type else None
        if old_key and old_key != key:
            acts.append(AlarmAct(False, *old_key, summary=f"{f.check} on {f.host or 'the site'}: now {r.state}"))
            raised = False
        if hard and key:
            sev = f.severity.get(r.state.lower(), "minor")
            where = f.host or "the site"
            acts.append(AlarmAct(True, key[0], key[1], sev, f"{f.check} on {where}: {r.state}: {r.summary}",
                                 {**f.details, **r.extra, "check": f.check, "state": str(r.state),
                                  "perfdata": format_perfdata(r.perfdata)}))
            raised, old_key = True, key
    row = {"state": str(r.state), "hard": int(hard), "attempt": attempt, "max_attempts": f.max_attempts,
           "summary": r.summary, "details": r.details, "perfdata": format_perfdata(r.perfdata),
           "alarm_type": old_key[0] if raised and old_key else (r.alarm_type or f.alarm_type),
           "alarm_object": old_key[1] if raised and old_key else (r.alarm_object or f.alarm_object),
           "alarm_raised": int(raised)}
    return row, acts


def record(store: Any, found: list[Found], now: float) -> list[AlarmAct]:
    """Every result as history and the checks' new states, in one transaction; the alarm acts to do.
    An alarm several checks raise (a shared datastore seen from each host) is resolved only when none
    of them has it raised any more."""
    def tx(db: sqlite3.Connection) -> list[AlarmAct]:
        acts: list[AlarmAct] = []
        for f in found:
            prev = db.execute("SELECT * FROM health_checks WHERE host=? AND check_name=?", (f.host, f.check)).fetchone()
            row, more = advance(dict(prev) if prev else None, f)
            changed = prev is None or prev["state"] != row["state"] or bool(prev["hard"]) != bool(row["hard"])
            hard_changed = prev is None or (row["hard"] and (prev["state"] != row["state"] or not prev["hard"]))
            db.execute(
                "INSERT INTO health_checks(host, check_name, state, hard, attempt, max_attempts, summary, details, "
                "perfdata, last_checked, last_change, last_hard_change, alarm_type, alarm_object, alarm_raised) "
                "VALUES(:host, :check, :state, :hard, :attempt, :max_attempts, :summary, :details, :perfdata, :now, "
                ":now, :now, :alarm_type, :alarm_object, :alarm_raised) "
                "ON CONFLICT(host, check_name) DO UPDATE SET state=:state, hard=:hard, attempt=:attempt, "
                "max_attempts=:max_attempts, summary=:summary, details=:details, perfdata=:perfdata, last_checked=:now, "
                "last_change=CASE WHEN :changed THEN :now ELSE last_change END, "
                "last_hard_change=CASE WHEN :hard_changed THEN :now ELSE last_hard_change END, "
                "alarm_type=:alarm_type, alarm_object=:alarm_object, alarm_raised=:alarm_raised",
                {**row, "host": f.host, "check": f.check, "now": now, "changed": int(changed),
                 "hard_changed": int(hard_changed)})
            cur = db.execute("INSERT INTO health_history(ts, host, check_name, state, hard, attempt, summary, details, "
                             "perfdata) VALUES(?,?,?,?,?,?,?,?,?)",
                             (now, f.host, f.check, row["state"], row["hard"], row["attempt"], row["summary"],
                              row["details"], row["perfdata"]))
            if cur.lastrowid and cur.lastrowid % 16 == 0:    # now and then: the newest HISTORY_KEPT stay
                db.execute("DELETE FROM health_history WHERE host=? AND check_name=? AND id <= (SELECT id FROM "
                           "health_history WHERE host=? AND check_name=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                           (f.host, f.check, f.host, f.check, HISTORY_KEPT))
            acts += more
        out = []
        for a in acts:
            if not a.raise_ and db.execute("SELECT 1 FROM health_checks WHERE alarm_type=? AND alarm_object=? AND "
                                           "alarm_raised=1", (a.type, a.object)).fetchone():
                continue
            out.append(a)
        return out
    return store.transaction(tx)


def _check(r: sqlite3.Row) -> HealthCheck:
    return HealthCheck(host=r["host"], check=r["check_name"], state=CheckState(r["state"]), hard=bool(r["hard"]),
                       attempt=r["attempt"], max_attempts=r["max_attempts"], summary=r["summary"], details=r["details"],
                       perfdata=r["perfdata"], last_checked=r["last_checked"], last_change=r["last_change"],
                       last_hard_change=r["last_hard_change"],
                       alarm=f"{r['alarm_type']} on {r['alarm_object']}" if r["alarm_raised"] else None)


def checks(store: Any, host: str | None = None) -> list[HealthCheck]:
    """The current state of every check (of one host), by host then check."""
    where, args = ("WHERE host=?", (host,)) if host is not None else ("", ())
    return store.read(lambda db: [_check(r) for r in db.execute(
        f"SELECT * FROM health_checks {where} ORDER BY host, check_name", args)])


def history(store: Any, check: str, host: str | None = None, limit: int = 50) -> list[HealthResult]:
    """The newest results of a check (on one host), newest first; `check` may end in * (vm-io:*)."""
    op = "LIKE" if check.endswith("*") else "="
    name = check[:-1] + "%" if check.endswith("*") else check
    where, args = f"check_name {op} ?", [name]
    if host is not None:
        where, args = where + " AND host=?", [*args, host]

    def read(db: sqlite3.Connection) -> list[HealthResult]:
        rows = db.execute(f"SELECT * FROM health_history WHERE {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [HealthResult(r["id"], r["ts"], r["host"], r["check_name"], CheckState(r["state"]), bool(r["hard"]),
                             r["attempt"], r["summary"], r["details"], r["perfdata"]) for r in rows]
    return store.read(read)


# ------------------------------------------------------------------------------ one round

@dataclass
class RoundReport:
    found: list[Found] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


class HealthRound:
    """The checks of a scope, over hosts in parallel (at most [health] parallel at once); the results
    recorded and the alarms raised or resolved."""

    def __init__(self, engine: Any, ops: Any, scope: Scope, *,
                 progress: Callable[[int, int, str], None] | None = None) -> None:
        self.engine, self.ops, self.scope = engine, ops, scope
        self.site = engine.site
        self.cfg = settings(self.site)
        self._progress = progress or (lambda done, total, item: None)

    def _severity(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**self.cfg.severity, **(extra or {})}

    def _found(self, host: str, check: str, r: CheckResult, alarm: str | None, obj: str, *,
               attempts: int | None = None, severity: dict[str, str] | None = None) -> Found:
        return Found(host, check, r, attempts or self.cfg.max_attempts, alarm, obj,
                     {"host": host} if host else {}, self._severity(severity))

    async def run(self, hosts: list[str] | None = None, site_checks: bool | None = None) -> RoundReport:
        hosts = list(self.scope.hosts if hosts is None else hosts)
        report = RoundReport()
        sem = asyncio.Semaphore(self.cfg.parallel)
        done = 0

        async def one(h: str) -> list[Found]:
            nonlocal done
            async with sem:
                try:
                    return await self.host(h, report)
                finally:
                    done += 1
                    self._progress(done, len(hosts), h)
        for fs in await asyncio.gather(*(one(h) for h in hosts)):
            report.found += fs
        if self.scope.site_checks if site_checks is None else site_checks:
            report.found += await self.site_checks()
        acts = await self.engine.store.call(record, self.engine.store, report.found, self.ops.now())
        for a in acts:
            if a.raise_:
                info = await self.ops.raise_alarm(a.type, a.object, a.severity, a.summary, details=a.details,
                                                  source="health")
                if info.count == 1:          # new; a hard problem found again repeats its alarm (count + 1)
                    report.raised.append(f"{a.type} on {a.object}")
            elif await self.ops.resolve(a.type, a.object, a.summary) is not None:
                report.resolved.append(f"{a.type} on {a.object}")
        return report

    # -------------------------------------------------------------- a host

    async def host(self, h: str, report: RoundReport) -> list[Found]:
        spec = self.site.hosts[h]
        wants = lambda c: self.scope.wants(c, self.cfg)   # noqa: E731
        groups = [g for g, names in (("platform", ("qemu", "systemd", "time", "vm-state", "vm-io", "vm-agent")),
                                     ("devices", ("raid", "smart")), ("environment", ("temperature",)))
                  if any(wants(n) for n in names)]
        stores = [(d.name, d.path) for d in self.site.datastores_of(h)] if wants("datastore") else []
        plugins = [p for p in self.scope.plugins(self.cfg) if p.runs_on(h, spec.cluster)]
        token = secrets.token_hex(8)
        args = script_args(token, groups, spec.runtime, stores, plugins)
        budget = self.cfg.timeout + max((p.timeout for p in plugins), default=0)
        obj = f"host:{h}"
        connect_s = 0.0
        try:
            transport = self.engine.transport(h)
            async with asyncio.timeout(budget):
                if hasattr(transport, "connect"):       # SSH: the connection apart from the round trip
                    c0 = time.monotonic()
                    await transport.connect()
                    connect_s = time.monotonic() - c0
                t0, m0 = time.time(), time.monotonic()
                r = await HOST_SCRIPT.run(transport, *args, timeout=None)
        except (TimeoutError, asyncio.TimeoutError):
            report.unreachable.append(h)
            return [self._found(h, "ssh", CheckResult(
                CheckState.CRITICAL, f"no answer from {h} ({spec.target}) within {budget:g} s",
                "is the host up and reachable? check address/port in config.toml"), "host.down", obj)]
        except FerryError as e:
            report.unreachable.append(h)
            return [self._found(h, "ssh", CheckResult(CheckState.CRITICAL, f"unreachable: {e.message}", e.hint),
                                "host.down", obj)]
        rtt = time.monotonic() - m0
        text = r.stdout.decode("utf-8", "replace")
        sections = split_sections(text, token)
        out = HostOutput(sections, token, t0, t0 + rtt, rtt, complete="end" in sections)
        th = self.cfg.threshold
        ssh = check_ssh(rtt, th("ssh"), connect_s)
        if not out.complete:
            err = (r.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {r.exit_status}"])[-1]
            ssh = CheckResult(CheckState.WARNING, f"reachable, but the check script did not finish: {err}",
                              "the host needs a POSIX sh with /proc", ssh.perfdata, alarm_type="health.ssh")
        found = [self._found(h, "ssh", ssh, "health.ssh", obj)]
        simple = (("load", lambda: check_load(out, th("load"))), ("memory", lambda: check_memory(out, th("memory"))),
                  ("systemd", lambda: check_systemd(out, th("systemd"))), ("time", lambda: check_time(out, th("time"))),
                  ("qemu", lambda: check_qemu(out)), ("raid", lambda: check_raid(out)),
                  ("smart", lambda: check_smart(out)),
                  ("temperature", lambda: check_temperature(out, th("temperature"))))
        for name, fn in simple:
            if wants(name):
                found.append(self._found(h, name, _safely(fn), f"health.{name}", obj))
        for ds_name, path in stores:
            res = _safely(lambda: check_datastore(out, h, ds_name, path, th("datastore")))
            found.append(self._found(h, f"datastore:{ds_name}", res, "health.datastore", f"datastore:{ds_name}"))
        for p in plugins:
            found.append(self._found(h, p.name, _safely(lambda: check_plugin(out, p)), p.alarm or f"health.{p.name}",
                                     obj, attempts=p.max_attempts, severity=p.severity))
        if any(wants(n) for n in ("vm-state", "vm-io", "vm-agent")):
            found += await self.vms(h, out)
        return found

    # -------------------------------------------------------------- a host's VMs

    async def vms(self, h: str, out: HostOutput) -> list[Found]:
        from ..vm.model import RUNNING_STATES, UNFINISHED_STATES, VMKind, VMSpec, VMState
        rows = [r for r in await self.engine.store.call(self.engine.store.vm_rows, host=h) if r["kind"] == VMKind.VM]
        if not rows:
            return []
        listed = out.lines("vms")
        running = {ln.split()[0][:-4]: int(ln.split()[1]) for ln in listed or [] if len(ln.split()) == 2
                   and ln.split()[1].isdigit()}

        async def one(row: dict) -> list[Found]:
            spec = VMSpec.from_dict(row["spec"])
            state, pid = VMState(row["state"]), running.get(spec.process_name)
            obj = f"vm:{spec.name}"
            wants = lambda c: self.scope.wants(c, self.cfg)   # noqa: E731
            # QEMU's run state, asked once: it tells vm-state a pause nobody recorded, vm-io an I/O error,
            # and vm-agent that a guest which does not run cannot answer.
            status, io = (await self._qmp_status(spec) if pid is not None
                          else (None, CheckResult(CheckState.OK, "not running")))
            if listed is None:
                st = unknown(f"{h} did not list its QEMU processes")
            elif row["busy"] or state in UNFINISHED_STATES:
                st = CheckResult(CheckState.OK, f"{state}: its task {row['busy'] or ''} works on it".replace("  ", " "))
            elif state in RUNNING_STATES and pid is None:
                st = CheckResult(CheckState.CRITICAL, f"recorded {state}, but its QEMU process is not running on {h}",
                                 f"ferry vm start {spec.name} (or ferry vm list to reconcile the record)")
            elif state == VMState.MISSING:
                st = CheckResult(CheckState.CRITICAL, f"missing: recorded running, its QEMU process is gone from {h}",
                                 f"ferry vm start {spec.name}")
            elif pid is not None and state not in RUNNING_STATES:
                st = CheckResult(CheckState.WARNING, f"recorded {state}, but its QEMU runs on {h} (pid {pid})",
                                 "ferry vm list reconciles the record")
            elif status == "paused" and state == VMState.RUNNING:
                st = CheckResult(CheckState.WARNING, "paused, though recorded running: paused outside Ferry "
                                 "(QMP status paused)", f"ferry vm resume {spec.name} continues it")
            elif status == "running" and state == VMState.PAUSED:
                st = CheckResult(CheckState.WARNING, "running, though recorded paused: continued outside Ferry",
                                 f"ferry vm resume {spec.name} records it running")
            else:
                st = CheckResult(CheckState.OK, f"{state}" + (f", QEMU pid {pid}" if pid else "") + ", as recorded")
            found = []
            if wants("vm-state"):
                found.append(self._found(h, f"vm-state:{spec.name}", st, "health.vm-state", obj))
            if wants("vm-io"):
                found.append(self._found(h, f"vm-io:{spec.name}", io, "health.vm-io", obj))
            # A paused guest's agent cannot answer: not asked, its check keeps its last state (as a host's
            # checks do while the host is unreachable) rather than raising an alarm for the pause.
            if wants("vm-agent") and status in (None, "running"):
                ag = await self._agent(spec) if pid is not None else CheckResult(CheckState.OK, "not running")
                found.append(self._found(h, f"vm-agent:{spec.name}", ag, "health.vm-agent", obj))
            return found
        out_: list[Found] = []
        for fs in await asyncio.gather(*(one(r) for r in rows)):
            out_ += fs
        return out_

    async def _qmp_status(self, spec: Any) -> tuple[str | None, CheckResult]:
        """QEMU's run state of a VM whose QEMU runs (None: QMP did not answer), judged as vm-io."""
        from ..vm.service import VMService
        try:
            async with asyncio.timeout(VM_TIMEOUT):
                q = await VMService.of(self.engine).qmp(spec, timeout=VM_TIMEOUT)
                async with q:
                    st = await q.execute("query-status")
        except (FerryError, OSError, TimeoutError) as e:
            return None, unknown(f"QMP of {spec.name} does not answer: "
                                 f"{getattr(e, 'message', None) or e or 'timed out'}")
        status = st.get("status", "?")
        if status == "io-error":
            return status, CheckResult(CheckState.CRITICAL, f"paused on an I/O error (QMP status {status})",
                                       "free space on its datastore or fix the disk, then ferry vm resume "
                                       + spec.name)
        if status in ("internal-error", "guest-panicked", "shutdown"):
            return status, CheckResult(CheckState.CRITICAL, f"QMP status {status}")
        if status == "paused":      # QEMU says so only after a stop command: on request, not an error
            return status, CheckResult(CheckState.OK, "paused on request, not on an I/O error (QMP status paused)")
        return status, CheckResult(CheckState.OK, f"QMP status {status}")

    async def _agent(self, spec: Any) -> CheckResult:
        from ..vm.service import VMService
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(VM_TIMEOUT):
                ga = await VMService.of(self.engine).agent(spec, timeout=VM_TIMEOUT)
                async with ga:
                    await ga.ping(timeout=VM_TIMEOUT)
        except (FerryError, OSError, TimeoutError) as e:
            return CheckResult(CheckState.WARNING, getattr(e, "message", None) or f"the guest agent of {spec.name} "
                               "does not answer", getattr(e, "hint", ""))
        return CheckResult(CheckState.OK, f"the guest agent answers ({(time.monotonic() - t0) * 1000:.0f} ms)")

    # -------------------------------------------------------------- the site's own checks

    async def site_checks(self) -> list[Found]:
        found: list[Found] = []
        obj = f"site:{self.site.name or 'site'}"
        if self.scope.wants("tasks", self.cfg):
            found.append(self._found(SITE, "tasks", await self._tasks(), "health.tasks", obj))
        if self.scope.wants("alarms", self.cfg):
            found.append(self._found(SITE, "alarms", await self._alarms(), None, obj))
        if self.scope.wants("backup", self.cfg):
            from .backup import check as backup_check
            found.append(self._found(SITE, "backup", await backup_check(self.engine, self.ops.now()), "backup.stale",
                                     obj, attempts=1))
        if self.scope.wants("advisory", self.cfg):
            for text in self.scope.advisories:
                aid = hashlib.sha1(text.encode()).hexdigest()[:10]
                res = await self.engine.store.call(_advisory, self.engine.store, aid, text)
                found.append(self._found(SITE, f"advisory:{aid}", res, "advisory", f"advisory:{aid}", attempts=1))
        return found

    async def _tasks(self) -> CheckResult:
        now = self.ops.now()
        window, stuck_after = self.cfg.failed_window, self.cfg.stuck_after

        def read(db: sqlite3.Connection) -> tuple[list, list]:
            failed = db.execute("SELECT id, title, error FROM tasks WHERE state='failed' AND finished >= ? "
                                "ORDER BY id DESC", (now - window,)).fetchall()
            stuck = db.execute("SELECT id, title, state, updated FROM tasks WHERE state IN ('running', 'queued') "
                               "AND kind != ? AND updated < ? ORDER BY id", (KIND, now - stuck_after)).fetchall()
            return [dict(r) for r in failed], [dict(r) for r in stuck]
        failed, stuck = await self.engine.store.call(self.engine.store.read, read)
        lines = [f"stuck: task {t['id']} ({t['title']}, {t['state']}) unchanged for {(now - t['updated']) / 60:.0f} min"
                 for t in stuck] + [f"failed: task {t['id']} ({t['title']}): {t['error'] or ''}" for t in failed]
        perf = (PerfDatum("failed", len(failed), "", "0", "", 0), PerfDatum("stuck", len(stuck), "", "", "0", 0))
        if stuck:
            return CheckResult(CheckState.CRITICAL, f"{len(stuck)} stuck task{'s' if len(stuck) > 1 else ''} (no "
                               f"change for {stuck_after / 60:.0f} min), {len(failed)} failed", "\n".join(lines), perf)
        if failed:
            return CheckResult(CheckState.WARNING, f"{len(failed)} task{'s' if len(failed) > 1 else ''} failed in the "
                               f"last {window / 3600:.0f} h: " + ", ".join(str(t["id"]) for t in failed[:10]),
                               "\n".join(lines), perf)
        return CheckResult(CheckState.OK, f"no failed tasks in the last {window / 3600:.0f} h, none stuck", "", perf)

    async def _alarms(self) -> CheckResult:
        open_ = [a for a in await self.ops.alarms() if a.state == "active" and a.silenced_by is None
                 and a.suppressed_by is None]
        if not open_:
            return CheckResult(CheckState.OK, "no open alarm waits for someone")
        grave = [a for a in open_ if a.severity in ("critical", "major")]
        text = "\n".join(f"{a.severity} {a.type} on {a.object}: {a.summary}" for a in open_)
        return CheckResult(CheckState.CRITICAL if grave else CheckState.WARNING,
                           f"{len(open_)} open alarm{'s' if len(open_) > 1 else ''} not acknowledged"
                           + (f", {len(grave)} critical or major" if grave else ""), text)


def _advisory(store: Any, aid: str, text: str) -> CheckResult:
    """An advisory is a WARNING until someone acknowledged its alarm (or cleared it by hand)."""
    def read(db: sqlite3.Connection) -> CheckResult:
        r = db.execute("SELECT acked_by, acked_at, ack_comment, cleared_by FROM alarms WHERE type='advisory' AND "
                       "object=? AND (acked_by IS NOT NULL OR (cleared_by IS NOT NULL AND cleared_by != 'engine')) "
                       "ORDER BY id DESC LIMIT 1", (f"advisory:{aid}",)).fetchone()
        if r is None:
            return CheckResult(CheckState.WARNING, text, "acknowledge its alarm (ferry alarm ack ID) once it is handled")
        who = r["acked_by"] or r["cleared_by"]
        return CheckResult(CheckState.OK, f"acknowledged by {who}: {text}", r["ack_comment"] or "")
    return store.read(read)


def _safely(fn: Callable[[], CheckResult]) -> CheckResult:
    """A check that trips over what a host said is UNKNOWN with why, never a failed round."""
    try:
        return fn()
    except (ValueError, IndexError, KeyError, TypeError) as e:
        return unknown(f"the check could not read the host's answer: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------ the task

def ops_of(engine: Any) -> Any:
    """The engine's Ops (alarms): EngineClient's, or one of its own for an engine without a client."""
    ops = engine.services.get(_service.Ops)
    if ops is None:
        ops = engine.services[_service.Ops] = _service.Ops(engine.store, lambda: engine.site)
    return ops


def soft_hosts(store: Any, keys: set[tuple[str, str]]) -> set[str]:
    """The hosts ('' the site) with a check among `keys` in a soft problem state (to re-check)."""
    rows = store.read(lambda db: db.execute("SELECT host, check_name FROM health_checks WHERE hard=0").fetchall())
    return {r["host"] for r in rows if (r["host"], r["check_name"]) in keys}


@register
class HealthRunTask(TaskKind):
    """`ferry health run`: a round over the hosts of a checklist (or one host), then the re-checks of soft
    problems every retry_interval until each is hard or recovered."""
    name = KIND
    max_retries = 0

    def title(self, params: dict[str, Any]) -> str:
        what = params.get("checklist") or ("" if params.get("host") else "daily")
        return "health " + " ".join(x for x in (what, params.get("host") and f"on {params['host']}") if x)

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"health:{params.get('checklist') or ''}:{params.get('host') or ''}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        scope = scope_of(ctx.site, ctx.params.get("checklist"), ctx.params.get("host"))
        cfg = settings(ctx.site)
        ops = ops_of(ctx.engine)
        total = len(scope.hosts)
        ctx.progress(units_done=0, units_total=total, item="round 1")

        def progress(done: int, of: int, host: str) -> None:
            ctx.progress(units_done=done, units_total=of, item=host)
        rnd = HealthRound(ctx.engine, ops, scope, progress=progress)
        t0 = time.monotonic()
        report = await rnd.run()
        keys = {(f.host, f.check) for f in report.found}
        latest = {(f.host, f.check): f for f in report.found}
        raised, resolved = list(report.raised), list(report.resolved)
        rounds = 1
        ctx.log(f"round 1: {len(report.found)} checks on {total} hosts in {time.monotonic() - t0:.1f} s"
                + (f"; unreachable: {', '.join(report.unreachable)}" if report.unreachable else ""))
        # Soft problems are re-checked sooner than the next round would, until hard or recovered.
        for _ in range(max([cfg.max_attempts, *(p.max_attempts or 0 for p in cfg.checks)]) - 1):
            again = await ctx.engine.store.call(soft_hosts, ctx.engine.store, keys)
            if not again or ctx.stopping:
                break
            rounds += 1
            ctx.progress(item=f"re-checking {len(again)} host{'s' if len(again) > 1 else ''} with soft problems "
                              f"in {cfg.retry_interval:g} s (round {rounds})")
            await asyncio.sleep(cfg.retry_interval)
            rnd = HealthRound(ctx.engine, ops, scope, progress=progress)
            hosts = [h for h in scope.hosts if h in again]
            rep = await rnd.run(hosts, site_checks=SITE in again and scope.site_checks)
            latest.update({(f.host, f.check): f for f in rep.found})
            raised += rep.raised
            resolved += rep.resolved
        now = await ctx.engine.store.call(checks, ctx.engine.store)
        mine = [c for c in now if (c.host, c.check) in keys]
        counts = {s.value: sum(1 for c in mine if c.state == s) for s in CheckState}
        ctx.progress(units_done=total, units_total=total, item="done")
        return {"checklist": ctx.params.get("checklist") or (None if ctx.params.get("host") else "daily"),
                "host": ctx.params.get("host"), "hosts": total, "checks": len(mine), "rounds": rounds,
                "states": counts, "soft": sum(1 for c in mine if c.state.problem and not c.hard),
                "problems": [{"host": c.host, "check": c.check, "state": str(c.state), "hard": c.hard,
                              "attempt": c.attempt, "max_attempts": c.max_attempts, "summary": c.summary}
                             for c in mine if c.state.problem],
                "raised": sorted(set(raised)), "resolved": sorted(set(resolved)),
                "unreachable": report.unreachable, "seconds": round(time.monotonic() - t0, 3)}


# ------------------------------------------------------------------------------ on schedule and on demand

async def recheck_site(engine: Any, ops: Any, names: tuple[str, ...]) -> RoundReport:
    """Some of the site's own checks judged now, outside any task (after a backup: `backup`)."""
    return await HealthRound(engine, ops, Scope(frozenset(names), (), True)).run([], site_checks=True)


async def start(engine: Any, site: Any, checklist: str | None = None, host: str | None = None) -> int:
    """The task of a health run (an unfinished one of the same job is followed, not doubled)."""
    scope_of(site, checklist, host)            # Refused now, not in the task
    params = {k: v for k, v in (("checklist", checklist), ("host", host)) if v}
    try:
        tid, _ = await engine.submit_or_resume(KIND, params)
    except JobAlreadyRunning as e:
        return e.task_id
    return tid


async def _scheduled(ops: Any, run: str, spec: Any) -> str:
    """A schedule's `run = "daily"` (or "health weekly"): the checklist's task, to its end."""
    words = run.split()
    checklist = words[1] if words and words[0] == "health" and len(words) > 1 else words[0] if words else "daily"
    if checklist == "health":
        checklist = "daily"
    engine = getattr(ops, "engine", None)
    if engine is None:
        raise PermanentError("health checks run as engine tasks, and this has no engine", "run the engine service")
    tid = await start(engine, ops.site, checklist)
    info = await engine.wait(tid)
    if info.state != TaskState.SUCCEEDED:
        raise PermanentError(f"health {checklist} (task {tid}) {info.state}: {info.error or ''}".strip(),
                             f"ferry task {tid} shows why")
    r = info.result or {}
    st = r.get("states", {})
    return (f"health {checklist}: task {tid}, {r.get('checks', 0)} checks: " +
            ", ".join(f"{n} {s}" for s, n in st.items() if n) + (f"; raised {len(r['raised'])}" if r.get("raised")
                                                                 else ""))


def _resolve(ops: Any, run: str) -> Any:
    words = run.split()
    if words and words[0] in settings(ops.site).checklist_names():
        return _scheduled
    return None


_service.register_runner("health", _scheduled)
_service.register_resolver(_resolve)

__all__ = ["GROUPS", "HealthRound", "HealthRunTask", "Scope", "advance", "checks", "history", "record", "scope_of",
           "settings", "start"]
