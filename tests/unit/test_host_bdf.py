"""DEVICE spellings: short, full and sysfs-path forms all name one Bdf; bad spellings are usage errors."""

from __future__ import annotations

import pytest

from pyvmm.host.bdf import Bdf, parse_bdf
from pyvmm.host.errors import HostUsageError


@pytest.mark.parametrize(
    "spelling",
    [
        "01:00.0",
        "0000:01:00.0",
        "/sys/bus/pci/devices/0000:01:00.0/",
        "/sys/bus/pci/devices/0000:01:00.0",
        "/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0",
        " 0000:01:00.0 ",
    ],
)
def test_spellings_name_one_device(spelling: str) -> None:
    assert parse_bdf(spelling) == Bdf(0, 1, 0, 0)


def test_hex_is_case_insensitive_and_printed_lower() -> None:
    bdf = parse_bdf("0000:0A:1F.7")
    assert bdf == Bdf(0, 0x0A, 0x1F, 7)
    assert str(bdf) == "0000:0a:1f.7"
    assert bdf.slot == "0000:0a:1f"


def test_vmd_domains_have_five_digits() -> None:
    assert str(parse_bdf("10000:e1:00.0")) == "10000:e1:00.0"


@pytest.mark.parametrize(
    "spelling", ["", "03.0", "00:00.8", "0000:00:20.0", "00:0x.0", "/sys/bus/pci/devices/"]
)
def test_bad_spellings_are_usage_errors(spelling: str) -> None:
    with pytest.raises(HostUsageError) as err:
        parse_bdf(spelling)
    assert err.value.exit_status == 2
    assert "\n" not in str(err.value)


def test_order_follows_the_address() -> None:
    assert sorted([parse_bdf("00:1f.0"), parse_bdf("00:02.0"), parse_bdf("0001:00:00.0")]) == [
        parse_bdf("00:02.0"), parse_bdf("00:1f.0"), parse_bdf("0001:00:00.0"),
    ]
