"""Command line -> VmConfig: multiplicity, defaults, validation catalogue (docs/cli.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    CpuTopology,
    DeviceConfig,
    DiskConfig,
    ImageType,
    MemoryConfig,
    PciSegmentConfig,
    PlatformConfig,
    RngConfig,
    VmConfig,
    aperture_weights,
    check_paths,
    parse_memory,
    parse_vm_config,
)

DEV0 = "/sys/bus/pci/devices/0000:01:00.0/"
DEV1 = "/sys/bus/pci/devices/0000:02:00.0/"
DEV2 = "/sys/bus/pci/devices/0000:03:00.0/"


def parse(*args: str) -> VmConfig:
    return parse_vm_config(["--kernel", "bzImage", *args])


def error(*args: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        parse(*args)
    return exc.value


# --- defaults and basic flags ---


def test_defaults() -> None:
    config = parse()
    assert config.payload.kernel == Path("bzImage")
    assert config.payload.initramfs is None
    assert config.payload.cmdline == ""
    assert config.cpus == CpusConfig(boot=1, max=1, topology=None, max_phys_bits=46)
    assert config.memory == MemoryConfig(size=512 << 20, thp=True)
    assert config.serial == ConsoleConfig(ConsoleMode.NULL)
    assert config.console == ConsoleConfig(ConsoleMode.TTY)
    assert config.disks == () and config.devices == () and config.pci_segments == ()
    assert config.platform == PlatformConfig(num_pci_segments=1, vfio_p2p_dma=True)
    assert config.verbosity == 0
    assert config.dry_run is False


def test_payload_flags_verbosity_and_dry_run() -> None:
    config = parse("--initramfs", "initrd", "--cmdline", "console=ttyS0 root=/dev/vda", "-vv", "--dry-run")
    assert config.payload.initramfs == Path("initrd")
    assert config.payload.cmdline == "console=ttyS0 root=/dev/vda"
    assert config.verbosity == 2
    assert config.dry_run is True
    assert parse("--verbose", "-v").verbosity == 2


def test_kernel_is_required() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_vm_config([])
    assert exc.value.option == "--kernel"
    assert str(exc.value).startswith("--kernel: ")


def test_cmdline_too_long() -> None:
    parse("--cmdline", "x" * (layout.CMDLINE_MAX_SIZE - 1))
    err = error("--cmdline", "x" * layout.CMDLINE_MAX_SIZE)
    assert err.option == "--cmdline"
    assert "too long" in err.message


def test_version_and_help_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_vm_config(["--version"])
    assert exc.value.code == 0
    assert "pyvmm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        parse_vm_config(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "x_exclude_mmap_bars",
        "num_pci_segments",
        "mmio32_aperture_weight",
        "size=",
        "/sys/bus/pci",
    ):
        assert text in out


# --- argparse errors become ConfigError ---


def test_unknown_argument_is_a_config_error() -> None:
    err = error("--frobnicate")
    assert err.option == "--frobnicate"
    assert "unrecognized" in err.message


def test_missing_value_names_the_option() -> None:
    err = error("--cpus")
    assert err.option == "--cpus"


def test_abbreviations_are_not_accepted() -> None:
    assert error("--mem", "size=1G").option == "--mem"


def test_single_valued_flag_given_twice_is_refused() -> None:
    err = error("--cpus", "boot=2", "--cpus", "boot=3")
    assert err.option == "--cpus"
    assert "more than once" in err.message


def test_error_str_is_one_line() -> None:
    err = ConfigError("--device path=a\nb", "bad")
    assert "\n" not in str(err)
    assert str(ConfigError("--cpus", "msg")) == "--cpus: msg"


# --- multiplicity ---


def test_device_takes_several_words_and_repeats() -> None:
    config = parse("--device", f"path={DEV0}", f"path={DEV1}", "--device", f"path={DEV2}")
    assert [d.path for d in config.devices] == [Path(DEV0), Path(DEV1), Path(DEV2)]


def test_disk_and_pci_segment_accumulate() -> None:
    config = parse(
        "--platform", "num_pci_segments=3",
        "--disk", "path=a", "path=b", "--disk", "path=c",
        "--pci-segment", "pci_segment=1", "--pci-segment", "pci_segment=2",
    )  # fmt: skip
    assert [d.path.name for d in config.disks] == ["a", "b", "c"]
    assert [s.pci_segment for s in config.pci_segments] == [1, 2]


# --- --cpus ---


def test_bare_cpus_number() -> None:
    assert parse("--cpus", "2").cpus == CpusConfig(boot=2, max=2)


def test_cpus_keys() -> None:
    cpus = parse("--cpus", "boot=4,max=4,topology=2:2:1:1,max_phys_bits=40").cpus
    assert cpus == CpusConfig(boot=4, max=4, topology=CpuTopology(2, 2, 1, 1), max_phys_bits=40)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("boot=4,max=2", "Max CPUs (2) lower than boot CPUs (4)"),
        ("boot=2,max=4", "CPU hotplug (max=4 above boot=2) is not supported by pyvmm yet"),
        ("boot=9000", "Too many CPUs: specified 9000 but 8192 is the limit"),
        ("boot=0", "at least one vCPU"),
        ("boot=2,topology=1:0:1:2", "No part of the CPU topology can be zero"),
        ("boot=4,topology=1:2:1:1", "Product of CPU topology parts does not match maximum vCPU"),
        ("boot=6,topology=3:2:1:1", "at most 2 threads per core"),
        ("topology=1:1:1", "must have 4 parts"),
        ("topology=1:a:1:1", "each part must be an integer"),
        ("max_phys_bits=65", "max_phys_bits=65 must be in 33..64"),
        ("boot=two", "Unable to convert 'two' for boot"),
        ("cpus=2", "Unknown option: cpus"),
        ("affinity=[0@[0]]", "affinity is not supported by pyvmm yet"),
        ("features=amx", "features is not supported by pyvmm yet"),
        ("kvm_hyperv=on", "kvm_hyperv=on is not supported by pyvmm yet"),
    ],
)
def test_cpus_errors(value: str, message: str) -> None:
    err = error("--cpus", value)
    assert err.option == f"--cpus {value}"
    assert message in err.message


def test_cpus_unsupported_keys_with_default_values_are_accepted() -> None:
    assert parse("--cpus", "boot=2,kvm_hyperv=off,nested=on,profile=host").cpus.boot == 2


def test_max_phys_bits_must_leave_room_for_64bit_bars() -> None:
    err = error("--cpus", "max_phys_bits=33", "--memory", "size=8G")
    assert err.option == "--cpus"
    assert "no room for 64-bit PCI BARs" in err.message
    assert parse("--cpus", "max_phys_bits=33", "--memory", "size=1G").cpus.max_phys_bits == 33


# --- --memory ---


def test_memory_size_4g() -> None:
    assert parse("--memory", "size=4G").memory.size == 4 * 1024**3


def test_memory_keys() -> None:
    mem = parse("--memory", "size=2G,hugepages=on,hugepage_size=2M,prefault=on,thp=off").memory
    assert mem == MemoryConfig(
        size=2 << 30, hugepages=True, hugepage_size=2 << 20, prefault=True, thp=False, shared=False
    )
    assert parse("--memory", "size=1G,mergeable=on").memory.mergeable is True
    assert parse("--memory", "size=1G,shared=on").memory.shared is True


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("size=1G,hugepage_size=2M", "Huge page size specified but huge pages not enabled"),
        ("size=1G,hugepages=on,hugepage_size=3M", "Huge page size is not power of 2: 3145728"),
        ("size=1G,shared=on,mergeable=on", "Invalid to set both 'mergeable' and 'shared' for memory"),
        ("size=1G,hugepages=on,mergeable=on", "Invalid to set both 'mergeable' and 'hugepages' for memory"),
        ("size=1000", "misaligned with default page size"),
        ("size=3M,hugepages=on,hugepage_size=2M", "misaligned"),
        ("size=0", "size=0 (memory zones) is not supported by pyvmm yet"),
        ("size=1g", "write 1G"),
        ("hotplug_size=1G", "hotplug_size=1G is not supported by pyvmm yet"),
        ("hotplug_method=virtio-mem", "hotplug_method=virtio-mem is not supported by pyvmm yet"),
        ("size=1G,shared=maybe", "Unable to convert 'maybe' for shared"),
    ],
)
def test_memory_errors(value: str, message: str) -> None:
    err = error("--memory", value)
    assert err.option == f"--memory {value}"
    assert message in err.message


def test_bare_memory_size_hints_at_size_key() -> None:
    err = error("--memory", "1G")
    assert "did you mean size=1G?" in err.message


# --- --serial / --console ---


@pytest.mark.parametrize(
    ("value", "mode", "path"),
    [("off", ConsoleMode.OFF, None), ("null", ConsoleMode.NULL, None), ("tty", ConsoleMode.TTY, None),
     ("file=/tmp/s.log", ConsoleMode.FILE, Path("/tmp/s.log")), ("tty,off", ConsoleMode.OFF, None)],
)  # fmt: skip
def test_serial_modes(value: str, mode: ConsoleMode, path: Path | None) -> None:
    assert parse("--serial", value, "--console", "null").serial == ConsoleConfig(mode, path)


@pytest.mark.parametrize("console", [None, "tty", "tty,id=c"])
def test_serial_and_console_both_tty_refused(console: str | None) -> None:
    args = ("--serial", "tty") + (("--console", console) if console else ())
    err = error(*args)
    assert err.option == "--serial tty --console tty"
    assert "only one of them can use the terminal" in err.message


@pytest.mark.parametrize(("serial", "console"), [("tty", "off"), ("tty", "null"), ("null", "tty"),
                                                 ("tty", "file=/tmp/c.log"), ("file=/tmp/s.log", "tty")])
def test_serial_and_console_both_on(serial: str, console: str) -> None:
    config = parse("--serial", serial, "--console", console)
    assert config.serial.mode.value == serial.split("=")[0]
    assert config.console.mode.value == console.split("=")[0]


def test_console_off_frees_its_slot() -> None:
    # an off console is no device: its pci_device_id claims no slot
    config = parse("--console", "off,pci_device_id=3", "--disk", "path=/d.img,pci_device_id=3")
    assert config.disks[0].pci_device_id == 3
    err = error("--console", "tty,pci_device_id=3", "--disk", "path=/d.img,pci_device_id=3")
    assert "already taken by --console" in err.message


# --- --rng ---


def test_rng_default_and_src() -> None:
    assert parse().rng == RngConfig(Path("/dev/urandom"))
    assert parse("--rng", "src=/dev/random").rng == RngConfig(Path("/dev/random"))
    assert parse("--rng", "src=/dev/random,iommu=off").rng.src == Path("/dev/random")
    assert parse("--rng", "src=").rng.src == Path("/dev/urandom")  # key= keeps the default


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("iommu=on", "iommu=on is not supported by pyvmm yet"),
        ("src=/dev/urandom,id=r", "Unknown option: id (known: src)"),
        ("pci_segment=1", "Unknown option: pci_segment"),
        ("size=4", "Unknown option: size"),
    ],
)
def test_rng_errors(value: str, message: str) -> None:
    err = error("--rng", value)
    assert err.option == f"--rng {value}"
    assert message in err.message


def test_rng_given_twice() -> None:
    assert "given more than once" in error("--rng", "src=/dev/urandom", "--rng", "src=/dev/random").message


def test_rng_source_checked(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    check_paths(parse_vm_config(["--kernel", str(kernel), "--rng", "src=/dev/urandom"]))
    regular = tmp_path / "seed"
    regular.write_bytes(b"x" * 64)
    check_paths(parse_vm_config(["--kernel", str(kernel), "--rng", f"src={regular}"]))
    for src, message in ((tmp_path / "missing", "No such file or directory"),
                         (tmp_path, "is not a regular file or character device")):
        with pytest.raises(ConfigError) as exc:
            check_paths(parse_vm_config(["--kernel", str(kernel), "--rng", f"src={src}"]))
        assert exc.value.option == f"--rng src={src}" and message in exc.value.message
        assert exc.value.exit_status == 2


def test_console_modes_and_pci_keys() -> None:
    console = parse("--console", "file=/tmp/c.log,id=con,pci_segment=0,pci_device_id=5").console
    assert console == ConsoleConfig(ConsoleMode.FILE, Path("/tmp/c.log"), id="con", pci_device_id=5)
    assert parse("--console", "off").console.mode is ConsoleMode.OFF


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--serial", "file=", "Path missing when using file console mode"),
        ("--serial", "socket=", "Path missing when using socket console mode"),
        ("--console", "file=", "Path missing when using file console mode"),
        ("--console", "", "invalid console mode given"),
        ("--serial", "", "invalid console mode given"),
        ("--console", "pty", "pty is not supported by pyvmm yet for --console"),
        ("--serial", "pty", "pty is not supported by pyvmm yet for --serial"),
        ("--serial", "socket=/tmp/x", "socket is not supported by pyvmm yet for --serial"),
        ("--console", "socket=/tmp/x", "socket is not supported by pyvmm yet for --console"),
        ("--serial", "tty,id=x", "Unknown option: id"),
        ("--console", "tty,iommu=on", "iommu=on is not supported by pyvmm yet"),
        ("--console", "tty,pci_device_id=32", "out of the supported range of 0..32"),
    ],
)
def test_console_errors(flag: str, value: str, message: str) -> None:
    err = error(flag, value)
    assert err.option == f"{flag} {value}"
    assert message in err.message


# --- --disk ---


def test_disk_keys() -> None:
    disk = parse(
        "--cpus", "2",
        "--disk", "path=/img,readonly=on,direct=on,id=root,num_queues=2,queue_size=256,pci_device_id=3,"
        "serial=abc,image_type=raw,iommu=off,_disable_io_uring=on",
    ).disks[0]  # fmt: skip
    assert disk == DiskConfig(
        path=Path("/img"), readonly=True, direct=True, id="root", num_queues=2, queue_size=256,
        pci_device_id=3, serial="abc", image_type=ImageType.RAW, disable_io_uring=True,
    )  # fmt: skip
    assert parse("--disk", "path=/img").disks[0] == DiskConfig(path=Path("/img"))


def test_vhost_user_disk_keys() -> None:
    config = parse("--cpus", "2", "--memory", "size=512M,shared=on",
                   "--disk", "vhost_user=true,socket=/run/vu.sock,num_queues=2,queue_size=256,id=vu,"
                             "pci_segment=0,pci_device_id=4")
    assert config.disks[0] == DiskConfig(path=None, id="vu", num_queues=2, queue_size=256, pci_device_id=4,
                                         vhost_user=True, socket=Path("/run/vu.sock"))
    assert config.disks[0].label == "--disk socket=/run/vu.sock"
    # huge pages are memfds too: what the backend maps
    hugepages = parse("--memory", "size=512M,hugepages=on", "--disk", "vhost_user=on,socket=/s")
    assert hugepages.disks[0].vhost_user


def test_disk_data_path_says_who_serves_it() -> None:
    """What -v logs as each disk opens (docs/virtio-blk.md#who-serves-a-disk)."""
    shared = parse("--cpus", "2", "--memory", "size=512M,shared=on",
                   "--disk", "vhost_user=on,socket=/run/vu.sock,num_queues=2", "path=/img,readonly=on",
                   "path=/img2,direct=on,queue_size=64")
    vu, ro, direct = shared.disks
    assert vu.data_path == "the vhost-user backend on /run/vu.sock (2 queue(s) of 128; pyvmm sees no request)"
    assert ro.data_path == ("pyvmm's in-process worker, one Python thread for the device (1 queue(s) of 128, "
                            "through the page cache, read-only)")
    assert direct.data_path.endswith("(1 queue(s) of 64, O_DIRECT)")


def test_vhost_user_errors_name_the_socket() -> None:
    err = error("--disk", "vhost_user=on,socket=/run/vu.sock")
    assert err.option == "--disk socket=/run/vu.sock"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("path=/img,num_queues=2", "Queue count (2) must not exceed boot vCPUs (1)"),
        ("path=/img,queue_size=100", "Queue size must be a power of 2"),
        ("path=/img,queue_size=2", "Block queue size must be greater than 2: 2"),
        ("path=/img,num_queues=0", "at least 1"),
        ("path=/img,serial=" + "x" * 21, "at most 20"),
        ("readonly=on", "path missing"),
        ("path=/img,image_type=qcow2", "image_type=qcow2 is not supported by pyvmm yet"),
        ("path=/img,image_type=iso", "image_type=iso is not one of raw"),
        ("path=/img,vhost_user=on,socket=/s", "path= cannot be used with vhost_user=on"),
        ("vhost_user=on,socket=/s,readonly=on", "readonly= cannot be used with vhost_user=on"),
        ("vhost_user=on,socket=/s,direct=off", "direct= cannot be used with vhost_user=on"),
        ("vhost_user=on,socket=/s,image_type=raw", "image_type= cannot be used with vhost_user=on"),
        ("vhost_user=on,socket=/s,serial=x", "serial= cannot be used with vhost_user=on"),
        ("vhost_user=on,socket=/s,bw_size=1000", "bw_size is not supported by pyvmm yet"),
        ("vhost_user=on,socket=/s,queue_size=100", "Queue size must be a power of 2"),
        ("vhost_user=on", "No socket provided when using vhost-user"),
        ("vhost_user=on,socket=/s", "Using vhost-user requires using shared memory or huge pages"),
        ("path=/img,socket=/s", "socket= is a vhost-user backend's: add vhost_user=on"),
        ("path=/img,vhost_user=off,socket=/s", "socket= is a vhost-user backend's: add vhost_user=on"),
        ("path=/img,bw_size=1000", "bw_size is not supported by pyvmm yet"),
        ("path=/img,iommu=on", "iommu=on is not supported by pyvmm yet"),
        ("path=/img,pci_segment=1", "Invalid PCI segment id: 1"),
        ("path=/img,pci_device_id=0", "Given PCI device ID (0) is reserved"),
        ("path=/img,id=__x", "Identifier __x is not valid"),
    ],
)
def test_disk_errors(value: str, message: str) -> None:
    err = error("--disk", value)
    assert err.option.startswith("--disk ")
    assert message in err.message


