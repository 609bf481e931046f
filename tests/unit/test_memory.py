"""Guest RAM mappings: huge-page placement, bounds-checked access, and the backings `--memory` asks for
(shared memfd, hugetlb pool checks, prefault, KSM, THP)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest

from pyvmm.config import MemoryConfig
from pyvmm.errors import ExitStatus
from pyvmm.memory import (
    HUGE_PAGE_SIZE,
    Backing,
    GuestMemory,
    GuestMemoryError,
    HugePagesError,
    MemfdFlag,
    check_hugepage_pool,
    resolve_hugepage_size,
)


def test_regions_start_on_huge_page_boundaries_and_views_agree_with_host_addresses() -> None:
    memory = GuestMemory([(0, 0xA0000), (0x100000, 8 << 20), (0x1_0000_0000, 4 << 20)])
    try:
        high = memory.regions[2]
        assert high.host_address % HUGE_PAGE_SIZE == 0
        for gpa in (0x9F000, 0x100000 + (8 << 20) - 8, 0x1_0000_0000, 0x1_0000_0000 + (4 << 20) - 8):
            memory.write_u64(gpa, 0x1122334455667788 ^ gpa)
            raw = ctypes.c_uint64.from_address(memory.host_address(gpa, 8)).value
            assert raw == memory.read_u64(gpa) == 0x1122334455667788 ^ gpa
        with pytest.raises(GuestMemoryError):
            memory.read(0x1_0000_0000 + (4 << 20) - 4, 8)
    finally:
        memory.close()


def test_low_ram_from_zero_is_huge_page_aligned() -> None:
    memory = GuestMemory([(0, 64 << 20)])
    try:
        assert memory.regions[0].host_address % HUGE_PAGE_SIZE == 0
        memory.write((64 << 20) - 1, b"\xff")
        assert memory.read((64 << 20) - 1, 1) == b"\xff"
    finally:
        memory.close()


def test_views_of_many_ranges_match_view_and_are_all_checked() -> None:
    memory = GuestMemory([(0, 8 << 20), (0x1_0000_0000, 4 << 20)])
    try:
        ranges = [(0x1000, 16), (0x7F_F000, 0x1000), (0x2000, 0)]
        for gpas, lengths in (
            ([g for g, _ in ranges], [n for _, n in ranges]),  # one region: checked as a whole
            ([0x1000, 0x1_0000_0000], [8, 8]),  # two regions: one at a time
        ):
            got = memory.views(gpas, lengths)
            for view, gpa, length in zip(got, gpas, lengths, strict=True):
                assert len(view) == length
                if length:
                    view[0] = 0x5A
                    assert memory.read(gpa, 1) == b"\x5a"
        assert memory.views([], []) == []
        for gpas, lengths in (
            ([0x1000, (8 << 20) - 8], [8, 16]),  # the second runs off the region's end
            ([0x1000, 0x1_0000_0000 + (4 << 20)], [8, 1]),
            ([0x1000], [-1]),
        ):
            with pytest.raises(GuestMemoryError):
                memory.views(gpas, lengths)
    finally:
        memory.close()


# --- backing: shared memfd, prefault, KSM, THP (issue 16) ---


def _smaps_entry(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address` (header as "name")."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and ":" not in head[0]:
            if entry is not None:
                return entry
            start, end = (int(x, 16) for x in head[0].split("-"))
            entry = {"name": head[5] if len(head) > 5 else ""} if start <= address < end else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    assert entry is not None, f"{address:#x} is not mapped"
    return entry


def _resident_pages(address: int, length: int) -> int:
    """How many of the pages in [address, address+length) are in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec)


def test_memfd_flags_encode_the_huge_page_size_as_log2_in_bits_26_up() -> None:
    assert MemfdFlag.huge(2 << 20) == MemfdFlag.HUGE_2MB == 0x54000000
    assert MemfdFlag.huge(1 << 30) == MemfdFlag.HUGE_1GB == 0x78000000


