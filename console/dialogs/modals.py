"""Modal screens: confirmation (default focus on the safe choice) and the keys of a view."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from ferry.engine.textsafe import lines


def esc(text: str) -> str:
    """Make text safe inside content markup, and on the terminal: its control characters are shown
    as escapes (Textual drops a few, but passes ESC and the C1 characters to the terminal)."""
    text = lines(text).replace("[", "\\[")
    # Textual cannot escape a backslash: one at the end would escape the markup tag that follows.
    return text[:-1] + "\\x5c" if text.endswith("\\") else text


def production_site(app: object) -> str | None:
    """The site's name when it is a production site (dialogs that change something say so)."""
    site = getattr(app, "site", None)
    if not getattr(site, "production", False):
        return None
    return getattr(site, "name", "") or "this site"


def production_line(app: object) -> str:
    """Content markup for the top of a dialog that changes something on a production site ("" elsewhere)."""
    name = production_site(app)
    return f"[b $production]⚠ PRODUCTION: this changes the production site {esc(name)}[/]" if name else ""


class ConfirmScreen(ModalScreen[bool]):
    """Asks before an action; `enter` on the default button never does the dangerous thing.
    On a production site a dialog that changes something (`changes`) says so at its top."""

    AUTO_FOCUS = "#cancel"
    BINDINGS = [
        Binding("escape", "back", "Back", id="ferry.modal.back"),
        Binding("left", "app.focus_previous", "Previous", show=False, id="ferry.modal.left"),
        Binding("right", "app.focus_next", "Next", show=False, id="ferry.modal.right"),
    ]

    def __init__(self, title: str, body: str, *, confirm: str, cancel: str = "Back", danger: bool = True,
                 changes: bool = True) -> None:
        super().__init__()
        self.title_text = title
        self.body_text = body
        self.confirm_label = confirm
        self.cancel_label = cancel
        self.danger = danger
        self.changes = changes

    def compose(self) -> ComposeResult:
        production = production_line(self.app) if self.changes else ""
        with Vertical(id="dialog", classes="danger" if self.danger or production else ""):
            if production:
                yield Static(Content.from_markup(production), id="dialog-production")
            yield Static(Content(self.title_text), id="dialog-title")
            yield Static(Content(self.body_text), id="dialog-body")
            with Horizontal(id="dialog-buttons"):
                yield Button(self.cancel_label, id="cancel")
                yield Button(self.confirm_label, id="confirm", variant="error" if self.danger else "primary")
            yield Static("enter: the focused button · tab/←→: move · esc: back", id="dialog-help")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm")

    def action_back(self) -> None:
        self.dismiss(False)


class HelpScreen(ModalScreen[None]):
    """The keys of the view that was shown, then the keys that work everywhere."""

    BINDINGS = [
        Binding("escape", "close", "Back", id="ferry.help.back"),
        Binding("question_mark", "close", "Close", show=False, id="ferry.help.close"),
        Binding("q", "close", "Close", show=False, id="ferry.help.quit"),
    ]

    def __init__(self, title: str, sections: list[tuple[str, list[tuple[str, ...]]]], *, note: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.sections = sections
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(Content(self.title_text), id="help-title")
            if self.note:
                yield Static(Content.from_markup(f"[b $warning]{esc(self.note)}[/]"), id="help-note")
            with VerticalScroll(id="help-body"):
                for heading, rows in self.sections:
                    if not rows:
                        continue
                    width = max(len(r[0]) for r in rows)
                    lines = [f"[b]{esc(heading)}[/b]"]
                    for k, d, *rest in rows:
                        ident = f"  [$text-muted]{esc(rest[0])}[/]" if rest and rest[0] else ""
                        lines.append(f"  [$accent]{esc(k.ljust(width))}[/]  {esc(d)}{ident}")
                    yield Static(Content.from_markup("\n".join(lines)), classes="help-section")
            yield Static("esc or ? to close · the grey names are the ids config.toml's [console.keys] remaps",
                         id="help-foot")

    def action_close(self) -> None:
        self.dismiss(None)
