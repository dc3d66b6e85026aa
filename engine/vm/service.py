"""The VM inventory: records in state.db reconciled with the QEMU processes the hosts run."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ..errors import FerryError, PermanentError, Refused, TransportError
from ..platform.accel import detect_acceleration
from ..platform.liveimage import LiveImage, build_live_image
from ..platform.qga import AgentNotAnswering, AgentUnavailable, GuestAgent
from ..platform.qmp import QMPClient
from .hostops import HostOps, image_cache_dir
from .model import (RUNNING_STATES, UNFINISHED_STATES, AgentReport, AgentState, CPUHotAdd, GuestFilesystem,
                    MissingVM, OrphanProcess, ReconcileReport, TimeSync, UnreachableHost, VMKind, VMSpec, VMState,
                    VMView, based_on, process_name)
from .prechecks import VM_ACTIONS, VMActionCheck, refusal

AGENT_TIMEOUT = 3.0
AGENT_REPORT_TIMEOUT = 10.0    # a whole `vm agent info`, every command of it
RUNNING_TIMEOUT = 10.0
DOWN_RECHECK_S = 15.0      # a host that did not list its VMs is asked again this often by the VM list


class VMService:
    """Shared by the VM task kinds and the client. One per engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.store = engine.store
        self.site = engine.site
        self.pool = engine.transports
        self._image: LiveImage | None = None
        self._image_lock = asyncio.Lock()
        self._accel: dict[str, str] = {}
        # hosts that did not list their VMs: when they last failed, and the re-checks under way
        self._down: dict[str, float] = {}
        self._rechecks: dict[str, asyncio.Task] = {}

    @classmethod
    def of(cls, engine: Any) -> "VMService":
        svc = engine.services.get(cls)
        if svc is None:
            svc = engine.services[cls] = cls(engine)
        return svc

    async def _db(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        return await self.store.call(fn, *args, **kw)

    # -------------------------------------------------------------- records

    def host(self, name: str) -> HostOps:
        return HostOps(self.site.host(name), self.pool.get(name), self.site)

    async def rows(self, *, recycled: bool = False, host: str | None = None) -> list[dict]:
        return await self._db(self.store.vm_rows, recycled=recycled, host=host)

    async def find(self, name: str, *, kind: VMKind | None = None, recycled: bool = False) -> dict:
        """The record of a VM or template by name (or id); a clear error naming what exists."""
        for r in await self._db(self.store.vm_named, name, recycled=recycled):
            if kind is None or r["kind"] == kind:
                return r
        what = {None: "VM or template", VMKind.VM: "VM", VMKind.TEMPLATE: "template"}[kind]
        where = " in the recycle bin" if recycled else ""
        names = [n for n, k in await self._db(self.store.vm_names, recycled=recycled) if kind is None or k == kind]
        hint = ("known: " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")) if names else \
            ("the recycle bin is empty" if recycled else "ferry vm create NAME makes one")
        if not recycled and any(n == name for n, _k in await self._db(self.store.vm_names, recycled=True)):
            hint = f"{name} is in the recycle bin: ferry vm restore {name}"
        raise Refused(f"no {what} named {name!r}{where}", hint)

    async def spec(self, name: str, **kw: Any) -> VMSpec:
        return VMSpec.from_dict((await self.find(name, **kw))["spec"])

    async def names_in_use(self) -> set[str]:
        return {r["name"] for r in await self.rows()}

    async def macs_in_use(self) -> set[str]:
        """Every MAC of the site's VMs and templates (the recycle bin's too: they may come back)."""
        from .nics import mac_for
        out: set[str] = set()
        for r in await self.rows() + await self.rows(recycled=True):
            vm = VMSpec.from_dict(r["spec"])
            out.update((n.mac or mac_for(vm.id, i)).lower() for i, n in enumerate(vm.nics))
        return out

    async def update(self, vm_id: str, **fields: Any) -> None:
        if isinstance(fields.get("spec"), VMSpec):
            fields["spec"] = fields["spec"].to_dict()
        for k in ("state", "kind"):
            if k in fields and fields[k] is not None:
                fields[k] = str(fields[k])
        await self._db(self.store.vm_update, vm_id, **fields)

    async def linked_clones(self, template: VMSpec) -> list[str]:
        """Names of the VMs (and templates) whose disks are based on the template's images; those in
        the recycle bin so marked."""
        live, binned = await self.rows(), await self.rows(recycled=True)
        in_bin = {r["id"] for r in binned}
        return sorted(s.name + (" (in the recycle bin)" if s.id in in_bin else "")
                      for s in based_on(template, [VMSpec.from_dict(r["spec"]) for r in [*live, *binned]]))

    async def busy_with(self, row: dict, own: int | None = None) -> str | None:
        """'task 12 (start web1, running)' when a live task other than `own` works on the VM."""
        other = row["busy"]
        if not other or other == own:
            return None
        try:
            info = await self.engine.get(other)
        except PermanentError:      # the task is gone from state.db
            return None
        # A task whose Ferry process died (kill -9, power loss) no longer holds the VM.
        if info.state.final or not await self.engine.owner_alive(info):
            return None
        return f"task {other} ({info.title}, {info.state})"

    async def checked(self, action: str, name: str, *, own: int | None = None, recycled: bool = False,
                      **rules: Any) -> tuple[dict, VMSpec, HostOps]:
        """The record, spec and host of the VM that `action` is for, once the rules of prechecks.refusal
        allow it on the VM as it is now (its host's processes, its busy mark, a template's linked clones);
        Refused otherwise. `own`: the task asking, which does not count as busy."""
        row = await self.find(name, recycled=recycled)
        spec = VMSpec.from_dict(row["spec"])
        view = self._view(row, None if recycled else await self._running_or_none(row["host"]))
        clones = await self.linked_clones(spec) if spec.is_template and action in ("vm_convert", "vm_delete") else None
        why = refusal(action, view, busy_task=await self.busy_with(row, own), clones=clones, **rules)
        if why is not None:
            raise why.error()
        return row, spec, self.host(spec.host)

    async def action_checks(self, name: str, *, recycled: bool = False) -> list[VMActionCheck]:
        """Each action (prechecks.VM_ACTIONS) with why it cannot apply to the VM now, or None: the
        rules of `checked`, over the same facts, asked once for them all."""
        row = await self.find(name, recycled=recycled)
        spec = VMSpec.from_dict(row["spec"])
        view = self._view(row, None if recycled else await self._running_or_none(row["host"]))
        busy = await self.busy_with(row)
        clones = await self.linked_clones(spec) if spec.is_template else None
        return [VMActionCheck(a, refusal(a, view, busy_task=busy, clones=clones)) for a in VM_ACTIONS]

    # -------------------------------------------------------------- live state

    async def running_on(self, host: str) -> dict[str, int]:
        """vm-<short id> -> pid of each QEMU running on the host; TransportError when it does not answer."""
        try:
            return await asyncio.wait_for(self.host(host).running_pidfiles(), RUNNING_TIMEOUT)
        except asyncio.TimeoutError:
            raise TransportError(f"host {host} did not list its VMs within {RUNNING_TIMEOUT:g} s",
                                 "the host may be overloaded or unreachable") from None

    async def _running_or_none(self, host: str) -> dict[str, int] | None:
        """As running_on, or None (the records' states stand) when the host does not answer."""
        try:
            return await self.running_on(host)
        except (FerryError, OSError):
            return None

    async def _listed_or_none(self, host: str) -> dict[str, int] | None:
        """As _running_or_none, for the VM list: a host that did not answer is not asked again on every
        list (a site with many dead hosts would wait for each on every poll): its records' states stand,
        and it is asked again in the background every DOWN_RECHECK_S, the list after that using the
        answer."""
        failed = self._down.get(host)
        if failed is not None:
            if time.monotonic() - failed >= DOWN_RECHECK_S and host not in self._rechecks:
                self._rechecks[host] = asyncio.create_task(self._recheck(host), name=f"recheck {host}")
            return None
        running = await self._running_or_none(host)
        if running is None:
            self._down[host] = time.monotonic()
        return running

    async def _recheck(self, host: str) -> None:
        try:
            if await self._running_or_none(host) is None:
                self._down[host] = time.monotonic()
            else:
                self._down.pop(host, None)
        finally:
            self._rechecks.pop(host, None)

    async def close(self) -> None:
        """Stop the re-checks of hosts that did not answer."""
        tasks = list(self._rechecks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def views(self, *, recycled: bool = False) -> list[VMView]:
        """Every VM with its state as the hosts report it now (a host that does not answer keeps the record's)."""
        rows = await self.rows(recycled=recycled)
        running: dict[str, dict[str, int] | None] = {}
        if not recycled:
            hosts = [h for h in {r["host"] for r in rows} if h in self.site.hosts]
            running = dict(zip(hosts, await asyncio.gather(*(self._listed_or_none(h) for h in hosts))))
        return [self._view(r, running.get(r["host"])) for r in rows]

    def _view(self, row: dict, running: dict[str, int] | None) -> VMView:
        spec = VMSpec.from_dict(row["spec"])
        state = VMState(row["state"])
        pid = None
        if running is not None and not row["recycled"] and state not in UNFINISHED_STATES:
            pid = running.get(spec.process_name)
            if pid and state not in RUNNING_STATES:
                state = VMState.RUNNING
            elif not pid and state in RUNNING_STATES:
                state = VMState.MISSING
        return VMView.of(spec, state, recycled=row["recycled"], purge_at=row["purge_at"], pid=pid, busy=row["busy"])

    async def view(self, name: str) -> VMView:
        row = await self.find(name)
        return self._view(row, await self._running_or_none(row["host"]))

    async def reconcile(self) -> ReconcileReport:
        """Compare what runs on the hosts with the records: orphans (QEMU without a record) and
        missing VMs (recorded running, process gone). Missing ones are marked so."""
        rows = await self.rows()
        by_host: dict[str, dict[str, dict]] = {}
        for r in rows:
            by_host.setdefault(r["host"], {})[process_name(r["id"])] = r
        orphans: list[OrphanProcess] = []
        missing: list[MissingVM] = []
        unreachable: list[UnreachableHost] = []
        n_running = 0
        for host in self.site.hosts:
            try:
                running = await self.running_on(host)
            except FerryError as e:
                unreachable.append(UnreachableHost(host, str(e)))
                continue
            known = by_host.get(host, {})
            for key, pid in running.items():
                r = known.get(key)
                if r is None:
                    orphans.append(OrphanProcess(host, key, pid))
                else:
                    n_running += 1
                    if r["state"] not in RUNNING_STATES:
                        await self.update(r["id"], state=VMState.RUNNING)
            for key, r in known.items():
                if r["state"] in RUNNING_STATES and key not in running and not r["busy"]:
                    missing.append(MissingVM(host, r["name"]))
                    await self.update(r["id"], state=VMState.MISSING)
        return ReconcileReport(n_running, tuple(orphans), tuple(missing), tuple(unreachable))

    # -------------------------------------------------------------- image and acceleration

    async def image(self, progress: Callable[[str, float], None] | None = None) -> LiveImage:
        async with self._image_lock:
            if self._image is None:
                cache = image_cache_dir(self.pool.workspace.cache_dir)
                self._image = await build_live_image(cache, progress=progress)
            return self._image

    async def accel(self, host: HostOps, image: LiveImage) -> tuple[str, str]:
        """kvm or tcg for the host, and the reason (auto checks once and caches the verdict)."""
        if host.name in self._accel:
            return self._accel[host.name], ""
        cache = image_cache_dir(self.pool.workspace.cache_dir)
        key = await _machine_key(host)
        choice = await detect_acceleration(host.t, image, runtime_dir=host.spec.runtime,
                                           cache_file=cache / f"accel-{key}.json", requested=host.spec.accel)
        self._accel[host.name] = str(choice.accel)
        return str(choice.accel), "" if choice.cached else choice.reason

    # -------------------------------------------------------------- QMP and agent

    async def qmp(self, vm: VMSpec, timeout: float = 10.0) -> QMPClient:
        h = self.host(vm.host)
        return await QMPClient.open(h.t, h.paths(vm).qmp, name=vm.name, timeout=timeout)

    async def agent(self, vm: VMSpec, *, timeout: float = AGENT_TIMEOUT) -> GuestAgent:
        """The guest agent of a running VM; PermanentError with the reason when it does not answer."""
        h = self.host(vm.host)
        if await h.pid(vm) is None:
            raise PermanentError(f"VM {vm.name} is not running, so its guest agent cannot answer",
                                 f"start it first: ferry vm start {vm.name}")
        path = h.paths(vm).qga
        try:
            ga = await GuestAgent.open(h.t, path, name=vm.name, timeout=timeout)
        except AgentUnavailable:
            if await h.t.stat(path) is None:
                raise
            # the channel is there, but QEMU took no connection to it: over SSH, sshd's connect is
            # refused while QEMU still holds the last one to an agent that stopped answering
            raise self._not_answering(vm) from None
        except AgentNotAnswering:
            raise self._not_answering(vm) from None
        return ga

    @staticmethod
    def _not_answering(vm: VMSpec) -> PermanentError:
        return PermanentError(f"the guest agent of {vm.name} does not answer (not installed, not running, "
                              "or the guest is still booting)",
                              "install and start qemu-guest-agent in the guest, or wait for the boot to finish")

    async def agent_info(self, name: str) -> AgentReport:
        """Agent state and what it reports: version, OS, kernel, IPs, CPU/memory/disk use."""
        vm = await self.spec(name)
        checked = time.time()
        try:
            ga = await self.agent(vm)
        except PermanentError as e:
            return AgentReport(vm.name, AgentState.NOT_RUNNING, checked, reason=e.message)
        try:
            # One deadline for the whole report: an agent that stops answering halfway (killed, the
            # guest hung) is said at once, not after each command's own timeout in turn.
            async with ga, asyncio.timeout(AGENT_REPORT_TIMEOUT):
                info = await ga.info()
                os_info = await ga.osinfo()
                try:
                    ifaces = await ga.network_interfaces()
                    ips = tuple(a for i in ifaces if i.name != "lo" for a in i.addresses)
                except AgentNotAnswering:
                    raise
                except FerryError:
                    ips = ()
                return AgentReport(vm.name, AgentState.RUNNING, checked, version=info.version,
                                   os=os_info.pretty_name or os_info.name, kernel=os_info.kernel_release, ips=ips,
                                   **await _usage(ga))
        except (AgentNotAnswering, TimeoutError):
            return AgentReport(vm.name, AgentState.NOT_RUNNING, checked,
                               reason=f"the guest agent of {vm.name} stopped answering (it does not answer now)")

    async def timesync(self, name: str) -> TimeSync:
        vm = await self.spec(name)
        ga = await self.agent(vm)
        async with ga:
            before = await _guest_time(ga)
            now = time.time_ns()
            await ga.set_time(now)
            after = await _guest_time(ga)
        return TimeSync(vm.name, offset_before_s=(before - now / 1e9) if before else None,
                        offset_after_s=(after - time.time()) if after else None)

    async def cpu_hotadd(self, name: str, cpus: int) -> CPUHotAdd:
        """Brings the VM to `cpus` vCPUs while it runs: QMP device_add, then online through the agent."""
        vm = await self.spec(name)
        if cpus <= vm.cpus:
            raise PermanentError(f"{vm.name} has {vm.cpus} vCPUs; hot-add only adds (asked for {cpus})",
                                 "removing vCPUs needs a restart: change it while stopped")
        if cpus > vm.max_cpus:
            raise PermanentError(f"{vm.name} can grow to {vm.max_cpus} vCPUs while running, not {cpus}",
                                 "stop it and raise its max cpus")
        ga = await self.agent(vm)   # refuse before touching anything when the agent is absent
        async with await self.qmp(vm) as q:
            slots = await q.execute("query-hotpluggable-cpus")
            free = [s for s in slots if "qom-path" not in s]
            free.sort(key=lambda s: tuple(s["props"].get(k, 0) for k in ("socket-id", "core-id", "thread-id")))
            for i, slot in enumerate(free[: cpus - vm.cpus]):
                await q.execute("device_add", {"driver": slot["type"], "id": f"cpu-hot{vm.cpus + i}",
                                               **slot["props"]})
        async with ga:
            deadline = time.monotonic() + 10
            while True:
                vcpus = await ga.vcpus()
                offline = {v.logical_id: True for v in vcpus if not v.online and v.can_offline}
                if len(vcpus) >= cpus or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if offline:
                await ga.set_vcpus(offline)
            online = sum(1 for v in await ga.vcpus() if v.online or v.logical_id in offline)
        await self.update(vm.id, spec=vm.with_(cpus=cpus))
        return CPUHotAdd(vm.name, cpus, online_in_guest=online)

    # -------------------------------------------------------------- recycle bin

    async def expired(self) -> list[dict]:
        now = time.time()
        return [r for r in await self.rows(recycled=True) if r["purge_at"] and r["purge_at"] <= now]


async def _guest_time(ga: GuestAgent) -> float | None:
    try:
        return int(await ga.execute("guest-get-time")) / 1e9
    except FerryError:
        return None


async def _machine_key(host: HostOps) -> str:
    """Which machine a host is, for the cached KVM verdict: its /etc/machine-id (hosts that are one
    machine — the lab's, or two names for one server — share the verdict; the verdict's own
    fingerprint of kernel, QEMU and CPU still decides whether it holds), else its name."""
    try:
        mid = (await host.t.read_file("/etc/machine-id")).decode("ascii", "replace").strip()
    except FerryError:
        mid = ""
    if mid.isalnum() and len(mid) >= 16:
        return f"machine-{mid[:16]}"
    return "local" if host.spec.transport == "local" else host.name


async def _usage(ga: GuestAgent) -> dict[str, Any]:
    """CPU (two samples of /proc/stat), memory (/proc/meminfo) and disk use (guest-get-fsinfo): the
    AgentReport fields that could be read."""
    out: dict[str, Any] = {}
    try:
        def cpu_times(text: bytes) -> tuple[int, int]:
            fields = [int(x) for x in text.split(b"\n", 1)[0].split()[1:]]
            return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)
        t1, i1 = cpu_times(await ga.read_file("/proc/stat"))
        await asyncio.sleep(0.5)
        t2, i2 = cpu_times(await ga.read_file("/proc/stat"))
        out["cpu_percent"] = round(100.0 * (1 - (i2 - i1) / (t2 - t1)), 1) if t2 > t1 else 0.0
        mem = {}
        for line in (await ga.read_file("/proc/meminfo")).decode().splitlines():
            k, _, v = line.partition(":")
            mem[k] = int(v.split()[0]) * 1024 if v.split() else 0
        total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", mem.get("MemFree", 0))
        out.update(mem_total=total, mem_used=total - avail)
    except AgentNotAnswering:
        raise
    except (FerryError, ValueError, IndexError):
        pass
    try:
        fs = await ga.filesystems()
        out["disks"] = tuple(GuestFilesystem(f.mountpoint, f.used_bytes, f.total_bytes) for f in fs)
    except AgentNotAnswering:
        raise
    except FerryError:
        out["disks"] = ()
    return out
