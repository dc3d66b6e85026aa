"""`ferry gc`: what tasks that are gone left behind, with its size, and its removal.

A task records every file it makes before making it (task_files), names its temporary files after
itself (`.ferry-task<ID>`), and reserves the VMs it makes as "incomplete" records. So whatever a
task left, because a rollback could not finish or an older Ferry made it, is found here:
- files recorded by tasks that ended (succeeded, cancelled) or no longer exist;
- files in the datastores whose names say a task made them for a while, when that task has ended
  (and the hidden temporary files of Ferry versions before these names: `.ferry-import-*`,
  `*.ferry-tmp*`);
- the same next to the output paths the store records for tasks (an export stages its package
  beside its output, wherever that is): a staging folder whose task's records are gone, or one an
  earlier Ferry made under a random name (`.OUT.ferry-tmp-*`);
- VM records left "incomplete" by a task that ended, with their disks.
What an unfinished task (paused, interrupted, failed) holds is its own: it is listed as kept, with
the way to release it (cancel the task: it rolls back).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .errors import FerryError
from .helpers import detached
from .tasks import remove_path

TASK_NAME_RE = re.compile(r"\.ferry-task(\d+)")
LEGACY_RE = re.compile(r"^\.ferry-import-[0-9a-f]{8}$|\.ferry-tmp")
UNFINISHED = ("queued", "running", "waiting", "paused", "interrupted", "failed")


@dataclass
class Leftover:
    host: str
    path: str                    # a file or folder on the host ("" for a record alone)
    what: str                    # what it is, for the operator
    task: int | None = None
    bytes: int | None = None
    vm_id: str | None = None     # a VM record to drop with it
    kept: str = ""               # why it is not removed (held by an unfinished task), with the way out
    removed: bool = False
    error: str = ""
    extra_paths: list[str] = field(default_factory=list)   # more files of the same leftover (a VM's disks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def find(client: Any) -> list[Leftover]:
    """Everything gc would remove (and what it keeps, with why), with sizes where the host answers."""
    store = client.store
    tasks = {r["id"]: r for r in await store.call(store.task_rows, limit=1_000_000)}

    def state_of(tid: int | None) -> str:
        r = tasks.get(tid) if tid is not None else None
        return r["state"] if r else "gone"

    def held(tid: int | None) -> str:
        st = state_of(tid)
        if st in UNFINISHED:
            return (f"held by task {tid} ({st}): `ferry task cancel {tid}` rolls it back"
                    + (f", `ferry task resume {tid}` finishes it" if st != "running" else ""))
        return ""

    out: list[Leftover] = []
    seen: set[tuple[str, str]] = set()
    for f in await store.call(store.tracked_files):
        tid = f["task_id"]
        st = state_of(tid)
        what = f"{'temporary' if f['role'] == 'temp' else 'made'} by task {tid} ({st})"
        out.append(Leftover(f["host"], f["path"], what, tid, kept=held(tid)))
        seen.add((f["host"], f["path"]))

    for row in await store.call(store.vm_rows) + await store.call(store.vm_rows, recycled=True):
        if row["state"] != "incomplete":
            continue
        tid = row["busy"]
        spec = row["spec"] or {}
        disks = [d["path"] for d in spec.get("disks", ())]
        item = Leftover(row["host"], "", f"VM record {row['name']} left incomplete by task {tid} ({state_of(tid)})",
                        tid, vm_id=row["id"], kept=held(tid), extra_paths=disks)
        out.append(item)
        seen.update((row["host"], p) for p in disks)

    beside = _outputs(client, tasks.values())
    places = [(host, ds, 2, _ferry_named) for host, ds in _datastores(client)] + \
        [(host, folder, 1, _staging_of(bases)) for (host, folder), bases in beside.items()]
    for host, folder, depth, keep in places:
        for path in await _named(client, host, folder, depth):
            if (host, path) in seen or not keep(PurePosixPath(path).name):
                continue
            m = TASK_NAME_RE.search(PurePosixPath(path).name)
            tid = int(m.group(1)) if m else None
            if tid is not None and state_of(tid) in UNFINISHED:
                what, kept = f"temporary of task {tid} ({state_of(tid)})", held(tid)
            elif tid is not None:
                what, kept = f"temporary of task {tid} ({state_of(tid)})", ""
            else:
                what, kept = "temporary file of an earlier Ferry version", ""
            out.append(Leftover(host, path, what, tid, kept=kept))
            seen.add((host, path))
    await _sizes(client, out)
    return out


async def collect(client: Any, *, dry_run: bool) -> list[Leftover]:
    """Find the leftovers and, unless dry_run, remove those no unfinished task holds."""
    items = await find(client)
    if dry_run:
        return items
    store = client.store
    for item in items:
        if item.kept:
            continue
        try:
            t = client.transports.get(item.host)
            for p in ([item.path] if item.path else []) + item.extra_paths:
                await remove_path(t, p)
            if item.vm_id:
                await _drop_empty_folders(t, item.extra_paths)
                await store.call(store.vm_delete, item.vm_id)
            if item.task is not None and item.path:
                await store.call(store.untrack_file, item.task, item.host, item.path)
            item.removed = True
        except (FerryError, OSError) as e:
            item.error = getattr(e, "message", None) or str(e)
    removed = [i for i in items if i.removed]
    if removed:
        await client.audit("gc", f"{len(removed)} leftover(s)",
                           {"paths": [f"{i.host}:{i.path or i.what}" for i in removed][:50]}, "ok")
    return items


def _datastores(client: Any) -> list[tuple[str, str]]:
    """(host, datastore path) once per datastore: a shared one through its first host."""
    out, done = [], set()
    for ds in client.site.datastores.values():
        if ds.hosts and ds.path not in done:
            done.add(ds.path)
            out.append((ds.hosts[0], ds.path))
    return out


def _outputs(client: Any, tasks: Any) -> dict[tuple[str, str], set[str]]:
    """(host, folder) -> the names of the outputs tasks were given there (params out, on params host)."""
    out: dict[tuple[str, str], set[str]] = {}
    for t in tasks:
        p = t["params"] or {}
        path, host = p.get("out"), p.get("host")
        if isinstance(path, str) and path.startswith("/") and host in client.site.hosts:
            folder, base = posixpath.split(posixpath.normpath(path))
            if folder != "/" and base:
                out.setdefault((host, folder), set()).add(base)
    return out


def _ferry_named(name: str) -> bool:
    """A name a task gives what it makes for a while, or one of an earlier Ferry's temporary names."""
    return bool(TASK_NAME_RE.search(name) or LEGACY_RE.search(name))


