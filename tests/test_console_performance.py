"""The console's Performance view (issue 14, F3): the hosts' newest samples side by side (sorted with the
table's own o/O), the selected host's history as a sparkline per metric with last/min/avg/max, and `w`
cycling the window 1h -> 1d -> 30d (the engine asked for the longer window: a sample older than an hour
shows in its numbers); `v` the VMs instead (their host, CPU, memory), the selected VM's history below,
readable at 80x24.

A real EngineClient on a throw-away workspace (the built-in folder lab: lab1, lab2, lab3); VMs are
created by the engine (vm.create), not started: the history of hosts and VMs is written through the
engine's own MetricsDB (the sampler's db, as its sample() does), its clock fixed so nothing waits.
"""

from __future__ import annotations

import re

import pytest

from ferry.console.app import FerryApp
from harness.pilot import text_of, until
import test_console_overview
from test_console_vms import make_vm
from test_terminal import screen_text

SIZE = (160, 40)
T0 = 1_800_000_000.0          # the sampler's and the console's now
client = test_console_overview.client      # the fixture: the lab's EngineClient, started


class FixedClock:
    def now(self) -> float:
        return T0

    async def sleep(self, seconds: float) -> None:      # the loop is never launched here
        raise AssertionError("no sampling loop in this test")


@pytest.fixture
def seeded(client):
    """The lab's client (test_console_overview's fixture), its history seeded on the fixed clock."""
    client.sampler.clock = FixedClock()
    db = client.sampler.db
    # lab1: 90 % CPU five hours ago (only in the day's tier), then 10, 20, 30 % in the last five minutes
    db.add({"host:lab1": {"cpu_pct": 90.0, "mem_pct": 50.0}}, T0 - 5 * 3600)
    for i, cpu in enumerate((10.0, 20.0, 30.0)):
        db.add({"host:lab1": {"cpu_pct": cpu, "mem_pct": 40.0 + i, "load1": 0.5, "net_rx_bps": 2048.0,
                              "net_tx_bps": 1024.0, "disk_read_bps": 0.0, "disk_write_bps": 4096.0}},
               T0 - 300 + 100 * i)
    # lab2: busier, sampled 50 s ago; lab3: never sampled
    db.add({"host:lab2": {"cpu_pct": 75.0, "mem_pct": 20.0, "load1": 3.25}}, T0 - 50)
    return client


def rows(app: FerryApp) -> list[list[str]]:
    table = app.performance_view.table
    return [[c.plain.strip() for c in table.get_row(row.key.value)] for row in table.ordered_rows]


def line_of(app: FerryApp, metric: str) -> str:
    return next(ln for ln in text_of(app, "#performance-detail").splitlines() if ln.strip().startswith(metric + " "))


def stats(app: FerryApp, metric: str) -> dict[str, str]:
    """A metric's numbers by the column names above them (last, min, avg, max: those the width leaves)."""
    names = text_of(app, "#performance-detail").splitlines()[1].split()
    return dict(zip(names, re.split(r"\s{2,}", line_of(app, metric).strip())[2:]))


