"""Alarms and events: an alarm is the state of (type, object), as RFC 8632 and Alertmanager have it.

    raise ─> active ─> acknowledged (who, when, comment) ─> cleared ─> history
                  └───────────────────────────────────────┘ (resolved: the condition went away; or by
                                                              hand, with a reason)

A repeat raise of an open alarm bumps its count and last_seen (a severity change is said as an event);
a raise after a clear opens a new alarm. Every raise, severity change, ack, clear and silence is an
event and an audit row, written in the same transaction as the change, and every check-then-act is one
store transaction: two Ferry processes raising the same alarm at once make one row.

Silences (matchers on type/object/severity, exact or glob; an expiry; who and why) mute matching
alarms: they are still recorded and listed, marked silenced, and not notified. Inhibition as
Alertmanager's: an open host.down alarm on host:H suppresses the alarms of the VMs on H (object vm:NAME,
the VM recorded on H, or details.host = H), listed as "suppressed by host.down on H", never hidden.
Both are facts of reading time: a silence added later silences an alarm raised before.
"""

from __future__ import annotations

import fnmatch
import json
import sqlite3
from typing import Any

from ..errors import PermanentError, Refused
from ..store import audit_in
from .model import AlarmInfo, AlarmState, EventInfo, NOTIFIED, Severity, SilenceInfo

ENGINE = "engine"             # the actor of what the engine does by itself (a raise, a clear on resolve)
MATCH_KEYS = ("type", "object", "severity")
INHIBITOR = "host.down"       # an open alarm of this type on host:H suppresses the alarms of H's VMs
HISTORY_KEPT = 500            # cleared alarms listed by alarms(all=True)


def _sev(value: str) -> Severity:
    try:
        return Severity(value)
    except ValueError:
        raise PermanentError(f"unknown severity {value!r}", "one of: " + ", ".join(Severity)) from None


def _event(db: sqlite3.Connection, now: float, kind: str, actor: str, text: str, *, alarm: dict | None = None) -> None:
    db.execute("INSERT INTO events(ts, kind, actor, text, alarm_id, type, object, severity) VALUES(?,?,?,?,?,?,?,?)",
               (now, kind, actor, text, alarm and alarm["id"], alarm and alarm["type"], alarm and alarm["object"],
                alarm and alarm["severity"]))


def _row(db: sqlite3.Connection, alarm_id: int) -> dict | None:
    r = db.execute("SELECT * FROM alarms WHERE id=?", (alarm_id,)).fetchone()
    return None if r is None else dict(r)


# ------------------------------------------------------------------------------ read-time facts

def _matches(matchers: dict[str, str], alarm: dict) -> bool:
    return all(fnmatch.fnmatchcase(str(alarm.get(k) or ""), pattern) for k, pattern in matchers.items())


def _active_silences(db: sqlite3.Connection, now: float) -> list[tuple[int, dict]]:
    return [(r["id"], json.loads(r["matchers"])) for r in
            db.execute("SELECT id, matchers FROM silences WHERE removed IS NULL AND expires > ? ORDER BY id", (now,))]


def _silence_of(silences: list[tuple[int, dict]], alarm: dict) -> int | None:
    return next((sid for sid, m in silences if _matches(m, alarm)), None)


def _host_of(db: sqlite3.Connection, alarm: dict) -> str | None:
    """The host whose being down suppresses this alarm: its details' host, else the VM's recorded host."""
    details = alarm["details"] if isinstance(alarm["details"], dict) else json.loads(alarm["details"] or "{}")
    if isinstance(details.get("host"), str):
        return details["host"]
    if alarm["object"].startswith("vm:"):
        r = db.execute("SELECT host FROM vms WHERE name=? AND recycled IS NULL", (alarm["object"][3:],)).fetchone()
        return r["host"] if r else None
    return None


def _suppressor(db: sqlite3.Connection, down: set[str], alarm: dict) -> str | None:
    if alarm["type"] == INHIBITOR or alarm["state"] == AlarmState.CLEARED or not down:
        return None
    host = _host_of(db, alarm)
    return f"{INHIBITOR} on {host}" if host in down else None


def _down_hosts(db: sqlite3.Connection) -> set[str]:
    return {r["object"][5:] for r in db.execute("SELECT object FROM alarms WHERE type=? AND state != 'cleared' "
                                                "AND object LIKE 'host:%'", (INHIBITOR,))}


