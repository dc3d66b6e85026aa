"""Task kinds used only by tests. Importing this module registers them."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from ferry.engine.errors import PermanentError, TransientError
from ferry.engine.tasks import TaskContext, TaskKind, register


def chunk_bytes(i: int, size: int) -> bytes:
    """Deterministic content of chunk i."""
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def expected_sha256(chunks: int, size: int) -> str:
    h = hashlib.sha256()
    for i in range(chunks):
        h.update(chunk_bytes(i, size))
    return h.hexdigest()


@register
class WriteChunks(TaskKind):
    """Appends chunks to a file, fsyncs, then checkpoints: resumable at any instant."""

    name = "test.write"

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return params.get("hosts", [])

    def title(self, params: dict[str, Any]) -> str:
        return f"write {params['chunks']} chunks to {os.path.basename(params['path'])}"

    def dedup_key(self, params: dict[str, Any]) -> str:
        return params["path"]

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        path, n, size = ctx.params["path"], ctx.params["chunks"], ctx.params["chunk_size"]
        delay = ctx.params.get("delay", 0.0)
        done = (ctx.checkpoint or {}).get("done", 0)
        with open(path, "ab" if done else "wb") as f:
            f.truncate(done * size)   # anything past the checkpoint was never promised: drop it
            f.seek(done * size)
            for i in range(done, n):
                f.write(chunk_bytes(i, size))
                f.flush()
                os.fsync(f.fileno())
                await ctx.save_checkpoint({"done": i + 1})
                ctx.progress(units_done=i + 1, units_total=n, bytes_done=(i + 1) * size, bytes_total=n * size,
                             item=f"chunk {i}")
                if delay:
                    await asyncio.sleep(delay)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {"sha256": digest, "resumed_from": done}


@register
class Hold(TaskKind):
    """Reports fixed progress and then waits until cancelled or paused (for console tests)."""

    name = "test.hold"

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return params.get("hosts", [])

    def title(self, params: dict[str, Any]) -> str:
        return params.get("title", "hold")

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        p = ctx.params
        ctx.progress(bytes_done=p.get("done", 0), bytes_total=p.get("total"), rate=p.get("rate"),
                     eta=p.get("eta"), item=p.get("item", ""))
        if p.get("finish_after") is not None:
            await asyncio.sleep(p["finish_after"])
            return {"held": True}
        await asyncio.Event().wait()
        return {}


@register
class Flaky(TaskKind):
    """Fails with a transient error `failures` times, then succeeds (or fails permanently)."""

    name = "test.flaky"
    max_retries = 3

    def title(self, params: dict[str, Any]) -> str:
        return "flaky"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        if ctx.params.get("permanent"):
            raise PermanentError("the disk is full on target:/data", "free space and resume the task")
        if ctx.attempt <= ctx.params.get("failures", 0):
            raise TransientError(f"connection lost (attempt {ctx.attempt})", "the engine retries")
        return {"attempts": ctx.attempt}


@register
class Confirm(TaskKind):
    """Waits for the operator to type a name, then finishes."""

    name = "test.confirm"

    def title(self, params: dict[str, Any]) -> str:
        return f"confirm {params['name']}"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        await ctx.confirm(f"type {ctx.params['name']} to go on", ctx.params["name"])
        return {"confirmed": True}


@register
class Helpers(TaskKind):
    """Makes a tracked "made" file and a tracked temporary one in params["folder"], then runs a helper
    command on this machine (or params["host"]) until it ends: `sleep` (dies with Ferry), or, with escape=True, a shell
    whose background `sleep` outlives it (a helper that a parent-death signal does not reach); its pid
    goes to folder/escaped.pid. With fail=True it fails after the files are made; with finish=True it
    succeeds. rollback_on_failure is set, and its rollback writes folder/rolled-back."""

    name = "test.helpers"
    rollback_on_failure = True

    def hosts(self, params: dict[str, Any]) -> list[str]:
        return [params["host"]] if params.get("host") else []

    def title(self, params: dict[str, Any]) -> str:
        return "helpers"

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        folder = ctx.params["folder"]
        made, temp = f"{folder}/made.img", f"{folder}/.made.img.ferry-task{ctx.id}"
        for path, role in ((made, "made"), (temp, "temp")):
            await ctx.track("local", path, role=role)
            with open(path, "wb") as f:
                f.write(b"x" * 65536)
        if ctx.params.get("fail"):
            raise PermanentError("the helper failed", "nothing to do")
        if ctx.params.get("finish"):
            return {"made": made}
        ctx.progress(units_done=1, units_total=2, item="helper running")
        t = ctx.transport(ctx.params.get("host", "local"))
        if ctx.params.get("escape"):
            await t.run(["sh", "-c", f"sleep 300 & echo $! > {folder}/escaped.pid; wait"], timeout=None)
        else:
            await t.run(["sleep", "300"], timeout=None)
        return {"made": made}

    async def rollback(self, ctx: TaskContext) -> None:
        with open(f"{ctx.params['folder']}/rolled-back", "w") as f:
            f.write(str(ctx.id))