async def test_hosts_side_by_side_sorted_and_a_hosts_sparklines_over_a_window_w_cycles(seeded):
    app = FerryApp(seeded, clock=lambda: T0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("P")
        view = app.performance_view
        await until(pilot, lambda: app.current_view == "performance" and view.ok and len(rows(app)) == 3,
                    what="the Performance view asked")
        assert rows(app) == [
            ["lab1", "30.0%", "42.0%", "0.50", "2.0 KiB/s", "1.0 KiB/s", "0 B/s", "4.0 KiB/s", "1m40s ago"],
            ["lab2", "75.0%", "20.0%", "3.25", "-", "-", "-", "-", "50s ago"],
            ["lab3", "-", "-", "-", "-", "-", "-", "-", "-"],
        ], rows(app)
        assert "3 hosts, 2 sampled · window 1h" in text_of(app, "#performance-status")

        # o: sorted by the next column (CPU, lowest first), O: the other way round (the busiest on top)
        await pilot.press("o")
        await until(pilot, lambda: [r[0] for r in rows(app)] == ["lab3", "lab1", "lab2"], what="sorted by cpu ▲")
        await pilot.press("O")
        await until(pilot, lambda: [r[0] for r in rows(app)] == ["lab2", "lab1", "lab3"], what="sorted by cpu ▼")
        assert "sorted by cpu ▼" in text_of(app, "#performance-status")

        # the cursor on lab1 (the second row): its last hour, a point per 10 s, the three recent samples
        await pilot.press("home", "down")
        await until(pilot, lambda: view.selected == "host:lab1", what="lab1 selected")
        await until(pilot, lambda: view.asked == ("host:lab1", 3600.0) and "a point per 10 s" in
                    text_of(app, "#performance-detail"), what="lab1's last hour")
        assert "▁▅█" in line_of(app, "cpu_pct")
        assert stats(app, "cpu_pct") == {"last": "30.0%", "min": "10.0%", "avg": "20.0%", "max": "30.0%"}
        assert stats(app, "mem_pct") == {"last": "42.0%", "min": "40.0%", "avg": "41.0%", "max": "42.0%"}
        assert stats(app, "disk_write_bps")["last"] == "4.0 KiB/s"

        # w: the day (1 min points): the 90 % five hours ago is in it
        await pilot.press("w")
        await until(pilot, lambda: view.asked == ("host:lab1", 86400.0) and "a point per 60 s" in
                    text_of(app, "#performance-detail"), what="lab1's last day")
        assert stats(app, "cpu_pct") == {"last": "30.0%", "min": "10.0%", "avg": "37.5%", "max": "90.0%"}
        assert "window 1d" in text_of(app, "#performance-status")
        # w: 30 days (10 min points: the three recent samples share a bucket), then back to the hour
        await pilot.press("w")
        await until(pilot, lambda: view.asked == ("host:lab1", 30 * 86400.0) and "a point per 600 s" in
                    text_of(app, "#performance-detail"), what="lab1's last 30 days")
        assert stats(app, "cpu_pct") == {"last": "20.0%", "min": "10.0%", "avg": "37.5%", "max": "90.0%"}
        await pilot.press("w")
        await until(pilot, lambda: view.asked == ("host:lab1", 3600.0), what="back to the hour")

        # lab3 has no samples: said, not an empty chart
        await pilot.press("down")
        await until(pilot, lambda: "no samples of lab3 in the last 1h" in text_of(app, "#performance-detail"),
                    what="lab3 said to have no samples")


async def test_v_shows_the_vms_with_their_host_and_a_vms_sparklines_readable_at_80x24(seeded):
    for name, host in (("web1", "lab1"), ("db1", "lab2"), ("idle1", "lab1")):
        await make_vm(seeded, name, host)
    # web1 and db1 ran the last five minutes (as the sampler writes a running VM's QEMU); idle1 never ran
    mib = 2.0 ** 20
    for i in range(3):
        seeded.sampler.db.add({
            "vm:web1": {"cpu_pct": 5.0 + 10 * i, "mem_pct": 50.0, "mem_rss_bytes": 64 * mib,
                        "mem_total_bytes": 128 * mib},
            "vm:db1": {"cpu_pct": 80.0, "mem_pct": 90.0 + i, "mem_rss_bytes": (115 + 2.5 * i) * mib,
                       "mem_total_bytes": 128 * mib}}, T0 - 300 + 100 * i)
    app = FerryApp(seeded, clock=lambda: T0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("P")
        view = app.performance_view
        await until(pilot, lambda: view.ok and len(rows(app)) == 3, what="the hosts")
        assert "v Hosts/VMs" in screen_text(app).splitlines()[-1]      # the footer says how

        await pilot.press("v")
        await until(pilot, lambda: view.mode == "vms" and [r[0] for r in rows(app)] == ["db1", "idle1", "web1"],
                    what="the VMs")
        assert rows(app) == [
            ["db1", "lab2", "80.0%", "92.0%", "120.0 MiB", "128.0 MiB", "1m40s ago"],
            ["idle1", "lab1", "-", "-", "-", "-", "-"],
            ["web1", "lab1", "25.0%", "50.0%", "64.0 MiB", "128.0 MiB", "1m40s ago"],
        ], rows(app)
        assert "3 VMs, 2 sampled · window 1h" in text_of(app, "#performance-status")
        # the busiest VM on top (o: host, o: cpu, O: highest first); `/lab1`: a host's VMs; esc: all again
        await pilot.press("o", "o", "O")
        await until(pilot, lambda: [r[0] for r in rows(app)] == ["db1", "web1", "idle1"], what="sorted by cpu ▼")
        await pilot.press("slash", *"lab1", "enter")
        await until(pilot, lambda: [r[0] for r in rows(app)] == ["web1", "idle1"], what="lab1's VMs")
        await pilot.press("escape")
        await until(pilot, lambda: len(rows(app)) == 3, what="the filter cleared")

        # web1 (the second row): its last hour below, every line whole at 80 columns (min gives its room)
        await pilot.press("home", "down")
        await until(pilot, lambda: view.asked == ("vm:web1", 3600.0) and "a point per 10 s" in
                    text_of(app, "#performance-detail"), what="web1's last hour")
        assert "web1 on lab1 over 1h" in text_of(app, "#performance-detail")
        assert "▁▅█" in line_of(app, "cpu_pct")
        assert stats(app, "cpu_pct") == {"last": "25.0%", "avg": "15.0%", "max": "25.0%"}
        assert stats(app, "mem_rss_bytes") == {"last": "64.0 MiB", "avg": "64.0 MiB", "max": "64.0 MiB"}
        screen = screen_text(app)
        assert "performance › vms › web1 › 1h" in screen.splitlines()[0]
        for metric in ("cpu_pct", "mem_rss_bytes", "mem_total_bytes", "mem_pct"):
            assert line_of(app, metric).strip() in screen, metric      # on screen, not wrapped
        await pilot.press("down")
        await until(pilot, lambda: "no samples of idle1 in the last 1h" in text_of(app, "#performance-detail"),
                    what="idle1 said to have no samples")

        # v again: the hosts as they were left
        await pilot.press("v")
        await until(pilot, lambda: view.mode == "hosts" and view.selected and view.selected.startswith("host:")
                    and len(rows(app)) == 3, what="the hosts again")
        assert "3 hosts, 2 sampled" in text_of(app, "#performance-status")


async def test_colon_perf_opens_the_view(seeded):
    app = FerryApp(seeded, clock=lambda: T0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("colon", *"perf", "enter")
        await until(pilot, lambda: app.current_view == "performance", what=":perf")
