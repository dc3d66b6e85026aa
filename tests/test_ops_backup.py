"""Management-data backups (issue 14, F5): a consistent online copy of state.db while another process
writes to it, the archive's checksum and manifest, SFTP to a loopback sshd verified on the server (a
corrupted copy caught), retention arithmetic with an injected clock, prune --dry-run and prune,
restore with typed confirmation (the current state backed up first, refused while tasks run), and
the alarm backup.stale when the newest backup is older than its schedule allows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ferry.engine.config import dump_config, lab_document, load_config
from ferry.engine.errors import PermanentError
from ferry.engine.ops import backup as bk
from ferry.engine.ops.backupmodel import BackupInfo
from ferry.engine.store import SCHEMA_VERSION, Store
from ferry.engine.workspace import Workspace
from harness.cli import ferry, isolate_ssh
from harness.waiting import until_sync

DAY = 86400.0
T0 = 1_800_000_000.0          # 2027-01-15 08:00 UTC


def workspace(tmp_path: Path, extra: str = "", doc_extra: dict | None = None) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    doc = lab_document(ws)
    doc.update(doc_extra or {})
    (ws / "config.toml").write_text(dump_config(doc).replace('name = "lab"\n', 'name = "lab"\n' + extra, 1) + "\n")
    Store(ws / "state.db").close()
    return ws


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS churn(n INTEGER, pad TEXT)")
n = 0
while True:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO churn VALUES(?, ?)", (n, "x" * 500))
    db.execute("INSERT INTO churn VALUES(?, ?)", (n, "y" * 500))
    db.execute("COMMIT")
    n += 1
"""


def test_a_backup_taken_while_another_process_writes_is_a_whole_database_with_its_checksum(tmp_path):
    ws = workspace(tmp_path)
    site = load_config(ws / "config.toml")
    (ws / "keys").mkdir()
    (ws / "keys" / "receiver_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (ws / "keys" / "receiver_ed25519.pub").write_text("ssh-ed25519 AAAA receiver\n")
    (ws / "known_hosts").write_text("[127.0.0.1]:2222 ssh-ed25519 AAAA\n")
    (ws / "themes").mkdir()
    (ws / "themes" / "mine.toml").write_text('name = "mine"\n')
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ws / "state.db")])
    try:
        def rows() -> int:
            with sqlite3.connect(ws / "state.db", timeout=30) as db:
                try:
                    return db.execute("SELECT COUNT(*) FROM churn").fetchone()[0]
                except sqlite3.OperationalError:
                    return 0
        until_sync(lambda: rows() >= 200, timeout=30, what="the writer to write")
        made = [bk.make_archive(ws, site, "manual", time.time()) for _ in range(2)]
        assert writer.poll() is None                               # it wrote all along
        assert rows() > max(200, 0)
    finally:
        writer.kill()
        writer.wait()
    assert made[0].id != made[1].id and made[1].id.endswith("-manual-2")     # same second: its own id
    for b in made:
        path = Path(b.path)
        assert path.parent == ws / "backups" and path.stat().st_mode & 0o777 == 0o600
        assert Path(f"{path}.sha256").read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
        got = members(path)
        assert list(got)[0] == "manifest.json"
        manifest = json.loads(got["manifest.json"])
        assert manifest["schema_version"] == SCHEMA_VERSION and manifest["site"] == "lab" and manifest["ferry_version"]
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
            n: hashlib.sha256(data).hexdigest() for n, data in got.items() if n != "manifest.json"}
        assert {"state.db", "config.toml", "known_hosts", "themes/mine.toml", "keys/receiver_ed25519.pub",
                "themes-builtin/dark.toml"} <= set(got)
        assert "keys/receiver_ed25519" not in got and b"PRIVATE KEY" not in b"".join(got.values())
        assert [e["path"] for e in manifest["excluded"]] == ["keys/receiver_ed25519"]
        copy = tmp_path / f"{b.id}.db"
        copy.write_bytes(got["state.db"])
        with sqlite3.connect(copy) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = db.execute("SELECT COUNT(*) FROM churn").fetchone()[0]
            assert n >= 200 and n % 2 == 0                         # whole transactions only
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    listed = bk.list_local(ws, site)
    assert [(b.id, b.verified) for b in listed] == [(made[1].id, True), (made[0].id, True)]
    damaged = Path(made[0].path)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    bad = {b.id: b for b in bk.list_local(ws, site)}[made[0].id]
    assert bad.verified is False and "SHA-256" in bad.problem


