"""VMs and templates on the QEMU hosts of a site."""
