"""`guest_extra_initramfs.py OUT`: the lab's guest initramfs with a second cpio archive appended (the kernel
unpacks both) holding /pyvmm-extra/button.ko and evdev.ko from the guest kernel's module tree, so a test
guest can load the ACPI button driver and read its input events."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

from pyvmm.lab.cpio import CpioArchive


def main(out: Path) -> None:
    tree = next(Path(os.environ["PYVMM_CACHE"], "kernel").glob("*/lib/modules/*/kernel"))
    extra = CpioArchive()
    extra.add_host_file("pyvmm-extra/button.ko", tree / "drivers/acpi/button.ko", 0o644)
    extra.add_host_file("pyvmm-extra/evdev.ko", tree / "drivers/input/evdev.ko", 0o644)
    base = Path(os.environ["PYVMM_GUEST_INITRAMFS"]).read_bytes()
    out.write_bytes(base + gzip.compress(extra.pack()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