def _staging_of(bases: set[str]) -> Any:
    """Beside the outputs `bases`: the staging folder of one of them, named after its task (or at random
    by an earlier Ferry); nothing else (the folder is the operator's, and may hold other things of Ferry's)."""
    def keep(name: str) -> bool:
        return any(name.startswith(f".{b}.ferry-tmp-") or name.startswith(f".{b}.ferry-task") for b in bases) \
            and _ferry_named(name)
    return keep


async def _named(client: Any, host: str, folder: str, depth: int) -> list[str]:
    """Paths in the folder (down to `depth` levels) whose names may be Ferry's temporary names."""
    script = ("find " + shlex.quote(folder) + f" -mindepth 1 -maxdepth {int(depth)} \\( -name '*.ferry-task*' -o "
              "-name '.ferry-import-*' -o -name '*.ferry-tmp*' \\) -print -prune 2>/dev/null; true")
    try:
        with detached():
            r = await client.transports.get(host).run(["sh", "-c", script], timeout=120)
    except (FerryError, OSError):
        return []
    return [p for p in r.stdout.decode("utf-8", "replace").splitlines() if p.strip()]


async def _sizes(client: Any, items: list[Leftover]) -> None:
    """Bytes each leftover takes on its host (du: allocated), one command per host."""
    by_host: dict[str, list[Leftover]] = {}
    for i in items:
        by_host.setdefault(i.host, []).append(i)
    for host, its in by_host.items():
        paths = sorted({p for i in its for p in ([i.path] if i.path else []) + i.extra_paths})
        if not paths:
            continue
        try:
            with detached():
                r = await client.transports.get(host).run(["du", "-s", "-B1", "--", *paths], timeout=300)
        except (FerryError, OSError):
            continue
        size: dict[str, int] = {}
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            n, _, p = line.partition("\t")
            if n.isdigit():
                size[p] = int(n)
        for i in its:
            i.bytes = sum(size.get(p, 0) for p in ([i.path] if i.path else []) + i.extra_paths)
            if i.path and i.path not in size:
                i.what += ", already gone"


async def _drop_empty_folders(t: Any, paths: list[str]) -> None:
    for folder in {str(PurePosixPath(p).parent) for p in paths}:
        with detached():
            await t.run(["rmdir", "--ignore-fail-on-non-empty", "--", folder], timeout=30)
