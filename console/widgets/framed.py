"""Full screens (the main one, the task log): drawn inside the theme's frame, and, on a production
site, inside the production frame with its label whatever the theme. Dialogs draw no frame of their own."""

from __future__ import annotations

from textual.screen import Screen


class FramedScreen(Screen):
    def on_mount(self) -> None:
        site = getattr(self.app, "site", None)
        production = bool(getattr(site, "production", False))
        self.set_class(production, "-production")
        if production:
            self.border_title = f"⚠ PRODUCTION · {getattr(site, 'name', '')}"