# --- --device ---


def test_unknown_disk_key_lists_only_supported_keys() -> None:
    err = error("--disk", "path=/img,foo=1")
    assert "Unknown option: foo" in err.message
    assert "readonly" in err.message
    assert "vhost_user" in err.message and "socket" in err.message  # supported on the command line
    assert "bw_size" not in err.message and "_disable_aio" not in err.message


def test_device_keys() -> None:
    dev = parse(
        "--device",
        f"path={DEV0},id=gpu0,pci_segment=0,pci_device_id=4,x_nv_gpudirect_clique=15,"
        "x_exclude_mmap_bars=[0,2-3],managed=on,iommu=off,x_allow_no_reset=on,x_msix_relocation=on",
    ).devices[0]
    assert dev == DeviceConfig(
        path=Path(DEV0), id="gpu0", pci_device_id=4, x_nv_gpudirect_clique=15,
        x_exclude_mmap_bars=(0, 2, 3), managed=True, x_allow_no_reset=True, x_msix_relocation=True,
    )  # fmt: skip
    assert parse("--device", f"path={DEV0}").devices[0] == DeviceConfig(path=Path(DEV0))


def test_device_path_last_occurrence_wins() -> None:
    assert parse("--device", f"path={DEV0},path={DEV1}").devices[0].path == Path(DEV1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"path={DEV0},x_exclude_mmap_bars=[0,7]", "x_exclude_mmap_bars entry 7 is out of range 0..5"),
        (f"path={DEV0},x_exclude_mmap_bars=[1-3", "Invalid syntax"),
        (f"path={DEV0},x_nv_gpudirect_clique=16", "x_nv_gpudirect_clique=16 is out of range 0..15"),
        (f"path={DEV0},x_nv_gpudirect_clique=256", "must be at most 255"),
        (f"path={DEV0},pci_device_id=32", "Given PCI device ID (32) is out of the supported range of 0..32"),
        (f"path={DEV0},pci_device_id=0", "Given PCI device ID (0) is reserved"),
        (f"path={DEV0},pci_device_id=300", "Given PCI device ID (300) is out of the supported range"),
        (f"path={DEV0},pci_segment=1", "Invalid PCI segment id: 1"),
        (f"path={DEV0},pci_segment=65536", "must be at most 65535"),
        (f"path={DEV0},fd=5", "fd is not supported by pyvmm yet"),
        (f"path={DEV0},iommu=on", "iommu=on is not supported by pyvmm yet"),
        (f"path={DEV0},id=__vfio", "Identifier __vfio is not valid"),
        (f"path={DEV0},managed=perhaps", "Unable to convert 'perhaps' for managed"),
        (f"path={DEV0},x_allow_no_reset=yes", "Unable to convert 'yes' for x_allow_no_reset"),
        (f"path={DEV0},x_msix_relocation=2", "Unable to convert '2' for x_msix_relocation"),
        (f"path={DEV0},bogus=1", "Unknown option: bogus"),
        ("id=gpu", "VFIO device config must specify path="),
    ],
)
def test_device_errors(value: str, message: str) -> None:
    err = error("--device", value)
    assert err.option.startswith("--device ")
    assert message in err.message


