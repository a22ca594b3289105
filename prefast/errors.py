"""The error hierarchy, re-exported from the store (which owns it), plus the
errors only the trainer side raises."""

from __future__ import annotations

from prefast.store.errors import (
    CacheAllocationError,
    CacheCorruptedError,
    CacheError,
    CacheExistsError,
    CacheLockedError,
    CacheNotFoundError,
    CacheWriteError,
    ConfigError,
    DiskFullError,
    PrefastError,
)


class DataUnavailableError(PrefastError):
    """A dataset's files are missing and cannot be downloaded."""

    exit_code = 2


class BoundaryStateError(PrefastError, RuntimeError):
    """A cache boundary was asked for a transition its state does not allow (a bug)."""


__all__ = [
    "BoundaryStateError",
    "CacheAllocationError",
    "CacheCorruptedError",
    "CacheError",
    "CacheExistsError",
    "CacheLockedError",
    "CacheNotFoundError",
    "CacheWriteError",
    "ConfigError",
    "DataUnavailableError",
    "DiskFullError",
    "PrefastError",
]
