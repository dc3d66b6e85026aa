"""What every top-level view of the console has: whether the operator sees it, and its crumbs."""

from __future__ import annotations

from typing import Any

from ferry.console.keys import implemented
from ferry.console.messages import CrumbsChanged


class ViewBase:
    """Mixed into the inventory, VMs and Tasks views (before their Textual widget class)."""

    VIEW: str
    app: Any
    screen: Any
    display: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A catalogue row may name an action its view does not implement yet: no key for it there.
        if "BINDINGS" in cls.__dict__:
            cls.BINDINGS = implemented(cls, cls.__dict__["BINDINGS"])
        super().__init_subclass__(**kwargs)

    @property
    def shown(self) -> bool:
        """On screen now: the active view, not covered by a modal."""
        return self.display and self.app.screen is self.screen

    def crumbs(self) -> tuple[str, ...]:
        raise NotImplementedError

    def post_crumbs(self) -> None:
        """The header shows the view's crumbs: at once where the app can (drawn in the frame of the
        cursor move that changed them), else by a message."""
        set_crumbs = getattr(self.app, "set_crumbs", None)
        if set_crumbs is not None:
            set_crumbs(self.VIEW, self.crumbs())
        else:
            self.post_message(CrumbsChanged(self.VIEW, self.crumbs()))
