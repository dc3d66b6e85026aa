"""Server migrations in the engine: the source reached over SSH, and the assessment task.

`migration.assess` (ferry migration assess NAME) collects the source's facts (assess.collect, read
only, nothing installed), measures the network on the data's path (netcheck.measure: from the
target host to the source, and a stream from the source to the target host's migration address),
judges both (assess.assess: findings, recommendation, the estimate at the measured bandwidth; a
network below its thresholds is a blocker unless the operator overrode it with a reason) and
records the assessment, its blockers and warnings, and the state `assessed`, in one transaction,
audited. `ferry migration netcheck NAME --override REASON` records such a reason (audited).
"""

from __future__ import annotations

from typing import Any

from .. import api
from ..config import HostSpec
from ..errors import FerryError, HostKeyError, PermanentError, Refused, TransientError
from ..hostfacts import migration_address
from ..tasks import TaskContext, TaskKind, register
from . import assess, netcheck
from .model import Finding, Method, Migration, MigrationState, sources_of

ASSESSABLE = sources_of(MigrationState.ASSESSED)


def source_spec(mig: Migration) -> HostSpec:
    """The source as an SSH host (named by its address: it is no host of the site)."""
    s = mig.spec.source
    return HostSpec(s.address, "", "ssh", address=s.address, port=s.port, user=s.user, identity=s.identity)


def source_transport(pool: Any, mig: Migration):
    """An SSH transport to the migration's source (`pool`: the engine's TransportPool, for its
    known_hosts and SSH settings), its host key checked (an unknown key: `ferry migration trust NAME`)."""
    from ..transport.ssh import SshTransport
    return SshTransport(source_spec(mig), known_hosts=pool.known_hosts, ssh_config_paths=pool.ssh_config_paths,
                        use_agent=pool.use_agent, connect_timeout=pool.connect_timeout)


async def ensure_idle(store: Any, name: str, kind: str, own: int | None = None) -> None:
    """Refused while another task works on the migration (a sync, a test launch, a cutover, ... of
    the same migration never run at once; a paused or interrupted one counts: it goes on later)."""
    busy = ("queued", "running", "waiting", "paused", "interrupted")
    for row in await store.call(store.task_rows, states=busy):
        if row["id"] != own and row["kind"].startswith("migration.") and row["kind"] != kind \
                and (row["params"] or {}).get("migration") == name:
            raise Refused(f"migration {name} is busy: task {row['id']} ({row['kind']}) is {row['state']}",
                          f"wait for it (ferry task show {row['id']}), or cancel it")


async def load(store: Any, name: str) -> Migration:
    row = await store.call(store.migration_row, name)
    if row is None:
        raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
    return api.convert(row, Migration)


class MigrationKind(TaskKind):
    """A task on one migration: its name is params["migration"]; one such job at a time (dedup), and
    ensure_idle keeps two kinds of them from running at once."""
    verb = ""               # the title: "<verb> NAME"
    usage = ""              # the command, for a missing name

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("migration"):
            raise PermanentError(f"{self.verb} needs a migration's name", self.usage)

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return []

    def title(self, params: dict[str, Any]) -> str:
        return f"{self.verb} {params['migration']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"migration:{params['migration']}"