def test_retention_arithmetic_with_an_injected_clock():
    def b(kind: str, t: float, where: str = "local") -> BackupInfo:
        bid = bk.new_id(kind, t, ())
        return BackupInfo(bid, kind, bk.created_of(bid), where, f"/x/{bid}", 1)
    keep = {"daily": 7, "hourly": 24, "monthly": 2}.get
    hourly = [b("hourly", T0 + h * 3600 + 1800) for h in range(72)]         # three days at :30
    daily = [b("daily", T0 + d * DAY) for d in range(10)]
    monthly = [b("monthly", T0 + m * 31 * DAY) for m in range(3)]
    doomed = bk.plan_prune(hourly + daily + monthly, lambda k: keep(k, 7))
    assert doomed == sorted(hourly[:48] + daily[:3] + monthly[:1], key=lambda x: x.created)
    remote = [b(k, T0 + i * 3600, "remote srv") for i, k in enumerate(["hourly", "daily"] * 16)]
    assert bk.plan_prune(remote, lambda k: 30, by_kind=False) == remote[:2]    # 30 kept, of any kind
    assert bk.plan_prune(daily[:7], lambda k: 7) == []

    # Staleness: `daily 02:00` (UTC) wants a backup since its last slot, once stale_after passed.
    site = load_config_text('timezone = "UTC"\n', '[schedules.nightly]\nat = "daily 02:00"\nrun = "backup"\n'
                            '[schedules.offsite]\nat = "hourly :30"\nrun = "backup remote srv"\n'
                            '[backup.remote.srv]\nhost = "127.0.0.1"\npath = "/srv/b"\n')
    two = T0 - 6 * 3600                                                       # 02:00 that day
    assert [(e.schedule, e.kind, e.remote) for e in bk.expected(site, T0)] == [("nightly", "daily", None),
                                                                               ("offsite", "hourly", "srv")]
    fresh = [b("daily", two + 5), b("hourly", T0 - 1800 + 3, "remote srv")]
    assert bk.stale(site, fresh, T0)[0] == []
    problems, _ = bk.stale(site, [b("daily", two - DAY + 5)], T0)
    assert len(problems) == 2 and problems[0].startswith("schedule nightly: no backup (local) since its run due "
                                                         "2027-01-15 02:00 UTC")
    early = bk.stale(site, [b("daily", two - DAY + 5)], two + 600)[0]         # within stale_after (900 s)
    assert not any("nightly" in p for p in early)


def load_config_text(site_extra: str, rest: str):
    import tempfile
    d = Path(tempfile.mkdtemp())
    (d / "config.toml").write_text(dump_config(lab_document(d)).replace('name = "lab"\n', 'name = "lab"\n' + site_extra,
                                                                        1) + "\n" + rest)
    return load_config(d / "config.toml")


