"""Refusing a copy whose source and target overlap, judged on the real machine and the real path.

Names prove nothing: `local` and a lab host are one machine, two host entries can point at one
address, and a path can reach a directory through a symlink, `..` or a bind mount. Each side's
agent says which running kernel it is on and the (device, inode) of the path and of every
directory above it (agent.locate); when both sides are on one kernel those pairs are compared.
A file-level copy deletes on the target what the source lacks: a source inside its target
would be deleted by its own copy.

The engine asks first (`precheck`, before it makes the task: a refusal is one line and no task),
and each round asks again before it writes (what changed in between: a directory renamed, a
symlink swapped).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from ..errors import FerryError, Refused
from .channel import AgentChannel
from .hosts import AgentHost

HINT = ("pick a target outside the source and a source outside the target; nothing was written")
# How long the precheck waits for the hosts' agents; past it (or when a host cannot be reached)
# the task finds out, with its retries, and its round refuses an overlap the same way.
PRECHECK_S = 30.0


def _ids(where: dict[str, Any]) -> list[tuple[int, int]]:
    return [tuple(x) for x in where.get("chain") or []]


def _shown(label: str, where: dict[str, Any]) -> str:
    real = where.get("real")
    return label if not real or label.endswith(":" + real) else f"{label} (really {real})"


def resolved(label: str, where: dict[str, Any] | None, log: Callable[[str, str], None]) -> str | None:
    """The path an agent resolved the operator's HOST:PATH `label` to (None: it did not say), said
    in the task log when it differs from what was given."""
    real = (where or {}).get("real")
    if real and real != label.split(":", 1)[1]:
        log(f"{label} is {real}", "info")
    return real


def same_machine(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return bool(a and b and a.get("machine") and a.get("machine") == b.get("machine"))


def refuse_tree_overlap(src: str, src_where: dict[str, Any], dst: str, dst_where: dict[str, Any]) -> None:
    """Refused when the source directory and the target directory are the same, or one holds
    the other. `src`/`dst` are the operator's HOST:PATH, for the message."""
    # A missing source is the walk's error to give; its nearest ancestor is no source.
    if not same_machine(src_where, dst_where) or not src_where.get("exists"):
        return
    s_chain, t_chain = _ids(src_where), _ids(dst_where)
    if not s_chain or not t_chain:
        return
    s_id = s_chain[0]
    if dst_where.get("exists") and t_chain[0] == s_id:
        relation = "they are the same directory"
    elif s_id in t_chain:
        relation = "the target is inside the source"
    elif dst_where.get("exists") and t_chain[0] in s_chain[1:]:
        relation = "the source is inside the target, and the copy would delete it"
    else:
        return
    raise Refused(f"refused: {_shown(src, src_where)} and {_shown(dst, dst_where)} overlap on one "
                  f"machine: {relation}", HINT)


def refuse_block_overlap(src: str, src_where: dict[str, Any] | None, dst: str,
                         dst_where: dict[str, Any] | None) -> None:
    """Refused when the target image or device is the source, a partition of it or the disk it
    is a partition of, or the file behind a loop device that is the other."""
    if not same_machine(src_where, dst_where) or not src_where.get("exists") or not dst_where.get("exists"):
        return
    s_id, t_id = _ids(src_where)[:1], _ids(dst_where)[:1]
    relation = None
    if s_id and s_id == t_id:
        relation = "they are the same file or device"
    elif src_where.get("rdev") and dst_where.get("rdev"):
        s_dev, t_dev = src_where["rdev"], dst_where["rdev"]
        if s_dev == t_dev:
            relation = "they are the same device"
        elif src_where.get("disk") == t_dev or dst_where.get("disk") == s_dev:
            relation = "one is a partition of the other"
    if relation is None:
        for loop, other in ((src_where, dst_where), (dst_where, src_where)):
            backing = loop.get("backing")
            if backing and other.get("chain") and tuple(backing) == tuple(other["chain"][0]):
                relation = "one is a loop device over the other"
    if relation is not None:
        raise Refused(f"refused: {_shown(src, src_where)} and {_shown(dst, dst_where)} overlap on one "
                      f"machine: {relation}", "pick another target; nothing was written")


async def locate(t: AgentHost, path: str) -> dict[str, Any]:
    """Where `path` really is on t's host (agent.locate), as an agent there says."""
    ch = await AgentChannel.start(t, "locate", path=path)
    try:
        where = (await ch.recv_json()).get("where")
    finally:
        await ch.finish()
    return where if isinstance(where, dict) else {}


async def precheck(level: str, src_t: AgentHost, src_path: str, dst_t: AgentHost, dst_path: str) -> None:
    """Refused when a `level` ("files" or "blocks") copy from src_t:src_path to dst_t:dst_path
    would overlap on one machine; asked of the hosts before a task exists, and nothing is written.
    A host that cannot be asked is no refusal: the task says why, and its round checks again."""
    try:
        async with asyncio.timeout(PRECHECK_S):
            found = await asyncio.gather(locate(src_t, src_path), locate(dst_t, dst_path), return_exceptions=True)
    except TimeoutError:
        return
    for r in found:
        if isinstance(r, BaseException) and not isinstance(r, FerryError):
            raise r
    if any(isinstance(r, BaseException) for r in found):
        return
    refuse = refuse_tree_overlap if level == "files" else refuse_block_overlap
    refuse(f"{src_t.host}:{src_path}", found[0], f"{dst_t.host}:{dst_path}", found[1])
