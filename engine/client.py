"""The engine's calls, served in this process: what the engine service serves over its socket.

Front ends never build this themselves: they reach the service through engine.remote.RemoteEngine,
which has the same calls with the same typed records (engine/api.py). Tests and the service use
EngineClient directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable

from . import probe as _probe  # noqa: F401  (registers the probe task kind)
from .replicate import task as _replicate  # noqa: F401  (registers replicate.files / replicate.blocks)
from .vm import kinds as _vm_kinds  # noqa: F401  (registers vm.*)
from .migration import service as _migration_kinds  # noqa: F401  (registers migration.*)
from .ops import health as _health  # health.run, and the schedules' checklists (engine/ops/health.py)
from .ops import backup as _backup  # management-data backups, and the schedules' run = "backup" (engine/ops/backup.py)
from .migration import prepare as _migration_prepare  # noqa: F401  (registers migration.prepare)
from .migration import sync as _migration_sync  # noqa: F401  (registers migration.sync)
from .migration import testlaunch as _migration_test  # noqa: F401  (registers migration.test)
from .migration import cutover as _migration_cutover  # noqa: F401  (registers migration.cutover|rollback|finalize)
from .vm.model import AgentReport, CPUHotAdd, ReconcileReport, TimeSync, VMSpec, VMView
from .vm.prechecks import VMActionCheck, precheck, refused
from .vm.service import VMService
from .vm.serial import SerialConsole, open_serial
from .config import SiteConfig
from .errors import FerryError, PermanentError, Refused
from .events import Subscription
from .api import AuditEntry, HostKey, TaskLogEntry, TrackedFile
from .gc import Leftover
from .hostfacts import HostFacts, gather_all, gather_facts, tap_owners
from .migration.model import Migration, PlanApplied, PlanCheck
from .ops.backupmodel import BackupList, BackupResult
from .ops.healthmodel import HealthCheck, HealthResult
from .ops.metrics import metrics_of
from .ops.metricsmodel import HostMetrics, MetricSeries, VMMetrics
from .ops.model import AlarmInfo, EventInfo, ScheduleInfo, SilenceInfo
from .ops.service import Ops
from .store import Store, current_user
from .taskmodel import TaskInfo
from .tasks import Engine, JobAlreadyRunning, kind_of
from .transport import TransportPool, fetch_host_key, record_host_key
from .workspace import Workspace
from .logs import logger

if TYPE_CHECKING:
    from .platform.labops import LabStatus


log = logger("ferry.engine")


class EngineClient:
    def __init__(self, workspace: Workspace, site: SiteConfig, *, adopt: bool = True,
                 transports: TransportPool | None = None) -> None:
        self.workspace = workspace.ensure()
        self.site = site
        self.store = Store(workspace.state_path)
        self.transports = transports or TransportPool(site, workspace)
        self.engine = Engine(self.store, site, transports=self.transports, adopt=adopt)
        self.ops = Ops(self.store, lambda: self.site)     # alarms, silences, events, schedules (engine/ops)
        self.ops.engine = self.engine            # scheduled runs submit tasks (health checklists)
        self.engine.services[Ops] = self.ops     # tasks raise alarms through it (health checks)
        self.sampler = metrics_of(self.engine, lambda: self.site, self.workspace)   # F3; the service launches it
        self._config_stamp = self._stamp()
        self._lab_lock = asyncio.Lock()      # one build or teardown of the network lab at a time

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.workspace.config_path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    async def reload_site(self) -> bool:
        """Read config.toml again when it changed since it was read (the engine service does this
        before every call, so an edit takes effect without a restart). Raises ConfigError while the
        new file is invalid (nothing acts on a configuration the operator is halfway through
        editing); returns True when the site changed. Hosts whose entry changed or went lose their
        pooled connection."""
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return False
        site = self.workspace.load_config()
        self._config_stamp = stamp
        old, self.site = self.site, site
        self.engine.site = site
        self.transports.site = site
        for svc in self.engine.services.values():
            if getattr(svc, "site", None) is old:
                svc.site = site
        stale = [h for h in list(self.transports.hosts()) if old.hosts.get(h) != site.hosts.get(h)]
        await self.transports.drop(stale)
        self._lab_folders()
        log.info("config.toml changed: site %s reloaded (%d hosts)", site.name, len(site.hosts))
        return True

    @classmethod
    def open(cls, workspace: Workspace, **kw: Any) -> "EngineClient":
        """Load the workspace's site (raises ConfigError) and build a client for it."""
        return cls(workspace, workspace.load_config(), **kw)

    def _lab_folders(self) -> None:
        """The lab's hosts (folders, or namespaces of this machine) get their runtime and datastores."""
        if self.site.is_lab or self.site.lab.network:
            for path in [h.runtime for h in self.site.hosts.values()] + [d.path for d in self.site.datastores.values()]:
                Path(path).mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        self._lab_folders()
        if self.site.is_lab and not self.site.lab.network:
            from .platform.labops import network_lab_default
            why = network_lab_default(self.workspace.root)
            if why:
                log.info("%s", why)
        if self.site.lab.network and await self.get_setting("lab.down") is not True:
            # A site that is the network lab: adopt it (or repair what is missing of it) before any
            # task resumes on its hosts; one `ferry lab down` took down on purpose stays down.
            try:
                await self._lab_call("up")
            except FerryError as e:
                log.warning("the network lab is not up: %s (hint: %s)", e.message, e.hint)
        await self.engine.start()

    async def close(self) -> None:
        await self.ops.stop()
        await self.sampler.stop()
        self.sampler.close()
        await self.engine.stop()
        vms = self.engine.services.get(VMService)
        if vms is not None:
            await vms.close()
        await self.transports.close()
        self.store.close()

    @property
    def engine_state(self) -> str:
        return self.engine.state

    def subscribe(self) -> Subscription:
        return self.engine.subscribe()

    # ------------------------------------------------------------------ tasks

    async def list_tasks(self, limit: int = 500) -> list[TaskInfo]:
        return await self.engine.list(limit=limit)

    async def get_task(self, task_id: int) -> TaskInfo:
        return await self.engine.get(task_id)

    async def get_site(self) -> SiteConfig:
        """The site this engine serves, as its config.toml describes it."""
        return self.site

    async def task_log(self, task_id: int, limit: int = 200) -> list[TaskLogEntry]:
        rows = await self.store.call(self.store.task_log, task_id, limit)
        return [TaskLogEntry(ts=r["ts"], level=r["level"], message=r["message"]) for r in rows]

    async def task_files(self, task_id: int) -> list[TrackedFile]:
        """The files a task recorded on its hosts (temporary, or made), while it holds them."""
        rows = await self.store.call(self.store.tracked_files, task_id)
        return [TrackedFile(task_id=r["task_id"], host=r["host"], path=r["path"], role=r["role"],
                            created=r["created"]) for r in rows]

    async def submit(self, kind: str, params: dict[str, Any]) -> int:
        return await self.engine.submit(kind, params)

    async def pause(self, task_id: int) -> TaskInfo:
        return await self.engine.pause(task_id)

    async def resume(self, task_id: int) -> TaskInfo:
        return await self.engine.resume(task_id)

    async def cancel(self, task_id: int) -> TaskInfo:
        return await self.engine.cancel(task_id)

    async def confirm(self, task_id: int, typed: str) -> TaskInfo:
        return await self.engine.confirm(task_id, typed)

    async def replicate(self, level: str, params: dict[str, Any], *, restart: bool = False) -> tuple[int, bool]:
        """Start a files/blocks replication round, or resume the unfinished one for the same SRC and DST.
        Refused, and no task made, when the engine's precheck refuses it (an overlap, say)."""
        await _replicate.precheck(self.engine, level, params)
        return await self.engine.submit_or_resume(f"replicate.{level}", params, restart=restart)

    async def start_probe(self, host: str, *, pings: int = 20, size_mib: int = 64) -> int:
        return await self.submit("probe", {"host": host, "pings": pings, "size_mib": size_mib})

    # ------------------------------------------------------------------ VMs and templates

    @property
    def _vms(self) -> VMService:
        return VMService.of(self.engine)

    async def vm_list(self, *, recycled: bool = False) -> list[VMView]:
        """Every VM and template with its live state (recycled=True: the recycle bin)."""
        return await self._vms.views(recycled=recycled)

    async def vm_get(self, name: str) -> VMView:
        return await self._vms.view(name)

    async def vm_agent(self, name: str) -> AgentReport:
        """What the guest agent reports (or why it cannot)."""
        return await self._vms.agent_info(name)

    async def vm_reconcile(self) -> ReconcileReport:
        """Orphan QEMU processes and missing VMs, compared with the records."""
        return await self._vms.reconcile()

    async def vm_actions(self, name: str, *, recycled: bool = False) -> list[VMActionCheck]:
        """Which actions apply to the VM or template (by name or id; recycled: in the recycle bin) now,
        each with the engine's refusal or None: what a front end dims, asked of the same rules as
        `precheck`, which still decides when the action is asked for."""
        return await self._vms.action_checks(name, recycled=recycled)

    async def vm_task(self, kind: str, params: dict[str, Any]) -> int:
        """Start a VM task (vm.create/start/shutdown/hibernate/clone/convert/delete/restore/purge/
        export/import); params name the VM as "vm" (or "src"), the host is filled in here. The same
        job started again while its task is unfinished (interrupted, paused, queued) attaches to that
        task and resumes it, instead of being refused for the names or the VM it holds."""
        return (await self.vm_task_or_attach(kind, params))[0]

    async def vm_task_or_attach(self, kind: str, params: dict[str, Any]) -> tuple[int, bool]:
        """As vm_task: (the task's id, whether it is an unfinished one that goes on)."""
        params = self._validated(kind, params)
        key = kind_of(kind).dedup_key(params)
        if key is not None:
            same = await self.store.call(self.store.unfinished_task, kind, key)
            if same is not None and same["state"] != "failed":
                params.setdefault("host", same["params"].get("host"))
                try:
                    return await self.engine.submit_or_resume(kind, {n: v for n, v in params.items() if v is not None})
                except JobAlreadyRunning as e:     # another front end's command: the same task, followed
                    return e.task_id, True
        await self._fill_host(kind, params)
        await precheck(self.engine, kind, params)    # Refused: no task is made
        if key is not None:      # a failed task of the job starts again (it rolled back what it made)
            return await self.engine.submit_or_resume(kind, params)
        return await self.submit(kind, params), False

    async def open_serial(self, name: str) -> SerialConsole:
        """The serial console (ttyS0) of the running VM: `await read()` what the guest prints (b"" once
        it ended), `await write(data)` what is typed, `await close()`. Refused when the VM is not
        running, or its serial console is open elsewhere."""
        return await open_serial(self._vms, name)

    async def vm_timesync(self, name: str) -> TimeSync:
        return await self._audited("vm.timesync", name, {}, self._vms.timesync(name))

    async def vm_cpu_hotadd(self, name: str, cpus: int) -> CPUHotAdd:
        return await self._audited("vm.cpu_hotadd", name, {"cpus": cpus}, self._vms.cpu_hotadd(name, cpus))

    async def _audited(self, action: str, target: str, params: dict, work: Awaitable[Any]) -> Any:
        """An operator action done at once (not as a task), recorded in the audit log either way."""
        try:
            out = await work
        except Exception as e:
            await self.audit(action, target, params, f"failed: {e}")
            raise
        await self.audit(action, target, params, "ok")
        return out

    async def wait_task(self, task_id: int, timeout: float | None = None) -> TaskInfo:
        return await self.engine.wait(task_id, timeout=timeout)

    async def precheck(self, kind: str, params: dict[str, Any]) -> None:
        """What `vm_task` would refuse, asked first (raises Refused); nothing is done."""
        params = self._validated(kind, params)
        await self._fill_host(kind, params)
        await precheck(self.engine, kind, params)

    @staticmethod
    def _validated(kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """A copy of the parameters, checked by the kind: bad input is a refusal (exit code 2), before
        any task."""
        params = dict(params)
        try:
            kind_of(kind).validate(params)
        except PermanentError as e:
            raise refused(e) from None
        return params

    async def _fill_host(self, kind: str, params: dict[str, Any]) -> None:
        """The host of the VM the parameters name ("vm" or "src"), when they do not give it."""
        if "host" not in params:
            ref = params.get("vm") or params.get("src")
            if ref and ref != "*expired*":
                row = await self._vms.find(ref, recycled=kind in ("vm.restore", "vm.purge"))
                params["host"] = row["host"]

    # ------------------------------------------------------------------ hosts

    async def host_facts(self, host: str, timeout: float = 10.0) -> HostFacts:
        spec = self.site.host(host)
        return await gather_facts(self.transports.get(host), spec, self.site.datastores_of(host), timeout,
                                  site=self.site, owners=await self._tap_owners(host))

    async def hosts_facts(self, timeout: float = 10.0) -> dict[str, HostFacts]:
        """Every host's facts, gathered in parallel, by host name in the configuration's order."""
        return await gather_all(self.transports, self.site, timeout=timeout, owners=await self._tap_owners())

    async def _tap_owners(self, host: str | None = None) -> dict[str, str]:
        """Tap name -> VM name, so the facts name the VMs whose taps are on a host's bridges (host:
        the VMs recorded on it, whose taps its bridges carry; a site has thousands of VMs, and facts
        are asked of each host in turn)."""
        return tap_owners(VMSpec.from_dict(r["spec"]) for r in await self._vms.rows(host=host))

    async def host_key(self, host: str) -> HostKey:
        """The SSH host key `host` presents (or its jump host, first), against what is recorded."""
        return _host_key(host, await fetch_host_key(self.transports.ssh(host)))

    async def trust_host(self, host: str, fingerprint: str) -> HostKey:
        """Record the key `host` presents as trusted, provided it is the one the operator checked."""
        info = await fetch_host_key(self.transports.ssh(host))
        return await self._trust(info, fingerprint, "host.trust", host, host, "host")

    async def _trust(self, info: Any, fingerprint: str, action: str, target: str, who: str, what: str) -> HostKey:
        """Record the key `info` (that `who` presents) in the workspace's known_hosts, provided it is
        the one the operator checked on the `what`; audited as `action` on `target`."""
        if info.fingerprint != fingerprint:
            raise PermanentError(f"{who} presents {info.fingerprint}, not {fingerprint}", f"check the fingerprint "
                                 f"on the {what}: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
        await record_host_key(self.workspace.known_hosts_path, info)
        await self.audit(action, target, {"fingerprint": info.fingerprint, "was": str(info.status),
                                          "endpoint": info.endpoint}, "ok")
        return _host_key(target, info)

    # ------------------------------------------------------------------ the network lab

    async def _lab_call(self, action: str) -> Any:
        from .platform import labops
        lab = labops.lab_of(self.workspace.root, self.site.lab.subnet, labops.lab_vlans(self.site))
        configured = self.site.lab.network
        async with self._lab_lock:
            if action == "status":
                out = await asyncio.to_thread(labops.status, lab, configured=configured)
                if self.site.is_lab and not configured:
                    why = labops.network_lab_default(self.workspace.root) or (
                        "the lab's hosts are folders on this machine (made so when the workspace was)"
                        + labops.FOLDER_LAB_NICS)
                    out = dataclasses.replace(out, folders=why)
                return out
            if action == "up":
                out = await asyncio.to_thread(labops.up, lab, self.workspace.known_hosts_path,
                                              configured=configured)
            else:
                out = await asyncio.to_thread(labops.down, lab, configured=configured)
            if configured and out.changed:      # connections to an sshd that went are of no use
                await self.transports.drop([h.name for h in out.hosts if h.name in self.site.hosts])
            return out

    async def lab_up(self) -> LabStatus:
        """Build the network lab of this workspace (adopt it when up, repair it when half made); its
        host keys trusted in the workspace's known_hosts. Refused without root."""
        await self.store.call(self.store.set_setting, "lab.down", False)
        return await self._audited("lab.up", "lab", {}, self._lab_call("up"))

    async def lab_down(self) -> LabStatus:
        """Stop every process of the network lab and remove it (namespaces, links, fence)."""
        out = await self._audited("lab.down", "lab", {}, self._lab_call("down"))
        await self.store.call(self.store.set_setting, "lab.down", True)
        return out

    async def lab_status(self) -> LabStatus:
        """Each lab host: namespace, address, sshd pid, whether it answers."""
        return await self._lab_call("status")

    # ------------------------------------------------------------------ server migrations
    # A plan file is read here, by the engine: it runs on the machine of the workspace, where the
    # operator's command line runs too (a path relative to the command's folder is made absolute
    # by the front end).

    async def plan_check(self, path: str) -> PlanCheck:
        """A plan file checked against the site and the migrations in the store: every problem
        (FILE:LINE: key: problem (hint: ...)), else its wave and migrations."""
        from .migration import plan
        return await plan.check(self.store, Path(path), self.site)

    async def plan_apply(self, path: str, dry_run: bool = False) -> PlanApplied:
        """Apply a plan file (ConfigError with its problems; Refused when it changes a migration past
        assessed): new migrations planned, changed ones updated, in one transaction, audited."""
        from .migration import plan
        return await plan.apply(self.store, Path(path), self.site, dry_run=dry_run, actor=current_user())

    async def migration_list(self, wave: str | None = None) -> list[Migration]:
        """The migrations (of one wave), by wave and name."""
        return [_migration(r) for r in await self.store.call(self.store.migration_rows, wave)]

    async def migration_get(self, name: str) -> Migration:
        row = await self.store.call(self.store.migration_row, name)
        if row is None:
            raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
        return _migration(row)

    async def migration_source_key(self, name: str) -> HostKey:
        """The SSH host key the migration's source presents, against what is recorded."""
        from .migration.service import load, source_transport
        t = source_transport(self.transports, await load(self.store, name))
        try:
            return _host_key(name, await fetch_host_key(t))
        finally:
            await t.close()

    async def trust_migration_source(self, name: str, fingerprint: str) -> HostKey:
        """Record the key the migration's source presents as trusted, if it is the one the operator checked."""
        from .migration.service import load, source_transport
        mig = await load(self.store, name)
        t = source_transport(self.transports, mig)
        try:
            info = await fetch_host_key(t)
        finally:
            await t.close()
        return await self._trust(info, fingerprint, "migration.trust", name,
                                 f"the source of {name} ({mig.spec.source.target})", "source")

    async def migration_override(self, name: str, reason: str) -> Migration:
        """The operator goes on despite a network below its thresholds, for `reason` (audited); a
        network blocker of the last assessment becomes a warning."""
        if not reason.strip():
            raise Refused("an override needs a reason", f"ferry migration netcheck {name} --override 'why'")
        return _migration(await self.store.call(self.store.migration_override, name, reason.strip(),
                                                actor=current_user()))

    async def migration_report(self, name: str) -> str:
        """The last assessment of the migration as Markdown (Refused before one was made)."""
        from .migration.service import report
        return report(await self.migration_get(name))

    async def migration_cutover_summary(self, name: str) -> dict[str, Any]:
        """What the cutover's confirmation shows: last sync's age, data changed since, the predicted
        downtime in parts, the last test launch, the network check, blockers and the steps."""
        from .migration.cutover import summary
        return summary(await self.migration_get(name))

    async def migration_cancel_cutover(self, name: str, reason: str) -> int | None:
        """A running cutover of the migration cancelled (its rollback restores the source): its task's
        id; None when no cutover task is under way."""
        for info in await self.engine.list(states=("queued", "running", "waiting", "paused", "interrupted")):
            if info.kind == "migration.cutover" and info.params.get("migration") == name:
                await self.engine.cancel(info.id, reason=reason)
                return info.id
        return None

    # ------------------------------------------------------------------ operations (engine/ops)

    async def alarms(self, all: bool = False) -> list[AlarmInfo]:
        """Open alarms (active, acknowledged) by severity; all=True: cleared ones too (history)."""
        return await self.ops.alarms(all=all)

    async def alarm_ack(self, id: int, comment: str = "") -> AlarmInfo:
        """Acknowledge an open alarm (who: the caller; audited)."""
        return await self.ops.ack(id, comment)

    async def alarm_clear(self, id: int, reason: str) -> AlarmInfo:
        """Clear an open alarm by hand, with a reason (audited)."""
        return await self.ops.clear(id, reason)

    async def silence_add(self, matchers: dict[str, str], duration_s: float, reason: str) -> SilenceInfo:
        """Silence alarms matching every matcher (type, object, severity; exact or glob) for duration_s."""
        return await self.ops.silence_add(matchers, duration_s, reason)

    async def silence_list(self, all: bool = False) -> list[SilenceInfo]:
        return await self.ops.silence_list(all=all)

    async def silence_remove(self, id: int) -> SilenceInfo:
        return await self.ops.silence_remove(id)

    async def events(self, limit: int = 100) -> list[EventInfo]:
        """The newest events of alarms and silences, newest first."""
        return await self.ops.events(limit=limit)

    async def schedules(self) -> list[ScheduleInfo]:
        """Each schedule of config.toml with its next run and its last run."""
        return await self.ops.schedules()

    async def health_run(self, checklist: str | None = None, host: str | None = None) -> int:
        """A health round (task health.run) of a checklist (default daily), or of every check of one host;
        the id of its task (a run of the same job under way: that one)."""
        return await _health.start(self.engine, self.site, checklist, host)

    async def health_list(self, host: str | None = None) -> list[HealthCheck]:
        """The current state of every check: state, SOFT/HARD, attempt, summary, when last checked."""
        return await self.store.call(_health.checks, self.store, host)

    async def health_history(self, check: str, host: str | None = None, limit: int = 50) -> list[HealthResult]:
        """The newest results of a check (a trailing * matches a prefix: vm-io:*), newest first."""
        return await self.store.call(_health.history, self.store, check, host, limit)

    async def backup_now(self, remote: str | None = None) -> BackupResult:
        """A backup of the management data now (kind manual), uploaded to `remote` (and to each remote
        with auto = true), each upload verified on its server; then retention."""
        r = await _backup.backups_of(self.ops).now_("manual", remote)
        await _backup.record_freshness(self.ops)
        return r

    async def backup_list(self) -> BackupList:
        """Every backup here and on the remotes, newest first, each checked against its checksum."""
        return await _backup.backups_of(self.ops).list()

    async def backup_prune(self, dry_run: bool = False) -> BackupList:
        """Backups past [backup.keep], oldest first: removed (unless dry_run)."""
        return await _backup.backups_of(self.ops).prune(dry_run=dry_run)

    async def metrics(self, name: str, metric: str | None = None, since: float = 3600.0) -> list[MetricSeries]:
        """A host's or VM's metrics (or the one named) over the last `since` seconds, min/avg/max per bucket."""
        return await self.sampler.series(name, metric, since)

    async def metrics_compare(self) -> list[HostMetrics]:
        """Every host's newest sample: CPU, memory, network and disk rates, load."""
        return await self.sampler.compare()

    async def metrics_compare_vms(self) -> list[VMMetrics]:
        """Every VM's newest sample (CPU, memory), with its host; none for a VM that does not run."""
        return await self.sampler.compare_vms()

    # ------------------------------------------------------------------ leftovers

    async def gc(self, dry_run: bool = False) -> list[Leftover]:
        """What tasks that are gone left behind on the hosts, removed (unless dry_run), with sizes."""
        from .gc import collect
        return await collect(self, dry_run=dry_run)

    # ------------------------------------------------------------------ settings and audit

    async def get_setting(self, key: str, default: Any = None) -> Any:
        return await self.store.call(self.store.get_setting, key, default)

    async def set_setting(self, key: str, value: Any) -> None:
        await self.store.call(self.store.set_setting, key, value)
        await self.audit("setting.set", key, {"value": value}, "ok")

    async def audit(self, action: str, target: str, params: dict | None, result: str) -> None:
        await self.store.call(self.store.audit, action, target, params, result)

    async def audit_log(self, limit: int = 50) -> list[AuditEntry]:
        """The newest `limit` entries of the audit log, newest first."""
        rows = await self.store.call(self.store.audit_rows, limit)
        return [AuditEntry(id=r["id"], ts=r["ts"], actor=r["actor"], action=r["action"], target=r["target"],
                           params=r["params"] or {}, result=r["result"]) for r in rows]


def _migration(row: dict) -> Migration:
    """A migration as stored, with its read-time figures: what changed since the last round, the final
    sync's and the cutover's predicted durations, the measured downtime."""
    from dataclasses import replace

    from .api import convert
    m = _migration_sync.with_figures(convert(row, Migration))
    from .migration.model import MigrationState as S
    cut = m.cutover or {}
    ahead = m.state in (S.SYNCING, S.READY)     # (a cutover record then is an earlier, rolled-back one)
    predicted = _migration_cutover.predicted_downtime(m) if ahead else cut.get("predicted_downtime")
    return replace(m, predicted_downtime_s=(predicted or {}).get("total_s"),
                   predicted_downtime_parts=(predicted or {}).get("parts"),
                   measured_downtime_s=None if ahead else cut.get("measured_downtime_s"))


def _host_key(host: str, info: Any) -> HostKey:
    return HostKey(host=host, endpoint=info.endpoint, key_type=info.key_type, fingerprint=info.fingerprint,
                   status=str(info.status), old_fingerprints=tuple(info.old_fingerprints), jump=info.jump)