def test_shared_ram_is_one_memfd_seen_through_a_second_mapping_and_closed_with_the_memory() -> None:
    memory = GuestMemory([(0, 8 << 20), (0x1_0000_0000, 4 << 20)], Backing(shared=True))
    try:
        low, high = memory.regions
        assert low.fd is not None and low.fd == high.fd
        assert (low.file_offset, high.file_offset) == (0, 8 << 20)
        assert os.readlink(f"/proc/self/fd/{low.fd}").startswith("/memfd:pyvmm-ram")
        assert _smaps_entry(low.host_address)["name"].startswith("/memfd:pyvmm-ram")
        memory.write(0x1234, b"low region")
        memory.write(0x1_0000_0000 + 0x10, b"high region")
        # What a vhost-user backend does with (fd, offset): map the file itself and see the guest's bytes.
        other = mmap.mmap(high.fd, 12 << 20, flags=mmap.MAP_SHARED)
        try:
            assert other[0x1234 : 0x1234 + 10] == b"low region"
            assert other[(8 << 20) + 0x10 : (8 << 20) + 0x1B] == b"high region"
            other[0x2000:0x2004] = b"back"
            assert memory.read(0x2000, 4) == b"back"
        finally:
            other.close()
        fd = low.fd
    finally:
        memory.close()
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_private_ram_has_no_file() -> None:
    memory = GuestMemory([(0, 4 << 20)])
    try:
        assert memory.regions[0].fd is None
        assert not _smaps_entry(memory.regions[0].host_address)["name"].startswith("/memfd:")
    finally:
        memory.close()


@pytest.mark.parametrize("shared", [False, True])
def test_prefault_makes_every_page_resident_at_start(shared: bool) -> None:
    size = 16 << 20
    for prefault, want in ((False, 0), (True, size // mmap.PAGESIZE)):
        memory = GuestMemory([(0, size)], Backing(shared=shared, prefault=prefault, thp=False))
        try:
            region = memory.regions[0]
            assert _resident_pages(region.host_address, size) == want
            if prefault:
                rss = int(_smaps_entry(region.host_address)["Rss"].split()[0])
                assert rss >= size >> 10
        finally:
            memory.close()


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm").is_dir(), reason="kernel without KSM")
def test_mergeable_marks_ram_for_ksm() -> None:
    for mergeable in (False, True):
        memory = GuestMemory([(0, 8 << 20)], Backing(mergeable=mergeable))
        try:
            flags = _smaps_entry(memory.regions[0].host_address)["VmFlags"].split()
            assert ("mg" in flags) is mergeable, flags
        finally:
            memory.close()


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="kernel without THP")
def test_thp_off_leaves_ram_unadvised() -> None:
    for thp in (False, True):
        memory = GuestMemory([(0, 8 << 20)], Backing(thp=thp))
        try:
            flags = _smaps_entry(memory.regions[0].host_address)["VmFlags"].split()
            assert ("hg" in flags) is thp, flags
        finally:
            memory.close()


# --- huge pages: the host's sizes and pool, from a fake sysfs ---


def _fake_host(tmp_path: Path, pools: dict[int, dict[str, int]], default_kb: int = 2048) -> tuple[Path, Path]:
    sysfs = tmp_path / "hugepages"
    for kb, values in pools.items():
        directory = sysfs / f"hugepages-{kb}kB"
        directory.mkdir(parents=True)
        for name in ("nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages",
                     "nr_overcommit_hugepages"):
            (directory / name).write_text(f"{values.get(name, 0)}\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       16384000 kB\nHugepagesize:       {default_kb} kB\nHugetlb: 0 kB\n")
    return sysfs, meminfo


def test_a_pool_with_enough_free_pages_passes(tmp_path: Path) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: {"nr_hugepages": 600, "free_hugepages": 512}})
    pool = check_hugepage_pool(1 << 30, 2 << 20, sysfs, meminfo)
    assert (pool.total, pool.free, pool.available) == (600, 512, 512)


@pytest.mark.parametrize(
    ("pool", "free"),
    [
        ({"nr_hugepages": 100, "free_hugepages": 100}, 100),
        # pages another mapping has reserved are counted in free_hugepages but are not available
        ({"nr_hugepages": 600, "free_hugepages": 600, "resv_hugepages": 200}, 400),
    ],
)
def test_a_pool_too_small_is_one_usage_line_naming_nr_hugepages(tmp_path: Path, pool: dict[str, int],
                                                                free: int) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: pool, 1048576: {}})
    with pytest.raises(HugePagesError) as exc:
        check_hugepage_pool(1 << 30, 2 << 20, sysfs, meminfo)
    message = str(exc.value)
    assert exc.value.exit_status == ExitStatus.USAGE and "\n" not in message
    assert f"needs 512 huge pages of 2 MiB but {free} are free" in message, message
    # the pool grown by what is missing
    assert message.endswith(f"echo {pool['nr_hugepages'] + 512 - free} > /proc/sys/vm/nr_hugepages"), message