def test_device_error_names_the_option_string() -> None:
    err = error("--device", f"path={DEV0},x_exclude_mmap_bars=[7]")
    assert (
        str(err)
        == f"--device path={DEV0},x_exclude_mmap_bars=[7]: x_exclude_mmap_bars entry 7 is out of range 0..5"
    )


def test_pci_device_id_zero_allowed_off_segment_zero() -> None:
    config = parse(
        "--platform", "num_pci_segments=2", "--device", f"path={DEV0},pci_segment=1,pci_device_id=0"
    )
    assert config.devices[0].pci_device_id == 0


def test_duplicate_device_paths_compared_after_normalising() -> None:
    err = error("--device", "path=/sys/bus/pci/devices/0000:01:00.0", f"path={DEV0}")
    assert "Duplicated device path" in err.message
    err = error("--device", f"path={DEV0}", "path=/sys/bus/pci/devices/../devices/0000:01:00.0")
    assert "Duplicated device path" in err.message


def test_duplicate_device_paths_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "0000:01:00.0"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    err = error("--device", f"path={real}", f"path={link}/")
    assert err.option == f"--device path={link}"


def test_clique_requires_p2p_dma() -> None:
    err = error("--platform", "vfio_p2p_dma=off", "--device", f"path={DEV0},x_nv_gpudirect_clique=1")
    assert "Device with x_nv_gpudirect_clique requires vfio_p2p_dma=on" in err.message
    assert parse("--platform", "vfio_p2p_dma=off", "--device", f"path={DEV0}").platform.vfio_p2p_dma is False


