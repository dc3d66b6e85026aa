"""The network check before a migration (E3), measured for real between two lab hosts (network
namespaces reached over SSH): from the target host to the source, and a stream from the source to
the target host's address; thresholds decide, and a source that does not answer fails every probe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ferry.engine.config import HostSpec
from ferry.engine.migration.netcheck import NetThresholds, measure
from ferry.engine.platform.netlab import NetLab
from ferry.engine.transport.ssh import SshTransport
from harness.netlab import random_subnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("sshd", path="/usr/sbin:/usr/bin") is None,
                                reason="needs root (network namespaces) and sshd")


@pytest.fixture(scope="module")
def lab():
    root = Path(tempfile.mkdtemp(prefix="fnc-", dir="/tmp"))
    lab = NetLab(root / "lab", ("lab1", "lab3"), random_subnet())
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        shutil.rmtree(root, ignore_errors=True)


def transport(lab: NetLab, host: str) -> SshTransport:
    spec = HostSpec(host, "lab", "ssh", address=lab.address(host), user="root", identity=str(lab.identity))
    return SshTransport(spec, known_hosts=[lab.known_hosts], ssh_config_paths=[], use_agent=False)


async def test_between_two_lab_hosts_latency_loss_and_throughput_are_measured_and_judged(lab):
    src, dst = transport(lab, "lab1"), transport(lab, "lab3")
    try:
        # (latency and jitter bars for a busy 2-core machine: the probes' timing is the host's scheduling)
        easy = NetThresholds(max_latency_ms=50, max_jitter_ms=50)
        nc = await measure(src, lab.address("lab1"), 22, dst, "lab3", lab.address("lab3"), probes=10,
                           stream_bytes=32 << 20, thresholds=easy)
        assert (nc.probes, nc.lost) == (10, 0)
        assert 0 < nc.latency_ms < 50 and nc.jitter_ms is not None
        assert nc.bandwidth_mbit > 100 and nc.stream_s > 0          # veths: far above 100 Mbit/s
        assert nc.passed and nc.line.endswith(": passed"), nc.line
        # the same path against a bar it cannot reach: blocked, the figure named
        strict = await measure(src, lab.address("lab1"), 22, dst, "lab3", lab.address("lab3"), probes=3,
                               stream_bytes=4 << 20, thresholds=NetThresholds(max_latency_ms=50, max_jitter_ms=50,
                                                                              min_bandwidth_mbit=1e9))
        assert not strict.passed and len(strict.problems) == 1
        assert strict.problems[0].startswith("throughput ") and "below 1e+09 Mbit/s" in strict.problems[0]
        # the defaults are the source notes': no loss, latency under 2 ms, over 100 Mbit/s
        assert NetThresholds() == NetThresholds(max_loss_pct=0, max_latency_ms=2, max_jitter_ms=1,
                                                min_bandwidth_mbit=100)
    finally:
        await src.close()
        await dst.close()


async def test_a_source_that_does_not_answer_loses_every_probe_and_is_blocked(lab):
    src, dst = transport(lab, "lab1"), transport(lab, "lab3")
    try:
        gone = lab.address("lab1").rsplit(".", 1)[0] + ".99"        # on the lab segment, nobody there
        nc = await measure(src, gone, 22, dst, "lab3", lab.address("lab3"), probes=3)
        assert nc.lost == 3 and nc.latency_ms is None and nc.bandwidth_mbit is None
        assert not nc.passed
        assert any(p.startswith("loss 100% (3 of 3 probes unanswered)") for p in nc.problems), nc.problems
        assert "throughput not measured" in nc.line
    finally:
        await src.close()
        await dst.close()
