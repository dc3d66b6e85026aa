"""state.db: SQLite (WAL) holding tasks, checkpoints, task logs, audit and settings.

The schema is versioned with PRAGMA user_version and migrated forward on open.
All methods are synchronous and short; async callers go through `Store.call`, which
runs them on one dedicated thread so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import PermanentError

T = TypeVar("T")

# Each entry migrates from version i to i+1. Never edit a released entry; append.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        title       TEXT NOT NULL,
        params      TEXT NOT NULL,
        hosts       TEXT NOT NULL,
        dedup_key   TEXT,
        state       TEXT NOT NULL,
        progress    TEXT,
        checkpoint  TEXT,
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        result      TEXT,
        error       TEXT,
        hint        TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        requested   TEXT,
        waiting     TEXT,
        owner       TEXT,
        heartbeat   REAL,
        created_by  TEXT,
        created     REAL NOT NULL,
        started     REAL,
        finished    REAL,
        updated     REAL NOT NULL
    );
    CREATE INDEX tasks_state ON tasks(state);
    CREATE INDEX tasks_dedup ON tasks(dedup_key);
    CREATE TABLE task_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        ts      REAL NOT NULL,
        level   TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX task_log_task ON task_log(task_id, id);
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        params  TEXT NOT NULL,
        result  TEXT NOT NULL
    );
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # v2: chunk maps of block-level replication, committed with the checkpoint they belong to.
    """
    CREATE TABLE chunks (
        task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        idx     INTEGER NOT NULL,
        hash    BLOB NOT NULL,
        PRIMARY KEY (task_id, idx)
    ) WITHOUT ROWID;
    """,
    # v3: the VMs and templates Ferry manages. A recycled (delayed-deleted) VM keeps its row
    # with recycled set, and its name is free again for new VMs until it is restored.
    """
    CREATE TABLE vms (
        id        TEXT PRIMARY KEY,
        name      TEXT NOT NULL,
        kind      TEXT NOT NULL,
        host      TEXT NOT NULL,
        state     TEXT NOT NULL,
        spec      TEXT NOT NULL,
        busy      INTEGER,
        recycled  REAL,
        purge_at  REAL,
        created   REAL NOT NULL,
        updated   REAL NOT NULL
    );
    CREATE UNIQUE INDEX vms_name ON vms(name) WHERE recycled IS NULL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_SECRET_RE = re.compile(r"pass(word|phrase)?|secret|token|private|credential|api_?key", re.I)
REDACTED = "<redacted>"