@register
class AssessMigration(TaskKind):
    name = "migration.assess"
    max_retries = 0

    def validate(self, params: dict[str, Any]) -> None:
        if not params.get("migration"):
            raise PermanentError("an assessment needs a migration's name", "ferry migration assess NAME")

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return []

    def title(self, params: dict[str, Any]) -> str:
        return f"assess {params['migration']}"

    def dedup_key(self, params: dict[str, Any]) -> str | None:
        return f"migration:{params['migration']}"

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        """Refused before a task is made: no such migration, or one past assessment."""
        mig = await load(svc.store, params["migration"])
        if mig.state not in ASSESSABLE:
            raise Refused(f"migration {mig.name} is {mig.state}: it is assessed before its target is prepared",
                          f"ferry migration show {mig.name}")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc, mig = await _checked(self, ctx)
        src = mig.spec.source
        ctx.progress(item=f"collecting the facts of {src.target}", units_done=0, units_total=3)
        t = source_transport(svc.pool, mig)
        try:
            try:
                facts = await assess.collect(t)
            except HostKeyError as e:
                raise HostKeyError(f"the source of {mig.name}: {e.message}",
                                   f"check the fingerprint on the source, then: ferry migration trust {mig.name}",
                                   host=e.host, fingerprint=e.fingerprint, changed=e.changed) from None
            except FerryError as e:
                # said of the source and its plan, not of a host of config.toml
                cls = TransientError if isinstance(e, TransientError) else PermanentError
                raise cls(f"the source of {mig.name} ({src.target}) cannot be assessed: {e.message}",
                          f"check [migrations.{mig.name}.source] in the plan (address, port, user, identity) "
                          "and that sshd answers there") from None
            nc, netfail = (None, None) if facts.windows else await _measure(ctx, svc, mig, t)
        finally:
            await t.close()
        ctx.progress(item="judging", units_done=2)
        method = None if mig.spec.method == Method.AUTO else mig.spec.method
        bw = nc.bandwidth_mbit * 1e6 if nc and nc.bandwidth_mbit else None
        a = assess.assess(facts, resize=bool(mig.spec.target.disks), method=method, bandwidth_bps=bw)
        net_blockers, net_warnings = network_findings(mig, nc, netfail)
        blockers = [Finding(f.name, f.message, f.hint) for f in a.blockers] + net_blockers
        warnings = [Finding(f.name, f.message, f.hint) for f in a.warnings] + net_warnings
        report = {"report": api.to_builtins(a), "netcheck": api.to_builtins(nc) if nc else None}
        await svc.store.call(svc.store.migration_transition, mig.name, MigrationState.ASSESSED.value,
                             allowed_from=tuple(s.value for s in ASSESSABLE),
                             params={"blockers": [b.name for b in blockers], "task": ctx.id},
                             assessment=report, blockers=[api.to_builtins(b) for b in blockers],
                             warnings=[api.to_builtins(w) for w in warnings])
        rec = a.recommendation
        if rec:
            ctx.log(f"recommended: {rec.reason}")
        if nc:
            ctx.log(f"network: {nc.line}")
        for b in blockers:
            ctx.log(f"blocker {b.name}: {b.message}", "warning")
        ctx.progress(item="assessed", units_done=3)
        return {"migration": mig.name, "method": str(rec.method) if rec else None, "reason": rec.reason if rec else None,
                "estimate_s": a.estimate.seconds if a.estimate else None, "network": nc.line if nc else None,
                "blockers": [b.name for b in blockers], "warnings": [w.name for w in warnings],
                "windows": facts.windows or None}



NETWORK_FINDINGS = ("network", "netcheck_failed")


async def _checked(kind: Any, ctx: TaskContext) -> tuple[Any, Migration]:
    """The VM service and the task's migration, once the kind's check passes again as the task runs."""
    from ..vm.service import VMService
    svc = VMService.of(ctx.engine)
    await kind.check(svc, ctx.params)
    return svc, await load(svc.store, ctx.params["migration"])


async def _measure(ctx: TaskContext, svc: Any, mig: Migration, t: Any
                   ) -> tuple[netcheck.NetCheck | None, Finding | None]:
    """The network check from the target host's migration address to the source (over `t`), or why
    it could not run."""
    src, h = mig.spec.source, svc.host(mig.spec.target.host)
    address, _ = migration_address(h.spec)
    ctx.progress(item=f"network check: {src.address} -> {h.name} ({address})", units_done=1)
    try:
        return await netcheck.measure(t, src.address, src.port, h.t, h.name, address,
                                      thresholds=mig.spec.thresholds), None
    except FerryError as e:
        return None, Finding("netcheck_failed", f"the network check could not run: {e.message}", e.hint)