def _info(db: sqlite3.Connection, r: dict, silences: list[tuple[int, dict]], down: set[str]) -> AlarmInfo:
    details = json.loads(r["details"] or "{}") if isinstance(r["details"], str) else r["details"]
    open_ = r["state"] != AlarmState.CLEARED
    return AlarmInfo(id=r["id"], type=r["type"], object=r["object"], severity=Severity(r["severity"]),
                     state=AlarmState(r["state"]), summary=r["summary"], count=r["count"], first_seen=r["first_seen"],
                     last_seen=r["last_seen"], details=details, source=r["source"], acked_by=r["acked_by"],
                     acked_at=r["acked_at"], ack_comment=r["ack_comment"], cleared_at=r["cleared_at"],
                     cleared_by=r["cleared_by"], clear_reason=r["clear_reason"],
                     silenced_by=_silence_of(silences, r) if open_ else None,
                     suppressed_by=_suppressor(db, down, r) if open_ else None)


# ------------------------------------------------------------------------------ changes (one transaction each)

def raise_alarm(store, type: str, object: str, severity: str, summary: str, *, now: float,
                details: dict | None = None, source: str = "", actor: str = ENGINE) -> tuple[AlarmInfo, bool]:
    """Raise (type, object): a new alarm, or the open one's count and last_seen bumped (severity and
    summary brought up to date). (The alarm, whether it should be notified: new, or risen to critical or
    major, and neither silenced nor suppressed.)"""
    sev = _sev(severity)
    if not type.strip() or not object.strip():
        raise PermanentError("an alarm needs a type and an object", "e.g. type host.down, object host:cna01")

    def tx(db: sqlite3.Connection) -> tuple[AlarmInfo, bool]:
        r = db.execute("SELECT * FROM alarms WHERE type=? AND object=? AND state != 'cleared'", (type, object)).fetchone()
        if r is None:
            cur = db.execute("INSERT INTO alarms(type, object, severity, state, summary, details, source, count, "
                             "first_seen, last_seen) VALUES(?,?,?,?,?,?,?,1,?,?)",
                             (type, object, sev, AlarmState.ACTIVE, summary, json.dumps(details or {}), source, now, now))
            row = _row(db, cur.lastrowid)
            _event(db, now, "raise", actor, f"{sev}: {summary}", alarm=row)
            audit_in(db, "alarm.raise", f"{type} {object}", {"id": row["id"], "severity": sev, "summary": summary},
                     "ok", actor)
            notify = True
        else:
            row = dict(r)
            was = Severity(row["severity"])
            db.execute("UPDATE alarms SET count=count+1, last_seen=?, severity=?, summary=?, details=? WHERE id=?",
                       (now, sev, summary, json.dumps(details if details is not None else json.loads(row["details"])),
                        row["id"]))
            notify = False
            if was != sev:
                _event(db, now, "severity", actor, f"{was} -> {sev}: {summary}", alarm={**row, "severity": sev})
                audit_in(db, "alarm.severity", f"{type} {object}", {"id": row["id"], "from": was, "to": sev}, "ok",
                         actor)
                notify = sev.rank < was.rank
            row = _row(db, row["id"])
        info = _info(db, row, _active_silences(db, now), _down_hosts(db))
        return info, notify and sev in NOTIFIED and info.silenced_by is None and info.suppressed_by is None
    return store.transaction(tx)


def resolve(store, type: str, object: str, *, now: float, text: str = "", actor: str = ENGINE) -> AlarmInfo | None:
    """The condition of (type, object) went away: its open alarm cleared (None when none is open)."""
    def tx(db: sqlite3.Connection) -> AlarmInfo | None:
        r = db.execute("SELECT * FROM alarms WHERE type=? AND object=? AND state != 'cleared'", (type, object)).fetchone()
        if r is None:
            return None
        return _clear(db, dict(r), now, actor, text or "the condition resolved", by_hand=False)
    return store.transaction(tx)


def _clear(db: sqlite3.Connection, row: dict, now: float, actor: str, reason: str, *, by_hand: bool) -> AlarmInfo:
    db.execute("UPDATE alarms SET state=?, cleared_at=?, cleared_by=?, clear_reason=? WHERE id=?",
               (AlarmState.CLEARED, now, actor, reason, row["id"]))
    _event(db, now, "clear", actor, ("cleared by hand: " if by_hand else "cleared: ") + reason, alarm=row)
    audit_in(db, "alarm.clear", f"alarm {row['id']}", {"type": row["type"], "object": row["object"],
                                                        "reason": reason, "by_hand": by_hand}, "ok", actor)
    return _info(db, _row(db, row["id"]), [], set())