def test_ids_must_be_unique_across_devices_and_disks() -> None:
    err = error("--disk", "path=/img,id=x", "--device", f"path={DEV0},id=x")
    assert "Identifier x is not unique" in err.message
    assert err.option == f"--device path={Path(DEV0)}"


def test_pci_slot_requested_twice() -> None:
    err = error("--device", f"path={DEV0},pci_device_id=3", f"path={DEV1},pci_device_id=3")
    assert "PCI device ID 3 on segment 0 is already taken" in err.message
    config = parse(
        "--platform", "num_pci_segments=2",
        "--device", f"path={DEV0},pci_device_id=3", f"path={DEV1},pci_device_id=3,pci_segment=1",
    )  # fmt: skip
    assert len(config.devices) == 2


# --- --platform / --pci-segment ---


def test_platform_keys() -> None:
    platform = parse(
        "--platform", "num_pci_segments=4,vfio_p2p_dma=off,iommu_address_width=64,iommufd=off"
    ).platform
    assert platform == PlatformConfig(num_pci_segments=4, vfio_p2p_dma=False)
    assert parse("--platform", "x_max_msi_routes=16").platform.x_max_msi_routes == 16
    assert parse().platform.x_max_msi_routes == 2048


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("num_pci_segments=0", "Number of PCI segments (0) not in range of 1 to 96"),
        ("num_pci_segments=97", "Number of PCI segments (97) not in range of 1 to 96"),
        ("num_pci_segments=2,iommu_segments=[2]", "Invalid PCI segment id: 2"),
        ("num_pci_segments=2,iommu_segments=[1]", "iommu_segments is not supported by pyvmm yet"),
        # only a virtio-iommu uses it (its guest address width): any value but the default is refused
        ("iommu_address_width=48", "iommu_address_width=48 is not supported by pyvmm yet; it sets a virtio"),
        ("iommu_address_width=65", "iommu_address_width=65 is not supported by pyvmm yet"),
        ("iommufd=on", "iommufd=on is not supported by pyvmm yet"),
        ("iommufd_fd=3", "iommufd_fd is not supported by pyvmm yet"),
        ("system_uuid=abc", "system_uuid is not supported by pyvmm yet"),
        ("x_max_msi_routes=0", "x_max_msi_routes=0 is out of range 1..2048"),
        ("x_max_msi_routes=2049", "x_max_msi_routes=2049 is out of range 1..2048"),
    ],
)
def test_platform_errors(value: str, message: str) -> None:
    err = error("--platform", value)
    assert err.option == f"--platform {value}"
    assert message in err.message


