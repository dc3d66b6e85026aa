"""Text that came from outside Ferry, made safe to show on an operator's terminal.

A guest's /etc/os-release, a host's facts, a file name in an error or a line of a task's log
can hold control characters: ESC starts sequences that retitle, clear or recolour the terminal,
the C1 characters (U+0080-U+009F) do the same on some terminals, and a carriage return or a
backspace overwrites what is already shown. Such characters are shown as visible escapes
(`\\x1b`, `\\x9b`, `\\r`, `\\u202e`): the text stays readable and nothing in it reaches the
terminal as a command. A byte that was not UTF-8 (the surrogate escape of a file name) shows as
`\\xff`. Values are stored and printed as JSON exactly as they came (JSON escapes them itself);
only what is shown is escaped.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

# C0 controls, DEL and C1 controls; the bidirectional marks, overrides and isolates (they reorder
# what follows them on screen); the line and paragraph separators; lone surrogates.
_OTHERS = "\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff"
_ONE_LINE = re.compile(f"[\x00-\x1f{_OTHERS}]")
_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")   # keeps tab and newline
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:   # os.fsdecode's stand-in for a byte that was not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def line(text: Any) -> str:
    """One line of text for a terminal: every control character escaped, newlines included."""
    text = text if isinstance(text, str) else str(text)
    return _ONE_LINE.sub(_visible, text)


def lines(text: Any) -> str:
    """Text of several lines for a terminal: control characters escaped, newline and tab kept."""
    text = text if isinstance(text, str) else str(text)
    return _LINES.sub(_visible, text)


class SafeStream:
    """A text stream (stdout, stderr) that writes everything through `lines()`.

    The command line replaces sys.stdout and sys.stderr with it, so that no message, whatever
    it quotes, can put a raw control character on the operator's terminal. `raw` is the stream
    underneath, for the few writes that need a control character of Ferry's own (the carriage
    return of a progress line), made of text already passed through `line()`."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(lines(text))
        return len(text)

    def writelines(self, texts) -> None:
        for text in texts:
            self.write(text)

    def __getattr__(self, name: str) -> Any:   # flush, isatty, fileno, encoding...
        return getattr(self.raw, name)


def raw_stream(stream: TextIO) -> TextIO:
    """The stream under a SafeStream (or the stream itself)."""
    return stream.raw if isinstance(stream, SafeStream) else stream
