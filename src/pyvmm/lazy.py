"""Package exports imported on first use (PEP 562).

A package's `__init__` names what it offers without importing every submodule behind it: a VM that passes
no device through or binds nothing should not pay, at every start, for importing the VFIO and host layers
(docs/ARCHITECTURE.md#start-up). Type checkers see the real imports under `TYPE_CHECKING`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """The package's module `__getattr__`: `exports` maps each exported name to its submodule."""

    def __getattr__(name: str) -> object:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)  # later lookups are plain attribute reads
        return value

    return __getattr__