def test_pci_segment_weights_later_entry_wins() -> None:
    config = parse(
        "--platform", "num_pci_segments=3",
        "--pci-segment", "pci_segment=0,mmio32_aperture_weight=2",
        "pci_segment=2,mmio64_aperture_weight=5", "pci_segment=0,mmio32_aperture_weight=3",
    )  # fmt: skip
    assert config.pci_segments[0] == PciSegmentConfig(0, 2, 1)
    assert aperture_weights(config) == [(3, 1), (1, 1), (1, 5)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pci_segment=1", "Invalid PCI segment id: 1"),
        ("mmio32_aperture_weight=0", "Invalid PCI segment aperture weight: 0"),
        ("mmio64_aperture_weight=0", "Invalid PCI segment aperture weight: 0"),
        ("mmio32_aperture_weight=0x100000000", "must be at most 4294967295"),
        ("pci_segment=0,size=1", "Unknown option: size"),
    ],
)
def test_pci_segment_errors(value: str, message: str) -> None:
    err = error("--pci-segment", value)
    assert err.option.startswith("--pci-segment ")
    assert message in err.message


# --- check_paths ---


def _pci_function(root: Path, name: str = "0000:01:00.0") -> Path:
    fn = root / name
    fn.mkdir()
    (fn / "config").write_bytes(b"\x00" * 256)
    (fn / "vendor").write_text("0x10de\n")
    return fn


