"""Alarms and events (engine/ops): the lifecycle (raise, repeat, ack, clear, history), silences with
expiry, inhibition by host.down, two processes raising one alarm at once, notification by a real
command and a real webhook (retried, never holding up the raise), and the `ferry` commands."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ferry.engine.config import NotifySettings, dump_config, lab_document
from ferry.engine.errors import PermanentError, Refused
from ferry.engine.ops import alarms as al
from ferry.engine.ops.schedule import Clock
from ferry.engine.ops.service import Ops
from ferry.engine.store import ACTOR, Store
from harness.cli import ferry
from harness.waiting import until


class Hands(Clock):
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def make_ops(tmp_path, notify: NotifySettings | None = None, clock: Clock | None = None, sleeps: list | None = None):
    store = Store(tmp_path / "state.db")
    site = SimpleNamespace(name="lab", notify=notify or NotifySettings(), timezone=None, schedules={})

    async def no_wait(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)
    return Ops(store, lambda: site, clock=clock or Hands(), notify_sleep=no_wait), store


def audit_actions(store: Store) -> list[str]:
    return [r["action"] for r in reversed(store.audit_rows(100))]


async def test_alarm_lifecycle_raise_repeat_ack_resolve_history(tmp_path):
    clock = Hands()
    ops, store = make_ops(tmp_path, clock=clock)
    ACTOR.set("alice")
    a = await ops.raise_alarm("datastore.full", "datastore:ds1", "major", "ds1 is 91% full")
    clock.t += 60
    b = await ops.raise_alarm("datastore.full", "datastore:ds1", "critical", "ds1 is 96% full")
    assert b.id == a.id and b.count == 2 and b.last_seen == a.first_seen + 60 and b.first_seen == a.first_seen
    assert b.severity == "critical" and b.summary == "ds1 is 96% full" and b.state == "active"
    assert len(await ops.alarms()) == 1

    acked = await ops.ack(a.id, "freeing space")
    assert (acked.state, acked.acked_by, acked.ack_comment, acked.acked_at) == ("acknowledged", "alice",
                                                                               "freeing space", clock.t)
    clock.t += 60
    again = await ops.raise_alarm("datastore.full", "datastore:ds1", "critical", "ds1 is 95% full")
    assert again.state == "acknowledged" and again.count == 3           # still being worked on
    clock.t += 60
    gone = await ops.resolve("datastore.full", "datastore:ds1")
    assert gone.state == "cleared" and gone.cleared_by == "engine" and gone.clear_reason == "the condition resolved"
    assert await ops.resolve("datastore.full", "datastore:ds1") is None
    assert await ops.alarms() == []
    history = await ops.alarms(all=True)
    assert [(h.id, h.state, h.count) for h in history] == [(a.id, "cleared", 3)]

    new = await ops.raise_alarm("datastore.full", "datastore:ds1", "major", "full again")
    assert new.id != a.id and new.count == 1                          # a raise after a clear: a new alarm
    with pytest.raises(Refused, match="needs a reason"):
        await ops.clear(new.id, "  ")
    done = await ops.clear(new.id, "disk replaced")
    assert (done.state, done.cleared_by, done.clear_reason) == ("cleared", "alice", "disk replaced")
    with pytest.raises(Refused, match="is cleared"):
        await ops.ack(new.id)
    with pytest.raises(PermanentError, match="no alarm 999"):
        await ops.ack(999)

    kinds = [(e.kind, e.alarm_id) for e in reversed(await ops.events())]
    assert kinds == [("raise", a.id), ("severity", a.id), ("ack", a.id), ("clear", a.id), ("raise", new.id),
                     ("clear", new.id)]
    assert audit_actions(store) == ["alarm.raise", "alarm.severity", "alarm.ack", "alarm.clear", "alarm.raise",
                                    "alarm.clear"]
    await ops.stop()
    store.close()


async def test_a_silence_mutes_matching_alarms_until_it_expires(tmp_path, monkeypatch):
    clock = Hands()
    ops, store = make_ops(tmp_path, clock=clock)
    host = await ops.raise_alarm("host.unreachable", "host:cna01", "critical", "cna01 does not answer")
    vm = await ops.raise_alarm("vm.paused", "vm:web1", "minor", "web1 paused")
    s = await ops.silence_add({"type": "host.*", "severity": "crit*"}, 7200, "maintenance of cna01")
    assert s.active and s.expires == clock.t + 7200
    listed = {a.id: a for a in await ops.alarms()}
    assert listed[host.id].silenced_by == s.id and listed[host.id].note == f"silenced by {s.id}"
    assert listed[vm.id].silenced_by is None                   # not its type: still loud
    clock.t += 7200 + 1
    assert all(a.silenced_by is None for a in await ops.alarms())
    assert await ops.silence_list() == [] and (await ops.silence_list(all=True))[0].active is False
    await ops._tick()                                          # the engine's loop notes the expiry
    assert [e.kind for e in await ops.events(limit=2)] == ["silence.expire", "silence.add"]

    s2 = await ops.silence_add({"object": "vm:web*"}, 600, "rebuilding web tier")
    assert {a.id: a.silenced_by for a in await ops.alarms()}[vm.id] == s2.id
    removed = await ops.silence_remove(s2.id)
    assert removed.removed is not None and not removed.active
    with pytest.raises(Refused, match="has been removed"):
        await ops.silence_remove(s2.id)
    with pytest.raises(Refused, match="matches on type, object, severity, not colour"):
        await ops.silence_add({"colour": "red"}, 600, "why")
    with pytest.raises(Refused, match="needs a reason"):
        await ops.silence_add({"type": "x"}, 600, "")
    assert "silence.add" in audit_actions(store) and "silence.remove" in audit_actions(store)
    await ops.stop()
    store.close()


async def test_host_down_suppresses_its_vms_alarms_which_stay_listed(tmp_path):
    ops, store = make_ops(tmp_path)
    store.vm_insert(id="v1", name="db1", kind="vm", host="cna02", state="running", spec={})
    web = await ops.raise_alarm("vm.agent", "vm:web1", "minor", "agent silent", details={"host": "cna01"})
    db = await ops.raise_alarm("vm.agent", "vm:db1", "minor", "agent silent")       # recorded on cna02
    down = await ops.raise_alarm("host.down", "host:cna01", "critical", "cna01 is down")
    listed = {a.id: a for a in await ops.alarms()}
    assert listed[web.id].suppressed_by == "host.down on cna01" and listed[web.id].note == \
        "suppressed by host.down on cna01"
    assert listed[db.id].suppressed_by is None and listed[down.id].suppressed_by is None
    assert len(listed) == 3                                  # suppressed, not hidden
    down2 = await ops.raise_alarm("host.down", "host:cna02", "critical", "cna02 is down")
    assert {a.id: a.suppressed_by for a in await ops.alarms()}[db.id] == "host.down on cna02"
    await ops.resolve("host.down", "host:cna01")
    await ops.resolve("host.down", "host:cna02")
    assert all(a.suppressed_by is None for a in await ops.alarms())
    assert down2.id
    await ops.stop()
    store.close()


def test_two_processes_raising_one_alarm_at_once_make_one_row(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    stores = [Store(path), Store(path)]          # two connections, as two Ferry processes have
    start = threading.Barrier(2)
    errors = []

    def raiser(store: Store) -> None:
        try:
            start.wait()
            for i in range(40):
                al.raise_alarm(store, "task.stuck", "task:7", "major", "task 7 makes no progress", now=time.time())
        except Exception as e:   # noqa: BLE001 - shown by the assertion
            errors.append(e)
    threads = [threading.Thread(target=raiser, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = al.alarms(stores[0], now=time.time(), all=True)
    assert [(a.type, a.object, a.count) for a in rows] == [("task.stuck", "task:7", 80)]
    assert [e.kind for e in al.events(stores[1])] == ["raise"]
    for s in stores:
        s.close()


NOTIFY_SCRIPT = """#!/bin/sh
# A notification command: fails while {fails} exists and counts down, blocks while {hold} exists.
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
touch {started}
while [ -e {hold} ]; do sleep 0.02; done
if [ -s {fails} ]; then k=$(cat {fails}); if [ "$k" -gt 0 ]; then echo $((k - 1)) > {fails}; echo "pager down" >&2; exit 3; fi; fi
cat >> {out}
echo " $FERRY_ALARM_SEVERITY $FERRY_ALARM_TYPE $FERRY_ALARM_OBJECT" >> {out}
"""


def notify_script(tmp_path: Path) -> SimpleNamespace:
    f = SimpleNamespace(**{k: tmp_path / k for k in ("count", "started", "hold", "fails", "out")})
    script = tmp_path / "page.sh"
    script.write_text(NOTIFY_SCRIPT.format(**vars(f)))
    script.chmod(0o755)
    f.script = script
    return f


async def test_new_critical_and_major_alarms_run_the_notify_command_retried_and_never_blocking(tmp_path):
    f = notify_script(tmp_path)
    sleeps: list = []
    ops, store = make_ops(tmp_path, NotifySettings(command=(str(f.script),), retries=3, backoff_s=1.5), sleeps=sleeps)

    # A minor alarm is not notified; a critical one is, once: a repeat is no news.
    await ops.raise_alarm("vm.paused", "vm:web1", "minor", "web1 paused")
    a = await ops.raise_alarm("host.down", "host:cna01", "critical", "cna01 is down")
    await ops.raise_alarm("host.down", "host:cna01", "critical", "cna01 is still down")
    await ops.notifier.wait()
    lines = f.out.read_text().splitlines()
    assert lines[-1] == " critical host.down host:cna01" and len(lines) == 2
    assert json.loads(lines[0])["alarm"]["id"] == a.id and json.loads(lines[0])["site"] == "lab"

    # The pager fails twice: retried with backoff, told the third time.
    f.fails.write_text("2")
    b = await ops.raise_alarm("datastore.missing", "datastore:ds2", "major", "ds2 is not mounted")
    await ops.notifier.wait()
    assert f.out.read_text().splitlines()[-1] == " major datastore.missing datastore:ds2"
    assert sleeps == [1.5, 3.0] and f.count.read_text().strip() == "4"
    said = [e.text for e in await ops.events(limit=20) if e.alarm_id == b.id and e.kind.startswith("notify")]
    assert said == [f"command {f.script} told (attempt 3)"]

    # It never holds up the raise: the command is still running when the raise has returned.
    f.hold.touch()
    t0 = time.monotonic()
    c = await ops.raise_alarm("host.down", "host:cna09", "critical", "cna09 is down")
    assert time.monotonic() - t0 < 2 and c.state == "active"
    await until(lambda: f.count.read_text().strip() == "5", what="the command to start")
    assert not any("host:cna09" in ln for ln in f.out.read_text().splitlines())
    f.hold.unlink()
    await ops.notifier.wait()
    assert f.out.read_text().splitlines()[-1] == " critical host.down host:cna09"

    # Past its retries: logged and said as an event, and the alarm is there all the same.
    f.fails.write_text("9")
    d = await ops.raise_alarm("host.down", "host:cna10", "critical", "cna10 is down")
    await ops.notifier.wait()
    failed = [e.text for e in await ops.events(limit=5) if e.alarm_id == d.id and e.kind == "notify.failed"]
    assert failed == [f"command {f.script} failed 4 time(s); last: {f.script} exited with status 3: pager down"]
    assert (await ops.alarm(d.id)).state == "active"
    await ops.stop()
    store.close()


async def test_a_silenced_or_suppressed_alarm_is_not_notified_and_a_webhook_is(tmp_path):
    got: list = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ops, store = make_ops(tmp_path, NotifySettings(webhook=f"http://127.0.0.1:{server.server_port}/hook"))
        await ops.silence_add({"object": "host:cna01"}, 3600, "planned reboot")
        await ops.raise_alarm("host.down", "host:cna01", "critical", "cna01 is down")         # silenced
        await ops.raise_alarm("vm.down", "vm:web1", "critical", "web1 is down", details={"host": "cna01"})  # suppressed
        await ops.raise_alarm("host.down", "host:cna02", "major", "cna02 is down")
        await ops.notifier.wait()
        assert [(g["alarm"]["object"], g["alarm"]["severity"]) for g in got] == [("host:cna02", "major")]
        await ops.stop()
        store.close()
    finally:
        server.shutdown()


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "config.toml").write_text(dump_config(lab_document(root)))
    return root


def test_ferry_alarms_ack_clear_silence_and_events_on_the_engine(ws):
    # The alarms come from another process's connection to the store (a check, say): the engine lists them.
    store = Store(ws / "state.db")
    now = time.time()
    crit, _ = al.raise_alarm(store, "host.down", "host:lab1", "critical", "lab1 is down", now=now)
    vm, _ = al.raise_alarm(store, "vm.agent", "vm:web1", "minor", "web1's agent is silent", now=now,
                           details={"host": "lab1"})
    al.raise_alarm(store, "vm.agent", "vm:web1", "minor", "web1's agent is silent", now=now + 1,
                   details={"host": "lab1"})
    store.close()

    r = ferry(ws, "alarms", "--json")
    assert r.code == 0, r.err
    assert [(a["id"], a["severity"], a["count"], a["suppressed_by"]) for a in r.json] == [
        (crit.id, "critical", 1, None), (vm.id, "minor", 2, "host.down on lab1")]
    table = ferry(ws, "alarms").out.splitlines()
    assert table[0].split() == ["ID", "SEVERITY", "STATE", "TYPE", "OBJECT", "COUNT", "LAST-SEEN", "SUMMARY", "NOTE"]
    assert "✖ CRIT" in table[1] and "host:lab1" in table[1]
    assert "● MIN" in table[2] and table[2].rstrip().endswith("suppressed by host.down on lab1")

    r = ferry(ws, "alarm", "ack", str(crit.id), "--comment", "on it", "--json")
    assert r.code == 0, r.err
    assert r.json["state"] == "acknowledged" and r.json["ack_comment"] == "on it"
    r = ferry(ws, "alarm", "clear", str(vm.id), "--reason", "agent restarted")
    assert r.code == 0 and r.out.strip().startswith(f"alarm {vm.id} (vm.agent on vm:web1) cleared by ")
    assert [a["id"] for a in ferry(ws, "alarms", "--json").json] == [crit.id]
    assert [a["id"] for a in ferry(ws, "alarms", "--all", "--json").json] == [crit.id, vm.id]

    bad = ferry(ws, "alarm", "ack", "999")
    assert bad.code == 1 and bad.err.strip() == "ferry: no alarm 999 (hint: ferry alarms --all lists them)"
    bad = ferry(ws, "alarm", "clear", str(vm.id), "--reason", "again")
    assert bad.code == 1 and len(bad.err.splitlines()) == 1 and "is cleared" in bad.err and "hint:" in bad.err

    r = ferry(ws, "silence", "add", "--match", "type=host.*", "--for", "2h", "--reason", "maintenance", "--json")
    assert r.code == 0, r.err
    sid = r.json["id"]
    assert r.json["matchers"] == {"type": "host.*"} and 7190 < r.json["expires"] - time.time() <= 7200
    assert ferry(ws, "alarms", "--json").json[0]["silenced_by"] == sid
    listed = ferry(ws, "silence", "list")
    assert listed.out.splitlines()[0].split() == ["ID", "MATCHERS", "EXPIRES", "BY", "REASON", "STATE"]
    assert "type=host.*" in listed.out and "maintenance" in listed.out
    bad = ferry(ws, "silence", "add", "--match", "colour=red", "--for", "2h", "--reason", "x")
    assert bad.code == 2 and "is not KEY=PATTERN" in bad.err
    bad = ferry(ws, "silence", "add", "--match", "type=x", "--for", "soon", "--reason", "x")
    assert bad.code == 2 and "is not a duration" in bad.err
    r = ferry(ws, "silence", "remove", str(sid))
    assert r.code == 0 and r.out.strip() == f"silence {sid} (type=host.*) removed"
    assert ferry(ws, "silence", "list", "--json").json == []
    assert ferry(ws, "alarms", "--json").json[0]["silenced_by"] is None

    ev = ferry(ws, "events", "--json").json
    assert [e["kind"] for e in reversed(ev)] == ["raise", "raise", "ack", "clear", "silence.add", "silence.remove"]
    audit = ferry(ws, "audit", "--json").json
    assert {"alarm.ack", "alarm.clear", "silence.add", "silence.remove"} <= {a["action"] for a in audit}


def test_notify_settings_in_config_toml(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    path = root / "config.toml"
    path.write_text(dump_config({**lab_document(root), "notify": {"command": ["/bin/true"], "webhook": "ftp://x",
                                                                  "backoff": 0.5}}))
    r = ferry(root, "config", "check")
    assert r.code == 2
    line = path.read_text().splitlines().index('webhook = "ftp://x"') + 1
    assert r.err.splitlines() == [f"{path}:{line}: "
                                  "notify.webhook: is not an http(s) URL: 'ftp://x' "
                                  "(hint: for example: webhook = \"https://hooks.example/ferry\")"]
