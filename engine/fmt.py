"""Human-readable figures shared by the CLI and the console."""

from __future__ import annotations

import time

from .taskmodel import Progress, TaskState

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def rate(bps: float | None) -> str:
    """Bytes per second: a task's rate is always bytes (the engine derives no rate of steps or
    items, which would say nothing about time left)."""
    return "-" if bps is None else f"{size(bps)}/s"


def parse_rate(text: str) -> float:
    """'50M' -> bytes per second. Suffixes K, M, G (powers of 1024); plain numbers are bytes/s."""
    t = text.strip().upper().removesuffix("B/S").removesuffix("/S").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (for example 50M for 50 MiB/s)") from None
    if value <= 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return value


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def bar(fraction: float | None, width: int = 20) -> str:
    """A text progress bar; an unknown fraction shows as dots."""
    if fraction is None:
        return "·" * width
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:5.1f}%"


def progress_line(p: Progress, width: int = 20, *, state: TaskState | None = None) -> str:
    """Bar, percentage, what is done; the rate and ETA only while they mean something (known, and
    the task running when its state is given); "paused" for a paused task."""
    if p.bytes_total:
        done = f"{size(p.bytes_done)}/{size(p.bytes_total)}"
    elif p.bytes_done:
        done = size(p.bytes_done)
    else:
        done = f"{p.units_done}/{p.units_total}" if p.units_total else str(p.units_done)
    parts = [bar(p.fraction, width), percent(p.fraction), done]
    if state is None or state == TaskState.RUNNING:
        if p.rate is not None:
            parts.append(rate(p.rate))
        if p.eta is not None:
            parts.append(f"ETA {duration(p.eta)}")
    elif state in (TaskState.PAUSED, TaskState.INTERRUPTED):
        parts.append(str(state))
    if p.item:
        parts.append(p.item)
    return "  ".join(parts)


def clock(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


def stamp(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def guest_kernel(os_name: str | None, kernel: str | None) -> str:
    """The kernel to show beside a guest's OS name: nothing when the name already says it."""
    return kernel if kernel and kernel not in (os_name or "") else ""
