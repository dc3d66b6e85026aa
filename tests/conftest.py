"""Shared fixtures. The sshd harness is a plugin in harness/sshd.py."""

import os
import re

import pytest

pytest_plugins = ["harness.sshd"]

# Every `ferry` command a test runs reaches the workspace's engine service, started on demand as a
# process of its own. One left with nothing to do stops after a few seconds; one a test leaves
# behind is killed when the test ends (below), and any other at the end of the session.
os.environ.setdefault("FERRY_ENGINE_IDLE_EXIT", "5")
# ... and knows the task kinds the tests register (tests/harness/kinds.py).
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_TESTS, os.environ.get("PYTHONPATH")]))
os.environ["FERRY_TASK_KINDS"] = "harness.kinds"
# The built-in lab is the folder lab for most tests (no namespaces, no sshds to start for a test that
# needs no network); the tests of the network lab as the default lab ask for it (FERRY_LAB unset).
os.environ["FERRY_LAB"] = "folders"
# The engines the tests start sample no performance data (every 10 s over every host: connections and
# processes the tests do not expect); tests/test_ops_metrics.py turns it on for its own.
os.environ["FERRY_METRICS"] = "off"


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(request):
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        from harness.cli import kill_engines
        kill_engines(tmp)
        down_default_lab(tmp)


def down_default_lab(root) -> None:
    """Workspaces in `root` (it, or a folder of it) whose built-in lab was the network lab (W/lab/subnet
    kept; a command run with an environment of its own, without the suite's FERRY_LAB): their
    namespaces, sshds, DHCP server and fence go with the test."""
    from pathlib import Path
    root = Path(root)
    for kept in [root / "lab" / "subnet", *root.glob("*/lab/subnet")]:
        if kept.exists():
            from ferry.engine.platform.labops import lab_of
            lab_of(kept.parent.parent, kept.read_text().strip()).down()


def down_labs_under(base) -> None:
    """Every network lab whose sshd runs from a workspace under `base` (what a test left, however)."""
    from pathlib import Path
    base = str(base).rstrip("/") + "/"
    roots = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            # sshd retitles itself: "sshd: /usr/sbin/sshd -f CONFIG -E LOG [listener] ...", one string
            line = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for path in re.findall(r"-f (\S+/lab/[^/\s]+/sshd/sshd_config)", line):
            if path.startswith(base):
                roots.add(Path(path).parents[3])        # W/lab/HOST/sshd/sshd_config -> W
    for root in roots:
        down_default_lab(root)


@pytest.fixture(params=["openssh", "asyncssh"])
def via(request, monkeypatch):
    """Bulk data through the OpenSSH client (the default), or relayed over asyncssh (a machine
    without an `ssh` binary): both paths must give the same result. The engine of the test's site
    is started afresh with the setting, and stopped after the test."""
    from harness.cli import kill_engines
    site = request.getfixturevalue("site") if "site" in request.fixturenames else None
    if site is not None:
        kill_engines(site.workspace.root)
    if request.param == "asyncssh":
        from harness.cli import relay_over_asyncssh
        relay_over_asyncssh(monkeypatch)
    yield request.param
    if site is not None:
        kill_engines(site.workspace.root)


# ------------------------------------------------------------------ skips never pass unseen
# A skipped test tested nothing: a run that skipped any ends with a banner that counts them and
# says why (the reasons name what is missing: root, a loop device, mkfs.ext4, QEMU), and with
# FERRY_TESTS_STRICT=1 (or --no-skips) such a run fails.

def pytest_addoption(parser):
    parser.addoption("--no-skips", action="store_true", default=False,
                     help="fail the run when any test was skipped (also: FERRY_TESTS_STRICT=1)")


def _strict(config) -> bool:
    import os
    return config.getoption("--no-skips") or os.environ.get("FERRY_TESTS_STRICT") == "1"


def _skips(terminalreporter) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped test of the run."""
    out = []
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        out.append((rep.nodeid, reason.removeprefix("Skipped: ")))
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = _skips(terminalreporter)
    if not skips:
        return
    by_reason: dict[str, list[str]] = {}
    for nodeid, reason in skips:
        by_reason.setdefault(reason, []).append(nodeid)
    tr = terminalreporter
    tr.section(f"{len(skips)} tests SKIPPED: this run did not test everything", sep="!", red=True, bold=True)
    for reason, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        tr.write_line(f"{len(ids):4d} x {reason}", red=True, bold=True)
        for nodeid in ids[:5]:
            tr.write_line(f"       {nodeid}")
        if len(ids) > 5:
            tr.write_line(f"       ... and {len(ids) - 5} more")
    tr.write_line("hint: run the suite as root after scripts/bootstrap.sh install (it installs e2fsprogs, "
                  "util-linux and QEMU); the README's Tests section lists what each test needs", yellow=True)
    if _strict(config):
        tr.write_line("FERRY_TESTS_STRICT=1 / --no-skips: a run with skipped tests fails", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        from harness.cli import kill_engines
        kill_engines(factory.getbasetemp())
        down_labs_under(factory.getbasetemp())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _strict(session.config) and _skips(reporter) and session.exitstatus == 0:
        session.exitstatus = 1
