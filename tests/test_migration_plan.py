"""Migration plans (issue 13): `ferry plan check|apply FILE` and `ferry migration list|show`, on the
built-in (folder) lab: a good plan recorded as planned migrations, every kind of bad input its one
line, a changed plan taken by a planned or assessed migration and refused past that, and Ferry
processes applying at once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ferry.engine.migration.model import MigrationState, sources_of
from ferry.engine.store import Store
from harness.cli import ferry, kill_engines
from test_races import start_together

PLAN = """\
[wave]
name = "wave1"
description = "web tier"

[defaults]
target = { host = "lab1", datastore = "shared" }
sync_interval = "6h"

[migrations.web01]
method = "auto"
excludes = ["/tmp/*"]
services = ["nginx", "cron"]
[migrations.web01.source]
address = "10.231.1.50"
port = 22
[migrations.web01.target]
cpus = 2
memory = "2G"
disks = ["20G", "50G"]
[migrations.web01.final]
address = "10.231.1.50/24"
gateway = "10.231.1.1"

[migrations.db01]
method = "block"
source = { address = "10.231.1.51", user = "admin" }
"""


def plan(**lines: str) -> str:
    """PLAN with some lines replaced (by number: l7="..."), so every other line keeps its number."""
    out = PLAN.splitlines()
    for key, text in lines.items():
        out[int(key[1:]) - 1] = text
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One workspace (and engine) for the module's tests on the built-in folder lab."""
    root = tmp_path_factory.mktemp("migration-plan")
    yield root / "ws"
    kill_engines(root)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The test's folder as the current one: a plan file is named as an operator types it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def migrations(ws: Path) -> dict[str, dict]:
    r = ferry(ws, "migration", "list", "--json")
    assert r.code == 0, r.err
    return {m["name"]: m for m in r.json}


def audit(ws: Path, action: str) -> list[dict]:
    return [a for a in ferry(ws, "audit", "--json", "--limit", "1000").json if a["action"] == action]


def test_a_good_plan_becomes_planned_migrations_and_applying_it_again_changes_nothing(tmp_path, here):
    ws = tmp_path / "ws"
    (here / "wave1.toml").write_text(PLAN)
    r = ferry(ws, "plan", "check", "wave1.toml")
    assert (r.code, r.out, r.err) == (0, "wave1.toml: 2 migrations in wave wave1, no problems\n", "")
    dry = ferry(ws, "plan", "apply", "wave1.toml", "--dry-run", "--json")
    assert dry.code == 0 and sorted(dry.json["created"]) == ["db01", "web01"] and dry.json["dry_run"]
    assert migrations(ws) == {}

    r = ferry(ws, "plan", "apply", "wave1.toml")
    assert r.code == 0, r.err
    assert r.out.splitlines()[-1] == "wave1.toml: wave wave1: 2 created, 0 updated, 0 unchanged"
    rows = sqlite3.connect(ws / "state.db").execute("SELECT name, wave, state FROM migrations ORDER BY name").fetchall()
    assert rows == [("db01", "wave1", "planned"), ("web01", "wave1", "planned")]

    got = migrations(ws)
    web, db = got["web01"], got["db01"]
    assert (web["state"], web["round"], web["last_sync"], web["blockers"]) == ("planned", 0, None, [])
    assert web["spec"]["source"] == {"address": "10.231.1.50", "port": 22, "user": "root", "identity": None}
    assert web["spec"]["target"] == {"host": "lab1", "datastore": "shared", "network": "default", "cpus": 2,
                                     "memory_mib": 2048, "disks": [20 << 30, 50 << 30]}
    assert web["spec"]["final"] == {"address": "10.231.1.50/24", "gateway": "10.231.1.1", "dns": []}
    assert web["spec"]["thresholds"] == {"max_loss_pct": 0, "max_latency_ms": 2, "max_jitter_ms": 1,
                                         "min_bandwidth_mbit": 100}      # the source notes
    assert (web["spec"]["method"], web["spec"]["services"], web["spec"]["sync_interval_s"]) == ("auto", ["nginx", "cron"], 6 * 3600)
    # [defaults] under a migration that says nothing of its target
    assert (db["spec"]["target"]["host"], db["spec"]["target"]["datastore"], db["spec"]["sync_interval_s"]) == \
        ("lab1", "shared", 6 * 3600)
    assert (db["spec"]["method"], db["spec"]["source"]["user"]) == ("block", "admin")
    assert sorted(a["target"] for a in audit(ws, "migration.planned")) == ["db01", "web01"]

    table = ferry(ws, "migration", "list").out.splitlines()
    assert table[0].split() == ["NAME", "WAVE", "STATE", "ROUND", "LAST-SYNC", "SOURCE", "TARGET", "METHOD"]
    assert table[2].split() == ["web01", "wave1", "○", "planned", "0", "-", "root@10.231.1.50", "lab1/shared", "auto"]
    assert ferry(ws, "migration", "list", "--wave", "wave2", "--json").json == []
    show = ferry(ws, "migration", "show", "db01", "--json")
    assert show.code == 0 and show.json == db
    assert "source     admin@10.231.1.51" in ferry(ws, "migration", "show", "db01").out
    missing = ferry(ws, "migration", "show", "nope")
    assert missing.code == 1 and "no migration named 'nope'" in missing.err

    again = ferry(ws, "plan", "apply", "wave1.toml", "--json")
    assert again.code == 0 and (again.json["created"], again.json["updated"]) == ([], [])
    assert sorted(again.json["unchanged"]) == ["db01", "web01"]
    assert migrations(ws) == got
    assert len(audit(ws, "migration.planned")) == 2


