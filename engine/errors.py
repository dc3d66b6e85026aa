"""Errors an operator can read: each carries a one-line message and a hint."""

from __future__ import annotations


class FerryError(Exception):
    """An expected failure: shown to the operator as one line plus a hint, never a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.message, "hint": self.hint, "kind": type(self).__name__}


class ConfigError(FerryError):
    """The site configuration is invalid; carries every problem found."""

    def __init__(self, problems: list["ConfigProblem"]) -> None:  # noqa: F821
        self.problems = problems
        first = problems[0] if problems else None
        super().__init__(str(first) if first else "invalid configuration", "")

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class TransientError(FerryError):
    """A failure worth retrying: connection lost, timeout, host briefly unreachable."""


class PermanentError(FerryError):
    """A failure retrying cannot fix: bad input, missing file, refused permission."""


class Refused(PermanentError):
    """An action that cannot apply as asked (the VM's state, a name in use, no room): refused before
    anything was done, and before any task was made when the front end asked first."""


class TransportError(TransientError):
    """A host could not be reached or the channel to it broke."""


class HostKeyError(PermanentError):
    """A host presented an SSH host key that is unknown or changed."""

    def __init__(self, message: str, hint: str, *, host: str, fingerprint: str, changed: bool) -> None:
        super().__init__(message, hint)
        self.host = host
        self.fingerprint = fingerprint
        self.changed = changed


class CommandError(PermanentError):
    """A command on a host exited non-zero."""

    def __init__(self, message: str, hint: str = "", *, exit_status: int | None = None, stderr: str = "") -> None:
        super().__init__(message, hint)
        self.exit_status = exit_status
        self.stderr = stderr


class TaskCancelled(FerryError):
    """The operator cancelled the task."""
