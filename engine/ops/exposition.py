"""Prometheus exposition (F3): the engine serves GET /metrics on [metrics] listen (a local address, off
by default) in Prometheus' text format, written by prometheus-client, so a site's Prometheus scrapes
Ferry's hosts, VMs, tasks, alarms and health checks:

    ferry_host_up{host}                        1 when its newest sample answered, else 0
    ferry_host_cpu_percent{host}               and _memory_percent, _memory_used_bytes, _memory_total_bytes,
    ferry_host_load1{host}                     _network_receive_bytes_per_second, ..._transmit_...,
                                               _disk_read_bytes_per_second, _disk_write_bytes_per_second
    ferry_vm_cpu_percent{vm,host}              and ferry_vm_memory_rss_bytes, ferry_vm_memory_bytes,
    ferry_vm_state{vm,host,state}              1 for each VM's recorded state
    ferry_tasks{state}                         tasks by state
    ferry_alarms_open{severity}                active and acknowledged alarms (silenced ones too)
    ferry_health_check_state{host,check}       0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (host "" = the site)
    ferry_metrics_last_sample_timestamp_seconds

The server is asyncio's own (no thread): each scrape reads the store off the loop and renders the
newest sample the engine holds in memory; nothing is sampled for a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any, Iterator

from ..logs import logger

log = logger("ferry.metrics")

HOST_GAUGES = (("cpu_pct", "cpu_percent", "CPU busy, % of all CPUs"),
               ("mem_pct", "memory_percent", "memory in use (MemTotal - MemAvailable), %"),
               ("mem_used_bytes", "memory_used_bytes", "memory in use (MemTotal - MemAvailable)"),
               ("mem_total_bytes", "memory_total_bytes", "MemTotal"),
               ("load1", "load1", "1-minute load average"),
               ("net_rx_bps", "network_receive_bytes_per_second", "received by physical interfaces"),
               ("net_tx_bps", "network_transmit_bytes_per_second", "sent by physical interfaces"),
               ("disk_read_bps", "disk_read_bytes_per_second", "read from whole disks"),
               ("disk_write_bps", "disk_write_bytes_per_second", "written to whole disks"))
VM_GAUGES = (("cpu_pct", "cpu_percent", "QEMU's CPU time, % of the VM's vCPUs"),
             ("mem_rss_bytes", "memory_rss_bytes", "QEMU's resident memory"),
             ("mem_total_bytes", "memory_bytes", "memory given to the VM"))


def _store_facts(db: sqlite3.Connection) -> dict[str, Any]:
    return {
        "tasks": db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall(),
        "alarms": db.execute("SELECT severity, COUNT(*) FROM alarms WHERE state != 'cleared' "
                             "GROUP BY severity").fetchall(),
        "checks": db.execute("SELECT host, check_name, state FROM health_checks").fetchall(),
        "vms": db.execute("SELECT name, host, state FROM vms WHERE kind='vm' AND recycled IS NULL").fetchall(),
    }


class _Snapshot:
    """A prometheus-client collector of one scrape's numbers."""

    def __init__(self, metrics: Any, facts: dict[str, Any]) -> None:
        self.m, self.facts = metrics, facts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily as G
        from ..ops.model import Severity
        from ..ops.nagios import CheckState
        from ..taskstate import TaskState
        m = self.m
        up = G("ferry_host_up", "1 when the host answered its newest sample", labels=["host"])
        for h in m.site.hosts:
            up.add_metric([h], 1.0 if m.up.get(h) else 0.0)
        yield up
        for key, name, doc in HOST_GAUGES:
            g = G(f"ferry_host_{name}", doc, labels=["host"])
            for obj, vals in sorted(m.latest.items()):
                if obj.startswith("host:") and vals.get(key) is not None:
                    g.add_metric([obj[5:]], vals[key])
            yield g
        for key, name, doc in VM_GAUGES:
            g = G(f"ferry_vm_{name}", doc, labels=["vm", "host"])
            for obj, vals in sorted(m.latest.items()):
                if obj.startswith("vm:") and vals.get(key) is not None:
                    g.add_metric([obj[3:], m.vm_hosts.get(obj, "")], vals[key])
            yield g
        g = G("ferry_vm_state", "1 for the VM's recorded state", labels=["vm", "host", "state"])
        for name, host, state in self.facts["vms"]:
            g.add_metric([name, host, state], 1.0)
        yield g
        counts = {s.value: 0 for s in TaskState} | {s: n for s, n in self.facts["tasks"]}
        g = G("ferry_tasks", "tasks by state", labels=["state"])
        for s, n in counts.items():
            g.add_metric([s], n)
        yield g
        counts = {s.value: 0 for s in Severity} | {s: n for s, n in self.facts["alarms"]}
        g = G("ferry_alarms_open", "active and acknowledged alarms by severity", labels=["severity"])
        for s, n in counts.items():
            g.add_metric([s], n)
        yield g
        g = G("ferry_health_check_state", "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN", labels=["host", "check"])
        for host, check, state in self.facts["checks"]:
            try:
                code = CheckState(state).code
            except ValueError:
                code = 3
            g.add_metric([host, check], code)
        yield g
        if m.sampled_at is not None:
            yield G("ferry_metrics_last_sample_timestamp_seconds", "when the engine last sampled", value=m.sampled_at)


class Exposition:
    """The /metrics server of one engine."""

    def __init__(self, metrics: Any, listen: str) -> None:
        self.metrics, self.listen = metrics, listen
        self._server: asyncio.base_events.Server | None = None

    @classmethod
    async def start(cls, metrics: Any, listen: str) -> "Exposition":
        from .metricsconfig import MetricsSettings
        e = cls(metrics, listen)
        host, port = MetricsSettings(listen=listen).address
        e._server = await asyncio.start_server(e._handle, host, port)
        return e

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        store = self.metrics.engine.store
        facts = await store.call(store.read, _store_facts)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self.metrics, facts))
        return generate_latest(registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif parts[1].split("?")[0] != "/metrics":
                status, body, ctype = "404 Not Found", b"Ferry serves /metrics\n", "text/plain"
            else:
                from prometheus_client import CONTENT_TYPE_LATEST
                status, body, ctype = "200 OK", await self.render(), CONTENT_TYPE_LATEST
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:       # noqa: BLE001 - a scrape that fails is logged; the engine goes on
            log.exception("a /metrics scrape failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
