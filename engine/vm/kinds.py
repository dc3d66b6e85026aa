"""Registers every VM task kind with the engine (imported by the client)."""

from . import copies, create, delete, lifecycle, packages  # noqa: F401
