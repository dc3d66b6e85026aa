"""Progress of the VM tasks that move data: bytes done over a total fixed up front, step by step."""

from __future__ import annotations

from typing import Any, Callable

# (bytes_done, bytes_total, what is being done); called with measured=False for work found already
# done (a resume), which moves the bar but is not the speed of the work.
ProgressFn = Callable[..., None]


class ByteMeter:
    """Bytes done over a total that is known before the work starts and never changes, across the
    steps of one job (each disk of a clone; convert, hash and tar of an export). A step reports how
    far it is with show(); advance() closes it."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn, self.total, self.done, self._last = fn, max(int(total), 0), 0, None

    def show(self, partial: int, label: str, *, measured: bool = True) -> None:
        if self.fn is None:
            return
        now = (min(self.done + max(int(partial), 0), self.total), self.total, label)
        if now != self._last:
            self._last = now
            if measured:
                self.fn(*now)
            else:
                self.fn(*now, measured=False)

    def advance(self, n: int, label: str, *, measured: bool = True) -> None:
        """Close a step of n bytes; measured=False: found done already (a resume), not done now."""
        self.done += max(int(n), 0)
        self.show(0, label, measured=measured)


def reporter(ctx: Any) -> ProgressFn:
    """A task's progress as (done, total, item) calls: bytes for the engine, whose rate and ETA follow
    them (and which holds the bar where it stood when a resumed task counts the same total again)."""
    def report(done: int, total: int, item: str, measured: bool = True) -> None:
        ctx.progress(bytes_done=done, bytes_total=total or None, item=item, measured=measured)
    return report
