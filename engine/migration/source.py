"""The source's side of a cutover (E8): its services, its address, and the go-live timer that brings
it back by itself ("commit confirmed"). A library the cutover task calls; each call takes a Transport
to the source (service.source_transport, or park_transport once the source is parked).

What lives on the source, in SOURCE_DIR/<migration>/ (root, 0700):
- services.active  the plan's services that were active when the first stop came (one a line); written
                   once, before anything is stopped, so a stop again after a kill knows what to start;
- park.env         the network as it was (interface, service address, park address, promote_secondaries,
                   routes through a gateway on that interface), written once before the source moves;
- park.sh          moves the source to its park address; restore.sh  puts everything back (below);
- golive.deadline  when the armed timer fires (the source's clock); golive.pid  the timer without systemd;
- parked, restored "EPOCH FAILURES" once park.sh / restore.sh ran (restoring: restore.sh started);
                   park.log, restore.log their output.

Phases, and what a kill -9 of Ferry anywhere leaves:
1. stop_services: the active ones recorded (once), then stopped in the plan's order. Again: the record
   stands, the ones still running are stopped.
2. arm: restore.sh written, then `systemd-run --unit ferry-golive-<name> --on-active=N` runs it (without
   systemd: a setsid'd `sleep N` with a pid file). Arming again replaces the timer. From here on the
   source comes back by itself unless disarm comes first: a dead Ferry cannot strand it.
3. park: park.env recorded (once), then park.sh runs DETACHED on the source two seconds later (it takes
   away the address this SSH connection uses): the park address added, promote_secondaries=1 (else
   the kernel deletes a secondary address of the subnet with the primary one), the service address
   removed, the gateway routes put back from the park address. Ferry then reconnects at the park address
   with the source's pinned host key. Again: park.sh is idempotent (an address there already is fine).
4. disarm (go-live confirmed): the timer stopped; the source stays parked, its services stopped. A timer
   that fired already is an error: the source is back at its address.
   restore_now (rollback): the timer re-armed to fire in two seconds (detached, for the same reason);
   wait_restored then reads restore.sh's result at the service address.
5. cleanup (finalize): the timer and the folder go; the source stays as it is.
restore.sh: the service address back (if missing), promote_secondaries=1 while the park address goes
(the service address must not go with it), the recorded routes replaced, promote_secondaries as it was,
the recorded services started in reverse order. Each step tolerates what is there already. IPv4 only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import NAME_RE, HostSpec
from ..errors import FerryError, HostKeyError, PermanentError, Refused, TransientError
from ..helpers import detached
from ..transport.base import Transport
from .model import SOURCE_DIR

LAUNCH_DELAY_S = 2          # park.sh and restore_now's restore start this long after the SSH reply left
NOT_ROOT = 97               # the scripts' exit status when not run as root


@dataclass(frozen=True)
class Services:
    """The plan's services on the source: how they are managed, those active before the cutover, and
    what this call changed (stopped, or started)."""
    manager: str                        # "systemd", or "service" (init scripts)
    active: tuple[str, ...]             # active before the first stop (or now, when nothing was stopped)
    changed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """A route through a gateway, as `ip route` shows it."""
    dst: str                            # "default" or a prefix
    gateway: str
    dev: str
    src: str | None = None
    metric: int | None = None
    proto: str | None = None
    onlink: bool = False

    def args(self, src: str | None = None) -> str:
        """Its `ip route replace` arguments (with `src` instead of its own when given)."""
        a = [self.dst, "via", self.gateway, "dev", self.dev]
        if self.proto:
            a += ["proto", self.proto]
        if src or self.src:
            a += ["src", src or self.src or ""]
        if self.metric is not None:
            a += ["metric", str(self.metric)]
        if self.onlink:
            a.append("onlink")
        return " ".join(a)


@dataclass(frozen=True)
class NetFacts:
    """The interface that carries an address of the source, and what depends on it."""
    interface: str
    address: str                        # without its prefix
    prefix: int
    routes: tuple[Route, ...]           # through a gateway on the interface (the default route(s) first)
    promote_secondaries: int
    lease_s: int | None = None          # the address's valid lifetime when it is not permanent (a DHCP lease)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class Parked:
    """A source moved off its service address (as recorded on the source before it moved)."""
    interface: str
    address: str                        # the service address, CIDR
    park: str                           # the park address, CIDR
    routes: tuple[Route, ...]           # as they were
    promote_secondaries: int            # as it was


@dataclass(frozen=True)
class Restored:
    """restore.sh ran: when (the source's clock) and how many of its steps failed."""
    at: int
    failures: int
    log: str = ""


# ------------------------------------------------------------------ running scripts on the source

def folder(name: str) -> str:
    """SOURCE_DIR/<name> (a migration name: no path tricks)."""
    if not NAME_RE.match(name):
        raise PermanentError(f"{name!r} is no migration name", "names are letters, digits, '.', '_' and '-'")
    return f"{SOURCE_DIR}/{name}"


def unit(name: str) -> str:
    return f"ferry-golive-{name}"


def _who(t: Transport, name: str) -> str:
    return f"the source of {name} ({t.host})"


def _prologue(name: str) -> str:
    return (f"set -u\n[ \"$(id -u)\" = 0 ] || {{ echo \"logged in as $(id -un), not root\" >&2; exit {NOT_ROOT}; }}\n"
            f"D={shlex.quote(folder(name))}\nU={shlex.quote(unit(name))}\n"
            "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then M=systemd; "
            "else M=service; fi\n" + _STOP_SLEEP)


# The go-live timer without systemd: its sleep's process group, when the pid file names it (dash's kill
# takes no "--"). True when it was stopped.
_STOP_SLEEP = """stop_sleep() {
    [ -f "$D/golive.pid" ] || return 1
    p=$(cat "$D/golive.pid"); rm -f "$D/golive.pid"
    grep -q "$U" "/proc/$p/cmdline" 2>/dev/null && kill -TERM "-$p" 2>/dev/null
}
"""


async def _sh(t: Transport, name: str, what: str, body: str, *, timeout: float = 120) -> str:
    """Runs `body` (after the prologue: root checked, D, U and M set) as root on the source; its stdout.
    Every failure a FerryError naming the source, what was asked, and a hint."""
    who = _who(t, name)
    try:
        r = await t.sh(_prologue(name) + body, timeout=timeout)
    except HostKeyError:
        raise
    except FerryError as e:
        cls = TransientError if isinstance(e, TransientError) else PermanentError
        raise cls(f"{who}: {what}: {e.message}", e.hint or "is the source up and its sshd reachable?") from None
    if r.exit_status == NOT_ROOT:
        raise PermanentError(f"{who}: {what}: {r.stderr.decode(errors='replace').strip()}",
                             f"the cutover needs root on the source: user = \"root\" in [migrations.{name}.source]")
    if r.exit_status != 0:
        lines = r.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {r.exit_status}"]
        raise PermanentError(f"{who}: {what} failed: {lines[-1]}",
                             f"look at the source ({folder(name)} holds Ferry's files there)")
    return r.stdout.decode(errors="replace")


def _lines(out: str, tag: str) -> tuple[str, ...]:
    return tuple(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(tag + " "))


# ------------------------------------------------------------------ services

_SERVICE_FUNCS = """
is_active() { if [ $M = systemd ]; then systemctl is-active --quiet "$1"; else service "$1" status >/dev/null 2>&1; fi; }
svc() { if [ $M = systemd ]; then systemctl "$1" "$2"; else service "$2" "$1"; fi; }
"""


def _words(services: Sequence[str]) -> str:
    return " ".join(shlex.quote(s) for s in services)


async def active_services(t: Transport, name: str, services: Sequence[str]) -> Services:
    """Which of `services` run on the source now (systemctl is-active; `service NAME status` without
    systemd)."""
    out = await _sh(t, name, "asking which services run", _SERVICE_FUNCS + f"""
echo "manager $M"
for s in {_words(services) or '""'}; do [ -n "$s" ] && is_active "$s" && echo "active $s"; done
exit 0
""")
    return Services(_lines(out, "manager")[0], _lines(out, "active"))


async def stop_services(t: Transport, name: str, services: Sequence[str]) -> Services:
    """Stops those of `services` that run, in their order; the ones active before the first stop are
    recorded on the source first (once: a stop again after a kill still knows them)."""
    out = await _sh(t, name, "stopping the services", _SERVICE_FUNCS + f"""
mkdir -p "$D" && chmod 0700 "$D" || exit 1
if [ ! -f "$D/services.active" ]; then
    : > "$D/.services.tmp" || exit 1
    for s in {_words(services) or '""'}; do [ -n "$s" ] && is_active "$s" && echo "$s" >> "$D/.services.tmp"; done
    sync "$D/.services.tmp" 2>/dev/null || sync
    mv -f "$D/.services.tmp" "$D/services.active" || exit 1
fi
echo "manager $M"
while read -r s; do echo "active $s"; done < "$D/services.active"
for s in {_words(services) or '""'}; do
    [ -n "$s" ] && is_active "$s" || continue
    svc stop "$s" >&2 || {{ echo "cannot stop $s" >&2; exit 3; }}
    echo "changed $s"
done
""")
    return Services(_lines(out, "manager")[0], _lines(out, "active"), _lines(out, "changed"))


async def start_services(t: Transport, name: str) -> Services:
    """Starts the services recorded as active (stop_services), in reverse order; those running
    already are left alone."""
    out = await _sh(t, name, "starting the services", _SERVICE_FUNCS + """
echo "manager $M"
[ -f "$D/services.active" ] || exit 0
while read -r s; do echo "active $s"; done < "$D/services.active"
bad=""
while read -r s; do
    [ -n "$s" ] || continue
    is_active "$s" && continue
    if svc start "$s" >&2; then echo "changed $s"; else bad="$bad $s"; fi
done <<EOF
$(sed -n '1!G;h;$p' "$D/services.active")
EOF
[ -z "$bad" ] || { echo "could not start:$bad" >&2; exit 3; }
""")
    return Services(_lines(out, "manager")[0], _lines(out, "active"), _lines(out, "changed"))


# ------------------------------------------------------------------ network facts

_FACTS = """
if ip -j -4 addr show >/dev/null 2>&1; then
    echo json; ip -j -4 addr show; echo; echo @@; ip -j -4 route show table main; echo
else
    echo text; ip -o -4 addr show; echo @@; ip -4 route show table main
fi
echo @@
for f in /proc/sys/net/ipv4/conf/*/promote_secondaries; do
    i=${f%/promote_secondaries}; echo "${i##*/} $(cat "$f")"
done
"""


FOREVER = 0xFFFFFFFF        # iproute2's valid_lft of a permanent address


def _parse_facts(out: str, address: str) -> tuple[str, int, list[dict[str, Any]], dict[str, int], int | None] | None:
    """(interface, prefix, routes as dicts, promote_secondaries by interface, the address's lease in s
    or None when permanent) from _FACTS' output; None when no interface carries `address`."""
    kind, _, rest = out.partition("\n")
    addrs, routes, promote = (rest.split("@@\n") + ["", "", ""])[:3]
    found: tuple[str, int] | None = None
    lease: int | None = None
    if kind == "json":
        for link in json.loads(addrs or "[]"):
            for a in link.get("addr_info", ()):
                if a.get("local") == address:
                    found = (link["ifname"], int(a["prefixlen"]))
                    valid = a.get("valid_life_time", FOREVER)
                    lease = int(valid) if a.get("dynamic") or valid != FOREVER else None
        rows = json.loads(routes or "[]")
    else:
        for line in addrs.splitlines():
            f = line.split()
            if len(f) >= 4 and f[2] == "inet" and f[3].split("/")[0] == address:
                found = (f[1].rstrip(":").split("@")[0], int(f[3].split("/")[1]))
                valid = f[f.index("valid_lft") + 1].removesuffix("sec") if "valid_lft" in f[:-1] else "forever"
                lease = int(valid) if valid.isdigit() else (0 if "dynamic" in f else None)
        rows = []
        for line in routes.splitlines():
            f = line.split()
            if not f:
                continue
            row: dict[str, Any] = {"dst": f[0], "flags": [w for w in f if w == "onlink"]}
            for key, field in (("via", "gateway"), ("dev", "dev"), ("src", "prefsrc"), ("metric", "metric"),
                               ("proto", "protocol")):
                if key in f[1:-1]:
                    row[field] = f[f.index(key, 1) + 1]
            rows.append(row)
    if found is None:
        return None
    values = {}
    for line in promote.splitlines():
        iface, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[iface] = int(value)
    return found[0], found[1], rows, values, lease


async def network_facts(t: Transport, name: str, address: str) -> NetFacts:
    """The interface carrying `address` on the source, its prefix, its gateway routes (the default
    route(s) first: `ip -j` where the source's ip has it) and its promote_secondaries."""
    ip = _ipv4(t, name, address)
    out = await _sh(t, name, f"reading the network of {ip}", _FACTS)
    parsed = _parse_facts(out, ip)
    if parsed is None:
        raise PermanentError(f"{_who(t, name)}: no interface has the address {ip}",
                             f"check the source's address in [migrations.{name}.source]: `ip addr` on the source")
    iface, prefix, rows, promote, lease = parsed
    routes = [Route(dst=r["dst"], gateway=r["gateway"], dev=r["dev"], src=r.get("prefsrc"),
                    metric=int(r["metric"]) if r.get("metric") is not None else None,
                    proto=r.get("protocol"), onlink="onlink" in (r.get("flags") or ()))
              for r in rows if r.get("gateway") and r.get("dev") == iface]
    routes.sort(key=lambda r: r.dst != "default")
    return NetFacts(iface, ip, prefix, tuple(routes), promote.get(iface, 0), lease)


def _ipv4(t: Transport, name: str, address: str) -> str:
    try:
        ip = ipaddress.ip_interface(address).ip
    except ValueError:
        raise PermanentError(f"{_who(t, name)}: {address!r} is no IP address",
                             f"check [migrations.{name}] in the plan") from None
    if ip.version != 4:
        raise Refused(f"{_who(t, name)}: {address} is IPv6: a cutover moves IPv4 addresses only",
                      "give the source's IPv4 address")
    return str(ip)


# ------------------------------------------------------------------ the scripts on the source

# The head of park.sh and restore.sh: `move FROM TO ROUTES` moves the interface's address FROM to TO.
_HEAD = """#!/bin/sh
# Ferry, the cutover of migration {name}: {what}.
# Safe to run again: each step tolerates what is there already.
set -u
D={folder}
exec >>"$D/{log}.log" 2>&1
echo "{log} $(date -u +%FT%TZ)"
fail=0
step() {{ "$@" || {{ echo "failed: $*"; fail=$((fail + 1)); }}; }}
has() {{ [ -n "$(ip -o -4 addr show dev "$IF" to "${{1%/*}}" 2>/dev/null)" ]; }}
move() {{
    has "$2" || step ip addr add "$2" brd + dev "$IF"
    # else the kernel deletes the secondary addresses of a subnet with its primary: TO with FROM
    echo 1 > "/proc/sys/net/ipv4/conf/$IF/promote_secondaries" || fail=$((fail + 1))
    ! has "$1" || step ip addr del "$1" dev "$IF"
    while read -r r; do [ -z "$r" ] || step ip route replace $r; done <<EOF
$3
EOF
}}
"""

_RESTORE = """: > "$D/restoring"                  # (a disarm from now on comes too late)
rm -f "$D/golive.pid" "$D/golive.deadline"
systemctl stop ferry-park-{name}.timer 2>/dev/null
# the park's guard first (it would take the address off again): its unit, else its process group
systemctl stop ferry-guard-{name}.service 2>/dev/null
g=$(cat "$D/guard.pid" 2>/dev/null) && grep -q guard.sh "/proc/$g/cmdline" 2>/dev/null && kill -KILL "-$g" 2>/dev/null
rm -f "$D/guard.pid"
if [ -f "$D/park.env" ]; then
    . "$D/park.env"
    move "$PARK" "$ADDR" "$ROUTES"
    # neighbours may have learnt the target's MAC for the address meanwhile (iputils' arping, if any)
    arping -q -c 2 -U -I "$IF" "${{ADDR%/*}}" >/dev/null 2>&1 || true
    echo "$PROMOTE" > "/proc/sys/net/ipv4/conf/$IF/promote_secondaries" || fail=$((fail + 1))
fi
if [ -f "$D/services.active" ]; then
    if [ -d /run/systemd/system ]; then M=systemd; else M=service; fi
    while read -r s; do
        [ -n "$s" ] || continue
        if [ $M = systemd ]; then step systemctl start "$s"; else step service "$s" start; fi
    done <<EOF
$(sed -n '1!G;h;$p' "$D/services.active")
EOF
fi
echo "$(date +%s) $fail" > "$D/.restored.tmp" && mv -f "$D/.restored.tmp" "$D/restored"
echo "restored, $fail failed"
"""

_PARK = """. "$D/park.env"
move "$ADDR" "$PARK" "$PARK_ROUTES"
echo "$(date +%s) $fail" > "$D/.parked.tmp" && mv -f "$D/.parked.tmp" "$D/parked"
# the guard keeps the service address off while parked (its own unit: this one's end would stop it)
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
    systemctl is-active --quiet ferry-guard-{name}.service || {{
        systemctl reset-failed ferry-guard-{name}.service 2>/dev/null
        step systemd-run --quiet --unit ferry-guard-{name} --description "Ferry: {name} parked, its address kept off" \
            /bin/sh "$D/guard.sh"; }}
else
    g=$(cat "$D/guard.pid" 2>/dev/null)
    [ -n "$g" ] && grep -q guard.sh "/proc/$g/cmdline" 2>/dev/null || \
        setsid /bin/sh "$D/guard.sh" </dev/null >/dev/null 2>&1 &
fi
echo "parked, $fail failed"
"""

# While the source is parked (until a restore begins, or Ferry's folder goes): whatever puts the service
# address back on its interface (a DHCP client renewing its lease, a network manager reapplying its
# setup), it comes off again within a second, said in the park's log: the target holds that address.
_GUARD = """#!/bin/sh
# Ferry, the cutover of migration {name}: the parked source's service address kept off its interface.
D={folder}
echo $$ > "$D/guard.pid"
. "$D/park.env"
while [ -f "$D/parked" ] && [ ! -e "$D/restoring" ]; do
    if [ -n "$(ip -o -4 addr show dev "$IF" to "${{ADDR%/*}}" 2>/dev/null)" ] && [ ! -e "$D/restoring" ]; then
        ip addr del "$ADDR" dev "$IF" && echo "guard $(date -u +%FT%TZ): $ADDR came back on $IF while parked" \
            "(a DHCP client renewing its lease?): taken off again" >> "$D/park.log"
    fi
    sleep 1
done
"""


def _put(path: str, text: str, mode: str) -> str:
    """Shell lines writing `text` to `path` atomically with `mode`."""
    tag = "FERRY_EOF_7f3a"
    assert tag not in text
    return (f"cat > {path}.tmp <<'{tag}' || exit 1\n{text}{tag}\n"
            f"chmod {mode} {path}.tmp && mv -f {path}.tmp {path} || exit 1\n")


def _scripts(name: str) -> str:
    f = shlex.quote(folder(name))
    restore = _HEAD.format(name=name, folder=f, log="restore", what="the go-live timer's restore, the source\n"
                           "# back as it was (its address, routes, services; the park address gone)")
    restore += _RESTORE.format(name=name)
    park = _HEAD.format(name=name, folder=f, log="park", what="the source moved to its park address,\n"
                        "# its gateway routes kept") + _PARK.format(name=name)
    return (_put('"$D/restore.sh"', restore, "0700")
            + _put('"$D/park.sh"', park, "0700")
            + _put('"$D/guard.sh"', _GUARD.format(name=name, folder=f), "0700"))


def _later(delay: int, script: str) -> str:
    """Shell lines running "$D/<script>" `delay` seconds from now, detached from this SSH session: a
    transient systemd timer `$U` (replacing one armed before: a run it started ends first), else a
    setsid'd sleep whose pid (its process group) is in $D/golive.pid. ($U is the unit's name.)"""
    return f"""
systemctl stop "$U.timer" 2>/dev/null
stop_sleep
i=0
while systemctl is-active --quiet "$U.service" 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
systemctl reset-failed "$U.timer" "$U.service" 2>/dev/null
echo $(( $(date +%s) + {delay} )) > "$D/golive.deadline" || exit 1
if [ $M = systemd ]; then
    systemd-run --quiet --unit "$U" --description "Ferry: $U" --on-active={delay}s \\
        --timer-property=AccuracySec=100ms /bin/sh "$D/{script}" || exit 1
else
    setsid /bin/sh -c 'echo $$ > "$1/golive.pid"; sleep {delay}; rm -f "$1/golive.pid"; exec /bin/sh "$1/{script}"' \\
        "$U" "$D" </dev/null >/dev/null 2>&1 &
    i=0; while [ ! -s "$D/golive.pid" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
fi
"""


# ------------------------------------------------------------------ the go-live timer

async def arm(t: Transport, name: str, seconds: int) -> None:
    """Arms the go-live timer: SOURCE_DIR/<name>/restore.sh runs on the source in `seconds` unless
    disarm comes first (systemd-run --unit ferry-golive-<name>; without systemd a setsid'd sleep).
    Arming again replaces the timer."""
    if seconds < 1:
        raise PermanentError(f"{_who(t, name)}: a go-live timer of {seconds} s", "give it at least a second")
    with detached():        # the timer outlives the task (its sleep, without systemd, is not the task's helper)
        await _sh(t, name, f"arming the go-live timer ({seconds} s)", "mkdir -p \"$D\" && chmod 0700 \"$D\" || exit 1\n"
                  + _scripts(name) + 'rm -f "$D/restored" "$D/restoring"\n' + _later(seconds, "restore.sh"))


_ARMED = """
left() { echo "left $(( $(cat "$D/golive.deadline" 2>/dev/null || date +%s) - $(date +%s) ))"; }
if [ "$(systemctl show -p SubState --value "$U.timer" 2>/dev/null)" = waiting ]; then left; exit 0; fi
if [ -f "$D/golive.pid" ] && grep -q "$U" "/proc/$(cat "$D/golive.pid")/cmdline" 2>/dev/null; then left; fi
exit 0
"""


async def armed(t: Transport, name: str) -> float | None:
    """Seconds until the go-live timer fires (0 when due), or None when none is armed (never armed,
    disarmed, or fired)."""
    left = _lines(await _sh(t, name, "reading the go-live timer", _ARMED), "left")
    return max(0.0, float(left[0])) if left else None


async def disarm(t: Transport, name: str) -> bool:
    """Go-live confirmed: the timer stopped, the source left parked (its services stopped). True when
    a timer was stopped, False when none was armed. Raises when the timer fired already: the source
    is back at its address."""
    out = await _sh(t, name, "stopping the go-live timer", """
if [ "$(systemctl show -p SubState --value "$U.timer" 2>/dev/null)" = waiting ]; then
    systemctl stop "$U.timer" && echo "stopped timer"
fi
stop_sleep && echo "stopped sleep"
rm -f "$D/golive.deadline"
if [ -f "$D/restoring" ] || [ -f "$D/restored" ]; then echo "fired now"; fi
exit 0
""")
    if _lines(out, "fired"):
        raise PermanentError(f"{_who(t, name)}: the go-live timer fired before go-live was confirmed: "
                             "the source is back at its address with its services",
                             f"roll back (ferry migration rollback {name}): the source and the target both "
                             "claim the address now")
    return bool(_lines(out, "stopped"))


async def restore_now(t: Transport, name: str) -> None:
    """Rollback: restore.sh runs on the source at once (the timer re-armed to fire in LAUNCH_DELAY_S,
    so that it runs detached: it takes away a park address this connection may use). `t`'s connection
    is closed; wait_restored reads the outcome (over a transport to the service address)."""
    await arm(t, name, LAUNCH_DELAY_S)
    await t.close()


async def restored(t: Transport, name: str) -> Restored | None:
    """restore.sh's outcome since the timer was last armed, or None while it has not run."""
    out = await _sh(t, name, "reading the restore's outcome",
                    '[ -f "$D/restored" ] || exit 0\necho "restored $(cat "$D/restored")"\n'
                    'tail -n 20 "$D/restore.log" 2>/dev/null | sed "s/^/log /"\n')
    got = _lines(out, "restored")
    if not got:
        return None
    at, _, failures = got[0].partition(" ")
    return Restored(int(at), int(failures or 0), "\n".join(_lines(out, "log")))


async def wait_restored(t: Transport, name: str, *, timeout: float = 120) -> Restored:
    """Waits until restore.sh has run (reconnecting to `t` while the source moves); raises when it
    does not come, or came with failed steps."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await restored(t, name)
        except TransientError as e:
            await t.close()                       # a connection to an address that went: start afresh
            if time.monotonic() > deadline:
                raise TransientError(f"{_who(t, name)} did not come back within {timeout:g} s: {e.message}",
                                     f"look at the source's console; {folder(name)}/restore.log says what ran")
            await asyncio.sleep(1)
            continue
        if r is not None:
            if r.failures:
                failed = [line for line in r.log.splitlines() if line.startswith("failed")]
                raise PermanentError(f"{_who(t, name)}: {r.failures} step(s) of the restore failed: "
                                     f"{failed[-1] if failed else '?'}", f"see {folder(name)}/restore.log on the source")
            return r
        if time.monotonic() > deadline:
            raise TransientError(f"{_who(t, name)}: the restore did not run within {timeout:g} s",
                                 f"is a go-live timer armed? {folder(name)}/restore.log on the source")
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------ park

def _env(p: Parked) -> str:
    park_ip, addr_ip = p.park.split("/")[0], p.address.split("/")[0]
    park_routes = "\n".join(r.args(src=park_ip if r.src == addr_ip else None) for r in p.routes)
    values = {"IF": p.interface, "ADDR": p.address, "PARK": p.park, "PROMOTE": str(p.promote_secondaries),
              "ROUTES": "\n".join(r.args() for r in p.routes), "PARK_ROUTES": park_routes}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def _from_env(text: str) -> Parked:
    values = dict(w.split("=", 1) for w in shlex.split(text) if "=" in w)
    routes = []
    for line in values.get("ROUTES", "").splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        kv = {f[i]: f[i + 1] for i in range(1, len(f) - 1)}
        routes.append(Route(f[0], kv["via"], kv["dev"], kv.get("src"),
                            int(kv["metric"]) if "metric" in kv else None, kv.get("proto"), f[-1] == "onlink"))
    return Parked(values["IF"], values["ADDR"], values["PARK"], tuple(routes), int(values["PROMOTE"]))


async def parked(t: Transport, name: str) -> Parked | None:
    """The park recorded on the source (park.env), or None before the first park."""
    out = await _sh(t, name, "reading the park", '[ -f "$D/park.env" ] || exit 0\necho park\ncat "$D/park.env"\n')
    return _from_env(out.partition("\n")[2]) if out.startswith("park\n") else None


async def park(t: Transport, name: str, address: str, park: str, *, require_timer: bool = True,
               timeout: float = 120) -> tuple[Parked, Transport]:
    """Moves the source off `address` (its service address) to `park` (CIDR, the same interface; a
    bare address takes the service address's prefix) without losing the control path; returns what
    was recorded and a transport to the park address (the source's pinned host key). Called again
    (after a kill) it finishes the park; `t` may then reach either address (the park address is tried
    when the service address does not answer). `t`'s connection is closed. Refused while no go-live
    timer is armed (unless require_timer=False)."""
    who = _who(t, name)
    park_ip = _ipv4(t, name, park)
    try:
        timer = await armed(t, name)
    except TransientError:
        # no answer at the service address: parked already (a park before a kill), or nowhere
        await t.close()
        t = await park_transport(t, name, park)
        timer = await armed(t, name)
    if require_timer and timer is None:
        raise Refused(f"{who}: no go-live timer is armed: the source would not come back by itself",
                      "arm it first (source.arm)")
    rec = await parked(t, name)
    if rec is None:
        facts = await network_facts(t, name, address)
        if park_ip == facts.address:
            raise Refused(f"{who}: the park address {park_ip} is the service address",
                          f"give [migrations.{name}.cutover] park_address another address")
        cidr = park if "/" in park else f"{park_ip}/{facts.prefix}"
        await _check_sshd(t, name, park_ip)
        rec = Parked(facts.interface, facts.cidr, cidr, facts.routes, facts.promote_secondaries)
        await _sh(t, name, "recording the network before the park", "mkdir -p \"$D\" && chmod 0700 \"$D\" || exit 1\n"
                  + _put('"$D/park.env"', _env(rec), "0600"))
    elif rec.address.split("/")[0] != _ipv4(t, name, address) or rec.park.split("/")[0] != park_ip:
        raise PermanentError(f"{who}: a park of {rec.address} at {rec.park} is recorded, not of {address} at {park}",
                             "finish that one first (restore, then source.cleanup)")
    launch = _scripts(name) + 'rm -f "$D/parked"\n' + _later_park()
    try:
        with detached():
            await _sh(t, name, f"parking at {rec.park}", launch, timeout=30)
    except TransientError:
        pass   # the reply may have been lost with the address; the park address tells below
    await t.close()
    tp = await park_transport(t, name, rec.park)
    await _wait_parked(tp, name, rec, timeout)
    return rec, tp


def _later_park() -> str:
    """park.sh in LAUNCH_DELAY_S, detached (its own unit: the go-live timer stays as it is)."""
    return f"""
P=ferry-park-"${{U#ferry-golive-}}"
systemctl stop "$P.timer" 2>/dev/null; systemctl reset-failed "$P.timer" "$P.service" 2>/dev/null
if [ $M = systemd ]; then
    systemd-run --quiet --unit "$P" --on-active={LAUNCH_DELAY_S}s --timer-property=AccuracySec=100ms \\
        /bin/sh "$D/park.sh" || exit 1
else
    setsid /bin/sh -c 'sleep {LAUNCH_DELAY_S}; exec /bin/sh "$1/park.sh"' park "$D" </dev/null >/dev/null 2>&1 &
fi
"""


async def _check_sshd(t: Transport, name: str, park_ip: str) -> None:
    """Refused when sshd listens on the service address only: it would not answer at the park address."""
    port = getattr(getattr(t, "spec", None), "port", None) or 22
    out = await _sh(t, name, "asking where sshd listens",
                    f"command -v ss >/dev/null 2>&1 || exit 0\nss -Hltn 'sport = :{port}' | awk '{{print \"on \" $4}}'\n")
    where = {w.rsplit(":", 1)[0].strip("[]") for w in _lines(out, "on")}
    if where and not where & {"0.0.0.0", "*", "::", park_ip}:
        raise Refused(f"{_who(t, name)}: sshd listens on {', '.join(sorted(where))} only: it would not answer at "
                      f"the park address {park_ip}", "let sshd listen on all addresses (ListenAddress) for the cutover")


async def _wait_parked(tp: Transport, name: str, rec: Parked, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    addr_ip = rec.address.split("/")[0]
    last: FerryError | None = None
    await asyncio.sleep(LAUNCH_DELAY_S + 0.5)    # park.sh starts then: before, the park address is not there
    while time.monotonic() < deadline:
        try:
            out = await _sh(tp, name, "checking the park",
                            f'[ -f "$D/parked" ] && echo "parked $(cat "$D/parked")"\n'
                            f'ip -o -4 addr show dev {shlex.quote(rec.interface)} to {addr_ip} | sed "s/^/still /"\n'
                            'grep "^failed" "$D/park.log" 2>/dev/null | tail -n 1 | sed "s/^/log /"\nexit 0\n')
        except TransientError as e:
            last = e
            await tp.close()
            await asyncio.sleep(1)
            continue
        last = None
        done = _lines(out, "parked")                # park.sh has finished
        if done:
            log = _lines(out, "log")
            if int(done[0].split()[1]) or _lines(out, "still"):
                why = log[0] if log else f"{addr_ip} is still on {rec.interface}"
                raise PermanentError(f"{_who(tp, name)}: parking at {rec.park} went wrong: {why}",
                                     "the go-live timer brings the source back, or at once: restore_now")
            return
        await asyncio.sleep(0.5)
    why = last.message.removeprefix(f"{_who(tp, name)}: checking the park: ") if last else "it answers, not parked"
    raise TransientError(f"{_who(tp, name)} does not answer as parked at {rec.park} within {timeout:g} s: {why}",
                         "the go-live timer brings it back; look at the source's console and park.log")


async def park_transport(t: Transport, name: str, park: str) -> Transport:
    """An SSH transport to the source at its park address, trusting only the host keys pinned for the
    source (written to the workspace's keys folder, next to its known_hosts, for the connection)."""
    from ..transport.knownhosts import TrustStore, endpoint_name, public_line, write_pinned
    from ..transport.ssh import SshTransport
    spec: HostSpec = t.spec                         # type: ignore[attr-defined]
    port = spec.port or 22
    park_ip = _ipv4(t, name, park)
    keys = (await TrustStore.load(t.known_hosts)).trusted_keys(spec.address or spec.name, "", port)  # type: ignore[attr-defined]
    if not keys:
        raise HostKeyError(f"{_who(t, name)}: no host key is pinned for it", f"ferry migration trust {name}",
                           host=spec.address or spec.name, fingerprint="", changed=False)
    keys_dir = Path(t.known_hosts[0]).parent / "keys"  # type: ignore[attr-defined]
    known = keys_dir / f"{name}.park.known_hosts"
    text = "".join(f"{endpoint_name(park_ip, port)} {public_line(k)}\n" for k in keys)
    await asyncio.to_thread(write_pinned, known, text)
    parked_spec = HostSpec(park_ip, "", "ssh", address=park_ip, port=spec.port,
                           user=spec.user, identity=spec.identity)
    return SshTransport(parked_spec, known_hosts=[known], ssh_config_paths=t.ssh_config_paths,  # type: ignore[attr-defined]
                        use_agent=t.use_agent, connect_timeout=t.connect_timeout)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ finalize

async def cleanup(t: Transport, name: str) -> None:
    """Finalize: the go-live timer (if any) and SOURCE_DIR/<name> go; the source stays as it is."""
    await _sh(t, name, "removing Ferry's files", """
for u in "$U" "ferry-park-${U#ferry-golive-}"; do
    systemctl stop "$u.timer" 2>/dev/null; systemctl reset-failed "$u.timer" "$u.service" 2>/dev/null
done
systemctl stop "ferry-guard-${U#ferry-golive-}.service" 2>/dev/null
stop_sleep
rm -rf "$D"
""")
