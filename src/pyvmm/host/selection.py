"""Choosing the functions a bind takes: whole IOMMU groups or refusal, never a partial group."""

from __future__ import annotations

from collections.abc import Sequence

from . import sysfs
from .bdf import Bdf
from .errors import RefusedError
from .groups import blocks_group, group_of, stuck_bridge
from .pciids import PciIds
from .preflight import describe
from .sysfs import PciFunction


def select_targets(
    requested: Sequence[Bdf], functions: Sequence[PciFunction], whole_group: bool, db: PciIds
) -> list[PciFunction]:
    """The functions a bind must take: the requested ones, plus with `whole_group` every other endpoint
    of their groups. Refuses bridges, devices without an IOMMU group and, without `whole_group`, partial
    groups."""
    by_bdf = {f.bdf: f for f in functions}
    chosen: list[PciFunction] = []
    for bdf in requested:
        fn = by_bdf.get(bdf) or sysfs.read_function(bdf)
        if fn.is_bridge:
            raise RefusedError(f"{bdf}: is a bridge ({describe(fn, db)}); VFIO passes endpoints only")
        group = group_of(fn, functions)
        if group is None:
            raise RefusedError(
                f"{bdf}: has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) and check "
                "`pyvmm-host check`"
            )
        if fn not in chosen:
            chosen.append(fn)
        others = [m for m in group.members if m.bdf != bdf]
        if whole_group:
            for m in others:
                if not m.is_bridge and m not in chosen:
                    chosen.append(m)
            stuck = [m for m in others if stuck_bridge(m)]
            if stuck:
                named = ", ".join(describe(m, db) for m in stuck)
                raise RefusedError(
                    f"{bdf}: IOMMU group {group.number} also holds the bridge {named}, which cannot be "
                    "passed through; the group can never be viable in this slot"
                )
    if not whole_group:
        for fn in list(chosen):
            group = group_of(fn, functions)
            assert group is not None
            missing = [m for m in group.members if blocks_group(m) and m not in chosen]
            if missing:
                named = ", ".join(describe(m, db) for m in missing)
                raise RefusedError(
                    f"{fn.bdf}: IOMMU group {group.number} is only partly taken: it also holds {named}; name "
                    f"{'them' if len(missing) > 1 else 'it'} too or use --group"
                )
    return chosen
