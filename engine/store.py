"""state.db: SQLite (WAL) holding tasks, checkpoints, task logs, audit and settings.

The schema is versioned with PRAGMA user_version and migrated forward on open, in one
exclusive transaction, so that Ferry processes opening a fresh workspace at the same time
agree on one schema. All methods are synchronous and short; async callers go through
`Store.call`, which runs them on one dedicated thread so the event loop never blocks on disk.

Every sqlite3 error leaves this module as a FerryError: a lock held past the busy timeout is
a TransientError naming the processes that hold it; a damaged file (as PRAGMA quick_check
finds it) is a PermanentError whose hint says how to start fresh; anything else says what
failed without calling a healthy database damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import getpass
import json
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import FerryError, PermanentError, Refused, TransientError
from .logs import logger

T = TypeVar("T")
log = logger("ferry.store")

# How long a write waits for another process's write lock before saying who holds it
# (FERRY_DB_BUSY_TIMEOUT_S overrides it: the engine service and the test suite's impatient cases).
BUSY_TIMEOUT_S = float(os.environ.get("FERRY_DB_BUSY_TIMEOUT_S") or 10.0)

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
    # v4: one unfinished task per job, so that the same job started twice by two processes at
    # once gives one task. Duplicates an older Ferry let through are retired first (the newest
    # one stays; it holds the latest checkpoint).
    """
    UPDATE tasks SET state='cancelled', finished=COALESCE(finished, updated),
        error='a duplicate of task ' || (SELECT MAX(t.id) FROM tasks t WHERE t.kind=tasks.kind
            AND t.dedup_key=tasks.dedup_key AND t.state NOT IN ('succeeded','cancelled'))
            || ', which does the same job'
    WHERE dedup_key IS NOT NULL AND state NOT IN ('succeeded','cancelled') AND id < (
        SELECT MAX(t.id) FROM tasks t WHERE t.kind=tasks.kind AND t.dedup_key=tasks.dedup_key
            AND t.state NOT IN ('succeeded','cancelled'));
    CREATE UNIQUE INDEX tasks_one_unfinished ON tasks(kind, dedup_key)
        WHERE dedup_key IS NOT NULL AND state NOT IN ('succeeded','cancelled');
    """,
    # v5: the files a task makes on hosts (temporary, or made for what it builds), recorded before
    # each exists, so that a task killed at any instant leaves nothing that cannot be found: its
    # resume, its rollback, or `ferry gc` once the task is gone removes them. No foreign key: the
    # rows outlive a task row that is deleted, which is when gc needs them most.
    """
    CREATE TABLE task_files (
        task_id INTEGER NOT NULL,
        host    TEXT NOT NULL,
        path    TEXT NOT NULL,
        role    TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (task_id, host, path)
    ) WITHOUT ROWID;
    CREATE INDEX task_files_path ON task_files(host, path);
    """,
    # v6: server migrations (issue 13), one row each, applied from a wave's plan file. spec is the
    # plan's MigrationSpec, assessment/blockers/warnings the last assessment's (JSON).
    """
    CREATE TABLE migrations (
        name       TEXT PRIMARY KEY,
        wave       TEXT NOT NULL,
        state      TEXT NOT NULL,
        spec       TEXT NOT NULL,
        round      INTEGER NOT NULL DEFAULT 0,
        last_sync  REAL,
        assessment TEXT,
        override   TEXT,
        blockers   TEXT NOT NULL DEFAULT '[]',
        warnings   TEXT NOT NULL DEFAULT '[]',
        created    REAL NOT NULL,
        updated    REAL NOT NULL
    );
    CREATE INDEX migrations_wave ON migrations(wave, name);
    """,
    # v7: a migration's prepared target (JSON: the VM, the receiver's address and pinned host key,
    # the disks and partitions), set with the state target_prepared.
    """
    ALTER TABLE migrations ADD COLUMN target TEXT;
    """,
    # v8: a migration's cutover (JSON: each step's state and times, the predicted and the measured
    # downtime) and its last test launch (JSON: passed, boot and check durations, what was checked).
    """
    ALTER TABLE migrations ADD COLUMN cutover TEXT;
    ALTER TABLE migrations ADD COLUMN test TEXT;
    """,
    # v9: a migration's sync rounds (JSON: the last ROUNDS_KEPT, each what it moved and how long it
    # took; every round is in the audit log too) and the last measure of what changed on the source
    # since the last round (JSON: bytes, items, at).
    """
    ALTER TABLE migrations ADD COLUMN rounds TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE migrations ADD COLUMN changed TEXT;
    """,
    # v10: operations (issue 14, engine/ops). An alarm is the state of (type, object): one row while it
    # is active or acknowledged (the partial unique index: two processes raising it at once make one
    # row), kept as history once cleared. Events list every raise, ack, clear and silence. Silences mute
    # matching alarms until they expire. A schedule's anchor is the last slot it handled; its runs are
    # its history.
    """
    CREATE TABLE alarms (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        type        TEXT NOT NULL,
        object      TEXT NOT NULL,
        severity    TEXT NOT NULL,
        state       TEXT NOT NULL,
        summary     TEXT NOT NULL,
        details     TEXT NOT NULL DEFAULT '{}',
        source      TEXT NOT NULL DEFAULT '',
        count       INTEGER NOT NULL DEFAULT 1,
        first_seen  REAL NOT NULL,
        last_seen   REAL NOT NULL,
        acked_by    TEXT,
        acked_at    REAL,
        ack_comment TEXT,
        cleared_at  REAL,
        cleared_by  TEXT,
        clear_reason TEXT
    );
    CREATE UNIQUE INDEX alarms_open ON alarms(type, object) WHERE state != 'cleared';
    CREATE INDEX alarms_by_state ON alarms(state, id);
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        kind     TEXT NOT NULL,
        actor    TEXT NOT NULL,
        text     TEXT NOT NULL,
        alarm_id INTEGER,
        type     TEXT,
        object   TEXT,
        severity TEXT
    );
    CREATE TABLE silences (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        matchers   TEXT NOT NULL,
        created    REAL NOT NULL,
        expires    REAL NOT NULL,
        created_by TEXT NOT NULL,
        reason     TEXT NOT NULL,
        removed    REAL,
        removed_by TEXT,
        expiry_noted INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE schedules (
        name     TEXT PRIMARY KEY,
        cron     TEXT NOT NULL,
        anchor   REAL NOT NULL,
        running  INTEGER
    );
    CREATE TABLE schedule_runs (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule  TEXT NOT NULL,
        slot      REAL NOT NULL,
        started   REAL,
        ended     REAL,
        result    TEXT,
        caught_up INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX schedule_runs_by ON schedule_runs(schedule, id);
    """,
    # v11: health checks (issue 14, engine/ops/health.py). One row per (host, check) holds its current
    # state with Nagios' soft/hard attempt count and the alarm it raised; every result is history
    # (the newest HISTORY_KEPT per check kept). host '' is the site's own checks (tasks, alarms, advisories).
    """
    CREATE TABLE health_checks (
        host         TEXT NOT NULL,
        check_name   TEXT NOT NULL,
        state        TEXT NOT NULL,
        hard         INTEGER NOT NULL,
        attempt      INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        summary      TEXT NOT NULL,
        details      TEXT NOT NULL DEFAULT '',
        perfdata     TEXT NOT NULL DEFAULT '',
        last_checked REAL NOT NULL,
        last_change  REAL NOT NULL,
        last_hard_change REAL NOT NULL,
        alarm_type   TEXT,
        alarm_object TEXT,
        alarm_raised INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (host, check_name)
    );
    CREATE TABLE health_history (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts         REAL NOT NULL,
        host       TEXT NOT NULL,
        check_name TEXT NOT NULL,
        state      TEXT NOT NULL,
        hard       INTEGER NOT NULL,
        attempt    INTEGER NOT NULL,
        summary    TEXT NOT NULL,
        details    TEXT NOT NULL DEFAULT '',
        perfdata   TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX health_history_by ON health_history(check_name, host, id);
    """,
]
ROUNDS_KEPT = 50
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


def redacted_keys(value: Any, prefix: str = "") -> list[str]:
    """The parameters `scrub` redacted (dotted paths): what a task must be given again to run."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in (
            [prefix + str(key)] if v == REDACTED and _SECRET_RE.search(str(key)) else
            redacted_keys(v, f"{prefix}{key}."))]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in redacted_keys(v, prefix)]
    return []


