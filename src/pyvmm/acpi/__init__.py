"""pyvmm.acpi"""
