"""state.db as an operator meets it: a damaged file, a lock another process keeps, an old schema.

Every sqlite error reaches the user as one line with a hint, never a traceback; the hint to move
the database aside comes only when PRAGMA quick_check finds it damaged.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ferry.engine.store as store_mod
from ferry.engine.errors import PermanentError, TransientError
from ferry.engine.store import MIGRATIONS, SCHEMA_VERSION, Store
from harness.cli import ferry

COMMANDS = (("tasks",), ("task", "show", "1"), ("vm", "list"))


def workspace_with_tasks(root: Path, n: int = 60) -> Path:
    """A workspace whose state.db holds n tasks (enough for the tasks table to span many pages)."""
    s = Store(root / "state.db")
    try:
        for i in range(n):
            s.insert_task(kind="probe", title=f"probe lab1 #{i} " + "x" * 200, params={"host": "lab1"},
                          hosts=["lab1"], state="succeeded", dedup_key=None, owner=None)
    finally:
        s.close()
    return root


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def replicate_args(tmp_path: Path) -> tuple[str, ...]:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "f").write_bytes(b"data")
    return ("replicate", "files", f"local:{tmp_path / 'src'}", f"local:{tmp_path / 'dst'}")


# ------------------------------------------------------------------ a damaged state.db

def corrupt_table(db: Path, table: str) -> None:
    """Overwrite the root page of `table` with garbage, as a failing disk might."""
    con = sqlite3.connect(db)
    try:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    finally:
        con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0x0B]) + b"\xff" * 64)   # not a b-tree page type, then junk


def test_a_damaged_table_is_one_line_with_the_move_aside_hint(tmp_path):
    good = workspace_with_tasks(tmp_path / "good")
    ws = tmp_path / "copy"
    ws.mkdir()
    shutil.copy(good / "state.db", ws / "state.db")    # a copy: closed cleanly, so the WAL is empty
    corrupt_table(ws / "state.db", "tasks")
    for args in (("tasks",), ("task", "show", "1"), replicate_args(tmp_path)):
        r = ferry(ws, *args)
        line = one_line(r.err)
        assert r.code == 1, (args, r.err)
        assert f"state database {ws / 'state.db'} is damaged" in line, (args, line)
        assert "hint: move it aside" in line, (args, line)
    # What the damage does not touch still works: the VM list reads another table.
    assert ferry(ws, "vm", "list").code == 0
    assert not (tmp_path / "dst").exists(), "nothing was copied on a damaged database"


def test_a_file_that_is_not_a_database_is_one_line_for_every_command(tmp_path):
    ws = workspace_with_tasks(tmp_path / "ws")
    with open(ws / "state.db", "r+b") as f:
        f.write(b"this is no SQLite header")
    for args in (*COMMANDS, replicate_args(tmp_path)):
        r = ferry(ws, *args)
        line = one_line(r.err)
        assert r.code == 1, (args, r.err)
        assert "is damaged: file is not a database" in line and "move it aside" in line, (args, line)


# ------------------------------------------------------------------ a lock held by another process

HOLDER = textwrap.dedent("""
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "exclusive":
        con.execute("PRAGMA locking_mode=EXCLUSIVE")   # readers are shut out too
    con.execute("BEGIN EXCLUSIVE")
    con.execute("SELECT COUNT(*) FROM tasks").fetchone()
    print("held", flush=True)
    sys.stdin.readline()
    con.execute("ROLLBACK")
""")


@pytest.fixture
def hold_lock(monkeypatch):
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.3, raising=False)   # the old code had 10 s
    monkeypatch.setenv("FERRY_DB_BUSY_TIMEOUT_S", "0.3")      # for the engine the commands start
    holders = []

    def hold(db: Path, mode: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        holders.append(p)
        assert p.stdout.readline() == "held\n"
        return p
    yield hold
    for p in holders:
        p.communicate("\n", timeout=30)


def test_a_write_lock_held_too_long_names_the_process_and_readers_go_on(tmp_path, hold_lock):
    ws = workspace_with_tasks(tmp_path / "ws")
    holder = hold_lock(ws / "state.db", "write")
    r = ferry(ws, *replicate_args(tmp_path))
    line = one_line(r.err)
    assert r.code == 1
    assert f"state database {ws / 'state.db'} is locked: pid {holder.pid} (" in line, line
    assert "held it for more than 0.3 s" in line and "hint: wait for it to finish" in line, line
    assert "damaged" not in line and "move" not in line
    # Reading needs no write lock: the task list and a task still show.
    assert ferry(ws, "tasks").code == 0
    assert "probe lab1 #0" in ferry(ws, "task", "show", "1").out


def test_an_exclusive_lock_is_one_line_naming_the_process_never_called_damage(tmp_path, hold_lock):
    ws = workspace_with_tasks(tmp_path / "ws")
    holder = hold_lock(ws / "state.db", "exclusive")
    for args in (*COMMANDS, replicate_args(tmp_path)):
        r = ferry(ws, *args)
        line = one_line(r.err)
        assert r.code == 1, (args, r.err)
        assert f"is locked: pid {holder.pid} (" in line and "sqlite3" in line, (args, line)
        assert "damaged" not in line and "move" not in line, (args, line)


def test_store_errors_are_transient_for_locks_and_permanent_for_damage(tmp_path, hold_lock):
    ws = workspace_with_tasks(tmp_path / "ws")
    s = Store(ws / "state.db")
    try:
        hold_lock(ws / "state.db", "write")
        with pytest.raises(TransientError, match="is locked"):
            s.set_setting("theme", "dark")
        assert s.task_row(1)["title"].startswith("probe lab1 #0")
    finally:
        s.close()
    corrupt_table(ws / "state.db", "tasks")
    s = Store(ws / "state.db")
    try:
        with pytest.raises(PermanentError, match="is damaged") as e:
            s.task_rows()
        assert "move it aside" in e.value.hint
    finally:
        s.close()


# ------------------------------------------------------------------ migrations

def test_an_old_database_with_duplicate_unfinished_jobs_is_migrated_keeping_the_newest(tmp_path):
    db = tmp_path / "state.db"
    con = sqlite3.connect(db, isolation_level=None)
    for migration in MIGRATIONS[:3]:
        for stmt in migration.split(";"):
            if stmt.strip():
                con.execute(stmt)
    con.execute("PRAGMA user_version=3")
    row = ("replicate.files", "t", "{}", "[]", "local:/a -> local:/b", 1.0, 1.0)
    for state in ("succeeded", "failed", "running", "queued"):   # three unfinished: the race of an older Ferry
        con.execute("INSERT INTO tasks(kind,title,params,hosts,dedup_key,created,updated,state)"
                    " VALUES(?,?,?,?,?,?,?,?)", (*row, state))
    con.close()
    s = Store(db)
    try:
        assert s.schema_version == SCHEMA_VERSION
        states = {r["id"]: (r["state"], r["error"]) for r in s.task_rows()}
        assert states[1] == ("succeeded", None)
        assert states[2] == states[3] == ("cancelled", "a duplicate of task 4, which does the same job")
        assert states[4] == ("queued", None)
        tid, created = s.insert_task(kind="replicate.files", title="t", params={}, hosts=[], state="queued",
                                     dedup_key="local:/a -> local:/b", owner=None)
        assert (tid, created) == (4, False), "an unfinished task already does this job"
        with pytest.raises(PermanentError, match="refused a change"):
            s.update_task(2, state="queued")      # a second unfinished task for the job: refused
    finally:
        s.close()
