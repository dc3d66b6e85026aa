"""The engine service reads config.toml again when it changes: an edit takes effect at the next
command, without `ferry engine stop`; an invalid edit is refused with its one-line problem and
nothing acts on it; fixing the file carries on (issue 11: the engine as a service)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from harness.cli import engine_pid, ferry

CONFIG = textwrap.dedent("""\
    [site]
    name = "reload"
    [clusters.c]
    [hosts.h1]
    cluster = "c"
    transport = "local"
    runtime = "{root}/h1/run"
    [datastores.d1]
    path = "{root}/h1/ds"
    hosts = ["h1"]
    """)
MORE = textwrap.dedent("""\
    [hosts.h2]
    cluster = "c"
    transport = "local"
    runtime = "{root}/h2/run"
    """)


def _hosts(ws: Path) -> list[str]:
    r = ferry(ws, "hosts", "--json")
    assert r.code == 0, r.err
    return sorted(h["host"] if "host" in h else h["name"] for h in r.json)


def test_an_edited_config_takes_effect_without_restarting_the_engine(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = ws / "config.toml"
    cfg.write_text(CONFIG.format(root=tmp_path))
    assert _hosts(ws) == ["h1"]
    pid = engine_pid(ws)
    assert pid
    cfg.write_text(CONFIG.format(root=tmp_path) + MORE.format(root=tmp_path))
    assert _hosts(ws) == ["h1", "h2"]                      # the same engine, the new site
    assert engine_pid(ws) == pid
    cfg.write_text(CONFIG.format(root=tmp_path) + "[hosts.h3]\ncluster = \"nope\"\ntransport = \"local\"\n")
    r = ferry(ws, "hosts", "--json")
    assert r.code == 2, (r.code, r.out, r.err)
    assert "config.toml:" in r.err and "cluster 'nope' is not defined" in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1
    cfg.write_text(CONFIG.format(root=tmp_path))
    assert _hosts(ws) == ["h1"]
    assert engine_pid(ws) == pid
