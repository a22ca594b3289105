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
    CacheReadError,
    CacheUnavailableError,
    CacheWriteError,
    ConfigError,
    DiskBudgetError,
    DiskFullError,
    PrefastError,
)


class DataUnavailableError(PrefastError):
    """A dataset's files are missing and cannot be downloaded."""

    exit_code = 2


class TrainingDivergedError(PrefastError):
    """The training loss is not finite: the run stops (no cache of non-finite values is
    kept); the message names the learning rate and its 1/t_i scaling."""


class UnreadableImageError(DataUnavailableError):
    """An image file that cannot be decoded; the message names its path and the decoder's
    word. Raised in a DataLoader worker, it comes back with the worker's traceback in its
    message: only the line that names the file is kept, so the CLI says one line."""

    MARK = "cannot decode image "

    def __init__(self, message: str):
        ours = [line for line in message.splitlines() if self.MARK in line]
        if ours:
            message = ours[-1][ours[-1].index(self.MARK) :]
        super().__init__(message)


class Terminated(BaseException):
    """SIGTERM arrived (the CLI turns the signal into this exception, so the run unwinds:
    writers abort, locks are released). A ``BaseException``, like ``KeyboardInterrupt``:
    no ``except Exception`` on the way up may turn it into a cache error and carry on."""


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
    "CacheReadError",
    "CacheUnavailableError",
    "CacheWriteError",
    "ConfigError",
    "DataUnavailableError",
    "DiskBudgetError",
    "DiskFullError",
    "PrefastError",
    "Terminated",
    "TrainingDivergedError",
    "UnreadableImageError",
]
