"""Where the user's own ssh files are (the defaults when a pool is not told otherwise)."""

from __future__ import annotations

import os
from pathlib import Path


def default_ssh_config_paths() -> list[Path]:
    p = Path("~/.ssh/config").expanduser()
    return [p] if os.access(p, os.R_OK) else []


def default_user_known_hosts() -> Path:
    return Path("~/.ssh/known_hosts").expanduser()
