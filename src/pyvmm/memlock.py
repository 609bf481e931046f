"""How much memory this process may lock, against what VFIO will pin: shared by pyvmm-host's checks
(hostfacts) and `pyvmm --device`, which checks before it opens anything (docs/cli.md#passthrough-devices).

VFIO's type1 IOMMU pins every page it maps for DMA and charges it to the process's RLIMIT_MEMLOCK, unless
the process has CAP_IPC_LOCK (root normally has). pyvmm maps all guest RAM, so an unprivileged pyvmm
needs a limit of at least the guest's RAM: without it the first DMA mapping fails halfway through the
build with ENOMEM.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from pyvmm.errors import UsageError

CAP_IPC_LOCK = 14  # <linux/capability.h>


def can_lock_memory() -> bool:
    """CAP_IPC_LOCK in the effective set: VFIO then ignores RLIMIT_MEMLOCK."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes; None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def check_vfio_pinning(pinned: int) -> None:
    """Refuse (one line, how to raise it) when VFIO could not pin `pinned` bytes for this process."""
    limit = memlock_limit()
    if limit is None or limit >= pinned or can_lock_memory():
        return
    kib = -(-pinned // 1024)
    raise UsageError(
        f"--device: VFIO pins all guest RAM ({_mib(pinned)}) but RLIMIT_MEMLOCK allows {_mib(limit)}: "
        f"raise it to at least {kib} KiB (`ulimit -l {kib}`, LimitMEMLOCK={pinned} in a systemd unit, "
        f"or memlock in /etc/security/limits.conf)"
    )
