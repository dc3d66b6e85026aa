"""The one-line header: where you are (site › view › item), production and read-only badges, engine state, clock."""

from __future__ import annotations

import time
from typing import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.reactive import reactive
from textual.widgets import Static

from ferry.console.dialogs.modals import esc
from ferry.console.widgets.paint import update_static

ENGINE_LOOK = {
    "running": ("sev-ok", "▶"),
    "stopping": ("sev-warn", "◆"),
    "stopped": ("sev-crit", "■"),
    "draining": ("sev-warn", "◆"),
    "connecting": ("sev-warn", "↻"),
    "reconnecting": ("sev-warn", "↻"),     # the engine service went away; the console waits for it
    "disconnected": ("sev-crit", "■"),
}


class FerryHeader(Horizontal):
    crumbs: reactive[tuple[str, ...]] = reactive(tuple)
    engine_state: reactive[str] = reactive("stopped")
    now: reactive[float] = reactive(0.0)

    def __init__(self, site_name: str, production: bool, *, clock: Callable[[], float] = time.time,
                 engine_state: Callable[[], str] = lambda: "stopped", readonly: bool = False) -> None:
        super().__init__(id="header")
        self.site_name = site_name
        self.production = production
        self.readonly = readonly
        self.clock = clock
        self.engine_state_of = engine_state

    def compose(self) -> ComposeResult:
        yield Static(id="crumbs", markup=False)
        if self.production:
            yield Static("⚠ PRODUCTION", id="badge")
        if self.readonly:
            yield Static("READ-ONLY", id="readonly")
        yield Static(id="engine")
        yield Static(id="clock")

    def on_mount(self) -> None:
        self.set_interval(1.0, self.tick)
        self.tick()
        self._render_clock()
        self._render_crumbs()
        self._render_engine()

    def tick(self) -> None:
        """Once a second: the clock, and the engine state (also updated on engine events)."""
        self.now = self.clock()
        self.engine_state = self.engine_state_of()

    def watch_now(self) -> None:
        self._render_clock()

    def watch_crumbs(self) -> None:
        self._render_crumbs()

    def watch_engine_state(self) -> None:
        self._render_engine()

    def _render_clock(self) -> None:
        for w in self.query("#clock").results(Static):
            text = time.strftime("%H:%M:%S", time.localtime(self.now))
            w.update(text, layout=len(str(w.content)) != len(text))    # the same width: no layout

    def _render_crumbs(self) -> None:
        if not self.query("#crumbs"):
            return
        parts = [f"[b $primary]{esc(self.site_name)}[/]"] + [esc(c) for c in self.crumbs]
        update_static(self.query_one("#crumbs", Static), Content.from_markup(" [$text-muted]›[/] ".join(parts)))

    def _render_engine(self) -> None:
        if not self.query("#engine"):
            return
        var, sym = ENGINE_LOOK.get(self.engine_state, ("sev-unknown", "?"))
        self.query_one("#engine", Static).update(
            Content.from_markup(f"engine [${var}]{sym} {esc(self.engine_state)}"
                                f"{'…' if self.engine_state.endswith('connecting') else ''}[/]"))
