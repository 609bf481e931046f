"""The one exception type of pyvmm.vfio: a host-side VFIO problem, described in one line."""

from __future__ import annotations

from pyvmm.errors import PyvmmError


class VfioError(PyvmmError):
    """VFIO is unusable or refused a request; the message is one line and says what to do where it can."""
