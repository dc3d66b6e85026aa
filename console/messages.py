"""Messages posted by workers and views. Workers only post messages; views and the app handle them."""

from __future__ import annotations

from textual.message import Message

from ferry.console.poller import HostStatus, VMList


class HostUpdated(Message):
    """New facts (or a failure) for one host. A newer one for the same host replaces a pending one."""

    def __init__(self, status: HostStatus) -> None:
        super().__init__()
        self.status = status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, HostUpdated) and message.status.host == self.status.host


class TasksChanged(Message):
    """The task feed has changes; the handler takes them from the feed. Pending ones collapse into one."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TasksChanged)


class CrumbsChanged(Message):
    """A view's position changed (the selected node or task), for the breadcrumb."""

    def __init__(self, view: str, crumbs: tuple[str, ...]) -> None:
        super().__init__()
        self.view = view
        self.crumbs = crumbs


class VMsUpdated(Message):
    """A new VM list (or a failed poll). A newer one replaces a pending one."""

    def __init__(self, vms: VMList) -> None:
        super().__init__()
        self.vms = vms

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, VMsUpdated)


class AgentUpdated(Message):
    """What the guest agent of one VM said (or why it could not)."""

    def __init__(self, name: str, info: dict) -> None:
        super().__init__()
        self.name = name
        self.info = info


class AgentSampled(Message):
    """One guest agent answer for the VMs view (info), or why asking failed (error)."""

    def __init__(self, vm_id: str, info: dict | None, error: str | None = None) -> None:
        super().__init__()
        self.vm_id = vm_id
        self.info = info
        self.error = error
