"""pyvmm.pci"""
