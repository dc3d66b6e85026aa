"""The migration network of a host (issue 12, REQUIREMENTS D5): a host's `migration_address` is where
replication data goes (the bulk streams' own SSH connections), while Ferry's control stays on its
management address; the host key is the one trusted for the host, checked under its management
name; a host without one sends its data to its management address as before."""

from __future__ import annotations

import re

from harness.cli import ferry
from harness.trees import describe, diff, write

MiB = 1 << 20


def data_connections(log: str) -> set[str]:
    """The local addresses sshd took connections on ("Connection from A port P on B port Q")."""
    return set(re.findall(r"Connection from \S+ port \d+ on (\S+) port \d+", log))


def test_replication_data_goes_to_the_hosts_migration_address(sshd_factory, tmp_path):
    server = sshd_factory.one_on(("127.0.0.1", "127.0.0.2"), log_level="VERBOSE")
    site = sshd_factory.site_of(tmp_path, {"ssh1": server})
    text = site.workspace.config_path.read_text()
    assert "[hosts.ssh1]\n" in text
    site.workspace.config_path.write_text(text.replace("[hosts.ssh1]\n", '[hosts.ssh1]\nmigration_address = "127.0.0.2"\n', 1))
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(3):
        write(src / f"f{i}.bin", bytes([i]) * MiB)
    before = len(server.log)
    r = ferry(site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{dst}", "--json")
    assert r.code == 0, r.err
    assert diff(describe(src), describe(dst)) == []
    seen = data_connections(server.log[before:])
    assert "127.0.0.2" in seen, seen          # the data path
    assert "127.0.0.1" in seen, seen          # control (walks, hashes) on the management address


def test_without_a_migration_address_data_goes_to_the_management_address(sshd_factory, tmp_path):
    server = sshd_factory.one_on(("127.0.0.1", "127.0.0.2"), log_level="VERBOSE")
    site = sshd_factory.site_of(tmp_path, {"ssh1": server})
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(src / "f.bin", b"x" * MiB)
    before = len(server.log)
    r = ferry(site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{dst}", "--json")
    assert r.code == 0, r.err
    assert data_connections(server.log[before:]) == {"127.0.0.1"}
    assert (dst / "f.bin").read_bytes() == b"x" * MiB


def test_a_migration_address_that_answers_with_another_host_key_gets_no_data(sshd_factory, tmp_path):
    """The migration address leads to another machine (another sshd, its own key, the same port): the
    data stream is refused for its host key, nothing is written there, and the error says so."""
    from harness.sshd import SshServer
    server = sshd_factory.one()
    impostor = SshServer(sshd_factory.base / "impostor", sshd_factory.user_key, sshd_factory.user_public,
                         address="127.0.0.3", port=server.port)
    impostor.setup()
    sshd_factory.servers.append(impostor)
    impostor.start()
    site = sshd_factory.site_of(tmp_path, {"ssh1": server})
    text = site.workspace.config_path.read_text()
    site.workspace.config_path.write_text(text.replace("[hosts.ssh1]\n", '[hosts.ssh1]\nmigration_address = "127.0.0.3"\n', 1))
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(src / "f.bin", b"y" * MiB)
    r = ferry(site.workspace.root, "replicate", "files", f"local:{src}", f"ssh1:{dst}")
    assert r.code == 1 and "host key" in r.err, (r.out, r.err)
    assert not (dst / "f.bin").exists()
    assert "Accepted publickey" not in impostor.log


def test_a_dhcp_lease_on_the_source_address_is_told_from_a_static_address(tmp_path):
    """The cutover's arm step reads the source's network (engine/migration/source.py _FACTS) and warns
    when the address the target takes is a lease (a parked source's DHCP client may take it back). The
    kernel's own `ip` output, in a namespace of the test's: a lease has a finite valid lifetime."""
    import os
    import secrets
    import subprocess

    import pytest

    from ferry.engine.migration.cutover import dhcp_warning
    from ferry.engine.migration.source import _FACTS, _parse_facts

    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    ns = f"ferry-dhcp-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def sh(script: str) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], check=True,
                                  capture_output=True, text=True).stdout
        sh("ip link add d0 type veth peer name d1 && ip link set d0 up && "
           "ip addr add 198.51.100.7/24 dev d0 valid_lft 3600 preferred_lft 3600 && "
           "ip addr add 198.51.100.8/24 dev d0")
        out = sh(_FACTS)
        assert out.startswith("json\n")
        text = "text\n" + sh("ip -o -4 addr show; echo @@; ip -4 route show table main; echo @@")
        for form in (out, text):
            leased, static = _parse_facts(form, "198.51.100.7"), _parse_facts(form, "198.51.100.8")
            assert leased[0] == static[0] == "d0"
            assert 3500 < leased[4] <= 3600 and static[4] is None, (leased, static)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    said = dhcp_warning("web1", "198.51.100.7", 3600)
    assert "DHCP lease (1h" in said and "ferry migration finalize web1" in said, said
