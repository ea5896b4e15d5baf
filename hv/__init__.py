"""hv: memory management for QEMU/KVM virtual machines, after VMware ESX Server."""

__version__ = "0.1.0"