def test_check_paths_accepts_existing_files(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 512)
    fn = _pci_function(tmp_path)
    config = parse_vm_config(
        ["--kernel", str(kernel), "--initramfs", str(initrd), "--disk", f"path={disk}",
         "--device", f"path={fn}/", "--serial", f"file={tmp_path}/serial.log"]
    )  # fmt: skip
    check_paths(config)


def test_check_paths_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        check_paths(parse_vm_config(["--kernel", str(tmp_path / "nope")]))
    assert exc.value.option == "--kernel"
    assert "does not exist" in exc.value.message


def test_check_paths_kernel_is_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        check_paths(parse_vm_config(["--kernel", str(tmp_path)]))


def test_check_paths_missing_initramfs(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError) as exc:
        check_paths(parse_vm_config(["--kernel", str(kernel), "--initramfs", str(tmp_path / "i")]))
    assert exc.value.option == "--initramfs"


def test_check_paths_unreadable_and_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permissions are asked through os.access; deny explicitly so the test also works as root.
    denied: set[tuple[str, int]] = set()
    real_access = os.access
    monkeypatch.setattr(
        "pyvmm.config.os.access", lambda p, mode: (str(p), mode) not in denied and real_access(p, mode)
    )
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    denied.add((str(kernel), os.R_OK))
    with pytest.raises(ConfigError, match="not readable"):
        check_paths(parse_vm_config(["--kernel", str(kernel)]))
    denied.clear()
    disk = tmp_path / "d.img"
    disk.write_bytes(b"d")
    denied.add((str(disk), os.W_OK))
    with pytest.raises(ConfigError, match="add readonly=on"):
        check_paths(parse_vm_config(["--kernel", str(kernel), "--disk", f"path={disk}"]))
    check_paths(parse_vm_config(["--kernel", str(kernel), "--disk", f"path={disk},readonly=on"]))