def test_overcommit_headroom_counts_as_available(tmp_path: Path) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: {"free_hugepages": 12, "nr_overcommit_hugepages": 500}})
    assert check_hugepage_pool(1 << 30, 2 << 20, sysfs, meminfo).available == 512
    sysfs, meminfo = _fake_host(tmp_path / "b", {2048: {"free_hugepages": 12, "nr_overcommit_hugepages": 500,
                                                         "surplus_hugepages": 1}})
    with pytest.raises(HugePagesError):
        check_hugepage_pool(1 << 30, 2 << 20, sysfs, meminfo)


def test_a_size_other_than_the_default_is_set_in_its_own_sysfs_file(tmp_path: Path) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: {"free_hugepages": 4096}, 1048576: {"free_hugepages": 1}})
    with pytest.raises(HugePagesError) as exc:
        check_hugepage_pool(2 << 30, 1 << 30, sysfs, meminfo)
    assert "needs 2 huge pages of 1 GiB but 1 are free" in str(exc.value)
    assert str(exc.value).endswith(f"echo 1 > {sysfs}/hugepages-1048576kB/nr_hugepages")
    # a host whose default size is 1G (default_hugepagesz=1G): /proc/sys/vm/nr_hugepages is the 1G pool
    sysfs, meminfo = _fake_host(tmp_path / "b", {2048: {}, 1048576: {}}, default_kb=1048576)
    with pytest.raises(HugePagesError) as exc:
        check_hugepage_pool(2 << 30, 1 << 30, sysfs, meminfo)
    assert str(exc.value).endswith("echo 2 > /proc/sys/vm/nr_hugepages")


def test_huge_page_size_defaults_to_the_hosts_and_must_exist_and_divide_the_ram(tmp_path: Path) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: {}, 1048576: {}})
    assert resolve_hugepage_size(1 << 30, None, sysfs, meminfo) == 2 << 20
    assert resolve_hugepage_size(1 << 30, 1 << 30, sysfs, meminfo) == 1 << 30
    for size, requested, words in (
        (1 << 30, 4 << 20, "hugepage_size=4 MiB: this host has no huge pages of that size (it has 2 MiB, "
                           "1 GiB)"),
        (3 << 20, None, "Memory size is misaligned with default page size or its hugepage size: 3145728 is "
                        "not a multiple of the 2 MiB huge pages"),
        (3 << 30 | 2 << 20, 1 << 30, "not a multiple of the 1 GiB huge pages"),
    ):
        with pytest.raises(HugePagesError) as exc:
            resolve_hugepage_size(size, requested, sysfs, meminfo)
        assert words in str(exc.value) and exc.value.exit_status == ExitStatus.USAGE
    with pytest.raises(HugePagesError, match="no huge pages"):
        resolve_hugepage_size(1 << 30, None, tmp_path / "absent", meminfo)


def test_for_config_checks_the_pool_before_mapping_anything(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs, meminfo = _fake_host(tmp_path, {2048: {"nr_hugepages": 10, "free_hugepages": 10}})
    monkeypatch.setattr("pyvmm.memory._memfd", lambda *a: pytest.fail("mapped before the pool check"))
    with pytest.raises(HugePagesError, match="needs 512 huge pages of 2 MiB but 10 are free"):
        GuestMemory.for_config(MemoryConfig(size=1 << 30, hugepages=True), sysfs, meminfo)


def test_for_config_maps_what_memory_asks_for(tmp_path: Path) -> None:
    size = 16 << 20
    for config, fd in ((MemoryConfig(size=size), False), (MemoryConfig(size=size, shared=True), True)):
        memory = GuestMemory.for_config(config, tmp_path, tmp_path / "meminfo")
        try:
            assert (memory.regions[0].fd is not None) is fd and memory.total_size == size
        finally:
            memory.close()
