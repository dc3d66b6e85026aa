"""Dialogs for VM actions: a small form (create, clone, deploy, export, import) and the delete
dialog that asks for the VM's name to be typed before its button does anything.

On a production site both say so at their top (as ConfirmScreen does), and the delete dialog
starts on its safest mode: the recycle bin, from which the VM can come back."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Awaitable, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Input, Select, Static

from ferry.console.dialogs.modals import esc, production_line

DELETE_MODES = (
    ("normal", "remove the record and the disk files"),
    ("secure", "overwrite the disks, verify, then remove them (slow)"),
    ("delayed", "move it to the recycle bin; purged after the days below"),
)
SAFEST_MODE = "delayed"     # the default on a production site: the VM can be restored (u) until purged


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    value: str | bool = ""
    kind: str = "text"                                  # text | select | check
    options: tuple[tuple[str, str], ...] = ()           # select: (shown, value)
    placeholder: str = ""                               # text: shown while empty; check: its label
    restrict: str | None = None                         # text: allowed characters (a regex)


def field_widget(f: Field) -> Input | Select | Checkbox:
    """The widget of one form field (id f-KEY, class form-field)."""
    if f.kind == "select":
        return Select(f.options, value=f.value, allow_blank=False, compact=True, id=f"f-{f.key}", classes="form-field")
    if f.kind == "check":
        return Checkbox(f.placeholder, bool(f.value), compact=True, id=f"f-{f.key}", classes="form-field")
    return Input(str(f.value), placeholder=f.placeholder, restrict=f.restrict, compact=True, id=f"f-{f.key}",
                 classes="form-field")


def form_values(screen: Screen, fields: list[Field]) -> dict:
    """The fields' values as shown on `screen` (text stripped)."""
    out: dict = {}
    for f in fields:
        w = screen.query_one(f"#f-{f.key}")
        out[f.key] = w.value.strip() if isinstance(w, Input) else w.value
    return out