def test_check_paths_missing_disk(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError) as exc:
        check_paths(parse_vm_config(["--kernel", str(kernel), "--disk", f"path={tmp_path}/missing.img"]))
    assert exc.value.option == f"--disk path={tmp_path}/missing.img"


def test_check_paths_device_must_be_a_pci_function(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    not_fn = tmp_path / "empty"
    not_fn.mkdir()
    with pytest.raises(ConfigError, match="is not a PCI function"):
        check_paths(parse_vm_config(["--kernel", str(kernel), "--device", f"path={not_fn}"]))
    (not_fn / "config").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a PCI function"):
        check_paths(parse_vm_config(["--kernel", str(kernel), "--device", f"path={not_fn}"]))
    with pytest.raises(ConfigError, match="is not a directory"):
        check_paths(parse_vm_config(["--kernel", str(kernel), "--device", f"path={tmp_path}/gone"]))


def test_check_paths_bare_bdf_gets_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError, match=r"path=/sys/bus/pci/devices/0000:01:00\.0/"):
        check_paths(parse_vm_config(["--kernel", str(kernel), "--device", "path=0000:01:00.0"]))


def test_check_paths_output_file_directory(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError) as exc:
        check_paths(parse_vm_config(["--kernel", str(kernel), "--console", f"file={tmp_path}/no/c.log"]))
    assert exc.value.option.startswith("--console file=")
    assert "does not exist" in exc.value.message


