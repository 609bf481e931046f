"""`--seccomp true|false|log`: per-thread-kind seccomp allow-lists (docs/seccomp.md)."""

from pyvmm.sandbox import SeccompMode
from pyvmm.seccomp.install import SeccompError, install

__all__ = ["SeccompError", "SeccompMode", "install"]
