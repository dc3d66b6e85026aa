"""Shared fixtures. The sshd harness is a plugin in harness/sshd.py."""

pytest_plugins = ["harness.sshd"]
