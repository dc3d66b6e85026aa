"""The virtualization platform: QEMU hosts and VMs, QMP, the guest agent, the live image."""
