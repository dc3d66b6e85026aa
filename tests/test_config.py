"""Configuration: the lab default, `ferry init`, and one precise line per problem in a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from ferry.engine.config import load_config
from ferry.engine.errors import ConfigError, PermanentError
from ferry.engine.workspace import Workspace

FERRY = [sys.executable, "-m", "ferry.console.cli"]

GOOD = """\
[site]
name = "dc1"
[clusters.prod]
[hosts.cna01]
cluster = "prod"
transport = "ssh"
address = "10.0.0.11"
port = 22
user = "root"
[hosts.cna02]
cluster = "prod"
transport = "local"
"""

# (config text, the one line expected: file:line: key: message) — the hint follows on the same line.
BAD = [
    ('[site]\nname = "dc1"\ncolour = "red"\n', ':3: site.colour: unknown key (hint: allowed keys here: name, production, theme, timezone)'),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "ssh"\naddress = "h"\nport = 70000\n',
     ':8: hosts.a.port: must be a port number from 1 to 65535, got 70000'),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "ssh"\naddress = "h"\nport = "22"\n',
     ":8: hosts.a.port: must be an integer, got '22'"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prdo"\ntransport = "local"\n',
     ":5: hosts.a.cluster: cluster 'prdo' is not defined (hint: add [clusters.prdo] or use one of: prod)"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "telnet"\n',
     ':6: hosts.a.transport: must be "ssh" or "local", got \'telnet\''),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "ssh"\n',
     ":4: hosts.a: missing required key 'address' for transport \"ssh\""),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ntransport = "local"\n',
     ":4: hosts.a: missing required key 'cluster'"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\naddress = "x"\n',
     ':7: hosts.a.address: not used with transport "local"'),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "ssh"\naddress = "h"\n'
     'identity = "/nonexistent/id_ed25519"\n', ":8: hosts.a.identity: key file /nonexistent/id_ed25519 does not exist"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts."bad name"]\ncluster = "prod"\ntransport = "local"\n',
     ":4: hosts.bad name: host name 'bad name' is not valid"),
    ('[clusters.prod]\n', ":: missing required key 'site'"),
    ('[site]\nname = \n', ":2: TOML syntax error: Invalid value"),
    ('[site]\nname = "dc1"\n[engine]\nmax_tasks = 0\n', ":4: engine.max_tasks: must be at least 1, got 0"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n'
     '[datastores.ds]\npath = "/srv"\nhosts = ["a", "b"]\n', ":9: datastores.ds.hosts: host 'b' is not defined"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n'
     '[datastores.ds]\npath = "relative/dir"\nhosts = ["a"]\n', ":8: datastores.ds.path: must be an absolute path"),
    ('[site]\nname = "dc1"\nproduction = "yes"\n', ":3: site.production: must be true or false, got 'yes'"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\naccel = "xen"\n',
     ':7: hosts.a.accel: must be "auto", "kvm" or "tcg", got \'xen\''),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\nnetworks = []\n',
     ":7: hosts.a.networks: must be a non-empty list of network names"),    # [networks.NAME] (issue 12)
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nbridge = "br-prod"\nvlan = 5000\n', ":9: networks.prod.vlan: must be a VLAN id from 1 to 4094, got 5000"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nbridge = "br-prod"\nvlna = 5\n', ":9: networks.prod.vlna: unknown key"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nvlan = 5\n', ":7: networks.prod: missing required key 'bridge' for mode \"bridge\""),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nbridge = "a-bridge-name-too-long"\n', ":8: networks.prod.bridge: is not a Linux interface name"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nbridge = "br0"\nhosts = ["a", "z"]\n', ":9: networks.prod.hosts: host 'z' is not defined"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nbridge = "br0"\nhosts = ["a"]\nuplinks = { b = "eth1" }\n',
     ":10: networks.prod.uplinks.b: host 'b' is not a host of this network"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n[networks.prod]\nmode = "user"\nbridge = "br0"\n', ':9: networks.prod.bridge: not used with mode "user"'),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\nnetworks = ["prod"]\n', ":7: hosts.a.networks: network 'prod' is not defined"),
    ('[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\nnetworks = ["p"]\n'
     '[hosts.b]\ncluster = "prod"\ntransport = "local"\n[networks.p]\nbridge = "br0"\nhosts = ["b"]\n',
     ":7: hosts.a.networks: network 'p' does not span host 'a'"),
    ('[site]\nname = "dc1"\n[lab]\nsubnet = "8.8.8.0/24"\n', ":4: lab.subnet: 8.8.8.0/24 is not a private range"),
    ('[site]\nname = "dc1"\n[lab]\nsubnet = "10.1.1.0/30"\n', ":4: lab.subnet: 10.1.1.0/30 is too small"),
]


def test_networks_load_with_their_hosts(tmp_path):
    site = load_config(write(tmp_path, '[site]\nname = "dc1"\n[clusters.prod]\n[hosts.a]\ncluster = "prod"\ntransport = "local"\n'
                            '[hosts.b]\ncluster = "prod"\ntransport = "local"\n'
                            '[networks.prod]\nbridge = "br-prod"\nvlan = 100\nmtu = 9000\nhosts = ["a"]\n'
                            'uplinks = { a = "eth1" }\n[networks.all]\nbridge = "br-all"\ncreate = false\n'
                            '[lab]\nsubnet = "10.77.0.0/24"\n'))
    prod = site.network("prod")
    assert (prod.mode, prod.bridge, prod.vlan, prod.mtu, prod.uplinks, prod.create) == (
        "bridge", "br-prod", 100, 9000, {"a": "eth1"}, True)
    assert site.networks_of("a") == ["default", "prod", "all"]
    assert site.networks_of("b") == ["default", "all"]
    assert site.network("default").mode == "user"          # QEMU user mode unless the site defines it
    assert site.lab.subnet == "10.77.0.0/24"
    with pytest.raises(PermanentError) as e:
        site.network("dmz")
    assert "dmz" in e.value.message and "all, default, prod" in e.value.hint


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_good_config_loads(tmp_path):
    site = load_config(write(tmp_path, GOOD))
    assert site.name == "dc1"
    assert site.hosts["cna01"].target == "root@10.0.0.11:22"
    assert site.hosts["cna02"].transport == "local"
    assert not site.is_lab


@pytest.mark.parametrize("text,expected", BAD, ids=[e.split(": ")[1] if ": " in e else e for _, e in BAD])
def test_bad_config_one_line_error(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    line, _, rest = expected.partition(":")[2].partition(":")
    want_prefix = f"{path}:{line}:" if line else f"{path}:"
    matching = [ln for ln in lines if ln.startswith(want_prefix) and expected.split(":", 2)[2] in ln]
    assert matching, f"expected a line like {want_prefix}{expected.split(':', 2)[2]!r}, got:\n" + "\n".join(lines)
    for ln in lines:
        assert "\n" not in ln and "Traceback" not in ln


def test_every_problem_is_reported(tmp_path):
    text = '[site]\nname = "dc1"\ncolour = 1\n[clusters.prod]\n[hosts.a]\ncluster = "x"\ntransport = "ftp"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    keys = [p.key for p in err.value.problems]
    assert keys == ["site.colour", "hosts.a.cluster", "hosts.a.transport"]
    assert all(p.hint for p in err.value.problems)


def test_lab_default_and_init(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    site = ws.load_config()
    assert site.is_lab and site.name == "lab"
    assert len(site.hosts_in("lab")) >= 2
    assert all(h.transport == "local" for h in site.hosts.values())
    runtimes = {h.runtime for h in site.hosts.values()}
    assert len(runtimes) == len(site.hosts), "each lab host has its own runtime folder"
    shared = [d for d in site.datastores.values() if d.shared]
    assert shared and set(shared[0].hosts) == set(site.hosts)
    for h in site.hosts:
        assert any(not d.shared for d in site.datastores_of(h)), f"{h} has a local datastore"

    path = ws.write_lab_config()
    written = load_config(path)
    assert written.hosts == site.hosts and written.datastores == site.datastores
    assert tomllib.loads(path.read_text())["site"]["name"] == "lab"


def run_cli(*args, env_ws: Path | None = None, cwd: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    if env_ws is not None:
        env["FERRY_WORKSPACE"] = str(env_ws)
    return subprocess.run(FERRY + list(args), capture_output=True, text=True, env=env, timeout=60)


def test_cli_config_check(tmp_path):
    ws = tmp_path / "ws"
    ok = run_cli("config", "check", env_ws=ws)
    assert ok.returncode == 0 and "<built-in lab>: ok" in ok.stdout

    ws.mkdir()
    (ws / "config.toml").write_text(textwrap.dedent("""\
        [site]
        name = "dc1"
        [clusters.prod]
        [hosts.cna01]
        cluster = "prod"
        transport = "ssh"
        address = "10.0.0.11"
        prot = 22
        """))
    bad = run_cli("config", "check", env_ws=ws)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"{ws}/config.toml:8: hosts.cna01.prot: unknown key (hint: allowed keys here: cluster, transport, address, "
        "port, user, identity, runtime, accel, cpu_model, networks, migration_address)"]
    # The console refuses to start on it with the same message, and no traceback.
    console = run_cli("--workspace", str(ws))
    assert console.returncode == 2
    assert console.stderr == bad.stderr


def test_cli_init_writes_lab_and_refuses_overwrite(tmp_path):
    ws = tmp_path / "ws"
    first = run_cli("init", env_ws=ws)
    assert first.returncode == 0 and (ws / "config.toml").is_file()
    again = run_cli("init", env_ws=ws)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_workspace_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_WORKSPACE", str(tmp_path / "env"))
    assert Workspace.resolve().root == tmp_path / "env"
    assert Workspace.resolve(tmp_path / "arg").root == tmp_path / "arg"
    monkeypatch.delenv("FERRY_WORKSPACE")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert Workspace.resolve().root == tmp_path / "xdg" / "ferry"
