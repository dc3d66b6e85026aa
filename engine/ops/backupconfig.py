"""config.toml's management-data backups: [backup], [backup.keep] and [backup.remote.NAME] (F5).

    [backup]
    local_dir = "/var/backup/ferry"   # default: <workspace>/backups
    stale_after = 900                 # seconds after a backup schedule's slot before its backup counts as missing

    [backup.keep]                     # how many of each kind stay; past it the oldest go
    daily = 7
    hourly = 24
    weekly = 4
    monthly = 2
    manual = 7
    before_restore = 5
    remote = 30                       # on each remote server (its own `keep` wins)

    [backup.remote.offsite]           # SFTP over the SSH stack of the hosts (known_hosts of the workspace)
    host = "backup01"                 # a host of config.toml, or an address
    port = 22
    user = "ferry"
    identity = "~/.ssh/id_ed25519"    # a path to the key: never the key itself, never a password
    path = "/srv/ferry-backups"
    keep = 30
    auto = true                       # every local backup is uploaded here too

The schedules themselves are ordinary [schedules.NAME] with run = "backup" (engine/ops/backup.py says
which kind a run makes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("hourly", "daily", "weekly", "monthly", "manual", "before-restore")
DEFAULT_KEEP = {"hourly": 24, "daily": 7, "weekly": 4, "monthly": 2, "manual": 7, "before-restore": 5, "remote": 30}
BACKUP_KEYS = {"local_dir": '"/var/backup/ferry"', "stale_after": "900", "keep": "{ daily = 7, monthly = 2 }",
               "remote": '{ offsite = { host = "backup01", path = "/srv/ferry-backups" } }'}
KEEP_KEYS = {k.replace("-", "_"): str(v) for k, v in DEFAULT_KEEP.items()}
REMOTE_KEYS = {"host": '"backup01"', "port": "22", "user": '"ferry"', "identity": '"~/.ssh/id_ed25519"',
               "path": '"/srv/ferry-backups"', "keep": "30", "auto": "true"}


@dataclass(frozen=True)
class RemoteTarget:
    """One [backup.remote.NAME]: an SFTP server that keeps `keep` backups of this site under `path`."""
    name: str
    host: str                       # a host of config.toml, or an address
    path: str
    port: int | None = None
    user: str | None = None
    identity: str | None = None     # a path to a private key file
    keep: int = 30
    auto: bool = False


@dataclass(frozen=True)
class BackupSettings:
    local_dir: str | None = None    # None: <workspace>/backups
    stale_after: float = 900.0
    keep: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_KEEP))
    remotes: dict[str, RemoteTarget] = field(default_factory=dict)

    def kept(self, kind: str) -> int:
        return self.keep.get(kind, DEFAULT_KEEP.get(kind, 7))


def parse_backup(c: Any, data: dict) -> BackupSettings:
    """[backup] of config.toml (problems reported to the Checker `c`)."""
    raw = data.get("backup", {})
    p = ("backup",)
    if not isinstance(raw, dict):
        c.problem(p, "must be a table", 'write [backup] with local_dir = "/var/backup/ferry"')
        return BackupSettings()
    c.table(raw, p, BACKUP_KEYS)
    local_dir = c.get(raw, p, "local_dir", str, None,
                      lambda v: None if v.startswith(("/", "~")) else f"must be an absolute path, got {v!r}",
                      BACKUP_KEYS["local_dir"])
    stale = c.get(raw, p, "stale_after", (int, float), 900.0,
                  lambda v: None if v >= 0 else f"must be 0 or more seconds, got {v}", "900")
    keep = dict(DEFAULT_KEEP)
    raw_keep = raw.get("keep", {})
    if not isinstance(raw_keep, dict):
        c.problem(p + ("keep",), "must be a table of kind = count", "for example: keep = { daily = 7, monthly = 2 }")
        raw_keep = {}
    c.table(raw_keep, p + ("keep",), KEEP_KEYS)
    for key in KEEP_KEYS:
        n = c.get(raw_keep, p + ("keep",), key, int, None,
                  lambda v: None if 1 <= v <= 10000 else f"must be 1 to 10000, got {v}", KEEP_KEYS[key])
        if n is not None:
            keep[key.replace("_", "-")] = n
    remotes: dict[str, RemoteTarget] = {}
    for name, t, path in c.entries(raw, "remote", "backup remote"):
        path = p + path
        c.table(t, path, REMOTE_KEYS, required=("host", "path"))
        host = c.get(t, path, "host", str, None, lambda v: None if v.strip() else "must not be empty", '"backup01"')
        rpath = c.get(t, path, "path", str, None,
                      lambda v: None if v.startswith("/") else f"must be an absolute path on the server, got {v!r}",
                      '"/srv/ferry-backups"')
        port = c.get(t, path, "port", int, None,
                     lambda v: None if 1 <= v <= 65535 else f"must be a port number from 1 to 65535, got {v}", "22")
        user = c.get(t, path, "user", str, None, None, '"ferry"')
        identity = c.get(t, path, "identity", str, None,
                         lambda v: None if v.startswith(("/", "~")) else
                         f"must be the absolute path of a private key file, got {v!r}", '"~/.ssh/id_ed25519"')
        rkeep = c.get(t, path, "keep", int, keep["remote"],
                      lambda v: None if 1 <= v <= 10000 else f"must be 1 to 10000, got {v}", "30")
        auto = c.get(t, path, "auto", bool, False, example="true")
        if host and rpath:
            remotes[name] = RemoteTarget(name, host.strip(), rpath.rstrip("/") or "/", port, user, identity,
                                         rkeep, auto)
    return BackupSettings(local_dir, float(stale), keep, remotes)


def settings(site: Any) -> BackupSettings:
    return getattr(site, "backup", None) or BackupSettings()
