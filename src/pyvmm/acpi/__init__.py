"""pyvmm.acpi: AML encoder (aml, resources) and the ACPI tables of a VM (platform, dsdt, tables).

The VM builder only needs `build_acpi_tables(AcpiPlatform(...))`; write `.data` at `.address` and hand
`.rsdp_address` to the boot protocol.
"""

from pyvmm.acpi.platform import AcpiPciSegment, AcpiPlatform, AcpiPlatformError
from pyvmm.acpi.tables import AcpiTableError, AcpiTables, build_acpi_tables

__all__ = [
    "AcpiPciSegment",
    "AcpiPlatform",
    "AcpiPlatformError",
    "AcpiTableError",
    "AcpiTables",
    "build_acpi_tables",
]
