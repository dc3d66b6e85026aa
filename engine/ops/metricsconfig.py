"""config.toml's performance sampling: [metrics] (F3).

    [metrics]
    enabled = true                  # the engine samples its hosts and VMs while it runs
    interval = 10                   # seconds between samples (1 or more)
    listen = "127.0.0.1:9464"       # serve Prometheus' /metrics here (default: not served)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METRICS_KEYS = {"enabled": "true", "interval": "10", "listen": '"127.0.0.1:9464"'}


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    interval: float = 10.0
    listen: str | None = None       # "HOST:PORT" of the Prometheus exposition; None: off

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _listen(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"must be HOST:PORT, got {v!r}"
    return None


def parse_metrics(c: Any, data: dict) -> MetricsSettings:
    """[metrics] of config.toml (problems reported to the Checker `c`)."""
    raw = data.get("metrics", {})
    p = ("metrics",)
    if not isinstance(raw, dict):
        c.problem(p, "must be a table", "write [metrics] with interval = 10")
        return MetricsSettings()
    c.table(raw, p, METRICS_KEYS)
    enabled = c.get(raw, p, "enabled", bool, True, example="true")
    interval = c.get(raw, p, "interval", (int, float), 10.0,
                     lambda v: None if 1 <= v <= 3600 else f"must be 1 to 3600 seconds, got {v}", "10")
    listen = c.get(raw, p, "listen", str, None, _listen, METRICS_KEYS["listen"])
    return MetricsSettings(enabled, float(interval), listen or None)


def settings(site: Any) -> MetricsSettings:
    return getattr(site, "metrics", None) or MetricsSettings()
