"""The move dialog: the site's other hosts, each with the engine's answer to moving the VM there.

The answers are the engine's precheck of that very move (`check(host)`), asked for every host at
once as the dialog opens; a host where the move is refused is dimmed with the reason, and choosing
it says the way out instead of closing. Choosing an allowed host closes the dialog with its name
(the caller asks for confirmation and submits the task)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, OptionList, Static
from textual.widgets.option_list import Option

from ferry.console.dialogs.modals import esc, production_line

ASKING = "asking the engine…"

# What the engine said of one host: None (the move applies) or (reason, hint).
Answer = tuple[str, str] | None


class MoveScreen(ModalScreen[str | None]):
    """Where to move `vm_name` (now on `source`): one row per host of `hosts`; enter on an allowed one
    closes with its name, esc closes with None."""

    AUTO_FOCUS = "#move-hosts"
    BINDINGS = [Binding("escape", "back", "Back", id="ferry.move.back")]
    DEFAULT_CSS = """
    MoveScreen {
        align: center middle;
        background: $background 60%;
    }
    #move-hosts {
        max-height: 12;
        margin-bottom: 1;
    }
    #move-hint {
        height: auto;
        color: $text-muted;
    }
    """

    def __init__(self, vm_name: str, source: str, hosts: list[str], check: Callable[[str], Awaitable[Answer]], *,
                 intro: str) -> None:
        super().__init__()
        self.vm_name = vm_name
        self.source = source
        self.hosts = hosts
        self.check = check
        self.intro = intro
        self.answers: dict[str, Answer] = {}         # host -> the engine's answer (absent: not yet)
        self.name_width = max(len(h) for h in hosts)

    def compose(self) -> ComposeResult:
        production = production_line(self.app)
        with Vertical(id="dialog", classes="form danger" if production else "form"):
            if production:
                yield Static(Content.from_markup(production), id="dialog-production")
            yield Static(Content(f"Move {self.vm_name} from {self.source} to another host"), id="dialog-title")
            yield Static(Content(self.intro), id="dialog-body")
            yield OptionList(*(Option(self._row(h), id=h) for h in self.hosts), id="move-hosts", compact=True)
            yield Static("", id="move-hint")
            yield Static("", id="form-error")
            with Horizontal(id="dialog-buttons"):
                yield Button("Back", id="cancel", compact=True)
                yield Button("Move", id="confirm", variant="primary", compact=True, disabled=True)
            yield Static("enter: move to the host · ↑↓: host · esc: back", id="dialog-help")

    def on_mount(self) -> None:
        self.run_worker(self._ask_all(), name=f"where can {self.vm_name} move", group="move-check",
                        exit_on_error=False)

    async def _ask_all(self) -> None:
        async def ask(host: str) -> None:
            self.answers[host] = await self.check(host)
            self._show(host)
        await asyncio.gather(*(ask(h) for h in self.hosts))

    def _row(self, host: str) -> Content:
        name = esc(host.ljust(self.name_width))
        if host not in self.answers:
            return Content.from_markup(f"  {name}  [$text-muted]{esc(ASKING)}[/]")
        answer = self.answers[host]
        if answer is None:
            return Content.from_markup(f"✔ [b]{name}[/b]  {esc(self.vm_name)} can move here")
        return Content.from_markup(f"[$text-muted]✖ {name}  {esc(answer[0])}[/]")

    def _show(self, host: str) -> None:
        hosts = self.query_one("#move-hosts", OptionList)
        hosts.replace_option_prompt(host, self._row(host))
        if hosts.highlighted_option is not None and hosts.highlighted_option.id == host:
            self._say_hint(host)

    def _say_hint(self, host: str) -> None:
        answer = self.answers.get(host)
        hint = f"hint: {answer[1]}" if answer and answer[1] else ""
        self.query_one("#move-hint", Static).update(Content(hint))
        self.query_one("#form-error", Static).update("")
        self.query_one("#confirm", Button).disabled = host not in self.answers or answer is not None

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option.id:
            self._say_hint(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.choose(event.option.id)

    def choose(self, host: str) -> None:
        """Close with `host` when the engine said the move applies; else say why it does not."""
        error = self.query_one("#form-error", Static)
        if host not in self.answers:
            error.update(Content(f"{host}: {ASKING}"))
            return
        answer = self.answers[host]
        if answer is not None:
            error.update(Content(f"{self.vm_name} cannot move to {host}: its row says why"))
            return
        self.dismiss(host)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        option = self.query_one("#move-hosts", OptionList).highlighted_option
        if event.button.id != "confirm":
            self.dismiss(None)
        elif option is not None and option.id:
            self.choose(option.id)

    def action_back(self) -> None:
        self.dismiss(None)
