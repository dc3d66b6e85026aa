"""The operator's keys: remapped from config.toml `[console.keys]`, and read-only mode.

A binding's id ("ferry.tasks.cancel") is what config.toml names without its "ferry." prefix:

    [console.keys]
    tasks.cancel = "C"
    inventory.vm.delete = "ctrl+d"

Read-only mode (`ferry --readonly`, or `[console] readonly = true`) removes every action that
changes something (k9s' --readonly): their keys leave the footer, the help and the palette, and
pressing one says why in one line.
"""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

PREFIX = "ferry."

# Actions that change a task, a VM or a template. Every new action that changes something joins here.
DESTRUCTIVE_ACTIONS = frozenset({
    "pause", "resume", "cancel_task",
    "vm_start", "vm_stop", "vm_force_stop", "vm_reboot", "vm_hibernate", "vm_create", "vm_clone",
    "vm_convert", "vm_deploy", "vm_export", "vm_import", "vm_delete", "vm_restore", "vm_purge",
    "vm_migrate", "vm_snapshot", "vm_mark_act",
    "vm_serial",        # typing into a guest's serial console changes whatever the guest lets it
})
READONLY_NOTICE = "read-only console: {what} is not available (--readonly, or [console] readonly = true)"


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
