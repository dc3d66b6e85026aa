"""`ferry migration assess|trust|netcheck|report` end to end (issue 13): a plan applied, its source a
real Linux server reached over SSH (a network-lab host: a namespace with its own sshd), its target
host another lab host; the facts, the network check on the data's path, the verdict recorded.
"""

from __future__ import annotations

import os
import platform
import shutil
import textwrap

import pytest

from harness.cli import ferry
from harness.lab import ok
from harness.netlab import netlab_workspace

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("sshd", path="/usr/sbin:/usr/bin") is None,
                                reason="needs root (network namespaces) and sshd")


@pytest.fixture(scope="module")
def mig():
    """A workspace whose site is lab3, a plan whose source is lab1 (not a host of the site) applied."""
    for ws, lab in netlab_workspace("fmig-", hosts=("lab3",), site="migsite"):
        plan = ws / "wave1.toml"
        plan.write_text(textwrap.dedent(f"""
            [wave]
            name = "wave1"
            [migrations.web01]
            [migrations.web01.source]
            address = "{lab.address('lab1')}"
            identity = "{lab.identity}"
            [defaults.thresholds]
            max_jitter_ms = 5                   # a busy 2-core machine schedules the probes late
            [migrations.web01.target]
            host = "lab3"
            datastore = "shared"
            network = "lab"
            """))
        r = ferry(ws, "plan", "apply", str(plan))
        assert r.code == 0, r.err
        yield ws, lab


def test_assess_needs_the_source_key_trusted_then_records_facts_network_and_verdict(mig):
    ws, lab = mig
    r = ferry(ws, "migration", "netcheck", "web01")           # planned: nothing measured before the assessment
    assert r.code == 2 and "ferry migration assess web01" in r.err and not ok(ws, "tasks"), r.err
    src = lab.address("lab1")
    kh = ws / "known_hosts"
    kh.write_text("".join(l for l in kh.read_text().splitlines(keepends=True) if not l.startswith(src + " ")))
    r = ferry(ws, "migration", "assess", "web01")
    assert r.code != 0 and "host key" in r.err.lower() and "ferry migration trust web01" in r.err, r.err
    assert ok(ws, "migration", "show", "web01")["state"] == "planned"
    r = ferry(ws, "migration", "trust", "web01", "--yes")
    assert r.code == 0 and "trusted: recorded in" in r.out, r.err
    r = ferry(ws, "migration", "assess", "web01")
    assert r.code == 0, r.err
    assert "web01 assessed:" in r.out and "network " in r.out, r.out
    m = ok(ws, "migration", "show", "web01")
    assert m["state"] == "assessed"
    facts = m["assessment"]["report"]["facts"]
    assert facts["arch"] == platform.machine() and facts["kernel"] == os.uname().release
    assert m["spec"]["thresholds"]["max_jitter_ms"] == 5 and m["spec"]["thresholds"]["max_latency_ms"] == 2
    nc = m["assessment"]["netcheck"]
    assert nc["lost"] == 0 and nc["latency_ms"] > 0 and nc["bandwidth_mbit"] > 100
    assert nc["target"].startswith("lab3 (") and nc["source"] == f"{src}:22"
    assert {"migration.trust", "migration.assessed"} <= {a["action"] for a in ok(ws, "audit")}


def test_an_override_is_audited_and_the_report_has_the_facts_and_the_network(mig):
    ws, _lab = mig
    if ok(ws, "migration", "show", "web01")["state"] != "assessed":
        assert ferry(ws, "migration", "assess", "web01").code == 0
    assert ferry(ws, "migration", "netcheck", "web01", "--override", " ").code == 2     # a reason is needed
    r = ferry(ws, "migration", "netcheck", "web01", "--override", "lab veths, measured on a busy machine")
    assert r.code == 0 and "overridden" in r.out, r.err
    m = ok(ws, "migration", "show", "web01")
    assert m["override"] == "lab veths, measured on a busy machine"
    assert "network" not in {b["name"] for b in m["blockers"]}
    entry = next(a for a in ok(ws, "audit") if a["action"] == "migration.override")
    assert entry["target"] == "web01" and entry["params"]["reason"] == m["override"]
    before = m["assessment"]["netcheck"]["checked_at"]
    # measured again: the new check replaces the last one, and its verdict the network findings
    r = ferry(ws, "migration", "netcheck", "web01")
    assert r.code == 0 and " -> lab3 (" in r.out and ("(passed)" in r.out or "overridden" in r.out), r.out
    again = ok(ws, "migration", "show", "web01")
    assert again["assessment"]["netcheck"]["checked_at"] > before and again["assessment"]["report"]
    assert "network" not in {b["name"] for b in again["blockers"]}
    assert any(a["action"] == "migration.netcheck" for a in ok(ws, "audit"))
    out = ws / "web01.md"
    assert ferry(ws, "migration", "report", "web01", "--out", str(out)).code == 0
    text = out.read_text()
    assert text.startswith("# Assessment of") and "## Network check" in text and "Overridden by the operator" in text
