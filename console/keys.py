"""The operator's keys: remapped from config.toml `[console.keys]`, and read-only mode.

A binding's id ("ferry.tasks.cancel") is what config.toml names without its "ferry." prefix:

    [console.keys]
    tasks.cancel = "C"
    inventory.vm.delete = "ctrl+d"

Every binding of the console's views is built from the one catalogue of actions (console/actions.py):
`bindings(group)`.

Read-only mode (`ferry --readonly`, or `[console] readonly = true`) removes every action that
changes something (k9s' --readonly): their keys leave the footer, the help and the palette, and
pressing one says why in one line.
"""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

from ferry.console import actions as catalogue
from ferry.console.actions import Action

PREFIX = "ferry."

# Actions that change a task, a VM or a template: the catalogue's rows with `changes`.
DESTRUCTIVE_ACTIONS = catalogue.changing_methods()
READONLY_NOTICE = "read-only console: {what} is not available (--readonly, or [console] readonly = true)"


def binding(action: Action) -> Binding:
    """The Textual binding of one catalogue action: its id is what [console.keys] remaps."""
    return Binding(action.key, action.name, action.title, show=action.show, priority=action.priority,
                   id=action.binding_id, tooltip=action.help)


def bindings(*groups: str) -> list[Binding]:
    """The bindings of the catalogue's actions of these view groups ("app", "vm", "tasks", ...), in
    catalogue order."""
    return [binding(a) for g in groups for a in catalogue.group(g)]


def implemented(cls: type, found: list) -> list:
    """`found` without the catalogue's bindings whose method `cls` does not have (yet): a row may name
    an action before its view implements it."""
    def missing(b: object) -> bool:
        action = action_of(b) if isinstance(b, Binding) else None
        return action is not None and not hasattr(cls, "action_" + action.method)
    return [b for b in found if not missing(b)]


def action_of(b: Binding) -> Action | None:
    """The catalogue's row of a binding (None: a binding of a dialog or an input, not in the catalogue)."""
    return catalogue.by_id(b.id) if b.id else None


def is_destructive(action: str) -> bool:
    """`action` as a binding names it ("vm_delete", "app.control('cancel')"): does it change anything?"""
    name = action.rsplit(".", 1)[-1].split("(", 1)[0]
    return name in DESTRUCTIVE_ACTIONS


def config_keymap(keys: dict[str, str]) -> dict[str, str]:
    """config.toml's [console.keys] (ids without "ferry.") as Textual's keymap (binding id -> keys)."""
    return {(k if k.startswith(PREFIX) else PREFIX + k): str(v) for k, v in keys.items()}


def binding_ids(classes: Iterable[Any]) -> set[str]:
    """Every binding id of these widget classes (and their bases)."""
    ids: set[str] = set()
    for cls in classes:
        for klass in getattr(cls, "__mro__", ()):
            for b in vars(klass).get("BINDINGS", []) or []:
                if isinstance(b, Binding) and b.id:
                    ids.add(b.id)
    return ids


def unknown_ids(keymap: dict[str, str], known: set[str]) -> list[str]:
    """The ids of `keymap` that name no binding (as the operator wrote them)."""
    return sorted(k.removeprefix(PREFIX) for k in keymap if k not in known)


def short_id(binding_id: str | None) -> str:
    return (binding_id or "").removeprefix(PREFIX)


def keys_of(binding: Binding, keymap: dict[str, str]) -> list[str]:
    """The keys a binding answers to, after any remapping."""
    keys = keymap.get(binding.id, binding.key) if binding.id else binding.key
    return [k.strip() for k in keys.split(",") if k.strip()]
