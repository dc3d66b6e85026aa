"""Refusing a copy whose source and target overlap, judged on the real machine and the real path.

Names prove nothing: `local` and a lab host are one machine, two host entries can point at one
address, and a path can reach a directory through a symlink, `..` or a bind mount. Each side's
agent says which running kernel it is on and the (device, inode) of the path and of every
directory above it (agent.locate); when both sides are on one kernel those pairs are compared.
A file-level copy deletes on the target what the source lacks: a source inside its target
would be deleted by its own copy.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import PermanentError

HINT = ("pick a target outside the source and a source outside the target; nothing was written")


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
    """PermanentError when the source directory and the target directory are the same, or one
    holds the other. `src`/`dst` are the operator's HOST:PATH, for the message."""
    if not same_machine(src_where, dst_where):
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
    raise PermanentError(f"refused: {_shown(src, src_where)} and {_shown(dst, dst_where)} overlap on one "
                         f"machine: {relation}", HINT)


def refuse_block_overlap(src: str, src_where: dict[str, Any] | None, dst: str,
                         dst_where: dict[str, Any] | None) -> None:
    """PermanentError when the target image or device is the source, a partition of it or the
    disk it is a partition of, or the file behind a loop device that is the other."""
    if not same_machine(src_where, dst_where) or not dst_where.get("exists"):
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
        raise PermanentError(f"refused: {_shown(src, src_where)} and {_shown(dst, dst_where)} overlap on one "
                             f"machine: {relation}", "pick another target; nothing was written")
