"""Test harness: real parts (sshd) started by the test suite itself."""
