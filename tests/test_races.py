"""Races between Ferry processes: many opening a fresh state.db at once, the same job started twice."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ferry.engine.config import lab_config
from ferry.engine.store import SCHEMA_VERSION, Store
from ferry.engine.taskmodel import TaskState
from ferry.engine.tasks import Engine
from harness.cli import ROOT
from harness.waiting import until

STARTERS = 40   # bench/store_open.py starts 100, which is too slow for the suite on 2 cores


def start_together(codes: list[str], *, cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """Run Python snippets as child processes released at one instant: each child does its imports,
    says it is ready, and waits for the word; the word goes to all of them once all are ready."""
    gate = textwrap.dedent("""
        import sys
        sys.path[:0] = [{root!r}]
        {prelude}
        print("ready", flush=True)
        sys.stdin.readline()
        {body}
    """)
    children = []
    for code in codes:
        prelude, _, body = code.partition("\n---\n")
        src = gate.format(root=str(ROOT), prelude=prelude.strip(), body=body.strip())
        children.append(subprocess.Popen([sys.executable, "-c", src], cwd=cwd, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for c in children:
            assert c.stdout.readline() == "ready\n", c.stderr.read()
        for c in children:
            c.stdin.write("go\n")
            c.stdin.flush()
        out = []
        for c in children:
            stdout, stderr = c.communicate(timeout=240)
            out.append(subprocess.CompletedProcess(c.args, c.returncode, stdout, stderr))
        return out
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


def test_many_processes_open_a_fresh_state_db_at_once(tmp_path):
    db = tmp_path / "ws" / "state.db"
    code = f"""
from pathlib import Path
from ferry.engine.store import Store
---
s = Store(Path({str(db)!r}))
print(s.schema_version)
s.close()
"""
    results = start_together([code] * STARTERS)
    failed = [r.stderr.strip().splitlines()[-1] for r in results if r.returncode != 0]
    assert not failed, f"{len(failed)} of {STARTERS} starts failed, e.g. {failed[0]}"
    assert {r.stdout.split()[-1] for r in results} == {str(SCHEMA_VERSION)}
    s = Store(db)
    try:
        tables = [r[0] for r in s._q("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
                                     " ORDER BY name")]
        assert tables == ["alarms", "audit", "chunks", "events", "health_checks", "health_history", "migrations",
                          "schedule_runs", "schedules", "settings", "silences", "task_files", "task_log", "tasks",
                          "vms"]
        assert s._q("PRAGMA journal_mode")[0][0] == "wal"
    finally:
        s.close()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_replication_started_twice_at_once_runs_once(tmp_path):
    ws, src, dst = tmp_path / "ws", tmp_path / "a", tmp_path / "b"
    for i in range(8):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 2}" / f"f{i}").write_bytes(os.urandom(1 << 20))
    Store(ws / "state.db").close()   # a workspace in use (opening a fresh one at once is the test above)
    argv = ["--workspace", str(ws), "replicate", "files", f"local:{src}", f"local:{dst}", "--bwlimit", "4M",
            "--json"]
    # Two real `ferry replicate` commands, released at one instant after their imports: whichever
    # comes second finds the first one's task running (the copy lasts far longer than the moment
    # between them) and must follow it rather than copy again.
    code = f"""
