"""Ferry's engine: tasks, transports, replication, platform. Never imports textual."""

import logging

logging.getLogger("ferry").addHandler(logging.NullHandler())