HOSTS = "hosts in the built-in lab: lab1, lab2, lab3"
BAD = {
    "unknown key": (dict(l11='exclude = ["/tmp/*"]'),
                    "wave1.toml:11: migrations.web01.exclude: unknown key (hint: allowed keys here: method, excludes, "
                    "services, sync_interval, relay, source, target, final, thresholds, cutover)"),
    "negative threshold": (dict(l11="thresholds = { max_latency_ms = -1 }"),
                           "wave1.toml:11: migrations.web01.thresholds.max_latency_ms: must be 0 or more "
                           "(hint: for example: max_latency_ms = 2)"),
    "go-live timer too short": (dict(l11='cutover = { confirm_within = "10s" }'),
                                "wave1.toml:11: migrations.web01.cutover.confirm_within: must be from 1m to 1d, got "
                                "'10s' (hint: for example: confirm_within = \"30m\")"),
    "missing wave name": (dict(l2="# no name"),
                          "wave1.toml:1: wave: missing required key 'name' (hint: add: name = \"wave1\")"),
    "source without address": (dict(l14="# no address"),
                               "wave1.toml:13: migrations.web01.source: missing required key 'address' "
                               "(hint: add: address = \"10.231.1.50\"; or give it in [defaults])"),
    "wrong type": (dict(l17='cpus = "two"'),
                   "wave1.toml:17: migrations.web01.target.cpus: must be an integer, got 'two' (hint: for example: cpus = 2)"),
    "bad size": (dict(l18='memory = "2 gigs"'),
                 "wave1.toml:18: migrations.web01.target.memory: is not a size: '2 gigs' (hint: for example: memory = \"2G\")"),
    "bad disk size": (dict(l19='disks = ["20G", "lots"]'),
                      "wave1.toml:19: migrations.web01.target.disks: is not a size: 'lots' "
                      "(hint: for example: disks = [\"20G\", \"50G\"])"),
    # in [defaults]: one line, though both migrations take it from there
    "bad interval": (dict(l7='sync_interval = "6 hours"'),
                     "wave1.toml:7: defaults.sync_interval: is not an interval: '6 hours' "
                     "(hint: for example: sync_interval = \"6h\")"),
    "unknown host": (dict(l6='target = { host = "lab9", datastore = "shared" }'),
                     f"wave1.toml:6: defaults.target.host: host 'lab9' is not a host of this site (hint: {HOSTS})"),
    "unknown datastore": (dict(l6='target = { host = "lab1", datastore = "ds9" }'),
                          "wave1.toml:6: defaults.target.datastore: datastore 'ds9' is not a datastore of this site "
                          "(hint: datastores of lab1: lab1-local, shared)"),
    "datastore of another host": (dict(l6='target = { host = "lab1", datastore = "lab2-local" }'),
                                  "wave1.toml:6: defaults.target.datastore: datastore 'lab2-local' is not on host "
                                  "'lab1' (hint: datastores of lab1: lab1-local, shared)"),
    "unknown network": (dict(l17='network = "prod"'),
                        "wave1.toml:17: migrations.web01.target.network: network 'prod' is not a network of this "
                        "site (hint: networks of lab1: default)"),
    "name used twice": (dict(l24="[migrations.web01]"),
                        "wave1.toml:24: migrations.web01: migration name used twice "
                        "(hint: each migration needs a name of its own: rename or merge one of them)"),
    "bad method": (dict(l25='method = "copy"'),
                   "wave1.toml:25: migrations.db01.method: must be \"file\", \"block\" or \"auto\", got 'copy' "
                   "(hint: for example: method = \"auto\")"),
    "gateway off the network": (dict(l22='gateway = "10.9.9.1"'),
                                "wave1.toml:22: migrations.web01.final.gateway: 10.9.9.1 is not in 10.231.1.0/24 "
                                "(hint: a gateway the target reaches on its own network)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_plan_gives_its_one_line_and_applies_nothing(ws, here, case):
    changes, line = BAD[case]
    (here / "wave1.toml").write_text(plan(**changes))
    r = ferry(ws, "plan", "check", "wave1.toml")
    assert (r.code, r.err, r.out) == (2, line + "\n", "")
    r = ferry(ws, "plan", "apply", "wave1.toml")
    assert (r.code, r.err) == (2, line + "\n")
    assert migrations(ws) == {}


def become(ws: Path, name: str, *states: MigrationState) -> None:
    """Take a migration through states, as the lifecycle's steps will (the store's audited transition)."""
    s = Store(ws / "state.db")
    try:
        for to in states:
            s.migration_transition(name, str(to), allowed_from=tuple(str(x) for x in sources_of(to)))
    finally:
        s.close()


def test_a_changed_plan_updates_planned_and_assessed_migrations_and_is_refused_past_that(tmp_path, here):
    ws = tmp_path / "ws"
    (here / "wave1.toml").write_text(PLAN)
    assert ferry(ws, "plan", "apply", "wave1.toml").code == 0

    (here / "wave1.toml").write_text(plan(l17="cpus = 4"))
    r = ferry(ws, "plan", "apply", "wave1.toml", "--json")
    assert (r.code, r.json["updated"], r.json["unchanged"]) == (0, ["web01"], ["db01"])
    web = migrations(ws)["web01"]
    assert (web["state"], web["spec"]["target"]["cpus"]) == ("planned", 4)

    become(ws, "web01", MigrationState.ASSESSED)
    assert migrations(ws)["web01"]["state"] == "assessed"
    (here / "wave1.toml").write_text(plan(l17="cpus = 3"))
    r = ferry(ws, "plan", "apply", "wave1.toml")
    assert r.code == 0 and "web01: updated" in r.out
    web = migrations(ws)["web01"]
    assert (web["state"], web["spec"]["target"]["cpus"]) == ("planned", 3)     # its assessment was of cpus 4
    back = audit(ws, "migration.planned")[0]
    assert (back["target"], back["params"]["from"]) == ("web01", "assessed")

    become(ws, "web01", MigrationState.ASSESSED, MigrationState.TARGET_PREPARED)
    (here / "wave1.toml").write_text(plan(l17="cpus = 1", l25='method = "file"'))
    r = ferry(ws, "plan", "apply", "wave1.toml")
    assert (r.code, r.out) == (2, "")
    assert r.err == ("ferry: migration web01 is target_prepared: its plan can no longer change it; nothing was "
                     "applied (hint: only a planned or assessed migration takes a changed plan: keep web01 as it "
                     "was in the file, or roll it back first)\n")
    got = migrations(ws)
    assert (got["web01"]["state"], got["web01"]["spec"]["target"]["cpus"]) == ("target_prepared", 3)
    assert got["db01"]["spec"]["method"] == "block"       # one transaction: the change of db01 went neither
    assert [a["params"]["from"] for a in audit(ws, "migration.target_prepared")] == ["assessed"]

    # another wave may not take a name in use
    (here / "wave2.toml").write_text(PLAN.replace('name = "wave1"', 'name = "wave2"'))
    r = ferry(ws, "plan", "check", "wave2.toml")
    assert r.code == 2
    assert r.err.splitlines()[0] == ("wave2.toml:9: migrations.web01: the name 'web01' is used by a migration of "
                                     "wave 'wave1' (hint: choose another name (ferry migration list shows the names in use))")


APPLY_IN_STORE = """
import asyncio, sys
from pathlib import Path
from ferry.engine.migration import plan
from ferry.engine.store import Store
from ferry.engine.workspace import Workspace
ws = Workspace(Path({ws!r}))
site = ws.load_config()
store = Store(ws.state_path)
---
out = asyncio.run(plan.apply(store, Path({file!r}), site))
print(len(out.created))
store.close()
"""
APPLY_BY_CLI = """
import sys
from ferry.console.cli import main
---
sys.exit(main(["--workspace", {ws!r}, "plan", "apply", {file!r}]))
"""


def test_ferry_processes_applying_one_plan_at_once_make_each_migration_once(tmp_path):
    ws = tmp_path / "ws"
    names = [f"web{i:02}" for i in range(30)]
    text = PLAN.split("[migrations.web01]")[0] + "".join(
        f'[migrations.{n}]\nsource = {{ address = "10.231.1.{i + 10}" }}\n' for i, n in enumerate(names))
    (tmp_path / "wave1.toml").write_text(text)
    assert ferry(ws, "plan", "check", str(tmp_path / "wave1.toml")).code == 0    # the engine runs, the db is made
    args = dict(ws=str(ws), file=str(tmp_path / "wave1.toml"))
    results = start_together([APPLY_IN_STORE.format(**args)] * 4 + [APPLY_BY_CLI.format(**args)] * 2)
    for r in results:
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # each made some (or none) of them, and together each once
    created = [int(r.stdout.split()[-1]) for r in results[:4]]
    created += [int(r.stdout.splitlines()[-1].split(": ")[-1].split()[0]) for r in results[4:]]
    assert sum(created) == len(names)
    assert sorted(migrations(ws)) == sorted(names)
    assert sorted(a["target"] for a in audit(ws, "migration.planned")) == sorted(names)
