"""Errors of the host-preparation layer; each carries a one-line message fit for a user."""

from __future__ import annotations

from pyvmm.errors import PyvmmError, UsageError


class HostError(PyvmmError):
    """A host operation failed; the message names the device and what to do (exit status 1)."""


class HostUsageError(HostError, UsageError):
    """The caller named something that does not exist or spelled it wrong (exit status 2)."""


class RefusedError(HostError):
    """A device must not be bound as asked (partial group, in use, bridge, no IOMMU)."""
