"""Registers every VM task kind with the engine (imported by the client)."""

from . import copies, create, delete, lifecycle, move, packages  # noqa: F401