def test_memory_hotplug_size_zero_means_no_hotplug() -> None:
    """Kata and CH configs spell out hotplug_size=0; it asks for nothing pyvmm lacks."""
    assert parse_memory("size=1G,hotplug_size=0,hotplugged_size=0") == parse_memory("size=1G")


# --- --vsock ---


def test_vsock_parsed() -> None:
    from pyvmm.config import VsockConfig

    assert parse().vsock is None
    assert parse("--vsock", "cid=3,socket=/run/v.sock").vsock == VsockConfig(3, Path("/run/v.sock"))
    cfg = parse("--vsock", "cid=0xfffffffe,socket=/run/v.sock,id=vs0,pci_segment=0,pci_device_id=9,iommu=off")
    assert cfg.vsock == VsockConfig(0xFFFF_FFFE, Path("/run/v.sock"), "vs0", 0, 9)


@pytest.mark.parametrize(("args", "message"), [
    (("--vsock", "socket=/run/v.sock"), "cid= is required"),
    (("--vsock", "cid=3"), "socket= is required"),
    (("--vsock", "cid=2,socket=/run/v.sock"), "cid=2 is out of range"),
    (("--vsock", "cid=4294967295,socket=/run/v.sock"), "out of range"),
    (("--vsock", "cid=three,socket=/run/v.sock"), "cid"),
    (("--vsock", "cid=3,socket=/run/v.sock,iommu=on"), "iommu=on is not supported"),
    (("--vsock", "cid=3,socket=/run/v.sock,vhost=on"), "vhost"),
    (("--vsock", "cid=3,socket=/" + "s" * 100), "too long"),
    (("--vsock", "cid=3,socket=/a", "--vsock", "cid=4,socket=/b"), "given more than once"),
    (("--vsock", "cid=3,socket=/a,pci_segment=1"), "Invalid PCI segment id: 1"),
    (("--vsock", "cid=3,socket=/a,id=d", "--disk", "path=x,id=d"), "Identifier d is not unique"),
])
def test_vsock_refused(args: tuple[str, ...], message: str) -> None:
    err = error(*args)
    assert err.exit_status == 2 and message in str(err) and "--vsock" in str(err), str(err)


def test_vsock_socket_paths_checked(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")

    def check(sock: Path) -> None:
        check_paths(parse_vm_config(["--kernel", str(kernel), "--vsock", f"cid=3,socket={sock}"]))

    check(tmp_path / "v.sock")
    with pytest.raises(ConfigError, match=r"directory .*missing does not exist"):
        check(tmp_path / "missing" / "v.sock")
    (tmp_path / "old.sock").write_text("")
    with pytest.raises(ConfigError, match="already exists"):
        check(tmp_path / "old.sock")