def _open(db: sqlite3.Connection, alarm_id: int, doing: str) -> dict:
    row = _row(db, alarm_id)
    if row is None:
        raise PermanentError(f"no alarm {alarm_id}", "ferry alarms --all lists them")
    if row["state"] == AlarmState.CLEARED:
        raise Refused(f"alarm {alarm_id} ({row['type']} on {row['object']}) is cleared: it cannot be {doing}",
                      "ferry alarms lists the open ones")
    return row


def ack(store, alarm_id: int, *, who: str, comment: str = "", now: float) -> AlarmInfo:
    """Acknowledge an open alarm: someone is on it (who, when, comment)."""
    def tx(db: sqlite3.Connection) -> AlarmInfo:
        row = _open(db, alarm_id, "acknowledged")
        db.execute("UPDATE alarms SET state=?, acked_by=?, acked_at=?, ack_comment=? WHERE id=?",
                   (AlarmState.ACKNOWLEDGED, who, now, comment or None, alarm_id))
        _event(db, now, "ack", who, "acknowledged" + (f": {comment}" if comment else ""), alarm=row)
        audit_in(db, "alarm.ack", f"alarm {alarm_id}", {"type": row["type"], "object": row["object"],
                                                       "comment": comment}, "ok", who)
        return _info(db, _row(db, alarm_id), _active_silences(db, now), _down_hosts(db))
    return store.transaction(tx)


def clear(store, alarm_id: int, *, who: str, reason: str, now: float) -> AlarmInfo:
    """Clear an open alarm by hand, with a reason: it goes to history."""
    if not reason.strip():
        raise Refused(f"clearing alarm {alarm_id} by hand needs a reason", f"ferry alarm clear {alarm_id} --reason TEXT")

    def tx(db: sqlite3.Connection) -> AlarmInfo:
        return _clear(db, _open(db, alarm_id, "cleared"), now, who, reason.strip(), by_hand=True)
    return store.transaction(tx)


def silence_add(store, matchers: dict[str, str], *, expires: float, who: str, reason: str, now: float) -> SilenceInfo:
    """Silence alarms matching every matcher (type, object, severity: exact or glob) until `expires`."""
    bad = [k for k in matchers if k not in MATCH_KEYS]
    if bad or not matchers:
        raise Refused(f"a silence matches on {', '.join(MATCH_KEYS)}" + (f", not {', '.join(bad)}" if bad else ""),
                      "e.g. --match type=host.* --match object=host:cna01")
    if any(not str(v).strip() for v in matchers.values()):
        raise Refused("a silence's matcher needs a value", "e.g. --match type=host.*")
    if "severity" in matchers and not any(fnmatch.fnmatchcase(s, matchers["severity"]) for s in Severity):
        raise Refused(f"severity {matchers['severity']!r} matches no severity", "one of: " + ", ".join(Severity))
    if not reason.strip():
        raise Refused("a silence needs a reason", "--reason 'maintenance of cna01'")
    if expires <= now:
        raise Refused("a silence must last a while", "e.g. --for 2h")

    def tx(db: sqlite3.Connection) -> SilenceInfo:
        cur = db.execute("INSERT INTO silences(matchers, created, expires, created_by, reason) VALUES(?,?,?,?,?)",
                         (json.dumps(matchers, sort_keys=True), now, expires, who, reason.strip()))
        sid = int(cur.lastrowid)
        said = " ".join(f"{k}={v}" for k, v in sorted(matchers.items()))
        _event(db, now, "silence.add", who, f"silence {sid} ({said}) until {_clock(expires)}: {reason.strip()}")
        audit_in(db, "silence.add", f"silence {sid}", {"matchers": matchers, "expires": expires,
                                                        "reason": reason.strip()}, "ok", who)
        return _silence(db.execute("SELECT * FROM silences WHERE id=?", (sid,)).fetchone(), now)
    return store.transaction(tx)


def silence_remove(store, silence_id: int, *, who: str, now: float) -> SilenceInfo:
    def tx(db: sqlite3.Connection) -> SilenceInfo:
        r = db.execute("SELECT * FROM silences WHERE id=?", (silence_id,)).fetchone()
        if r is None:
            raise PermanentError(f"no silence {silence_id}", "ferry silence list shows them")
        if r["removed"] is not None or r["expires"] <= now:
            raise Refused(f"silence {silence_id} has " + ("been removed" if r["removed"] is not None else "expired"),
                          "ferry silence list shows the active ones")
        db.execute("UPDATE silences SET removed=?, removed_by=? WHERE id=?", (now, who, silence_id))
        _event(db, now, "silence.remove", who, f"silence {silence_id} removed")
        audit_in(db, "silence.remove", f"silence {silence_id}", {"matchers": json.loads(r["matchers"])}, "ok", who)
        return _silence(db.execute("SELECT * FROM silences WHERE id=?", (silence_id,)).fetchone(), now)
    return store.transaction(tx)


