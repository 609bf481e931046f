"""pyvmm: a virtual machine monitor in Python on Linux KVM, built for VFIO PCI passthrough."""

__version__ = "0.1.0"
