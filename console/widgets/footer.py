"""The footer: Textual's, but rebuilt only when the keys it shows change.

Textual's Footer composes itself anew (a dozen widgets mounted, styled and laid out, then the
whole screen repainted) whenever any widget calls refresh_bindings, which the views do on every
cursor move. Here the keys are compared first: the same keys change nothing, the same keys with
other ones dimmed or enabled (another kind of row under the cursor) only restyle those keys.
"""

from __future__ import annotations

from textual.screen import Screen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def _shape(footer: Footer) -> tuple[tuple, tuple[bool, ...]]:
    """What Footer.compose would show: the keys (one per action, in order, with their text), and
    whether each is enabled."""
    app = footer.app
    first: dict[str, tuple] = {}
    for _node, binding, enabled, tooltip in footer.screen.active_bindings.values():
        if binding.show and binding.action not in first:
            first[binding.action] = (binding, bool(enabled), tooltip)
    keys = tuple((b.key, b.action, b.description, app.get_key_display(b), tip, id(b.group))
                 for b, _, tip in first.values())
    palette = app.COMMAND_PALETTE_BINDING if footer.show_command_palette and app.ENABLE_COMMAND_PALETTE else None
    palette_state = footer.screen.active_bindings.get(palette)
    return (keys, palette, footer.compact), tuple(e for _, e, _ in first.values()) + (
        (bool(palette_state.enabled),) if palette_state else ())


class FerryFooter(Footer):
    """A Footer that recomposes only when its keys change; see the module's docstring."""

    _shown: tuple | None = None

    def bindings_changed(self, screen: Screen) -> None:
        self._bindings_ready = True
        if not screen.app.app_focus or not self.is_attached or screen is not self.screen:
            return
        self.call_after_refresh(self._update_keys)

    async def _update_keys(self) -> None:
        if not self.is_attached:
            return
        shape, states = _shape(self)
        if self._shown is not None and self._shown[0] == shape:
            if self._shown[1] != states:
                self._restyle(states)
            self._shown = (shape, states)
            return
        self._shown = (shape, states)
        await self.recompose()

    def _restyle(self, states: tuple[bool, ...]) -> None:
        """Dim or enable the keys in place (the same keys, in the order they were composed)."""
        keys = list(self.query(FooterKey))
        keys = [k for k in keys if not k.has_class("-command-palette")] + \
            [k for k in keys if k.has_class("-command-palette")]
        if len(keys) != len(states):
            self.call_later(self.recompose)
            return
        for key, enabled in zip(keys, states):
            if key._disabled != (not enabled):
                key._disabled = not enabled
                key.set_class(not enabled, "-disabled")
