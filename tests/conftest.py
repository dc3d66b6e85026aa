"""Shared fixtures. The sshd harness is a plugin in harness/sshd.py."""

import pytest

pytest_plugins = ["harness.sshd"]


@pytest.fixture(params=["openssh", "asyncssh"])
def via(request, monkeypatch):
    """Bulk data through the OpenSSH client (the default), or relayed over asyncssh (a machine
    without an `ssh` binary): both paths must give the same result."""
    if request.param == "asyncssh":
        import engine.transport.openssh as openssh
        real = openssh.shutil.which
        monkeypatch.setattr(openssh.shutil, "which", lambda name, *a, **k: None if name == "ssh" else real(name))
    return request.param
