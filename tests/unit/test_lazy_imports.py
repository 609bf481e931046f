"""Start-up imports (docs/ARCHITECTURE.md#start-up): a VM without passthrough, disks or networks does not load
the VFIO, host or disk stacks, and the packages that import their exports on first use still offer them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# Loaded only by VMs that use them (or by the `pyvmm-host` tool).
NOT_FOR_A_PLAIN_VM = [
    "pyvmm.vfio.passthrough",
    "pyvmm.vfio.pci",
    "pyvmm.vfio.container",
    "pyvmm.host.binding",
    "pyvmm.host.inuse",
    "pyvmm.host.journal",
    "pyvmm.devices.virtio.block",
    "pyvmm.devices.virtio.image",
    "pyvmm.vhost.storage_daemon",
]

LAZY_PACKAGES = ["pyvmm.host", "pyvmm.vfio", "pyvmm.devices.virtio"]


def test_what_a_vm_start_imports_leaves_out_the_stacks_it_does_not_use() -> None:
    # A fresh interpreter: this one has imported everything the other tests use.
    code = (
        "import sys\n"
        "import pyvmm.cli, pyvmm.vmm, pyvmm.builder, pyvmm.machine\n"
        "from pyvmm.devices.virtio import attach, console, rng\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pyvmm'))))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert "pyvmm.builder" in loaded and "pyvmm.seccomp.allowlists" in loaded
    assert not loaded & set(NOT_FOR_A_PLAIN_VM), sorted(loaded & set(NOT_FOR_A_PLAIN_VM))


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_every_export_of_a_lazy_package_resolves_to_its_submodules_object(name: str) -> None:
    package = importlib.import_module(name)
    for export in package.__all__:
        value = getattr(package, export)
        assert getattr(value, "__name__", export) == export, (name, export)
        assert value is vars(package)[export]  # kept: the next lookup is a plain attribute read


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_a_name_a_lazy_package_does_not_export_is_an_attribute_error(name: str) -> None:
    package = importlib.import_module(name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        package.no_such_thing  # noqa: B018


def test_from_import_of_a_submodule_still_works_through_a_lazy_package() -> None:
    from pyvmm.host import sysfs
    from pyvmm.vfio import capabilities

    assert sysfs.__name__ == "pyvmm.host.sysfs" and capabilities.__name__ == "pyvmm.vfio.capabilities"
