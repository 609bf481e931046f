"""cloud-hypervisor's option-string grammar (docs/cli.md#option-string-grammar).

A structured flag such as `--device` takes one string of comma-separated items: `key=value` items and
valueless flags (`off`, `tty`). Commas inside double quotes or `[brackets]` do not split. A key given twice
keeps its last value; `key=` means "not given". Converters turn the raw strings into toggles, byte sizes,
integers and integer lists.

Deliberate differences from cloud-hypervisor (all stricter or more helpful, never a different meaning):
- a `[` or `]` inside double quotes is literal (CH counts it, so `file="a[1]"` would fail there);
- a valueless flag given a value (`off=on`) and an empty item (`a=1,,b=2`) are errors rather than
  silently accepted / reported as `Unknown option: `;
- integers may also be written in hex (`0x1f`);
- byte sizes accept only upper-case `K`/`M`/`G`, as CH does, but a lower-case or `MiB`/`GB` suffix gets an
  error that says what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
D = TypeVar("D")


class OptionError(ValueError):
    """An option string that does not follow the grammar or a value that does not convert."""


def split_items(text: str) -> list[str]:
    """Split an option string on commas that are outside double quotes and `[...]`.

    Quote characters are dropped (as CH does), so `file="a,b"` yields the item `file=a,b`.
    An empty (or all-blank) string has no items.
    """
    text = text.strip()
    if not text:
        return []
    items: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            continue
        if quoted:
            current.append(ch)
            continue
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise OptionError(f"Invalid syntax: ']' without a matching '[' in {text!r}")
        elif ch == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        raise OptionError(f'Invalid syntax: unbalanced double quote (") in {text!r}')
    if depth:
        raise OptionError(f"Invalid syntax: '[' without a matching ']' in {text!r}")
    items.append("".join(current))
    return items


# --- value converters: each raises OptionError with the reason only; Options adds the key. ---

_INT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s*([A-Za-z]*)")
_SIZE_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30}


def parse_toggle(value: str) -> bool:
    """`on`/`true` -> True, `off`/`false`/empty -> False (case-insensitive)."""
    v = value.strip().lower()
    if v in ("on", "true"):
        return True
    if v in ("off", "false", ""):
        return False
    raise OptionError("expected on or off")


def parse_int(value: str) -> int:
    """A non-negative integer, decimal or `0x` hex."""
    v = value.strip()
    if not _INT_RE.fullmatch(v):
        raise OptionError("expected a non-negative integer (decimal or 0x hex)")
    return int(v, 0) if v[:2].lower() == "0x" else int(v, 10)


def parse_byte_size(value: str) -> int:
    """An integer number of bytes with an optional binary suffix K, M or G (upper case, as in CH)."""
    v = value.strip()
    m = _SIZE_RE.fullmatch(v)
    if not m:
        raise OptionError("expected a size such as 512M, 4G or 65536")
    number, suffix = m.groups()
    if suffix not in _SIZE_SHIFTS:
        hint = suffix[:1].upper()
        if hint in _SIZE_SHIFTS and hint:
            raise OptionError(
                f"size suffix {suffix!r} is not understood: write {number}{hint} "
                "(suffixes are K, M, G in upper case and mean KiB, MiB, GiB)"
            )
        raise OptionError(f"size suffix {suffix!r} is not understood: use K, M or G (KiB, MiB, GiB)")
    return parse_int(number) << _SIZE_SHIFTS[suffix]


def parse_int_list(value: str) -> list[int]:
    """`[0,2-4,6]` -> [0, 2, 3, 4, 6]; brackets are optional for one element; `[]` is empty.

    Ranges `a-b` are inclusive and need a < b.
    """
    v = value.strip()
    if v.startswith("[") != v.endswith("]"):
        raise OptionError("unbalanced brackets in integer list")
    if v.startswith("["):
        v = v[1:-1].strip()
    if "[" in v or "]" in v:
        raise OptionError("nested brackets are not allowed in an integer list")
    if not v:
        return []
    result: list[int] = []
    for element in v.split(","):
        parts = element.split("-")
        if len(parts) > 2:
            raise OptionError(f"{element.strip()!r} is not an integer or a range a-b")
        try:
            numbers = [parse_int(p) for p in parts]
        except OptionError:
            raise OptionError(f"{element.strip()!r} is not an integer or a range a-b") from None
        if len(numbers) == 2:
            lo, hi = numbers
            if lo >= hi:
                raise OptionError(f"range {element.strip()!r} must go from low to high (a < b)")
            result.extend(range(lo, hi + 1))
        else:
            result.append(numbers[0])
    return result


@dataclass(frozen=True)
class Options:
    """The parsed items of one option string."""

    values: Mapping[str, str] = field(default_factory=dict)  # keys with a non-empty value, last wins
    flags: frozenset[str] = frozenset()  # valueless flags that were present
    blank: frozenset[str] = frozenset()  # keys whose last occurrence was `key=` (treated as not given)

    def has(self, key: str) -> bool:
        return key in self.values or key in self.flags

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def _convert(self, key: str, conv: Callable[[str], T], default: D) -> T | D:
        raw = self.values.get(key)
        if raw is None:
            return default
        try:
            return conv(raw)
        except OptionError as e:
            raise OptionError(f"Unable to convert {raw!r} for {key}: {e}") from None

    def toggle(self, key: str, default: bool) -> bool:
        return self._convert(key, parse_toggle, default)

    def byte_size(self, key: str, default: int | None = None) -> int | None:
        return self._convert(key, parse_byte_size, default)

    def integer(self, key: str, default: int | None = None, *, bits: int = 64) -> int | None:
        """An integer that must fit in an unsigned `bits`-bit field (u8, u16, ... in CH)."""

        def conv(raw: str) -> int:
            n = parse_int(raw)
            if n >= 1 << bits:
                raise OptionError(f"must be at most {(1 << bits) - 1}")
            return n

        return self._convert(key, conv, default)

    def int_list(self, key: str) -> list[int]:
        return self._convert(key, parse_int_list, [])


def parse_options(
    text: str, keys: Collection[str], valueless: Collection[str] = (), hidden: Collection[str] = ()
) -> Options:
    """Parse `text` against the keys a flag knows.

    `keys` need a value, `valueless` must not have one; `hidden` keys need a value too but are left out of
    the list of known keys that an unknown key's error shows (keys the caller only accepts to refuse).
    """
    values: dict[str, str] = {}
    flags: set[str] = set()
    blank: set[str] = set()
    for item in split_items(text):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not key:
            if not eq:
                raise OptionError(f"Invalid syntax: empty item (a doubled or trailing comma?) in {text!r}")
            raise OptionError(f"Invalid syntax: {item!r} has no key before '='")
        if key in valueless:
            if eq:
                raise OptionError(f"Invalid syntax: {key} takes no value (write just {key!r})")
            flags.add(key)
        elif key in keys or key in hidden:
            if not eq:
                raise OptionError(f"Invalid syntax: {key} needs a value ({key}=...)")
            value = value.strip()
            if value:
                values[key] = value
                blank.discard(key)
            else:
                values.pop(key, None)  # `key=` means "not given", even after an earlier value
                blank.add(key)
        else:
            known = ", ".join(sorted(k for k in {*keys, *valueless} if not k.startswith("_")))
            raise OptionError(f"Unknown option: {key} (known: {known})")
    return Options(values=values, flags=frozenset(flags), blank=frozenset(blank))
