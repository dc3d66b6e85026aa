"""Replication as engine tasks: `replicate.files` and `replicate.blocks`, one round per run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import SiteConfig
from ..errors import PermanentError, Refused
from ..helpers import detached
from ..tasks import TaskContext, TaskKind, kind_of, register
from . import agent as W
from . import overlap
from .blocks import DEFAULT_CHUNK, BlockOptions, BlockRound
from .channel import STALL_S
from .files import FileOptions, FileRound
from .hosts import agent_host


TOUCHED_MARGIN_NS = 2_000_000_000


def default_streams() -> int:
    """Parallel streams when not told: one per core of this machine, 2 to 4. More than the
    cores only adds switching (measured: 2 streams beat 4 on a 2-core machine)."""
    return max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True)
class Endpoint:
    host: str
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


def parse_endpoint(text: str, site: SiteConfig | None = None, *, what: str = "endpoint") -> Endpoint:
    """HOST:PATH, HOST a host of the site or `local`, PATH absolute."""
    host, sep, path = text.partition(":")
    known = sorted(site.hosts) + ["local"] if site else ["local"]
    if not sep or not host or not path:
        raise PermanentError(f"{what} {text!r} is not HOST:PATH",
                             f"for example local:/srv/data or {known[0]}:/srv/data")
    if not path.startswith("/"):
        raise PermanentError(f"{what} {text!r}: the path must be absolute", f"for example {host}:/{path}")
    if site is not None and host != "local":
        site.host(host)   # raises with the list of known hosts
    # Tidy the spelling only: `..` stays, for only the host can say where it leads (after a
    # symlink it is not the lexical parent); the round resolves the path there.
    parts = [c for c in path.split("/") if c not in ("", ".")]
    return Endpoint(host, "/" + "/".join(parts))


def _inside(path: str, root: str) -> bool:
    """By the names alone; a path with `..` is left to the host (see parse_endpoint)."""
    if "/../" in path + "/" or "/../" in root + "/":
        return False
    return (path.rstrip("/") + "/").startswith(root.rstrip("/") + "/")


def _endpoints(ctx_or_site, params: dict[str, Any]) -> tuple[Endpoint, Endpoint]:
    site = ctx_or_site if isinstance(ctx_or_site, SiteConfig) or ctx_or_site is None else ctx_or_site.site
    return (parse_endpoint(params["src"], site, what="source"),
            parse_endpoint(params["dst"], site, what="target"))


async def precheck(engine, level: str, params: dict[str, Any]) -> None:
    """What a replication would refuse, asked before its task is made (Refused: none is): the
    endpoints, the kind's checks by the names, and an overlap judged on the hosts themselves.
    Every front end starts replication through the engine, which asks this first."""
    src, dst = (parse_endpoint(params["src"], engine.site, what="source"),
                parse_endpoint(params["dst"], engine.site, what="target"))
    kind_of(f"replicate.{level}").validate(params)
    await overlap.precheck(level, agent_host(engine.transports, src.host), src.path,
                           agent_host(engine.transports, dst.host), dst.path)


class _ReplicateKind(TaskKind):
    max_retries = 5

    def hosts(self, params: dict[str, Any]) -> list[str]:
        src, dst = _endpoints(None, params)
        return sorted({src.host, dst.host})

    def dedup_key(self, params: dict[str, Any]) -> str:
        src, dst = _endpoints(None, params)   # local:/a/ and local:/a are one job
        return f"{src} -> {dst}"

    def validate(self, params: dict[str, Any]) -> None:
        src, dst = _endpoints(None, params)
        if src == dst:
            raise Refused("source and target are the same", "pick another target")
        streams = int(params.get("streams", default_streams()))
        if not 1 <= streams <= 64:
            raise PermanentError(f"--streams must be 1 to 64, got {streams}", "for example --streams 4")
        stall = float(params.get("stall_timeout", STALL_S))
        if not 5 <= stall <= 86400:
            raise PermanentError(f"--stall-timeout must be 5 to 86400 seconds, got {stall:g}",
                                 "for example --stall-timeout 300 on a slow or busy link")

    @staticmethod
    def _log(ctx: TaskContext):
        return lambda message, level="info": ctx.log(message, level)


@register
class ReplicateFiles(_ReplicateKind):
    name = "replicate.files"

    def title(self, params: dict[str, Any]) -> str:
        return f"files {params['src']} → {params['dst']}"

    def validate(self, params: dict[str, Any]) -> None:
        # By the names alone. precheck (before a task exists) and each round (before it writes)
        # compare the real directories on the hosts (overlap.py), which catches every other disguise.
        super().validate(params)
        src, dst = _endpoints(None, params)
        if src.host == dst.host:
            if _inside(dst.path, src.path):
                raise Refused(f"refused: the target {dst} is inside the source {src}",
                              "copying a tree into itself never ends; pick a target outside it")
            if _inside(src.path, dst.path):
                raise Refused(f"refused: the source {src} is inside the target {dst}, and the copy "
                              "would delete it", "pick a target outside the source")

    async def rollback(self, ctx: TaskContext) -> None:
        """A cancelled round leaves the target as far as it got (a sync: what it replaced is the
        source's), without the partly written files it kept for a resume (`.ferry-part.*`)."""
        _, dst = _endpoints(ctx, ctx.params)
        with detached():
            r = await ctx.transport(dst.host).run(
                ["find", dst.path, "-xdev", "-type", "f", "-name", W.PART_PREFIX.decode() + "*", "-delete"], timeout=None)
        if not r.ok and b"No such file" not in r.stderr:
            raise PermanentError(f"could not remove the partly written files under {dst}: "
                                 f"{r.stderr.decode('utf-8', 'replace').strip()[-200:]}",
                                 f"remove the files named .ferry-part.* under {dst.path} by hand")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        src, dst = _endpoints(ctx, p)
        opts = FileOptions(excludes=tuple(p.get("excludes", ())), system_excludes=bool(p.get("system_excludes")),
                           streams=int(p.get("streams", default_streams())), bwlimit=p.get("bwlimit"),
                           checksum=bool(p.get("checksum")), delete=bool(p.get("delete", True)),
                           one_file_system=bool(p.get("one_file_system")),
                           stall_s=float(p.get("stall_timeout", STALL_S)))
        round_no = (ctx.checkpoint or {}).get("round") or int(p.get("round", 1))
        store = ctx.engine.store
        previous = await store.call(store.last_result, self.name, self.dedup_key(p)) if round_no > 1 else None
        since = (previous or {}).get("source_walk_ns")

        async def save(state: dict) -> None:
            await ctx.save_checkpoint(state)

        rnd = FileRound(agent_host(ctx.engine.transports, src.host), src.path,
                        agent_host(ctx.engine.transports, dst.host), dst.path, opts,
                        round_no=round_no, checkpoint=ctx.checkpoint, progress=ctx.progress,
                        save_checkpoint=save, log=self._log(ctx),
                        # ctime is kept on a coarse clock, a little behind time_ns: a margin
                        touched_after=since - TOUCHED_MARGIN_NS if since else None)
        stats = await rnd.run()
        result = {**stats.to_dict(), "resumed": ctx.resumed, "src": str(src), "dst": str(dst)}
        if not stats.verified_on_arrival:
            problems = stats.refused + stats.errors
            if problems:
                more = f" (and {len(problems) - 1} more; see `ferry task show {ctx.id}`)" if len(problems) > 1 else ""
                raise PermanentError(problems[0] + more, "fix the cause and run the same command again to resume")
            if stats.changed_during_copy:
                n = len(stats.changed_during_copy)
                raise PermanentError(f"{n} file(s) kept changing while being copied, e.g. "
                                     f"{src}/{stats.changed_during_copy[0]}",
                                     "run another round (the same command), or stop what writes to them first")
            raise PermanentError("what was copied could not be verified on arrival",
                                 "run the same command again")
        return result


@register
class ReplicateBlocks(_ReplicateKind):
    name = "replicate.blocks"

    def title(self, params: dict[str, Any]) -> str:
        return f"blocks {params['src']} → {params['dst']}"

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        chunk = int(params.get("chunk_size", DEFAULT_CHUNK))
        if chunk < 64 * 1024 or chunk > 64 << 20 or chunk % 4096:
            raise PermanentError(f"chunk size must be a multiple of 4 KiB between 64 KiB and 64 MiB, got {chunk}",
                                 "for example --chunk-size 4M")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        src, dst = _endpoints(ctx, p)
        opts = BlockOptions(chunk_size=int(p.get("chunk_size", DEFAULT_CHUNK)),
                            streams=int(p.get("streams", default_streams())),
                            bwlimit=p.get("bwlimit"), compress=bool(p.get("compress")),
                            stall_s=float(p.get("stall_timeout", STALL_S)))
        ckpt = ctx.checkpoint or {}
        round_no = ckpt.get("round") or int(p.get("round", 1))
        chunkmap = await ctx.load_chunks() if ckpt.get("chunk") == opts.chunk_size else {}
        first = [True]

        async def save(state: dict, chunks: list[tuple[int, bytes]]) -> None:
            reset = first[0] and not chunkmap
            first[0] = False
            await ctx.save_checkpoint(state, chunks=chunks, reset_chunks=reset)

        rnd = BlockRound(agent_host(ctx.engine.transports, src.host), src.path,
                         agent_host(ctx.engine.transports, dst.host), dst.path, opts,
                         round_no=round_no, chunkmap=chunkmap, progress=ctx.progress, save_checkpoint=save,
                         log=self._log(ctx), restart=bool(p.get("restart")) and not ctx.resumed)
        stats = await rnd.run()
        result = {**stats.to_dict(), "resumed": ctx.resumed, "src": str(src), "dst": str(dst)}
        if not stats.verified_on_arrival:
            raise PermanentError(stats.errors[0] if stats.errors else "the target could not be verified",
                                 "run the same command again to resume and re-compare")
        return result