def network_findings(mig: Migration, nc: netcheck.NetCheck | None, netfail: Finding | None
                     ) -> tuple[list[Finding], list[Finding]]:
    """(blockers, warnings) a network check gives: below its thresholds a blocker, or a warning once
    the operator overrode it; one that could not run a blocker."""
    blockers: list[Finding] = [netfail] if netfail else []
    warnings: list[Finding] = []
    if nc is not None and not nc.passed:
        if mig.override:
            warnings.append(Finding("network", f"{nc.line} (overridden: {mig.override})", ""))
        else:
            blockers.append(Finding("network", nc.line, "fix the path, or go on anyway: "
                                    f"ferry migration netcheck {mig.name} --override REASON"))
    return blockers, warnings


@register
class NetcheckMigration(TaskKind):
    """`ferry migration netcheck NAME`: the network check again (an assessed migration's path may
    have changed), its verdict replacing the last one's in the migration's blockers and warnings."""
    name = "migration.netcheck"
    max_retries = 0

    validate = AssessMigration.validate
    hosts = AssessMigration.hosts
    dedup_key = AssessMigration.dedup_key

    def title(self, params: dict[str, Any]) -> str:
        return f"network check of {params['migration']}"

    async def check(self, svc: Any, params: dict[str, Any]) -> None:
        mig = await load(svc.store, params["migration"])
        if mig.state in (MigrationState.PLANNED, MigrationState.ROLLED_BACK):
            raise Refused(f"migration {mig.name} is {mig.state}: its assessment measures the network first",
                          f"ferry migration assess {mig.name}")
        if mig.state in (MigrationState.CUTTING_OVER, MigrationState.CUT_OVER, MigrationState.FINALIZED):
            raise Refused(f"migration {mig.name} is {mig.state}: the network check is for before the cutover",
                          f"ferry migration show {mig.name}")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        svc, mig = await _checked(self, ctx)
        t = source_transport(svc.pool, mig)
        try:
            nc, netfail = await _measure(ctx, svc, mig, t)
        finally:
            await t.close()
        blockers, warnings = network_findings(mig, nc, netfail)
        await svc.store.call(svc.store.migration_netcheck, mig.name, api.to_builtins(nc) if nc else None,
                             [api.to_builtins(b) for b in blockers], [api.to_builtins(w) for w in warnings],
                             replace=NETWORK_FINDINGS, task=ctx.id)
        ctx.log(f"network: {nc.line}" if nc else f"network check: {netfail.message}",
                "info" if nc and nc.passed else "warning")
        ctx.progress(item="measured", units_done=3, units_total=3)
        return {"migration": mig.name, "network": nc.line if nc else None, "passed": bool(nc and nc.passed),
                "blockers": [b.name for b in blockers], "warnings": [w.name for w in warnings]}


def report(mig: Migration) -> str:
    """The migration's last assessment as Markdown: the assessment's report, then the network check
    and the verdict recorded with it (blockers after any override)."""
    if not mig.assessment or not mig.assessment.get("report"):
        raise Refused(f"migration {mig.name} has not been assessed", f"ferry migration assess {mig.name}")
    a = api.convert(mig.assessment["report"], assess.Assessment)
    out = [assess.report_markdown(a).rstrip(), "", "## Network check", ""]
    nc = mig.assessment.get("netcheck")
    out.append(api.convert(nc, netcheck.NetCheck).line if nc else "not measured")
    if mig.override:
        out.append(f"\nOverridden by the operator: {mig.override}")
    out += ["", f"## Verdict: {len(mig.blockers)} blocker(s), {len(mig.warnings)} warning(s)", ""]
    out += [f"- blocker `{b.name}`: {b.message}" + (f" (hint: {b.hint})" if b.hint else "") for b in mig.blockers]
    out += [f"- warning `{w.name}`: {w.message}" for w in mig.warnings]
    return "\n".join(out) + "\n"
