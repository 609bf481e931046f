"""Guest-physical address layout for x86_64 guests (every fixed address lives here).

The layout follows cloud-hypervisor's (see docs/memory-layout.md) so that guests and users see the same
addresses under both VMMs.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Low memory: boot structures written by the loader.
EBDA_POINTER = 0x40E
BOOT_GDT_START = 0x500
BOOT_IDT_START = 0x520
PVH_START_INFO_START = 0x6000  # PVH entry (ELF vmlinux): hvm_start_info (56 bytes), %ebx points here
PVH_MODLIST_START = 0x6040  # its module list: one hvm_modlist_entry, the initramfs
ZERO_PAGE_START = 0x7000  # Linux boot_params ("zero page") of a bzImage boot
PVH_MEMMAP_START = 0x7000  # PVH: the start info's memory map (hvm_memmap_table_entry[]) in its place
PVH_MEMMAP_END = 0x8000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # 4 consecutive pages of 2 MiB page directories (identity map of 4 GiB)
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0xA0000  # ACPI tables (RSDP first) are written here
RSDP_POINTER = EBDA_START
HIGH_RAM_START = 0x100000  # lowest kernel load address
RESET_VECTOR = 0xFFFF0  # where a guest that restarts through real mode (reboot=bios) lands

# RAM may occupy [0, 3 GiB) and [4 GiB, ...).
LOW_RAM_END = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000

# The 32-bit hole.
MEM_32BIT_DEVICES_START = 0xC000_0000
MEM_32BIT_DEVICES_SIZE = 640 * MiB
PCI_MMCONFIG_START = 0xE800_0000
PCI_MMCONFIG_SIZE = 256 * MiB
PCI_MMCONFIG_SIZE_PER_SEGMENT = 1 * MiB
KVM_TSS_START = 0xF800_0000
KVM_TSS_SIZE = 3 * 4 * KiB
KVM_IDENTITY_MAP_START = 0xF800_3000
IOAPIC_START = 0xFEC0_0000
IOAPIC_SIZE = 0x20
APIC_START = 0xFEE0_0000
MSI_WINDOW_START = 0xFEE0_0000
MSI_WINDOW_SIZE = 0x10_0000

# The 64-bit device area ends 64 KiB + 1 MiB below the top of the guest physical address space;
# the top 1 MiB of the addressable part is the platform MMIO area.
TOP_RESERVED_SIZE = 64 * KiB
PLATFORM_AREA_SIZE = 1 * MiB
DEFAULT_MAX_PHYS_BITS = 46
# The ACPI control devices of the platform area, handed out top-down a page each (cloud-hypervisor's order,
# docs/hotplug.md#registers): the PCI hot-plug registers (PCIU, PCID, B0EJ, PSEG) in the top page, the
# Generic Event Device's one-byte event register in the page below.
PLATFORM_DEVICE_ALIGN = 4 * KiB
PCI_HOTPLUG_SIZE = 0x10
GED_SIZE = 1

# Legacy I/O ports and interrupt lines.
SERIAL_COM1_PORT = 0x3F8
SERIAL_COM1_IRQ = 4
PCI_CONFIG_IO_PORT = 0xCF8
PCI_CONFIG_IO_SIZE = 8
ACPI_PM_PORT = 0x600  # sleep control/status and reset register of the HW-reduced ACPI platform
ACPI_PM_SIZE = 8
I8042_PORT = 0x60  # keyboard controller data (0x60) .. command (0x64): only its reset pulse is emulated
I8042_SIZE = 5
CMOS_PORT = 0x70  # CMOS RTC index (0x70) and data (0x71) registers, where every PC has them
CMOS_SIZE = 2
IOAPIC_NUM_PINS = 24
PCI_INTX_IRQS = (5, 6, 7, 8, 9, 10, 11, 12)  # slot s uses PCI_INTX_IRQS[s % 8]
GED_IRQ = 13  # the Generic Event Device's edge-triggered line: the first IOAPIC pin after PCI_INTX_IRQS
MSI_GSI_BASE = 24
MSI_GSI_END = 4096
MSI_ROUTES_MAX = 2048  # GSIs 24-2071: half of KVM's 4096 routes (docs/interrupts.md#routing-failures)


def ecam_base(segment: int) -> int:
    """Guest-physical base of a PCI segment's 1 MiB ECAM window."""
    return PCI_MMCONFIG_START + segment * PCI_MMCONFIG_SIZE_PER_SEGMENT


def ram_regions(size: int) -> list[tuple[int, int]]:
    """Split `size` bytes of guest RAM into (guest address, length) regions around the 32-bit hole."""
    low = min(size, LOW_RAM_END)
    regions = [(0, low)]
    if size > low:
        regions.append((HIGH_RAM_BASE, size - low))
    return regions


def mmio64_area(ram_size: int, phys_bits: int) -> tuple[int, int]:
    """Inclusive [start, end] of the 64-bit PCI device area for a guest of `ram_size` bytes."""
    regions = ram_regions(ram_size)
    last_gpa, last_len = regions[-1]
    ram_end = last_gpa + last_len
    start = HIGH_RAM_BASE if ram_end <= LOW_RAM_END else ram_end
    end = (1 << phys_bits) - TOP_RESERVED_SIZE - PLATFORM_AREA_SIZE - 1
    return start, end


def platform_area(phys_bits: int) -> tuple[int, int]:
    """[start, end) of the platform MMIO area: the top 1 MiB below the 64 KiB left unused at the top."""
    end = (1 << phys_bits) - TOP_RESERVED_SIZE
    return end - PLATFORM_AREA_SIZE, end


def pci_hotplug_base(phys_bits: int) -> int:
    """Guest-physical address of the PCI hot-plug registers (PCI_HOTPLUG_SIZE bytes)."""
    return platform_area(phys_bits)[1] - PLATFORM_DEVICE_ALIGN


def ged_base(phys_bits: int) -> int:
    """Guest-physical address of the Generic Event Device's event register (GED_SIZE bytes)."""
    return platform_area(phys_bits)[1] - 2 * PLATFORM_DEVICE_ALIGN


def e820_entries(ram_size: int) -> list[tuple[int, int, int]]:
    """The E820 map as (address, length, type) with type 1 = RAM and 2 = reserved."""
    regions = ram_regions(ram_size)
    low_len = regions[0][1]
    entries = [(0, EBDA_START, E820_RAM)]
    if low_len > HIGH_RAM_START:
        entries.append((HIGH_RAM_START, low_len - HIGH_RAM_START, E820_RAM))
    for gpa, length in regions[1:]:
        entries.append((gpa, length, E820_RAM))
    entries.append((PCI_MMCONFIG_START, PCI_MMCONFIG_SIZE, E820_RESERVED))
    return sorted(entries)


E820_RAM = 1
E820_RESERVED = 2
