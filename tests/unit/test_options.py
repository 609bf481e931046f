"""The option-string grammar (docs/cli.md#option-string-grammar)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.options import (
    OptionError,
    parse_byte_size,
    parse_int,
    parse_int_list,
    parse_options,
    parse_toggle,
    split_items,
)

KEYS = {"path", "size", "cmdline", "bars", "id"}


# --- splitting ---


def test_split_plain_commas() -> None:
    assert split_items("a=1,b=2,c") == ["a=1", "b=2", "c"]


def test_split_keeps_commas_inside_brackets_and_nested_brackets() -> None:
    assert split_items("a=[1,2],b=[[1,2],[3,4]],c=3") == ["a=[1,2]", "b=[[1,2],[3,4]]", "c=3"]


def test_split_keeps_commas_inside_quotes_and_drops_the_quotes() -> None:
    assert split_items('cmdline="console=ttyS0,9600n8",id=x') == ["cmdline=console=ttyS0,9600n8", "id=x"]


def test_brackets_inside_quotes_are_literal() -> None:
    assert split_items('path="a[1",id=x') == ["path=a[1", "id=x"]


def test_split_trims_the_whole_string() -> None:
    assert split_items("  a=1,b=2 \n") == ["a=1", "b=2"]


def test_empty_string_has_no_items() -> None:
    assert split_items("") == []
    assert split_items("   ") == []


@pytest.mark.parametrize("text", ["a=[", "a=[[[]]]]", "a=]", "a=1]", 'a="', 'a="""', "a=[1,2"])
def test_unbalanced_quotes_or_brackets_are_invalid_syntax(text: str) -> None:
    with pytest.raises(OptionError, match="Invalid syntax"):
        split_items(text)


# --- items ---


def test_key_value_items() -> None:
    opts = parse_options("path=/a,size=128M", KEYS)
    assert opts.get("path") == "/a"
    assert opts.get("size") == "128M"
    assert opts.get("id") is None
    assert not opts.has("id")


def test_value_is_split_at_the_first_equals_sign() -> None:
    assert parse_options("cmdline=root=/dev/vda", KEYS).get("cmdline") == "root=/dev/vda"


def test_values_are_trimmed() -> None:
    assert parse_options('path=" /a b "', KEYS).get("path") == "/a b"


def test_unknown_key_is_named_and_known_keys_listed() -> None:
    with pytest.raises(OptionError, match=r"Unknown option: foo \(known: .*path") as exc:
        parse_options("path=/a,foo=1", KEYS)
    assert "bars" in str(exc.value)


def test_key_without_value_is_invalid_syntax() -> None:
    with pytest.raises(OptionError, match="Invalid syntax: path needs a value"):
        parse_options("path", KEYS)


def test_too_many_equals_on_unknown_key_is_unknown() -> None:
    with pytest.raises(OptionError, match="Unknown option: too_many"):
        parse_options("size=1,too_many=foo=bar", KEYS)


def test_last_occurrence_wins() -> None:
    assert parse_options("path=A,path=B", KEYS).get("path") == "B"


def test_empty_value_means_not_given_even_after_a_value() -> None:
    opts = parse_options("path=A,path=", KEYS)
    assert opts.get("path") is None
    assert not opts.has("path")
    assert "path" in opts.blank
    assert "path" not in parse_options("path=,path=A", KEYS).blank


def test_valueless_flags() -> None:
    opts = parse_options("tty", {"file"}, {"off", "tty"})
    assert opts.flags == {"tty"}
    assert opts.has("tty")
    assert not opts.has("off")


def test_valueless_flag_given_a_value_is_refused() -> None:
    with pytest.raises(OptionError, match="off takes no value"):
        parse_options("off=on", {"file"}, {"off"})


@pytest.mark.parametrize("text", ["a=1,,id=2", "path=x,", ",path=x"])
def test_empty_item_is_refused(text: str) -> None:
    with pytest.raises(OptionError, match="empty item"):
        parse_options(text.replace("a=", "path="), KEYS)


def test_item_without_key_is_refused() -> None:
    with pytest.raises(OptionError, match="no key"):
        parse_options("=x", KEYS)


# --- converters through Options ---


