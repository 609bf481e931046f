"""Fuzzing budgets: one hypothesis settings object per target, scaled by the PYVMM_FUZZ environment variable.

PYVMM_FUZZ unset (or "suite"): the bounded budget of the normal test run (all targets together ~60 s or
less on a 2-core machine), with a per-example deadline that only catches pathological slowness.
PYVMM_FUZZ=long (`make fuzz`): LONG_FACTOR times the examples and no deadline.

Targets never load a profile globally (that would change every other hypothesis test in the suite); they
decorate themselves with `fuzz_settings(examples, steps)`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

ENV_VAR = "PYVMM_FUZZ"
LONG_FACTOR = 50

_COMMON = {
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}
settings.register_profile(
    "pyvmm-fuzz-suite",
    deadline=timedelta(seconds=5),
    **_COMMON,  # type: ignore[arg-type]
)
settings.register_profile("pyvmm-fuzz-long", deadline=None, **_COMMON)  # type: ignore[arg-type]


def mode() -> str:
    value = os.environ.get(ENV_VAR, "suite").strip().lower() or "suite"
    if value not in ("suite", "long"):
        raise RuntimeError(f"{ENV_VAR}={value!r}: expected 'suite' or 'long'")
    return value


def factor() -> int:
    return LONG_FACTOR if mode() == "long" else 1


def fuzz_settings(examples: int, steps: int | None = None) -> settings:
    """Settings for one target: `examples` test cases in the suite (LONG_FACTOR times that in a long run);
    `steps` is the number of rule calls per case of a state machine."""
    parent = settings.get_profile(f"pyvmm-fuzz-{mode()}")
    extra = {} if steps is None else {"stateful_step_count": steps}
    return settings(parent, max_examples=examples * factor(), **extra)  # type: ignore[arg-type]
