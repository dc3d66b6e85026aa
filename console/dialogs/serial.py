"""A running VM's serial console, full screen: what the guest prints, and every key typed goes to it.

The engine opens the VM's serial port (`client.open_serial`); this screen shows its bytes as a small
terminal would (carriage return, newline, backspace, tab, erasing to the end of the line, cursor
left and right; colours are dropped), and shows any other control character as a visible escape,
as the console does elsewhere (engine/textsafe.py). Keys go to the guest as a terminal sends them
(enter as CR, backspace as DEL, ctrl+c as 0x03, arrows as escape sequences). Only ctrl+] is kept:
it leaves (and ctrl+q still quits Ferry).
"""

from __future__ import annotations

import asyncio
import codecs
import re
from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from ferry.engine.errors import FerryError
from ferry.engine.textsafe import line as safe

from ferry.console.widgets.framed import FramedScreen
from ferry.console.dialogs.modals import esc

LEAVE_KEY = "ctrl+right_square_bracket"
MAX_LINES = 2000
_CSI = re.compile(r"\x1b\[([0-9;?]*)([\x40-\x7e])")
_UNFINISHED = re.compile(r"\x1b(\[[0-9;?]{0,16})?")

# What a terminal sends for the keys that are not a character.
KEY_BYTES = {
    "enter": b"\r", "backspace": b"\x7f", "tab": b"\t", "escape": b"\x1b", "delete": b"\x1b[3~",
    "up": b"\x1b[A", "down": b"\x1b[B", "right": b"\x1b[C", "left": b"\x1b[D",
    "home": b"\x1b[H", "end": b"\x1b[F", "pageup": b"\x1b[5~", "pagedown": b"\x1b[6~",
}


class SerialTerminal(Widget, can_focus=True):
    """The lines the guest printed, with its cursor at the end of the last one."""

    DEFAULT_CSS = "SerialTerminal { height: 1fr; }"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.lines: list[str] = [""]
        self.col = 0
        self._pending = ""            # an escape sequence cut at the end of a chunk
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    # ------------------------------------------------------------------ what the guest prints

    def feed(self, data: bytes) -> None:
        text = self._pending + self._utf8.decode(data)
        self._pending = ""
        i = 0
        while i < len(text):
            c = text[i]
            if c == "\x1b":
                m = _CSI.match(text, i)
                if m:
                    self._csi(m.group(1), m.group(2), m.group())
                    i = m.end()
                    continue
                rest = text[i:]
                if _UNFINISHED.fullmatch(rest):
                    self._pending = rest      # the rest of the sequence comes with the next chunk
                    break
                self._put(safe(rest[:2]))
                i += 2
                continue
            if c == "\r":
                self.col = 0
            elif c == "\n":
                self._newline()
            elif c == "\b":
                self.col = max(0, self.col - 1)
            elif c == "\t":
                self._put(" " * (8 - self.col % 8))
            elif c == "\x07":
                pass
            else:
                self._put(safe(c))
            i += 1
        self.refresh()

    def _newline(self) -> None:
        self.lines.append("")
        self.col = 0
        if len(self.lines) > MAX_LINES:
            del self.lines[: len(self.lines) - MAX_LINES]

    def _put(self, s: str) -> None:
        cur = self.lines[-1].ljust(self.col)
        self.lines[-1] = cur[: self.col] + s + cur[self.col + len(s):]
        self.col += len(s)

    def _csi(self, params: str, final: str, seq: str) -> None:
        n = int(params) if params.isdigit() else None
        cur = self.lines[-1]
        if final == "K":        # erase in line
            if n in (None, 0):
                self.lines[-1] = cur[: self.col]
            elif n == 1:
                self.lines[-1] = " " * min(self.col + 1, len(cur)) + cur[self.col + 1:]
            else:
                self.lines[-1] = ""
        elif final == "J":      # erase in display: the cursor is on the last line
            if n == 2 or n == 3:
                self.lines, self.col = [""], 0
            else:
                self.lines[-1] = cur[: self.col]
        elif final == "C":
            self.col += n or 1
        elif final == "D":
            self.col = max(0, self.col - (n or 1))
        elif final == "G":
            self.col = max(0, (n or 1) - 1)
        elif final == "H" and not params:
            self.col = 0
        elif final in "mnhl":    # colours, a cursor-position query, modes: nothing to show
            pass
        else:
            self._put(safe(seq))

    @property
    def text(self) -> str:
        """What the screen holds, as plain lines."""
        return "\n".join(self.lines)

    def render(self) -> Text:
        height = max(1, self.size.height)
        shown = self.lines[-height:]
        out = Text()
        for i, ln in enumerate(shown):
            if i:
                out.append("\n")
            if i == len(shown) - 1:
                ln = ln.ljust(self.col + 1)
                out.append(ln[: self.col])
                out.append(ln[self.col], style="reverse" if self.has_focus else "")
                out.append(ln[self.col + 1:])
            else:
                out.append(ln)
        return out

    # ------------------------------------------------------------------ what the operator types

    def on_key(self, event: events.Key) -> None:
        event.stop()
        event.prevent_default()
        screen = self.screen
        if event.key == LEAVE_KEY:
            screen.leave_console()
            return
        data = KEY_BYTES.get(event.key)
        ctrl = re.fullmatch(r"ctrl\+([a-z])", event.key)
        if data is None and ctrl:                # ctrl+c is 0x03, ctrl+d 0x04, ...
            data = bytes([ord(ctrl.group(1)) - 96])
        if data is None and event.character is not None:
            data = event.character.encode()
        if data:
            screen.send_keys(data)

    def on_paste(self, event: events.Paste) -> None:
        event.stop()
        self.screen.send_keys(event.text.replace("\n", "\r").encode())


