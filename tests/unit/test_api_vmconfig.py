"""VmConfig JSON -> the same validated VmConfig the command line gives, and back (vm.info's config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvmm.api.vmconfig import VmConfigError, device_config_from_json, vm_config_from_json, vm_config_to_json
from pyvmm.config import ConsoleMode, parse_vm_config

# The shape Kata Containers' CH driver sends (its generated client's defaults included), without the
# virtio-fs and rootfs disk pyvmm does not have yet (its vsock: test_katas_vsock_is_the_command_lines).
KATA = {
    "payload": {"kernel": "/k/vmlinuz", "cmdline": "console=ttyS0 quiet", "initramfs": "/k/initrd"},
    "cpus": {
        "boot_vcpus": 2,
        "max_vcpus": 2,
        "kvm_hyperv": False,
        "nested": True,
        "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1},
    },
    "memory": {
        "size": 268435456,
        "shared": False,
        "hugepages": False,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "prefault": False,
        "thp": True,
    },
    "platform": {"num_pci_segments": 2, "tdx": False, "sev_snp": False},
    "rng": {"src": "/dev/urandom", "iommu": False},
    "serial": {"mode": "Tty"},
    "console": {"mode": "Off", "iommu": False},
    "iommu": False,
    "watchdog": False,
    "pvpanic": False,
    "landlock_enable": False,
    "some_future_key": {"anything": [1, 2]},
}


def test_kata_shape_gives_the_command_lines_config() -> None:
    config = vm_config_from_json(KATA)
    cli = parse_vm_config(
        [
            "--kernel",
            "/k/vmlinuz",
            "--initramfs",
            "/k/initrd",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2,max=2,topology=1:2:1:1",
            "--memory",
            "size=256M",
            "--platform",
            "num_pci_segments=2",
            "--serial",
            "tty",
            "--console",
            "off",
        ]
    )
    assert config == cli


def test_echo_has_defaults_and_reads_back_the_same() -> None:
    config = vm_config_from_json(KATA)
    echo = vm_config_to_json(config)
    assert echo["cpus"]["boot_vcpus"] == 2 and echo["memory"]["size"] == 268435456
    assert echo["serial"] == {"mode": "Tty"} and echo["console"]["mode"] == "Off"
    assert echo["platform"]["num_pci_segments"] == 2
    assert echo["rng"] == {"src": "/dev/urandom", "iommu": False}
    assert vm_config_from_json(json.loads(json.dumps(echo))) == config


def test_katas_vsock_is_the_command_lines(tmp_path: Path) -> None:
    # Kata always sends its agent's channel: a hybrid vsock on a socket in its sandbox directory.
    socket = tmp_path / "clh.sock"
    config = vm_config_from_json(KATA | {"vsock": {"cid": 3, "socket": str(socket), "iommu": False}})
    assert config.vsock == parse_vm_config(["--kernel", "/k", "--vsock", f"cid=3,socket={socket}"]).vsock
    echo = vm_config_to_json(config)
    assert echo["vsock"] == {"cid": 3, "socket": str(socket), "iommu": False, "pci_segment": 0}
    assert vm_config_from_json(json.loads(json.dumps(echo))) == config


def test_minimal_config_gets_chs_defaults() -> None:
    config = vm_config_from_json({"payload": {"kernel": "/k"}})
    echo = vm_config_to_json(config)
    assert echo["memory"]["size"] == 512 << 20
    assert echo["cpus"]["boot_vcpus"] == 1 and echo["cpus"]["max_vcpus"] == 1
    assert echo["serial"]["mode"] == "Null" and echo["console"]["mode"] == "Tty"


def test_disks_and_devices() -> None:
    config = vm_config_from_json(
        {
            "payload": {"kernel": "/k"},
            "disks": [
                {
                    "path": "/img,with,commas",
                    "readonly": True,
                    "image_type": "Raw",
                    "id": "root",
                    "num_queues": 1,
                    "queue_size": 128,
                    "vhost_user": False,
                    "backing_files": False,
                    "sparse": True,
                    "direct": False,
                    "iommu": False,
                }
            ],
            "devices": [
                {
                    "path": "/sys/bus/pci/devices/0000:00:03.0",
                    "id": "sd",
                    "iommu": False,
                    "x_exclude_mmap_bars": [0, 2],
                    "fd": 7,
                }
            ],
        }
    )
    assert config.disks[0].path == Path("/img,with,commas") and config.disks[0].readonly
    assert config.devices[0].x_exclude_mmap_bars == (0, 2) and config.devices[0].id == "sd"
    assert vm_config_from_json(vm_config_to_json(config)) == config


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({}, "payload"),
        ({"payload": {}}, "payload.kernel"),
        ({"payload": {"kernel": "/k", "firmware": "/fw"}}, "payload.firmware"),
        ({"payload": {"kernel": 5}}, "payload.kernel"),
        ({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}}, "cpus"),
        ({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}}, "cpus"),
        ({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": -1}}, "cpus.boot_vcpus"),
        ({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1.5}}, "cpus.boot_vcpus"),
        (
            {"payload": {"kernel": "/k"}, "cpus": {"topology": {"packages": 1}}},
            "cpus.topology.threads_per_core",
        ),
        (
            {"payload": {"kernel": "/k"}, "cpus": {"affinity": [{"vcpu": 0, "host_cpus": [1]}]}},
            "cpus.affinity",
        ),
        ({"payload": {"kernel": "/k"}, "memory": {"size": 1000}}, "memory"),
        ({"payload": {"kernel": "/k"}, "memory": {"size": 1 << 30, "hotplug_size": 1 << 30}}, "memory"),
        ({"payload": {"kernel": "/k"}, "memory": "1G"}, "memory"),
        ({"payload": {"kernel": "/k"}, "serial": {"mode": "Pty"}}, "serial"),
        ({"payload": {"kernel": "/k"}, "serial": {"mode": "Weird"}}, "serial.mode"),
        ({"payload": {"kernel": "/k"}, "console": {"mode": "File"}}, "console.file"),
        ({"payload": {"kernel": "/k"}, "vsock": {"cid": 2, "socket": "/s"}}, "vsock"),
        ({"payload": {"kernel": "/k"}, "vsock": {"cid": 3, "socket": "/s", "iommu": True}}, "vsock"),
        ({"payload": {"kernel": "/k"}, "net": [{"tap": "t0", "vhost_user": True}]}, "net[0]"),
        ({"payload": {"kernel": "/k"}, "net": {"tap": "t0"}}, "net"),
        ({"payload": {"kernel": "/k"}, "iommu": True}, "iommu"),
        ({"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 100}}, "platform"),
        ({"payload": {"kernel": "/k"}, "platform": {"iommufd": True}}, "platform"),
        ({"payload": {"kernel": "/k"}, "devices": [{"id": "x"}]}, "devices[0]"),
        ({"payload": {"kernel": "/k"}, "devices": {"path": "/x"}}, "devices"),
        ({"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "queue_size": 3}]}, "disks[0]"),
        ({"payload": {"kernel": "/k"}, "rng": {"src": "/dev/urandom", "pci_segment": 1}}, "rng.pci_segment"),
        ({"payload": {"kernel": "/k"}, "devices": [{"path": "/a", "pci_segment": 1}]}, "--device path=/a"),
        ([], "VmConfig"),
    ],
)
def test_refusals_name_the_key(document: object, key: str) -> None:
    with pytest.raises(VmConfigError) as info:
        vm_config_from_json(document)
    assert info.value.option == key, str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_ignored_everywhere() -> None:
    config = vm_config_from_json(
        {
            "payload": {"kernel": "/k", "new": 1},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "future": True},
            "serial": {"mode": "Off", "x": 1},
        }
    )
    assert config.serial.mode is ConsoleMode.OFF


def test_add_device_body_as_ch_remote_sends_it() -> None:
    device = device_config_from_json(
        {"path": "/sys/bus/pci/devices/0000:00:04.0", "iommu": False, "pci_segment": 0, "managed": True}
    )
    assert device.managed and device.path == Path("/sys/bus/pci/devices/0000:00:04.0")


def test_the_config_follows_the_running_vm(tmp_path: Path) -> None:
    """ApiVmm.current_config (vm.info's config, what vm.reboot boots): boot-time disks and devices the guest
    ejected leave it, hot-plugged ones join it with their ids, every id filled in."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pyvmm.api.vmm import ApiVmm
    from pyvmm.config import DiskConfig

    kernel = tmp_path / "k"
    kernel.write_bytes(b"")
    images = [tmp_path / f"d{i}.img" for i in range(3)]
    for image in images:
        image.write_bytes(b"\0" * 4096)
    config = parse_vm_config(["--kernel", str(kernel), "--disk", f"path={images[0]}",
                              f"path={images[1]},id=data",
                              "--device", "path=/sys/bus/pci/devices/0000:01:00.0/",
                              "path=/sys/bus/pci/devices/0000:02:00.0/"])
    hot_disk = replace(config.disks[0], path=images[2], id="hp")
    hot_device = replace(config.devices[0], id="_vfio4")
    present = {"data": None, "_vfio2": None, "hp": None, "_vfio4": None}  # _disk0 and _vfio1 were ejected
    hotplug = SimpleNamespace(devices=lambda: present, hot_plugged=lambda: [("hp", hot_disk),
                                                                           ("_vfio4", hot_device)])
    vmm = ApiVmm()
    vmm.config = config
    assert vmm.current_config() is config  # not running: the stored config as it is
    vmm.machine = SimpleNamespace(hotplug=hotplug)  # type: ignore[assignment]
    now = vmm.current_config()
    assert now is not None
    assert [(d.path, d.id) for d in now.disks] == [(images[1], "data"), (images[2], "hp")]
    assert all(isinstance(d, DiskConfig) for d in now.disks)
    assert [(str(d.path), d.id) for d in now.devices] == [
        ("/sys/bus/pci/devices/0000:02:00.0", "_vfio2"), ("/sys/bus/pci/devices/0000:01:00.0", "_vfio4")]
    shown = vm_config_to_json(now)
    assert [d["id"] for d in shown["disks"]] == ["data", "hp"]
    assert [d["id"] for d in shown["devices"]] == ["_vfio2", "_vfio4"]


def test_vm_shutdown_keeps_the_vm_as_it_was_for_the_next_boot(tmp_path: Path) -> None:
    """vm.shutdown stores the running VM's config (hot-plugged devices in, ejected ones out): vm.boot after
    it boots the same VM, as vm.reboot does and as CH does. The VM itself is stood in for; booting is shown
    in the lab (tests/lab/helpers/kata_api.py, step reboot)."""
    import contextlib
    from dataclasses import replace
    from types import SimpleNamespace

    from pyvmm.api.vmm import ApiVmm
    from pyvmm.machine import ExitKind, VmExit

    kernel = tmp_path / "k"
    kernel.write_bytes(b"")
    images = [tmp_path / f"d{i}.img" for i in range(2)]
    for image in images:
        image.write_bytes(b"\0" * 4096)
    config = parse_vm_config(["--kernel", str(kernel), "--disk", f"path={images[0]}"])
    hot_disk = replace(config.disks[0], path=images[1], id="hp")
    hotplug = SimpleNamespace(devices=lambda: {"hp": None}, hot_plugged=lambda: [("hp", hot_disk)])
    stopped = []
    vmm = ApiVmm()
    vmm.config = config
    vmm.machine = SimpleNamespace(  # type: ignore[assignment]
        hotplug=hotplug, request_stop=stopped.append, latch=SimpleNamespace(exit=VmExit(ExitKind.REQUESTED)))
    vmm._teardown = contextlib.ExitStack()
    vmm.shutdown()
    assert stopped == [ExitKind.REQUESTED] and vmm.machine is None
    assert vmm.config is not None and [(d.path, d.id) for d in vmm.config.disks] == [(images[1], "hp")]


def test_the_vmm_holds_tap_fds_while_a_config_has_their_nic(tmp_path: Path) -> None:
    """The fds of --net fd=[...] / vm.add-net stay open while the config (or the running VM) has the NIC:
    an ejected NIC's are closed, vm.shutdown keeps what the VM had, vm.delete closes the rest. Pipes stand
    in for tap queue files (ApiVmm only holds them)."""
    import contextlib
    import os
    from dataclasses import replace
    from types import SimpleNamespace

    from pyvmm.api.vmm import ApiVmm

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    kernel = tmp_path / "k"
    kernel.write_bytes(b"")
    boot_r, boot_w = os.pipe()
    hot_r, hot_w = os.pipe()
    try:
        config = parse_vm_config(["--kernel", str(kernel), "--cpus", "boot=2", "--net", f"fd=[{boot_r}]",
                                  "tap=t0"])
        hot = replace(config.nets[0], fds=(hot_r,), id="_net2")
        vmm = ApiVmm()
        vmm.set_config(config)
        present = {"_net1": None, "_net2": None}  # _net0 (the fd NIC) was ejected by the guest
        hotplug = SimpleNamespace(devices=lambda: present, hot_plugged=lambda: [("_net2", hot)])
        vmm.machine = SimpleNamespace(hotplug=hotplug, request_stop=lambda kind: None,  # type: ignore[assignment]
                                      latch=SimpleNamespace(exit=None))
        vmm._teardown = contextlib.ExitStack()
        vmm.keep_fds([hot_r])
        assert is_open(boot_r) and is_open(hot_r)
        vmm._release_fds()  # what the VMM's loop does after every call
        assert not is_open(boot_r) and is_open(hot_r)
        boot_r = -1  # closed by the VMM
        now = vmm.current_config()
        assert now is not None and [(n.tap, n.id, n.fds) for n in now.nets] == [("t0", "_net1", ()),
                                                                                (None, "_net2", (hot_r,))]
        vmm.shutdown()
        assert vmm.machine is None and vmm.config is not None
        assert [n.id for n in vmm.config.nets] == ["_net1", "_net2"] and is_open(hot_r)
        vmm.delete()
        assert not is_open(hot_r)
        hot_r = -1
    finally:
        for fd in (boot_r, boot_w, hot_r, hot_w):
            if fd >= 0:
                os.close(fd)
