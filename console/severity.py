"""Fixed meanings: a severity or task state is always a symbol and a word, and then a colour."""

from __future__ import annotations

import enum

from rich.text import Text

from ferry.engine.taskmodel import TaskState

from ferry.console.theming import rich_style


class Severity(enum.Enum):
    CRIT = ("✖", "CRIT", "sev-crit")
    MAJ = ("▲", "MAJ", "sev-maj")
    MIN = ("●", "MIN", "sev-min")
    WARN = ("◆", "WARN", "sev-warn")
    OK = ("✔", "OK", "sev-ok")
    UNKNOWN = ("?", "UNKNOWN", "sev-unknown")

    @property
    def symbol(self) -> str:
        return self.value[0]

    @property
    def word(self) -> str:
        return self.value[1]

    @property
    def variable(self) -> str:
        return self.value[2]

    @property
    def label(self) -> str:
        return f"{self.symbol} {self.word}"

    def markup(self, text: str | None = None) -> str:
        """Textual content markup in the severity's theme colour."""
        return f"[${self.variable}]{self.symbol} {text if text is not None else self.word}[/]"

    def text(self, variables: dict[str, str], text: str | None = None) -> Text:
        return Text(f"{self.symbol} {text if text is not None else self.word}", style=rich_style(variables, self.variable))


def usage_severity(fraction: float | None) -> Severity:
    """How full a datastore or memory is."""
    if fraction is None:
        return Severity.UNKNOWN
    if fraction >= 0.95:
        return Severity.CRIT
    if fraction >= 0.90:
        return Severity.MAJ
    if fraction >= 0.80:
        return Severity.WARN
    return Severity.OK


def load_severity(load1: float | None, cpus: int | None) -> Severity:
    """Load average per CPU."""
    if load1 is None or not cpus:
        return Severity.UNKNOWN
    per_cpu = load1 / cpus
    if per_cpu >= 4:
        return Severity.CRIT
    if per_cpu >= 2:
        return Severity.MAJ
    if per_cpu >= 1:
        return Severity.WARN
    return Severity.OK


def state_variable(state: TaskState) -> str:
    return f"state-{state.value}"


def state_markup(state: TaskState) -> str:
    return f"[${state_variable(state)}]{state.symbol} {state.value}[/]"


def state_text(state: TaskState, variables: dict[str, str]) -> Text:
    return Text(f"{state.symbol} {state.value}", style=rich_style(variables, state_variable(state),
                                                                   bold=state == TaskState.WAITING))