def test_conversion_error_names_value_and_key() -> None:
    opts = parse_options("size=lots", KEYS)
    with pytest.raises(OptionError, match=r"Unable to convert 'lots' for size"):
        opts.byte_size("size")


def test_integer_bits_bound() -> None:
    opts = parse_options("id=256", KEYS)
    assert opts.integer("id", bits=16) == 256
    with pytest.raises(OptionError, match="for id: must be at most 255"):
        opts.integer("id", bits=8)


def test_defaults_apply_when_not_given() -> None:
    opts = parse_options("", KEYS)
    assert opts.toggle("id", True) is True
    assert opts.byte_size("size", 7) == 7
    assert opts.integer("size", 3) == 3
    assert opts.int_list("bars") == []


def test_quoted_list_value() -> None:
    assert parse_options('bars="[0,2]",id=x', KEYS).int_list("bars") == [0, 2]


# --- converters ---


@pytest.mark.parametrize(
    ("text", "value"),
    [("on", True), ("ON", True), ("true", True), ("True", True), ("off", False), ("false", False),
     ("OFF", False), ("", False)],
)  # fmt: skip
def test_toggle(text: str, value: bool) -> None:
    assert parse_toggle(text) is value


@pytest.mark.parametrize("text", ["yes", "1", "enable", "onn"])
def test_toggle_rejects_other_words(text: str) -> None:
    with pytest.raises(OptionError, match="expected on or off"):
        parse_toggle(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("4096", 4096), ("1K", 1024), ("512M", 512 << 20), ("4G", 4 << 30), ("0x1000", 4096),
     ("0x2M", 2 << 20), (" 16M ", 16 << 20)],
)  # fmt: skip
def test_byte_size(text: str, value: int) -> None:
    assert parse_byte_size(text) == value


@pytest.mark.parametrize(("text", "hint"), [("512m", "512M"), ("4g", "4G"), ("4GB", "4G"), ("1KiB", "1K")])
def test_byte_size_wrong_suffix_suggests_the_right_one(text: str, hint: str) -> None:
    with pytest.raises(OptionError, match=f"write {hint} "):
        parse_byte_size(text)


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5G", "4T", "1 2"])
def test_byte_size_rejects(text: str) -> None:
    with pytest.raises(OptionError):
        parse_byte_size(text)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("17", 17), ("0x1f", 31), ("0X10", 16), ("007", 7)])
def test_int(text: str, value: int) -> None:
    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["", "-1", "+1", "1_000", "0x", "1e3", "abc", "0xg"])
def test_int_rejects(text: str) -> None:
    with pytest.raises(OptionError, match="non-negative integer"):
        parse_int(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("[0,2-4,6]", [0, 2, 3, 4, 6]), ("3", [3]), ("[5]", [5]), ("2-4", [2, 3, 4]), ("[]", []),
     ("[ 1 , 0x2 ]", [1, 2])],
)  # fmt: skip
def test_int_list(text: str, value: list[int]) -> None:
    assert parse_int_list(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [("[4-2]", "low to high"), ("[3-3]", "low to high"), ("[1-2-3]", "not an integer or a range"),
     ("[a]", "not an integer"), ("[1,]", "not an integer"), ("[1", "unbalanced"), ("[[1]]", "nested")],
)  # fmt: skip
def test_int_list_rejects(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_int_list(text)


@given(st.lists(st.integers(min_value=0, max_value=1 << 20), min_size=1, max_size=8))
def test_int_list_round_trips(numbers: list[int]) -> None:
    assert parse_int_list("[" + ",".join(map(str, numbers)) + "]") == numbers


@given(st.dictionaries(st.sampled_from(sorted(KEYS)), st.from_regex(r"[a-z0-9/]{1,8}", fullmatch=True)))
def test_items_round_trip(items: dict[str, str]) -> None:
    opts = parse_options(",".join(f"{k}={v}" for k, v in items.items()), KEYS)
    assert dict(opts.values) == items


def test_hidden_keys_are_accepted_but_not_listed() -> None:
    assert parse_options("legacy=1", KEYS, hidden={"legacy"}).get("legacy") == "1"
    with pytest.raises(OptionError) as exc:
        parse_options("bogus=1", {"path", "_private"}, hidden={"legacy"})
    assert "known: path)" in str(exc.value)
