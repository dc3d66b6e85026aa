"""The engine's log file in the workspace (logs/ferry.log). Secrets never reach it."""

from __future__ import annotations

import logging

from .textsafe import line
from .workspace import Workspace

_configured: set[str] = set()

# A library's loggers say nothing until the process sends them somewhere (setup_logging): with no
# handler, Python would print their warnings on stderr (over the console's screen). Set here, where
# the engine's loggers are made, not in engine/__init__.py: a command line that logs nothing then never
# imports logging (~4 ms of every command).
logging.getLogger("ferry").addHandler(logging.NullHandler())


def logger(name: str) -> logging.Logger:
    """The logger `name` (under `ferry`): silent until setup_logging sends it to the log file."""
    return logging.getLogger(name)


class SafeFormatter(logging.Formatter):
    """One line per record, with the control characters of text from hosts and guests (a file
    name, an OS name) escaped: `tail -f logs/ferry.log` must not hand them to a terminal either."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = line(record.message)
        return super().formatMessage(record)


def setup_logging(ws: Workspace, level: int = logging.INFO) -> str:
    """Send the `ferry` loggers to logs/ferry.log (rotated); returns the file's path."""
    path = ws.logs_dir / "ferry.log"
    if str(path) in _configured:
        return str(path)
    ws.ensure()
    import logging.handlers
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    root = logging.getLogger("ferry")
    root.addHandler(handler)
    root.setLevel(level)
    _configured.add(str(path))
    return str(path)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Also send the `ferry` loggers to stderr: under systemd that is the journal (which stamps the time)."""
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger("ferry").addHandler(handler)