class FormScreen(ModalScreen[dict | None]):
    """A few fields and OK/Back. `check(values)` returns (or, a coroutine, comes back with) a problem to
    show, or None to close with the values: the VM forms ask the engine's precheck there."""

    AUTO_FOCUS = ".form-field"
    BINDINGS = [Binding("escape", "back", "Back", id="ferry.form.back")]

    def __init__(self, title: str, fields: list[Field], *, confirm: str = "OK", intro: str = "",
                 check: Callable[[dict], str | None | Awaitable[str | None]] | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.fields = fields
        self.confirm_label = confirm
        self.intro = intro
        self.check = check
        # A list first (where to back up, which checklist): its default is the usual answer, and enter
        # on a list opens it; OK takes the focus, so enter does what the help line says.
        if fields and fields[0].kind == "select":
            self.AUTO_FOCUS = "#confirm"

    def compose(self) -> ComposeResult:
        production = production_line(self.app)
        with Vertical(id="dialog", classes="form danger" if production else "form"):
            if production:
                yield Static(Content.from_markup(production), id="dialog-production")
            yield Static(Content(self.title_text), id="dialog-title")
            if self.intro:
                yield Static(Content(self.intro), id="dialog-body")
            for f in self.fields:
                with Horizontal(classes="form-row"):
                    yield Static(Content(f.label), classes="form-label")
                    yield field_widget(f)
            yield Static("", id="form-error")
            with Horizontal(id="dialog-buttons"):
                yield Button("Back", id="cancel", compact=True)
                yield Button(self.confirm_label, id="confirm", variant="primary", compact=True)
            yield Static("enter: OK · tab: next field · esc: back", id="dialog-help")

    def values(self) -> dict:
        return form_values(self, self.fields)

    def submit(self) -> None:
        self.run_worker(self._submit(self.values()), name="form check", group="form-check", exclusive=True,
                        exit_on_error=False)

    async def _submit(self, vals: dict) -> None:
        problem = self.check(vals) if self.check else None
        if inspect.isawaitable(problem):
            self.query_one("#form-error", Static).update(Content("asking the engine…"))
            problem = await problem
        if problem:
            self.query_one("#form-error", Static).update(Content(problem))
            return
        if self.app.screen is self:      # not closed (esc) while the engine was asked
            self.dismiss(vals)

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "confirm":
            self.submit()
        else:
            self.dismiss(None)

    def action_back(self) -> None:
        self.dismiss(None)


class TypedNameScreen(ModalScreen[dict | None]):
    """Delete (or purge): the action button stays disabled until the typed text equals the name."""

    AUTO_FOCUS = "#typed"
    BINDINGS = [Binding("escape", "back", "Back", id="ferry.typed.back")]

    def __init__(self, name: str, *, title: str, body: str, confirm: str = "Delete", modes: bool = True,
                 keep_days: int = 7, what: str = "the name") -> None:
        super().__init__()
        self.vm_name = name
        self.what = what
        self.title_text = title
        self.body_text = body
        self.confirm_label = confirm
        self.modes = modes
        self.keep_days = keep_days

    def compose(self) -> ComposeResult:
        production = production_line(self.app)
        mode = SAFEST_MODE if production else "normal"     # production: what can come back, by default
        with Vertical(id="dialog", classes="form danger"):
            if production:
                yield Static(Content.from_markup(production), id="dialog-production")
            yield Static(Content(self.title_text), id="dialog-title")
            yield Static(Content(self.body_text), id="dialog-body")
            with Horizontal(classes="form-row"):
                yield Static(Content.from_markup(f"Type [b]{esc(self.vm_name)}[/b]"), classes="form-label")
                yield Input(placeholder=f"{self.what}, to confirm", compact=True, id="typed", classes="form-field")
            if self.modes:
                with Horizontal(classes="form-row"):
                    yield Static("Mode", classes="form-label")
                    yield Select([(m, m) for m, _ in DELETE_MODES], value=mode, allow_blank=False, compact=True,
                                 id="mode", classes="form-field")
                with Horizontal(classes="form-row"):
                    yield Static("Keep days", classes="form-label")
                    yield Input(str(self.keep_days), restrict=r"[0-9]*", compact=True, id="keep",
                                disabled=mode != "delayed", classes="form-field")
                yield Static(Content(dict(DELETE_MODES)[mode]), id="mode-help")
            yield Static("", id="form-error")
            with Horizontal(id="dialog-buttons"):
                yield Button("Back", id="cancel", compact=True)
                yield Button(self.confirm_label, id="confirm", variant="error", compact=True, disabled=True)
            yield Static(f"the button works once {self.what} is typed · esc: back", id="dialog-help")

    @property
    def matches(self) -> bool:
        return self.query_one("#typed", Input).value == self.vm_name

    @on(Input.Changed, "#typed")
    def _typed(self, event: Input.Changed) -> None:
        self.query_one("#confirm", Button).disabled = not self.matches
        self.query_one("#form-error", Static).update("")

    @on(Select.Changed, "#mode")
    def _mode(self, event: Select.Changed) -> None:
        mode = str(event.value)
        self.query_one("#keep", Input).disabled = mode != "delayed"
        self.query_one("#mode-help", Static).update(Content(dict(DELETE_MODES).get(mode, "")))

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def submit(self) -> None:
        if not self.matches:
            self.query_one("#form-error", Static).update(Content(f"type {self.what} exactly: {self.vm_name}"))
            return
        out: dict = {"confirm": self.vm_name}
        if self.modes:
            out["mode"] = str(self.query_one("#mode", Select).value)
            if out["mode"] == "delayed":
                days = self.query_one("#keep", Input).value.strip()
                out["keep_days"] = int(days) if days else self.keep_days
        self.dismiss(out)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "confirm":
            self.submit()
        else:
            self.dismiss(None)

    def action_back(self) -> None:
        self.dismiss(None)
