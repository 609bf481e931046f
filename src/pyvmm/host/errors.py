"""Errors of the host-preparation layer; each carries a one-line message fit for a user."""

from __future__ import annotations


class HostError(Exception):
    """A host operation failed; the message names the device and what to do."""

    exit_code = 1


class UsageError(HostError):
    """The caller named something that does not exist or spelled it wrong (exit code 2)."""

    exit_code = 2


class RefusedError(HostError):
    """A device must not be bound as asked (partial group, in use, bridge, no IOMMU)."""
