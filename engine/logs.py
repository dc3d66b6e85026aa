"""The engine's log file in the workspace (logs/ferry.log). Secrets never reach it."""

from __future__ import annotations

import logging
import logging.handlers

from .workspace import Workspace

_configured: set[str] = set()


def setup_logging(ws: Workspace, level: int = logging.INFO) -> str:
    """Send the `ferry` loggers to logs/ferry.log (rotated); returns the file's path."""
    path = ws.logs_dir / "ferry.log"
    if str(path) in _configured:
        return str(path)
    ws.ensure()
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    root = logging.getLogger("ferry")
    root.addHandler(handler)
    root.setLevel(level)
    _configured.add(str(path))
    return str(path)