def test_prune_dry_run_lists_and_prune_removes_the_oldest(tmp_path):
    ws = workspace(tmp_path, "", {"backup": {"keep": {"daily": 3}}})
    site = load_config(ws / "config.toml")
    made = [bk.make_archive(ws, site, "daily", T0 + d * DAY) for d in range(5)]
    manual = bk.make_archive(ws, site, "manual", T0 - 30 * DAY)
    r = ferry(ws, "backup", "prune", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert [x["id"] for x in r.json["backups"]] == [made[0].id, made[1].id]
    assert all(Path(x.path).exists() for x in made)
    text = ferry(ws, "backup", "prune", "--dry-run")
    assert text.out.splitlines()[0].startswith(f"would prune local {made[0].id} (")
    r = ferry(ws, "backup", "prune")
    assert r.code == 0 and r.out.splitlines()[0].startswith(f"pruned local {made[0].id}")
    left = ferry(ws, "backup", "list", "--json").json["backups"]
    assert [x["id"] for x in left] == [made[4].id, made[3].id, made[2].id, manual.id]
    assert not Path(made[0].path).exists() and not Path(f"{made[0].path}.sha256").exists()
    assert ferry(ws, "backup", "prune").out.startswith("nothing to prune")


@pytest.fixture
def remote_ws(sshd_factory, tmp_path, monkeypatch):
    isolate_ssh(monkeypatch, tmp_path / "home")
    server = sshd_factory.one()
    where = tmp_path / "srv" / "ferry-backups"
    ws = workspace(tmp_path, "", {"backup": {"remote": {"srv": {
        "host": server.address, "port": server.port, "user": server.user, "identity": str(server.user_key),
        "path": str(where), "keep": 2}}}})
    server.trust(Workspace(ws).known_hosts_path)
    return ws, server, where


def test_sftp_upload_is_verified_on_the_server_and_a_corrupted_copy_is_caught(remote_ws, tmp_path):
    ws, server, where = remote_ws
    r = ferry(ws, "backup", "now", "--remote", "srv", "--json")
    assert r.code == 0, r.err
    local, up = r.json["backup"], r.json["uploaded"][0]
    assert up["where"] == "remote srv" and up["verified"] is True and up["sha256"] == local["sha256"]
    there = where / Path(local["path"]).name
    assert hashlib.sha256(there.read_bytes()).hexdigest() == local["sha256"]
    assert (where / f"{there.name}.sha256").read_text().split()[0] == local["sha256"]
    assert [p.name for p in where.iterdir() if p.name.startswith(".")] == []           # no partial copy left
    good = ferry(ws, "backup", "now", "--remote", "srv", "--json").json["backup"]

    site = load_config(ws / "config.toml")
    pool_kw = dict(ssh_config_paths=[tmp_path / "none"], user_known_hosts=tmp_path / "none", use_agent=False)
    (tmp_path / "none").touch()

    async def through_ssh():
        from ferry.engine.transport import TransportPool
        srv = bk.RemoteServer(site, bk.remote_target(site, "srv"), TransportPool(site, Workspace(ws), **pool_kw))
        try:
            await srv.t.run(["truncate", "-s", "100", str(there)], check=True)     # damaged on the server
            # A local archive damaged after its checksum was taken: the server's sha256sum says so
            # before the copy counts, and the copy is removed.
            broken = tmp_path / "broken.tar.gz"
            broken.write_bytes(Path(good["path"]).read_bytes()[:-10])
            b = bk.local_info(Path(good["path"]), site)
            with pytest.raises(PermanentError, match="is corrupt: the server's SHA-256"):
                await srv.upload(BackupInfo(**{**{f: getattr(b, f) for f in b.__dataclass_fields__},
                                               "id": "20270101-000000-manual",
                                               "path": str(broken)}))
        finally:
            await srv.close()
    asyncio.run(through_ssh())
    assert not (where / "broken.tar.gz").exists() and [p.name for p in where.iterdir() if p.name.startswith(".")] == []

    listed = ferry(ws, "backup", "list", "--json")
    assert listed.code == 0, listed.err
    remote = {x["id"]: x for x in listed.json["backups"] if x["where"] == "remote srv"}
    assert remote[local["id"]]["verified"] is False and "server's SHA-256" in remote[local["id"]]["problem"]
    assert remote[good["id"]]["verified"] is True and remote[local["id"]]["size"] == 100
    table = ferry(ws, "backup", "list").out
    assert any(ln.startswith(local["id"]) and "remote srv" in ln and "✖" in ln for ln in table.splitlines())

    # A restore from the server refuses the damaged copy, and fetches a good one (gone here).
    r = ferry(ws, "backup", "restore", local["id"], "--remote", "srv", "--confirm", local["id"])
    assert r.code == 1 and "does not match its checksum" in r.err
    Path(good["path"]).unlink()
    Path(good["path"] + ".sha256").unlink()
    r = ferry(ws, "backup", "restore", good["id"], "--remote", "srv", "--confirm", good["id"], "--json")
    assert r.code == 0, r.err
    assert r.json["restored"]["id"] == good["id"] and Path(good["path"]).exists()


def test_restore_needs_its_confirmation_and_idle_tasks_and_backs_up_the_current_state_first(tmp_path):
    ws = workspace(tmp_path)
    made = ferry(ws, "silence", "add", "--match", "type=test.*", "--for", "1d", "--reason", "kept in the backup",
                 "--json")
    assert made.code == 0, made.err
    silence = made.json["id"]
    r = ferry(ws, "backup", "now", "--json")
    assert r.code == 0, r.err
    bid = r.json["backup"]["id"]
    assert ferry(ws, "silence", "remove", str(silence)).code == 0
    assert ferry(ws, "silence", "list", "--json").json == []

    r = ferry(ws, "backup", "restore", bid)                        # no tty, no --confirm
    assert r.code == 1 and r.err.strip() == (f"ferry: restoring backup {bid} replaces this workspace's state: it needs "
                                             f"a typed confirmation (hint: ferry backup restore {bid} --confirm {bid})")
    r = ferry(ws, "backup", "restore", bid, "--confirm", "yes")
    assert r.code == 1 and "is not the backup's id" in r.err

    async def hold() -> int:
        from ferry.engine import remote
        client = await remote.connect(Workspace(ws), client="cli")
        try:
            return await client.submit("test.hold", {"title": "busy"})
        finally:
            await client.close()
    tid = asyncio.run(hold())
    r = ferry(ws, "backup", "restore", bid, "--confirm", bid)
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1
    assert f"the engine's tasks are not idle: task {tid} (busy) is" in r.err
    assert ferry(ws, "task", "cancel", str(tid)).code == 0
    until_sync(lambda: ferry(ws, "task", "show", str(tid), "--json").json["state"] == "cancelled", timeout=30,
               what="the task to end")

    r = ferry(ws, "backup", "restore", bid, "--confirm", bid, "--json")
    assert r.code == 0, r.err
    assert r.json["restored"]["id"] == bid and r.json["engine_restarted"] is True
    assert "state.db" in r.json["files"] and "config.toml" in r.json["files"]
    back = ferry(ws, "silence", "list", "--json").json
    assert [(s["id"], s["reason"]) for s in back] == [(silence, "kept in the backup")]
    before = r.json["before"]
    assert before["kind"] == "before-restore" and Path(before["path"]).exists()
    copy = tmp_path / "before.db"
    copy.write_bytes(members(Path(before["path"]))["state.db"])
    with sqlite3.connect(copy) as db:                              # the state it replaced: the silence removed
        assert db.execute("SELECT removed_by IS NOT NULL FROM silences WHERE id=?", (silence,)).fetchone() == (1,)
    listed = ferry(ws, "backup", "list", "--json").json["backups"]
    assert {x["kind"] for x in listed} == {"manual", "before-restore"} and all(x["verified"] for x in listed)


def test_a_stale_backup_raises_backup_stale_and_a_new_one_clears_it(tmp_path):
    ws = workspace(tmp_path, 'timezone = "UTC"\n')
    with open(ws / "config.toml", "a") as f:
        f.write('[schedules.nightly]\nat = "daily 02:00"\nrun = "backup"\n'
                '[checklists.backups]\nchecks = ["backup"]\n')
    site = load_config(ws / "config.toml")
    old = bk.make_archive(ws, site, "daily", time.time() - 3 * DAY)
    r = ferry(ws, "health", "run", "backups", "--json")
    assert r.code == 0, r.err
    alarms = ferry(ws, "alarms", "--json").json
    assert [(a["type"], a["object"], a["severity"]) for a in alarms] == [("backup.stale", "site:lab", "critical")]
    assert "schedule nightly: no backup (local) since its run due" in alarms[0]["summary"]
    check = [c for c in ferry(ws, "health", "list", "--json").json if c["check"] == "backup"][0]
    assert check["state"] == "CRITICAL" and check["hard"] is True and old.id[:8] in check["summary"].replace("-", "")

    r = ferry(ws, "backup", "now", "--json")
    assert r.code == 0, r.err
    assert ferry(ws, "alarms", "--json").json == []                    # cleared at once, not at the next round
    history = ferry(ws, "alarms", "--all", "--json").json
    assert [(a["type"], a["state"]) for a in history] == [("backup.stale", "cleared")]


def test_a_schedule_runs_backup_hourly_and_the_engine_catches_up_a_missed_slot(tmp_path):
    ws = workspace(tmp_path, 'timezone = "UTC"\n')
    with open(ws / "config.toml", "a") as f:
        f.write('[schedules.mgmt]\nat = "hourly :00"\nrun = "backup hourly"\n')
    store = Store(ws / "state.db")         # the last slot it handled: three hours ago
    store.transaction(lambda db: db.execute("INSERT INTO schedules(name, cron, anchor) VALUES(?,?,?)",
                                            ("mgmt", "0 * * * * UTC", time.time() - 3 * 3600)))
    store.close()

    def ran():
        got = {s["name"]: s for s in ferry(ws, "schedules", "--json").json}
        last = got["mgmt"]["last"]
        return last if last and last["result"] and last["result"] != "running" else None
    last = until_sync(ran, timeout=60, what="the missed slot to be caught up")
    assert last["caught_up"] is True and last["result"].startswith("ok: backup ") and "-hourly" in last["result"]
    listed = ferry(ws, "backup", "list", "--json").json["backups"]
    assert [(x["kind"], x["verified"]) for x in listed] == [("hourly", True)]
