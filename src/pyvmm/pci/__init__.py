"""pyvmm.pci: the emulated PCI platform.

allocator (address ranges, top-down), apertures (per-segment windows), bar (BAR data), config (config space
with shadow BARs), device (the PciDevice interface, BarBusAdapter), bus (PciSegment, ECAM, 0xCF8),
msi (MSI / MSI-X emulation).
"""