# Who a call is for: the engine service sets it per call to the user at the other end of the socket
# (from SO_PEERCRED), so the audit log and a task's "created by" name that user, not the engine's.
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("ferry_actor", default=None)


def current_user() -> str:
    actor = ACTOR.get()
    if actor:
        return actor
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
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermanentError(f"cannot create the folder of the state database {path}: {e.strerror}",
                                 "pass --workspace DIR or set FERRY_WORKSPACE to a writable folder") from None
        try:
            with self._guard():
                self._db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
                self._db.row_factory = sqlite3.Row
                self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                self._wal()
                # FULL (fsync of the WAL at each commit): a committed state change, a VM record or
                # an audit entry survives a power cut. Checkpoints, progress, heartbeats and task
                # log lines are committed without it (see _soft).
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except BaseException:
            if self._db is not None:
                self._db.close()
            raise

    # ---------------------------------------------------------- plumbing

    def _wal(self) -> None:
        """Switch to WAL (once per database file). The switch needs a moment alone with the file,
        and a process racing us for it gets "database is locked" at once, whatever the busy
        timeout: so it is retried until the busy timeout has passed."""
        db = self._db
        assert db is not None
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0.005, 0.05))

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION: every migration in one exclusive transaction that
        reads the version again inside it, so a process that lost the race applies none twice."""
        with self._lock:
            db = self._db
            assert db is not None
            if self._user_version() == SCHEMA_VERSION:
                return
            db.execute("BEGIN EXCLUSIVE")
            try:
                version = self._user_version()
                if version > SCHEMA_VERSION:
                    raise PermanentError(
                        f"{self.path} has schema version {version}, newer than this Ferry understands "
                        f"({SCHEMA_VERSION})", "upgrade Ferry, or use another workspace")
                for i in range(version, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _user_version(self) -> int:
        assert self._db is not None
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @property
    def schema_version(self) -> int:
        with self._lock, self._guard():
            return self._user_version()

    @contextlib.contextmanager
    def _guard(self, conflict: FerryError | None = None) -> Iterator[None]:
        """Turn sqlite3 errors into FerryErrors (`conflict` for a broken UNIQUE constraint)."""
        try:
            yield
        except sqlite3.IntegrityError as e:
            if conflict is not None:
                raise conflict from None
            log.error("state database refused a change: %s", e, exc_info=True)
            raise PermanentError(f"the state database {self.path} refused a change: {e}",
                                 "this is a bug in Ferry: see logs/ferry.log in the workspace and report it") from None
        except sqlite3.Error as e:
            raise db_error(self.path, e) from None

    def _tx(self, fn: Callable[[sqlite3.Connection], T], begin: str = "BEGIN IMMEDIATE") -> T:
        with self._lock, self._guard():
            db = self._db
            assert db is not None
            db.execute(begin)
            try:
                out = fn(db)
                db.execute("COMMIT")
                return out
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(db)` in one write transaction (BEGIN IMMEDIATE): a check and the act it decides happen
        together, whatever other Ferry processes do at the same time (engine/ops uses it). Write the
        audit rows of what it does with `audit_in(db, ...)`, in the same transaction."""
        return self._tx(fn)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(db)` in one read transaction: its queries see one state of the database."""
        return self._tx(fn, "BEGIN")

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock, self._guard():
            assert self._db is not None
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = (), *, conflict: FerryError | None = None) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock, self._guard(conflict):
            assert self._db is not None
            return self._db.execute(sql, args).rowcount

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
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()

    # ---------------------------------------------------------- tasks

    def insert_task(self, *, kind: str, title: str, params: dict, hosts: list[str], state: str,
                    dedup_key: str | None, owner: str | None, count_rounds: bool = False) -> tuple[int, bool]:
        """Create a task: (its id, True). When an unfinished task already does the same job (same
        kind and dedup key), create nothing: (that task's id, False). Looking and inserting are one
        transaction, so the same job started by two processes at once gives one task.
        count_rounds: params["round"] counts the job's earlier successes, plus one."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> tuple[int, bool]:
            p = params
            if dedup_key is not None:
                same = db.execute("SELECT id FROM tasks WHERE kind=? AND dedup_key=? AND state NOT IN"
                                  " ('succeeded','cancelled') ORDER BY id DESC LIMIT 1", (kind, dedup_key)).fetchone()
                if same is not None:
                    return int(same["id"]), False
                if count_rounds:
                    done = db.execute("SELECT COUNT(*) FROM tasks WHERE kind=? AND dedup_key=?"
                                      " AND state='succeeded'", (kind, dedup_key)).fetchone()[0]
                    p = {**params, "round": done + 1}
            cur = db.execute(
                "INSERT INTO tasks(kind,title,params,hosts,dedup_key,state,owner,heartbeat,created_by,created,updated)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (kind, title, _dumps(p), _dumps(hosts), dedup_key, state, owner, now if owner else None,
                 current_user(), now, now))
            return int(cur.lastrowid), True
        return self._tx(tx)

    def unfinished_task(self, kind: str, dedup_key: str) -> dict | None:
        """The task that does this job and has not succeeded nor been cancelled (failed included), if any."""
        rows = self._q("SELECT * FROM tasks WHERE kind=? AND dedup_key=? AND state NOT IN ('succeeded','cancelled')"
                       " ORDER BY id DESC LIMIT 1", (kind, dedup_key))
        return _row(rows[0]) if rows else None

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

    def update_task(self, task_id: int, **fields: Any) -> int:
        """Update columns; JSON columns are encoded. `owner_is` and `state_is` guard the update;
        soft=True for progress only (see _soft). Returns 1 when the row was updated, else 0."""
        owner_is = fields.pop("owner_is", None)
        state_is = fields.pop("state_is", None)
        if fields.pop("soft", False):
            return self._soft(self.update_task, task_id, owner_is=owner_is, state_is=state_is, **fields)
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
        if state_is is not None:
            sql += " AND state=?"
            args.append(str(state_is))
        return self._exec(sql, tuple(args))

    def save_checkpoint(self, task_id: int, owner: str, checkpoint: dict, progress: dict | None,
                        chunks: list[tuple[int, bytes]] | None = None, reset_chunks: bool = False) -> int:
        """Commit a checkpoint (and chunk-map entries) in one transaction; refuses if this engine
        no longer owns the task.

        Committed without an fsync (see _soft): it survives a killed engine, but a power cut may
        lose it, and the task then resumes from the checkpoint before and repeats that step. A
        replication checkpoint claims only what the target acknowledged after its own fsync, so
        losing it repeats work and never skips any. An fsync here would wait behind the copy's
        writeback (measured: p95 14 ms, max 155 ms on a busy disk) on the store's one thread,
        several times a second per task."""
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
        a busy copy's writeback does not stall the engine several times a second.

        In WAL mode such a commit is in the WAL file when it returns: a killed process loses
        nothing. A power cut loses only the newest commits, never one in the middle (recovery
        stops at the first frame whose running checksum fails), and the next FULL commit (a
        state change) makes every earlier one durable with it."""
        with self._lock:
            self._exec("PRAGMA synchronous=NORMAL")
            try:
                return fn(*args, **kw)
            finally:
                self._exec("PRAGMA synchronous=FULL")

    def last_result(self, kind: str, dedup_key: str) -> dict | None:
        """The result of the newest succeeded task of the same job (the previous round)."""
        rows = self._q("SELECT result FROM tasks WHERE kind=? AND dedup_key=? AND state='succeeded'"
                       " ORDER BY id DESC LIMIT 1", (kind, dedup_key))
        return _loads(rows[0]["result"]) if rows else None

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
        self._soft(self._exec, "UPDATE tasks SET heartbeat=? WHERE owner=? AND state NOT IN"
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
        self._soft(self._exec, "INSERT INTO task_log(task_id, ts, level, message) VALUES(?,?,?,?)",
                   (task_id, time.time(), level, message))

    def task_log(self, task_id: int, limit: int = 200) -> list[dict]:
        rows = self._q("SELECT ts, level, message FROM task_log WHERE task_id=? ORDER BY id DESC LIMIT ?",
                       (task_id, limit))
        return [dict(r) for r in reversed(rows)]

    # ---------------------------------------------------------- audit and settings

    def audit(self, action: str, target: str, params: dict | None, result: str, actor: str | None = None) -> None:
        with self._lock, self._guard():
            assert self._db is not None
            _audit(self._db, action, target, params, result, actor)

    def audit_rows(self, limit: int = 200) -> list[dict]:
        rows = self._q("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(r), "params": _loads(r["params"])} for r in rows]

    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self._q("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        self._exec("INSERT INTO settings(key, value) VALUES(?, ?)"
                   " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, json.dumps(value)))

    # ---------------------------------------------------------- files tasks make on hosts

    def track_file(self, task_id: int, host: str, path: str, role: str) -> None:
        """Record, before it exists, a file or folder task `task_id` makes on `host`: role "temp"
        (removed when the task ends, whatever the end) or "made" (part of what the task builds:
        kept when it succeeds, removed when it rolls back)."""
        self._exec("INSERT INTO task_files(task_id, host, path, role, created) VALUES(?,?,?,?,?)"
                   " ON CONFLICT(task_id, host, path) DO UPDATE SET role=excluded.role",
                   (task_id, host, path, role, time.time()))

    def untrack_file(self, task_id: int, host: str, path: str) -> None:
        self._exec("DELETE FROM task_files WHERE task_id=? AND host=? AND path=?", (task_id, host, path))

    def tracked_files(self, task_id: int | None = None) -> list[dict]:
        """The files recorded for a task (or for every task), newest first."""
        if task_id is None:
            rows = self._q("SELECT * FROM task_files ORDER BY task_id, created DESC")
        else:
            rows = self._q("SELECT * FROM task_files WHERE task_id=? ORDER BY created DESC", (task_id,))
        return [dict(r) for r in rows]

    def workspace_id(self) -> str:
        """A random name for this workspace (its state.db), made once: it tags the helpers of its tasks."""
        known = self._q("SELECT value FROM settings WHERE key='workspace_id'")
        if known:           # (read without a write lock: a reading command works while another writes)
            return json.loads(known[0]["value"])

        def tx(db: sqlite3.Connection) -> str:
            r = db.execute("SELECT value FROM settings WHERE key='workspace_id'").fetchone()
            if r is not None:
                return json.loads(r["value"])
            value = os.urandom(4).hex()
            db.execute("INSERT INTO settings(key, value) VALUES('workspace_id', ?)", (json.dumps(value),))
            return value
        return self._tx(tx)

    def interrupt(self, task_id: int, can_take: Callable[[str | None, float | None], bool]) -> bool:
        """Mark a queued, running or waiting task whose Ferry process is gone as interrupted (and
        unowned), in one transaction with the look at its owner: True when it was."""
        def tx(db: sqlite3.Connection) -> bool:
            r = db.execute("SELECT owner, heartbeat, state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if r is None or r["state"] not in ("queued", "running", "waiting") or not r["owner"]:
                return False
            if not can_take(r["owner"], r["heartbeat"]):
                return False
            db.execute("UPDATE tasks SET state='interrupted', owner=NULL, waiting=NULL, updated=? WHERE id=?",
                       (time.time(), task_id))
            return True
        return self._tx(tx)

    # ---------------------------------------------------------- VMs and templates

    def vm_insert(self, *, id: str, name: str, kind: str, host: str, state: str, spec: dict,
                  busy: int | None = None) -> None:
        now = time.time()
        self._exec("INSERT INTO vms(id, name, kind, host, state, spec, busy, created, updated) VALUES(?,?,?,?,?,?,?,?,?)",
                   (id, name, kind, host, state, _dumps(spec), busy, now, now),
                   conflict=PermanentError(f"a VM or template named {name!r} already exists",
                                           "choose another name (ferry vm list shows the names in use)"))

    def vm_reserve(self, task_id: int, records: list[dict]) -> list[dict]:
        """Reserve the names of the VMs task `task_id` makes: each record (id, name, kind, host,
        spec) is inserted as state 'incomplete', busy with the task; one already reserved by the
        task (a resume) is kept as it is. In one transaction, so a name taken meanwhile by anything
        else refuses them all (PermanentError naming it) and none is inserted. Returns the rows in
        the order given, as stored (a resume gets the ids and paths of its first run)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> list[dict]:
            out = []
            for rec in records:
                r = db.execute("SELECT * FROM vms WHERE name=? AND recycled IS NULL", (rec["name"],)).fetchone()
                if r is not None:
                    if r["busy"] == task_id:
                        out.append(_vm_row(r))
                        continue
                    what = "being made by task %s" % r["busy"] if r["state"] == "incomplete" and r["busy"] else "in use"
                    raise PermanentError(f"the name {rec['name']!r} is {what}",
                                         "choose another name (ferry vm list shows the names in use)")
                db.execute("INSERT INTO vms(id, name, kind, host, state, spec, busy, created, updated)"
                           " VALUES(?,?,?,?,?,?,?,?,?)", (rec["id"], rec["name"], rec["kind"], rec["host"],
                                                          "incomplete", _dumps(rec["spec"]), task_id, now, now))
                out.append(_vm_row(db.execute("SELECT * FROM vms WHERE id=?", (rec["id"],)).fetchone()))
            return out
        return self._tx(tx)

    def release_holds(self, task_id: int) -> None:
        """A task that ended no longer holds the VMs it worked on (records it was making or deleting
        stay marked: what is left of them is for gc or a new delete to finish)."""
        self._exec("UPDATE vms SET busy=NULL, updated=? WHERE busy=? AND state NOT IN ('incomplete','deleting')",
                   (time.time(), task_id))

    def vm_rows_of_task(self, task_id: int) -> list[dict]:
        """The records a task holds (busy with it), recycled or not."""
        return [_vm_row(r) for r in self._q("SELECT * FROM vms WHERE busy=? ORDER BY name", (task_id,))]

    def vm_update(self, vm_id: str, **fields: Any) -> None:
        if "spec" in fields:
            fields["spec"] = _dumps(fields["spec"])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self._exec(f"UPDATE vms SET {cols} WHERE id=?", (*fields.values(), vm_id),
                   conflict=PermanentError(f"a VM or template named {fields.get('name')!r} already exists",
                                           "rename or delete the other one first"))

    def vm_take(self, vm_id: str, task_id: int, holder_gone: Callable[[dict | None], bool]) -> int | None:
        """Mark the VM busy with task `task_id`, in one transaction with the look at who holds it:
        None when taken; else the id of the task that holds it and is not gone
        (`holder_gone(its task row, or None when that row no longer exists)`)."""
        def tx(db: sqlite3.Connection) -> int | None:
            vm = db.execute("SELECT name, busy FROM vms WHERE id=?", (vm_id,)).fetchone()
            if vm is None:
                raise PermanentError(f"VM {vm_id} no longer exists", "ferry vm list shows what exists")
            other = vm["busy"]
            if other and other != task_id:
                row = db.execute("SELECT * FROM tasks WHERE id=?", (other,)).fetchone()
                if not holder_gone(_row(row) if row else None):
                    return int(other)
            db.execute("UPDATE vms SET busy=?, updated=? WHERE id=?", (task_id, time.time(), vm_id))
            return None
        return self._tx(tx)

    def vm_delete(self, vm_id: str) -> None:
        self._exec("DELETE FROM vms WHERE id=?", (vm_id,))

    def vm_rows(self, *, recycled: bool = False, host: str | None = None) -> list[dict]:
        """The records (recycled: those in the recycle bin), by name; host: only that host's."""
        if host is not None:
            return [_vm_row(r) for r in self._q(f"SELECT * FROM vms WHERE {_binned(recycled)} AND host=? "
                                                "ORDER BY name", (host,))]
        return [_vm_row(r) for r in self._q(f"SELECT * FROM vms WHERE {_binned(recycled)} ORDER BY name")]

    def vm_named(self, ref: str, *, recycled: bool = False) -> list[dict]:
        """The records named `ref`, or whose id it is (only those rows are decoded: a site may have
        thousands), by name."""
        return [_vm_row(r) for r in self._q(f"SELECT * FROM vms WHERE {_binned(recycled)} AND (name=? OR id=?) "
                                            "ORDER BY name", (ref, ref))]

    def vm_names(self, *, recycled: bool = False) -> list[tuple[str, str]]:
        """(name, kind) of every record, by name, without decoding their specs."""
        return [(r["name"], r["kind"])
                for r in self._q(f"SELECT name, kind FROM vms WHERE {_binned(recycled)} ORDER BY name")]

    def vm_row(self, vm_id: str) -> dict | None:
        rows = self._q("SELECT * FROM vms WHERE id=?", (vm_id,))
        return _vm_row(rows[0]) if rows else None


    # ---------------------------------------------------------- server migrations

    def migration_waves(self) -> dict[str, str]:
        """The wave of every migration, by name."""
        return {r["name"]: r["wave"] for r in self._q("SELECT name, wave FROM migrations")}

    def migration_rows(self, wave: str | None = None) -> list[dict]:
        """The migrations (of one wave), by wave and name."""
        if wave is None:
            rows = self._q("SELECT * FROM migrations ORDER BY wave, name")
        else:
            rows = self._q("SELECT * FROM migrations WHERE wave=? ORDER BY name", (wave,))
        return [_migration_row(r) for r in rows]

    def migration_row(self, name: str) -> dict | None:
        rows = self._q("SELECT * FROM migrations WHERE name=?", (name,))
        return _migration_row(rows[0]) if rows else None

    def migration_apply(self, wave: str, specs: dict[str, dict], *, spec_change: dict[str, str], planned: str,
                        file: str, dry_run: bool = False, actor: str | None = None) -> dict[str, list[str]]:
        """Apply a wave's plan: each spec (by name) is inserted in state `planned`, or replaces the
        spec of its migration when it differs and the migration's state is a key of `spec_change`
        (which gives the state it goes to); a changed one in any other state, or one of another
        wave, refuses the whole plan (Refused) and nothing is applied. Looking and writing are one
        transaction (two processes applying at once make one record); each change is audited in
        it. dry_run: nothing written. Returns the names created, updated and unchanged."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
            for name, spec in specs.items():
                text = _dumps(spec)
                r = db.execute("SELECT wave, state, spec FROM migrations WHERE name=?", (name,)).fetchone()
                if r is None:
                    out["created"].append(name)
                    if not dry_run:
                        db.execute("INSERT INTO migrations(name, wave, state, spec, created, updated)"
                                   " VALUES(?,?,?,?,?,?)", (name, wave, planned, text, now, now))
                        _audit(db, f"migration.{planned}", name, {"wave": wave, "file": file}, "ok", actor)
                    continue
                if r["wave"] != wave:
                    raise Refused(f"migration {name} belongs to wave {r['wave']}, not {wave}; nothing was applied",
                                  "choose another name (ferry migration list shows the names in use)")
                if r["spec"] == text:
                    out["unchanged"].append(name)
                    continue
                to = spec_change.get(r["state"])
                if to is None:
                    raise Refused(f"migration {name} is {r['state']}: its plan can no longer change it; "
                                  "nothing was applied", "only a planned or assessed migration takes a changed "
                                  f"plan: keep {name} as it was in the file, or roll it back first")
                out["updated"].append(name)
                if not dry_run:
                    db.execute("UPDATE migrations SET spec=?, state=?, updated=? WHERE name=?", (text, to, now, name))
                    _audit(db, f"migration.{to}" if to != r["state"] else "migration.updated", name,
                           {"wave": wave, "file": file, "from": r["state"], "why": "its plan changed"}, "ok", actor)
            return out
        return self._tx(tx)

    def migration_transition(self, name: str, to: str, *, allowed_from: tuple[str, ...],
                             params: dict | None = None, actor: str | None = None, **fields: Any) -> dict:
        """Move a migration to state `to` (with other columns: round, last_sync, assessment, ...), in
        one transaction with the look at its state (Refused when not one of `allowed_from`), audited
        as migration.<to>. Returns the row as stored."""
        for k in ("assessment", "blockers", "warnings"):
            if k in fields:
                fields[k] = _dumps(fields[k])

        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT state FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            if r["state"] not in allowed_from:
                raise Refused(f"migration {name} is {r['state']}: it cannot become {to}",
                              f"it can become {to} from: {', '.join(allowed_from) or 'none'}")
            cols = "".join(f", {k}=?" for k in fields)
            db.execute(f"UPDATE migrations SET state=?, updated=?{cols} WHERE name=?",
                       (to, time.time(), *fields.values(), name))
            _audit(db, f"migration.{to}", name, {"from": r["state"], **(params or {})}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_override(self, name: str, reason: str, *, actor: str | None = None) -> dict:
        """The operator's reason to go on despite a network below its thresholds: recorded, audited,
        and a network blocker of the last assessment made a warning, in one transaction."""
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            row = _migration_row(r)
            blockers = [b for b in row["blockers"] or [] if b["name"] != "network"]
            moved = [{**b, "message": f"{b['message']} (overridden: {reason})", "hint": ""}
                     for b in row["blockers"] or [] if b["name"] == "network"]
            db.execute("UPDATE migrations SET override=?, blockers=?, warnings=?, updated=? WHERE name=?",
                       (reason, _dumps(blockers), _dumps([*(row["warnings"] or []), *moved]), time.time(), name))
            _audit(db, "migration.override", name, {"reason": reason, "network_blocker": bool(moved)}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)


    def migration_prepared(self, name: str, target: dict, *, ready: str, prepared: str,
                           actor: str | None = None) -> dict:
        """The target of a migration made and running as receiver: `target` recorded and the state
        `prepared`, in one transaction with the look at the migration (state `ready`, no blockers:
        Refused otherwise), audited. The same VM recorded already (a resumed task): left as it is."""
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            row = _migration_row(r)
            if row["state"] == prepared and (row["target"] or {}).get("vm_id") == target["vm_id"]:
                return row
            if row["state"] != ready:
                raise Refused(f"migration {name} is {row['state']}: its target is prepared once it is {ready}",
                              f"ferry migration show {name}")
            if row["blockers"]:
                raise Refused(f"migration {name} has blockers: {', '.join(b['name'] for b in row['blockers'])}",
                              f"ferry migration report {name} says why")
            db.execute("UPDATE migrations SET state=?, target=?, updated=? WHERE name=?",
                       (prepared, _dumps(target), time.time(), name))
            _audit(db, f"migration.{prepared}", name, {
                "from": row["state"], "vm": target["vm"], "host": target["host"], "address": target["address"],
                "fingerprint": target["fingerprint"], "task": target.get("task")}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_receiver(self, name: str, target: dict, *, actor: str | None = None) -> dict:
        """The receiver of a migration booted again (sync.ensure_receiver): its address and host key
        recorded over the same target VM's, audited. Refused when the target recorded is another VM."""
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            row = _migration_row(r)
            if (row["target"] or {}).get("vm_id") != target["vm_id"]:
                raise Refused(f"migration {name} has another target now", f"ferry migration show {name}")
            db.execute("UPDATE migrations SET target=?, updated=? WHERE name=?", (_dumps(target), time.time(), name))
            _audit(db, "migration.receiver", name, {"vm": target["vm"], "address": target["address"],
                                                   "fingerprint": target["fingerprint"]}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_unprepared(self, name: str, vm_id: str, *, back: str, prepared: str,
                             actor: str | None = None) -> dict | None:
        """Undo migration_prepared when the target recorded is the VM `vm_id` (its task rolled back):
        the target cleared and the state `back`, audited. None when there is nothing to undo."""
        def tx(db: sqlite3.Connection) -> dict | None:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                return None
            row = _migration_row(r)
            if row["state"] != prepared or (row["target"] or {}).get("vm_id") != vm_id:
                return None
            db.execute("UPDATE migrations SET state=?, target=NULL, updated=? WHERE name=?", (back, time.time(), name))
            _audit(db, f"migration.{back}", name, {"from": prepared, "why": "its target was rolled back",
                                                   "vm": row["target"]["vm"]}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_netcheck(self, name: str, netcheck: dict | None, blockers: list[dict], warnings: list[dict], *,
                           replace: tuple[str, ...], task: int | None = None, actor: str | None = None) -> dict:
        """A network check measured again: it replaces the last one in the assessment, and its findings
        replace those named `replace` among the blockers and warnings; one transaction, audited."""
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            row = _migration_row(r)
            keep_b = [b for b in row["blockers"] or [] if b["name"] not in replace]
            keep_w = [w for w in row["warnings"] or [] if w["name"] not in replace]
            assessment = {**(row["assessment"] or {}), "netcheck": netcheck}
            db.execute("UPDATE migrations SET assessment=?, blockers=?, warnings=?, updated=? WHERE name=?",
                       (_dumps(assessment), _dumps(keep_b + blockers), _dumps(keep_w + warnings), time.time(), name))
            _audit(db, "migration.netcheck", name, {"task": task, "passed": netcheck is not None and not blockers,
                                                    "blockers": [b["name"] for b in blockers]}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_cutover(self, name: str, record: dict, *, to: str | None, allowed_from: tuple[str, ...],
                          actor: str | None = None) -> dict:
        """The cutover's record replaced (and, with `to`, the state changed, audited), in one transaction
        with the look at the state (Refused when not one of `allowed_from`)."""
        return self._migration_set(name, "cutover", record, to=to, allowed_from=allowed_from, actor=actor)

    def migration_tested(self, name: str, test: dict, *, to: str, allowed_from: tuple[str, ...],
                         actor: str | None = None) -> dict:
        """A test launch's result recorded, the state `to` (ready when it passed), audited."""
        return self._migration_set(name, "test", test, to=to, allowed_from=allowed_from, actor=actor,
                                   params={"passed": test.get("passed"), "task": test.get("task")})

    def _migration_set(self, name: str, column: str, value: dict, *, to: str | None, allowed_from: tuple[str, ...],
                       actor: str | None, params: dict | None = None) -> dict:
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT state FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            if r["state"] not in allowed_from:
                raise Refused(f"migration {name} is {r['state']}: its {column} cannot be recorded",
                              f"ferry migration show {name}")
            state = to or r["state"]
            db.execute(f"UPDATE migrations SET {column}=?, state=?, updated=? WHERE name=?",
                       (_dumps(value), state, time.time(), name))
            if to and (to != r["state"] or params):
                _audit(db, f"migration.{to}" if to != r["state"] else f"migration.{column}", name,
                       {"from": r["state"], **(params or {})}, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_round(self, name: str, rec: dict, *, allowed_from: tuple[str, ...], to: str | None = None,
                        actor: str | None = None) -> dict:
        """A sync round done: `rec` (round, label, task, started, ended, bytes, items, deleted) recorded,
        the migration's round and last_sync moved on, the last measure of changes cleared (it was of
        before this round) and, with `to`, its state changed; one transaction with the look at its state
        (Refused when not one of `allowed_from`), audited (migration.<to>, else migration.round). The
        same round of the same task recorded already (a resumed task): the row as it is."""
        def tx(db: sqlite3.Connection) -> dict:
            r = db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone()
            if r is None:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            row = _migration_row(r)
            if any(x["round"] == rec["round"] and x.get("task") == rec.get("task") for x in row["rounds"]):
                return row
            if row["state"] not in allowed_from:
                raise Refused(f"migration {name} is {row['state']}: its sync round {rec['round']} cannot be "
                              "recorded", f"ferry migration show {name}")
            if rec["round"] != row["round"] + 1:
                raise Refused(f"migration {name} has {row['round']} sync round(s): round {rec['round']} is not "
                              "the next", f"ferry migration show {name}")
            rounds = [*row["rounds"], rec][-ROUNDS_KEPT:]
            db.execute("UPDATE migrations SET state=?, round=?, last_sync=?, rounds=?, changed=NULL, updated=? "
                       "WHERE name=?", (to or row["state"], rec["round"], rec["ended"], _dumps(rounds), time.time(),
                                        name))
            params = {"from": row["state"], "round": rec["round"], "label": rec["label"], "bytes": rec["bytes"],
                      "items": rec["items"], "duration_s": round(rec["ended"] - rec["started"], 3),
                      "task": rec.get("task")}
            _audit(db, f"migration.{to}" if to else "migration.round", name, params, "ok", actor)
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)

    def migration_changed(self, name: str, changed: dict) -> dict:
        """The last measure of what changed on the source since the last round (bytes, items, at).
        Not audited: a measure, it changes nothing."""
        def tx(db: sqlite3.Connection) -> dict:
            if db.execute("UPDATE migrations SET changed=? WHERE name=?", (_dumps(changed), name)).rowcount == 0:
                raise PermanentError(f"no migration named {name!r}", "ferry migration list shows them")
            return _migration_row(db.execute("SELECT * FROM migrations WHERE name=?", (name,)).fetchone())
        return self._tx(tx)


def _audit(db: sqlite3.Connection, action: str, target: str, params: dict | None, result: str,
           actor: str | None = None) -> None:
    db.execute("INSERT INTO audit(ts, actor, action, target, params, result) VALUES(?,?,?,?,?,?)",
               (time.time(), actor or current_user(), action, target, _dumps(scrub(params or {})), result))


audit_in = _audit     # (public) an audit row written in the caller's transaction (Store.transaction)


def _migration_row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("spec", "assessment", "blockers", "warnings", "target", "cutover", "test", "rounds", "changed"):
        d[k] = _loads(d[k])
    return d


def _binned(recycled: bool) -> str:
    """The WHERE condition for the records in the recycle bin (recycled) or out of it."""
    return "recycled IS NOT NULL" if recycled else "recycled IS NULL"


# ---------------------------------------------------------- sqlite errors, as an operator reads them

def _code(e: sqlite3.Error) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF   # the primary code of an extended one


def _is_busy(e: sqlite3.Error) -> bool:
    return _code(e) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        _code(e) is None and ("locked" in str(e) or "busy" in str(e)))


def db_error(path: Path, e: sqlite3.Error) -> FerryError:
    """The FerryError an operator sees for a sqlite3 error on the state database at `path`."""
    code = _code(e)
    if _is_busy(e):
        holders = lock_holders(path)
        who = ", ".join(holders) if holders else "another process"
        return TransientError(
            f"state database {path} is locked: {who} held it for more than {BUSY_TIMEOUT_S:g} s",
            "wait for it to finish or stop it, then run the command again" if holders else
            f"find it with `fuser -v {path}*`, wait for it to finish or stop it, then run the command again")
    if code == sqlite3.SQLITE_FULL:
        return PermanentError(f"cannot write the state database {path}: the disk is full",
                              "free space on that filesystem, then run the command again")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return PermanentError(f"cannot open or write the state database {path}: {e}",
                              "check the owner and permissions of the workspace folder and of state.db, "
                              "state.db-wal and state.db-shm in it, or pass --workspace DIR")
    damage = damage_of(path)
    if damage:
        return PermanentError(
            f"state database {path} is damaged: {damage}",
            f"move it aside to start fresh: mv {path} {path}.damaged (and its -wal and -shm files); the tasks, "
            f"VM records and audit in it are then forgotten, and `sqlite3 {path}.damaged .recover` may save some")
    if code == sqlite3.SQLITE_IOERR:
        return PermanentError(f"reading or writing the state database {path} failed: {e}",
                              "the filesystem reported an I/O error: check the disk (dmesg), then run the command again")
    log.error("state database %s: %s", path, e, exc_info=e)
    return PermanentError(f"state database {path}: {e}",
                          "the database passed its integrity check; see logs/ferry.log in the workspace and report it")


def damage_of(path: Path) -> str | None:
    """What PRAGMA quick_check finds wrong with the database at `path`; None when it finds nothing
    (or cannot tell, because another process holds it)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None   # cannot even open it: not a sign of damage (permissions, a missing folder)
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check(20)").fetchall()]
    except sqlite3.Error as e:
        return None if _is_busy(e) or _code(e) in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) else str(e)
    finally:
        con.close()
    if rows == ["ok"]:
        return None
    found = [ln.strip() for r in rows for ln in str(r).splitlines() if ln.strip() and not ln.startswith("***")]
    return "quick_check finds " + (f"{found[0]} (and {len(found) - 1} more problems)" if len(found) > 1
                                   else found[0] if found else "it inconsistent")


def lock_holders(path: Path) -> list[str]:
    """Other processes that hold a write lock on the database at `path` (from /proc/locks), or
    failing that every other process that has it open: "pid N (command line)" each."""
    ids = set()
    for p in (path, Path(f"{path}-shm"), Path(f"{path}-wal")):
        try:
            st = p.stat()
        except OSError:
            continue
        ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    me = os.getpid()
    pids: list[int] = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: POSIX  ADVISORY  WRITE 12788 fe:00:2180849 1073741826 1073742335"; waiters have "->"
                if len(parts) < 6 or parts[1] == "->" or parts[3] != "WRITE":
                    continue
                try:
                    pid = int(parts[4])
                    major, minor, ino = parts[5].split(":")
                    key = (int(major, 16), int(minor, 16), int(ino))
                except ValueError:
                    continue
                if key in ids and pid != me and pid not in pids:
                    pids.append(pid)
    except OSError:
        pass
    if not pids:
        pids = [pid for pid in _pids_with_open(path) if pid != me]
    return [describe_process(pid) for pid in pids]


def _pids_with_open(path: Path) -> list[int]:
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def describe_process(pid: int) -> str:
    """ "pid N (its command line)", printable and short, for naming a process to an operator."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if len(args) > 2 and os.path.basename(args[0]).startswith("python") and args[1] == "-m":
        args = args[2:]          # "python -m ferry.console.cli ..." is ferry
    if args and (os.path.basename(args[0]) == "ferry" or args[0] in ("console.cli", "ferry.console.cli")):
        args[0] = "ferry"
    text = " ".join("".join(c if c.isprintable() else " " if c.isspace() else "?" for c in " ".join(args)).split())
    return f"pid {pid} ({text[:120] + '…' if len(text) > 120 else text})" if text else f"pid {pid}"


def _vm_row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["spec"] = _loads(d["spec"])
    return d


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("params", "hosts", "progress", "checkpoint", "result", "waiting", "requested"):
        d[k] = _loads(d[k])
    return d