def scrub(value: Any) -> Any:
    """Remove secrets from audit/log parameters: any key that looks like a secret is redacted."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_RE.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry, e.g. in a container with an arbitrary uid
        import os
        return f"uid{os.getuid()}"


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v, separators=(",", ":"), sort_keys=True)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


class Store:
    """One connection to state.db, used from a single worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed checkpoint survives power loss, not only a killed process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise PermanentError(f"cannot open state database {path}: {e}",
                                 "check the workspace folder; move a damaged state.db aside to start fresh") from None

    # ---------------------------------------------------------- plumbing

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise PermanentError(
                    f"{self.path} has schema version {version}, newer than this Ferry understands ({SCHEMA_VERSION})",
                    "upgrade Ferry, or use another workspace")
            for i in range(version, SCHEMA_VERSION):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version={i + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a store method off the event loop, serialised on one thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kw))

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------- tasks

    def insert_task(self, *, kind: str, title: str, params: dict, hosts: list[str], state: str,
                    dedup_key: str | None, owner: str | None) -> int:
        now = time.time()

        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO tasks(kind,title,params,hosts,dedup_key,state,owner,heartbeat,created_by,created,updated)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (kind, title, _dumps(params), _dumps(hosts), dedup_key, state, owner, now if owner else None,
                 current_user(), now, now))
            return int(cur.lastrowid)
        return self._tx(tx)

    def task_row(self, task_id: int) -> dict | None:
        rows = self._q("SELECT * FROM tasks WHERE id=?", (task_id,))
        return _row(rows[0]) if rows else None

    def task_rows(self, *, states: tuple[str, ...] | None = None, limit: int = 500,
                  since_updated: float | None = None) -> list[dict]:
        sql, args = "SELECT * FROM tasks", []
        conds = []
        if states:
            conds.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if since_updated is not None:
            conds.append("updated > ?")
            args.append(since_updated)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [_row(r) for r in self._q(sql, tuple(args))]

    def find_unfinished(self, kind: str, dedup_key: str) -> dict | None:
        """The newest task for the same job that has not succeeded (failed ones can be resumed)."""
        rows = self._q("SELECT * FROM tasks WHERE kind=? AND dedup_key=? AND state NOT IN"
                       " ('succeeded','cancelled') ORDER BY id DESC LIMIT 1", (kind, dedup_key))
        return _row(rows[0]) if rows else None

    def count_succeeded(self, kind: str, dedup_key: str) -> int:
        return self._q("SELECT COUNT(*) FROM tasks WHERE kind=? AND dedup_key=? AND state='succeeded'",
                       (kind, dedup_key))[0][0]

    def update_task(self, task_id: int, **fields: Any) -> None:
        """Update columns; JSON columns are encoded. `owner_is` guards the update; soft=True for
        progress only (see _soft)."""
        owner_is = fields.pop("owner_is", None)
        if fields.pop("soft", False):
            return self._soft(self.update_task, task_id, owner_is=owner_is, **fields)
        sets, args = [], []
        for k, v in fields.items():
            if k in ("params", "hosts", "progress", "checkpoint", "result", "waiting", "requested"):
                v = _dumps(v)
            sets.append(f"{k}=?")
            args.append(v)
        sets.append("updated=?")
        args.append(time.time())
        sql = f"UPDATE tasks SET {', '.join(sets)} WHERE id=?"
        args.append(task_id)
        if owner_is is not None:
            sql += " AND owner=?"
            args.append(owner_is)
        with self._lock:
            self._db.execute(sql, tuple(args))

    def save_checkpoint(self, task_id: int, owner: str, checkpoint: dict, progress: dict | None,
                        chunks: list[tuple[int, bytes]] | None = None, reset_chunks: bool = False) -> int:
        """Commit a checkpoint (and chunk-map entries) in one transaction; refuses if this engine
        no longer owns the task.

        Without an fsync of its own (synchronous=NORMAL for this commit): it survives a killed
        process, and on power loss it can only be lost, never claim too much, so the work is
        redone. An fsync here would wait behind the copy's own writeback, several times a second."""
        def tx(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT owner, checkpoint_seq FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row["owner"] != owner:
                raise PermanentError(f"task {task_id} is no longer owned by this engine",
                                     "another Ferry process took it over; see `ferry tasks`")
            seq = row["checkpoint_seq"] + 1
            if reset_chunks:
                db.execute("DELETE FROM chunks WHERE task_id=?", (task_id,))
            if chunks:
                db.executemany("INSERT OR REPLACE INTO chunks(task_id, idx, hash) VALUES(?,?,?)",
                               [(task_id, i, h) for i, h in chunks])
            db.execute("UPDATE tasks SET checkpoint=?, checkpoint_seq=?, progress=COALESCE(?, progress),"
                       " heartbeat=?, updated=? WHERE id=?",
                       (_dumps(checkpoint), seq, _dumps(progress), time.time(), time.time(), task_id))
            return seq
        return self._soft(self._tx, tx)

    def _soft(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run fn with commits that do not fsync (synchronous=NORMAL): for state that may be lost
        on power loss without harm (checkpoints, progress, heartbeats, task log lines), so that
        a busy copy's writeback does not stall the engine several times a second."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                return fn(*args, **kw)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def load_chunks(self, task_id: int) -> dict[int, bytes]:
        return {r["idx"]: bytes(r["hash"]) for r in self._q("SELECT idx, hash FROM chunks WHERE task_id=?",
                                                           (task_id,))}

    def claim(self, task_id: int, owner: str, can_take: Callable[[str | None, float | None], bool]) -> bool:
        """Atomically take ownership of an unfinished task when `can_take(current_owner, heartbeat)`."""
        def tx(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT owner, heartbeat, state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row["state"] in ("succeeded", "cancelled"):  # failed may be retried
                return False
            if not can_take(row["owner"], row["heartbeat"]):
                return False
            db.execute("UPDATE tasks SET owner=?, heartbeat=?, updated=? WHERE id=?",
                       (owner, time.time(), time.time(), task_id))
            return True
        return self._tx(tx)

    def heartbeat(self, owner: str) -> None:
        self._soft(self._db.execute, "UPDATE tasks SET heartbeat=? WHERE owner=? AND state NOT IN"
                   " ('succeeded','failed','cancelled')", (time.time(), owner))

    def take_requests(self, owner: str) -> list[tuple[int, dict]]:
        """Control requests (pause/resume/cancel/confirm) other processes left for this engine's tasks."""
        def tx(db: sqlite3.Connection) -> list[tuple[int, dict]]:
            rows = db.execute("SELECT id, requested FROM tasks WHERE owner=? AND requested IS NOT NULL",
                              (owner,)).fetchall()
            if rows:
                db.execute("UPDATE tasks SET requested=NULL WHERE owner=? AND requested IS NOT NULL", (owner,))
            return [(r["id"], json.loads(r["requested"])) for r in rows]
        return self._tx(tx)

    def append_log(self, task_id: int, level: str, message: str) -> None:
        self._soft(self._db.execute, "INSERT INTO task_log(task_id, ts, level, message) VALUES(?,?,?,?)",
                   (task_id, time.time(), level, message))

    def task_log(self, task_id: int, limit: int = 200) -> list[dict]:
        rows = self._q("SELECT ts, level, message FROM task_log WHERE task_id=? ORDER BY id DESC LIMIT ?",
                       (task_id, limit))
        return [dict(r) for r in reversed(rows)]

    # ---------------------------------------------------------- audit and settings

    def audit(self, action: str, target: str, params: dict | None, result: str, actor: str | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit(ts, actor, action, target, params, result) VALUES(?,?,?,?,?,?)",
                             (time.time(), actor or current_user(), action, target,
                              _dumps(scrub(params or {})), result))

    def audit_rows(self, limit: int = 200) -> list[dict]:
        rows = self._q("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(r), "params": _loads(r["params"])} for r in rows]

    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self._q("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO settings(key, value) VALUES(?, ?)"
                             " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, json.dumps(value)))

    # ---------------------------------------------------------- VMs and templates

    def vm_insert(self, *, id: str, name: str, kind: str, host: str, state: str, spec: dict,
                  busy: int | None = None) -> None:
        now = time.time()
        try:
            with self._lock:
                self._db.execute("INSERT INTO vms(id, name, kind, host, state, spec, busy, created, updated)"
                                 " VALUES(?,?,?,?,?,?,?,?,?)",
                                 (id, name, kind, host, state, _dumps(spec), busy, now, now))
        except sqlite3.IntegrityError:
            raise PermanentError(f"a VM or template named {name!r} already exists",
                                 "choose another name (ferry vm list shows the names in use)") from None

    def vm_update(self, vm_id: str, **fields: Any) -> None:
        if "spec" in fields:
            fields["spec"] = _dumps(fields["spec"])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        try:
            with self._lock:
                self._db.execute(f"UPDATE vms SET {cols} WHERE id=?", (*fields.values(), vm_id))
        except sqlite3.IntegrityError:
            raise PermanentError(f"a VM or template named {fields.get('name')!r} already exists",
                                 "rename or delete the other one first") from None

    def vm_delete(self, vm_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def vm_rows(self, *, recycled: bool = False) -> list[dict]:
        where = "recycled IS NOT NULL" if recycled else "recycled IS NULL"
        return [_vm_row(r) for r in self._q(f"SELECT * FROM vms WHERE {where} ORDER BY name")]

    def vm_row(self, vm_id: str) -> dict | None:
        rows = self._q("SELECT * FROM vms WHERE id=?", (vm_id,))
        return _vm_row(rows[0]) if rows else None


def _vm_row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["spec"] = _loads(d["spec"])
    return d


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("params", "hosts", "progress", "checkpoint", "result", "waiting", "requested"):
        d[k] = _loads(d[k])
    return d