def sweep(store, *, now: float) -> int:
    """Silences that expired since the last sweep, said as events (the engine's loop calls it)."""
    def tx(db: sqlite3.Connection) -> int:
        rows = db.execute("SELECT id FROM silences WHERE removed IS NULL AND expires <= ? AND expiry_noted=0",
                          (now,)).fetchall()
        for r in rows:
            db.execute("UPDATE silences SET expiry_noted=1 WHERE id=?", (r["id"],))
            _event(db, now, "silence.expire", ENGINE, f"silence {r['id']} expired")
        return len(rows)
    return store.transaction(tx)


# ------------------------------------------------------------------------------ reads

def alarms(store, *, now: float, all: bool = False, limit: int = HISTORY_KEPT) -> list[AlarmInfo]:
    """Open alarms, by severity then newest; all=True: cleared ones too (history, newest first, after)."""
    def read(db: sqlite3.Connection) -> list[AlarmInfo]:
        silences, down = _active_silences(db, now), _down_hosts(db)
        rows = [dict(r) for r in db.execute("SELECT * FROM alarms WHERE state != 'cleared'")]
        out = sorted((_info(db, r, silences, down) for r in rows), key=lambda a: (a.severity.rank, -a.last_seen))
        if all:
            out += [_info(db, dict(r), silences, down) for r in
                    db.execute("SELECT * FROM alarms WHERE state='cleared' ORDER BY cleared_at DESC, id DESC LIMIT ?",
                               (limit,))]
        return out
    return store.read(read)


def alarm(store, alarm_id: int, *, now: float) -> AlarmInfo:
    def read(db: sqlite3.Connection) -> AlarmInfo:
        row = _row(db, alarm_id)
        if row is None:
            raise PermanentError(f"no alarm {alarm_id}", "ferry alarms --all lists them")
        return _info(db, row, _active_silences(db, now), _down_hosts(db))
    return store.read(read)


def _silence(r: sqlite3.Row, now: float) -> SilenceInfo:
    return SilenceInfo(id=r["id"], matchers=json.loads(r["matchers"]), created=r["created"], expires=r["expires"],
                       created_by=r["created_by"], reason=r["reason"],
                       active=r["removed"] is None and r["expires"] > now, removed=r["removed"],
                       removed_by=r["removed_by"])


def silences(store, *, now: float, all: bool = False) -> list[SilenceInfo]:
    """Active silences, soonest to expire first; all=True: expired and removed ones too (the last 100)."""
    def read(db: sqlite3.Connection) -> list[SilenceInfo]:
        out = [_silence(r, now) for r in db.execute(
            "SELECT * FROM silences WHERE removed IS NULL AND expires > ? ORDER BY expires, id", (now,))]
        if all:
            out += [_silence(r, now) for r in db.execute(
                "SELECT * FROM silences WHERE removed IS NOT NULL OR expires <= ? ORDER BY id DESC LIMIT 100", (now,))]
        return out
    return store.read(read)


def events(store, *, limit: int = 100, alarm_id: int | None = None) -> list[EventInfo]:
    """The newest events (of one alarm), newest first."""
    def read(db: sqlite3.Connection) -> list[EventInfo]:
        where, args = ("WHERE alarm_id=?", (alarm_id,)) if alarm_id is not None else ("", ())
        return [EventInfo(id=r["id"], ts=r["ts"], kind=r["kind"], actor=r["actor"], text=r["text"],
                          alarm_id=r["alarm_id"], type=r["type"], object=r["object"], severity=r["severity"])
                for r in db.execute(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", (*args, limit))]
    return store.read(read)


def event(store, kind: str, text: str, *, now: float, actor: str = ENGINE, alarm: AlarmInfo | None = None) -> None:
    """An event of the ops layer itself (a notification that failed, say)."""
    a: dict[str, Any] | None = None if alarm is None else {"id": alarm.id, "type": alarm.type,
                                                           "object": alarm.object, "severity": alarm.severity}
    store.transaction(lambda db: _event(db, now, kind, actor, text, alarm=a))


def _clock(ts: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))

