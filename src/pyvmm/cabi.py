"""Helpers for ctypes mirrors of kernel UAPI structures, shared by the KVM and VFIO bindings."""

from __future__ import annotations

import ctypes
from typing import Any


def with_flex_array(
    header: type[ctypes.Structure],
    name: str,
    element: type[ctypes.Structure | ctypes.Union | ctypes._SimpleCData[Any]],
    n: int,
) -> type[ctypes.Structure]:
    """`header` followed by a flexible array member `name` of `n` `element`s, as one Structure type."""
    if n < 0:
        raise ValueError(f"negative element count {n} for {header.__name__}")
    fields = [*header._fields_, (name, element * n)]
    return type(f"{header.__name__}_{n}", (ctypes.Structure,), {"_fields_": fields})