import ferry.console.cli, ferry.engine.client
---
sys.exit(ferry.console.cli.main({argv!r}))
"""
    first, second = start_together([code, code])
    s = Store(ws / "state.db")
    try:
        rows = s.task_rows()
    finally:
        s.close()
    assert [(r["kind"], r["state"]) for r in rows] == [("replicate.files", "succeeded")], \
        f"the same job started twice made {len(rows)} tasks"
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    tid = rows[0]["id"]
    followed = [r for r in (first, second) if "already does this job" in r.stderr]
    assert len(followed) == 1, first.stderr + second.stderr
    assert f"task {tid}" in followed[0].stderr and "following it" in followed[0].stderr
    assert tree_digest(dst) == tree_digest(src)
    assert sum(1 for r in (first, second) if '"state": "succeeded"' in r.stdout) == 2


def test_processes_marking_one_vm_busy_at_once_give_it_to_one_task(tmp_path):
    """Store.vm_take, what a VM task calls before it works on a VM: of many processes asking at
    one instant for the same VM, one gets it and every other one is told which task has it."""
    db = tmp_path / "state.db"
    s = Store(db)
    try:
        s.vm_insert(id="vm-1", name="web01", kind="vm", host="lab1", state="stopped", spec={})
        tids = [s.insert_task(kind="vm.start", title=f"start web01 #{i}", params={}, hosts=["lab1"],
                              state="running", dedup_key=None, owner=None)[0] for i in range(12)]
    finally:
        s.close()
    codes = [f"""
from pathlib import Path
from ferry.engine.store import Store
---
s = Store(Path({str(db)!r}))
print(s.vm_take("vm-1", {tid}, lambda row: False))   # every holder is alive here
s.close()
""" for tid in tids]
    results = start_together(codes)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    said = [r.stdout.split()[-1] for r in results]
    winners = [tid for tid, out in zip(tids, said) if out == "None"]
    assert len(winners) == 1, f"{len(winners)} tasks were given the VM at once"
    assert set(said) - {"None"} == {str(winners[0])}, "the others were told which task has it"
    s = Store(db)
    try:
        assert s.vm_row("vm-1")["busy"] == winners[0]
    finally:
        s.close()


HOLD_VM = """
import asyncio
from ferry.engine.tasks import TaskKind, register
from ferry.engine.vm.lifecycle import working_on

@register
class HoldVM(TaskKind):
    # Works on a VM (marks it busy, as every VM task does) until it is stopped.
    name = "test.vm_hold"

    def title(self, params):
        return "hold " + params["vm_id"]

    async def run(self, ctx):
        row = await ctx.engine.store.call(ctx.engine.store.vm_row, ctx.params["vm_id"])
        async with working_on(ctx, row):
            await asyncio.Event().wait()
"""
exec(HOLD_VM)   # here too: this process runs the kind as well


async def test_a_vm_busy_with_a_live_task_refuses_another_and_is_free_once_its_process_dies(tmp_path):
    db, site = tmp_path / "state.db", lab_config(tmp_path)
    s = Store(db)
    s.vm_insert(id="vm-1", name="web01", kind="vm", host="lab1", state="stopped", spec={})
    s.close()
    child = subprocess.Popen([sys.executable, "-c", HOLD_VM + textwrap.dedent(f"""
        from pathlib import Path
        from ferry.engine.config import lab_config
        from ferry.engine.store import Store
        from ferry.engine.tasks import Engine

        async def main():
            eng = Engine(Store(Path({str(db)!r})), lab_config(Path({str(tmp_path)!r})))
            await eng.start()
            print(await eng.submit("test.vm_hold", {{"vm_id": "vm-1"}}), flush=True)
            await asyncio.Event().wait()
        asyncio.run(main())
    """)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    eng = Engine(Store(db), site)
    await eng.start()
    try:
        a = int(child.stdout.readline())
        await until(lambda: eng.store.vm_row("vm-1")["busy"] == a, what="the VM marked busy by the other process")
        b = await eng.submit("test.vm_hold", {"vm_id": "vm-1"})
        refused = await eng.wait(b, timeout=30)
        assert refused.state == TaskState.FAILED
        assert refused.error == f"web01 is busy with task {a} (hold vm-1, running)"
        assert f"ferry task cancel {a}" in refused.hint
        child.kill()              # kill -9: nothing of it unmarks the VM, yet it holds it no more
        child.wait()
        c = await eng.submit("test.vm_hold", {"vm_id": "vm-1"})
        await until(lambda: eng.store.vm_row("vm-1")["busy"] == c, what="the VM marked busy with the new task")
        assert (await eng.get(c)).state == TaskState.RUNNING
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await eng.stop()
        eng.store.close()
