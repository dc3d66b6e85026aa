"""A lab with the Debian source server running and a wave's plan applied: what the end-to-end migration
tests (test_migration_cutover, test_migration_rollback) start from.

The source (tests/harness/debsource.py) is imported and booted on lab1, its host keys pinned in the
workspace (as `ferry migration trust` does), lab3 given its migration address on the lab's VM network,
a park address reserved for the source at cutover, and the plan applied: one file-level migration to
lab3 with the plan's excludes.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from typing import Iterator

from .cli import ferry
from .debsource import SourceVM, import_source, source_image, start_source
from .netlab import netlab_workspace
from .qemu import image_cache

NOBODY_MAC = "02:fe:00:00:00:02"        # a MAC no NIC of the lab has: its lease gives the park address
# What a target booted by the live image's kernel does not need (the source's kernel modules and /boot,
# documentation): a full copy of this source takes minutes between two TCG guests.
EXCLUDES = ["/var/cache/apt/*", "/var/lib/apt/lists/*", "/tmp/*", "/boot/*", "/usr/lib/modules/*",
            "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"]


@contextlib.contextmanager
def migration_lab(prefix: str, site: str, name: str, *, confirm_within: str = "15m", excludes: list[str] = EXCLUDES,
                  memory: str = "384M", disk: str = "2G", hold: bool = False, method: str = "file"
                  ) -> Iterator[tuple[SourceVM, str]]:
    """(the source, its park address as CIDR) in a lab whose workspace holds wave1's migration `name`
    (nginx its service, the target on lab3 with `memory` and one disk of `disk`); the lab goes down when
    this closes, however the setup ended. `hold`: engines started meanwhile hold the tasks a killed one
    left (FERRY_ENGINE_HOLD) until `ferry task resume` or the same command. `method`: the plan's (block:
    the target's disks are the source's sizes, `disk` is not given)."""
    image = source_image(image_cache())
    with _env("FERRY_ENGINE_HOLD", "1" if hold else os.environ.get("FERRY_ENGINE_HOLD")), \
            _lab(prefix, site, name, image, confirm_within, excludes, memory, disk, method) as up:
        yield up


@contextlib.contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _lab(prefix: str, site: str, name: str, image, confirm_within: str, excludes: list[str], memory: str,
         disk: str, method: str = "file") -> Iterator[tuple[SourceVM, str]]:
    with contextlib.closing(netlab_workspace(prefix, site=site)) as lab_up:
        ws, lab = next(lab_up)
        import_source(ws, "src01", image)
        source = start_source(ws, lab, "src01", image)
        cfg = ws / "config.toml"
        cfg.write_text(cfg.read_text().replace(
            "[hosts.lab3]\n", f'[hosts.lab3]\nmigration_address = "{lab.vm_address("lab3")}"\n', 1))
        with (ws / "known_hosts").open("a") as f:
            f.write(image.known_hosts(source.address))
        park = f"{lab.reserve(NOBODY_MAC)}/{lab.vm_network.prefixlen}"
        plan = ws / "wave1.toml"
        plan.write_text(textwrap.dedent(f"""
            [wave]
            name = "wave1"
            [migrations.{name}]
            method = "{method}"
            services = ["nginx"]
            excludes = {excludes!r}
            source = {{ address = "{source.address}", identity = "{image.identity}" }}
            thresholds = {{ max_latency_ms = 50, max_jitter_ms = 50, min_bandwidth_mbit = 10 }}
            cutover = {{ park_address = "{park}", confirm_within = "{confirm_within}", check_ports = [22, 80] }}
            [migrations.{name}.target]
            host = "lab3"
            datastore = "shared"
            network = "lab"
            cpus = 1
            memory = "{memory}"
            """) + (f'disks = ["{disk}"]\n' if method == "file" else ""))
        r = ferry(ws, "plan", "apply", str(plan))
        assert r.code == 0, r.err
        yield source, park


def prepare(source: SourceVM, name: str) -> None:
    """Assessed (a network check below the lab's bars overridden: veths on a busy machine) and prepared."""
    from .lab import ok
    ws = source.ws
    r = ferry(ws, "migration", "assess", name)
    assert r.code == 0, r.err
    if any(b["name"] == "network" for b in ok(ws, "migration", "show", name)["blockers"]):
        assert ferry(ws, "migration", "netcheck", name, "--override", "lab veths on a busy machine").code == 0
    r = ferry(ws, "migration", "prepare", name)
    assert r.code == 0, r.err