class SerialScreen(FramedScreen):
    """The serial console of one VM, opened when the screen shows, closed when it goes."""

    DEFAULT_CSS = """
    SerialScreen #serial-status { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, client: Any, vm_name: str) -> None:
        super().__init__()
        self.client = client
        self.vm_name = vm_name
        self.chan: Any = None
        self.conn_state = "connecting…"
        self._typed: asyncio.Queue[bytes] = asyncio.Queue()     # sent in order by one worker

    def compose(self) -> ComposeResult:
        yield Static(id="serial-status")
        yield SerialTerminal(id="serial-term")

    def on_mount(self) -> None:
        super().on_mount()      # the production frame, as on every full screen
        self.show_status()
        self.query_one(SerialTerminal).focus()
        self.run_worker(self._open_serial(), name=f"serial of {self.vm_name}", group="serial", exit_on_error=False)

    def show_status(self, hint: str = "") -> None:
        head = f"[b]serial console of {esc(self.vm_name)}[/b] · {esc(self.conn_state)}"
        if hint:
            head += f"  [$text-muted]hint: {esc(hint)}[/]"
        self.query_one("#serial-status", Static).update(
            Content.from_markup(head + "  [$text-muted]ctrl+] leaves[/]"))

    async def _open_serial(self) -> None:
        try:
            self.chan = await self.client.open_serial(self.vm_name)
        except FerryError as e:
            self.conn_state = f"✖ {e.message}"
            self.show_status(e.hint)
            return
        self.conn_state = "connected"
        self.show_status()
        self.run_worker(self._send(), name=f"keys to {self.vm_name}", group="serial-keys", exit_on_error=False)
        term = self.query_one(SerialTerminal)
        while data := await self.chan.read():
            term.feed(data)
        reason = getattr(self.chan, "reason", "") or "closed"
        self.conn_state = "disconnected" + (" (VM stopped)" if reason.endswith(" stopped") else f" ({reason})")
        self.show_status()

    def send_keys(self, data: bytes) -> None:
        if self.chan is not None and self.conn_state == "connected":
            self._typed.put_nowait(data)

    async def _send(self) -> None:
        while True:
            data = await self._typed.get()
            try:
                await self.chan.write(data)
            except FerryError:
                return         # the reader says it ended

    def leave_console(self) -> None:
        self.dismiss()

    def on_unmount(self) -> None:
        if self.chan is not None:      # however the screen went: the VM's serial port is free again
            self._closing = asyncio.ensure_future(self.chan.close())
