"""One error hierarchy for the whole library, owned by the store.

The store imports nothing from the trainer side, so the base class lives
here and ``prefast.errors`` re-exports it. Every error a user can meet derives
from :class:`PrefastError` and its message says what was wrong *and* how to
fix it. The CLI prints the message on one line and exits with status 2 (bad
input) or 1 (a failed check), never a traceback.
"""

from __future__ import annotations

import errno


class PrefastError(Exception):
    """Base class of every error raised on purpose by PreFast."""

    exit_code = 1


class ConfigError(PrefastError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""

    exit_code = 2


class CacheError(PrefastError):
    """Base class of activation-store errors."""


class CacheNotFoundError(CacheError):
    """No complete cache with the given key exists under the cache root."""


class CacheReadError(CacheError):
    """A cache could not be read. Its two kinds (:func:`read_error` sorts an ``OSError``
    into one) say whether the cache itself is bad."""


class CacheCorruptedError(CacheReadError):
    """A chunk is missing, fails its checksum, or the completion record does not match:
    the cache is bad (it is deleted and rebuilt)."""

    def __init__(self, cache: str, detail: str):
        self.cache = cache
        self.detail = detail
        self.root: object | None = None  # the cache root, once known: the hint names it
        super().__init__(cache, detail)

    def __str__(self) -> str:
        where = f" --cache-dir {self.root}" if self.root is not None else ""
        return (
            f"cache {self.cache} is corrupted: {self.detail}. Delete it with "
            f"`prefast cache purge {self.cache}{where} --yes`; it will be recomputed."
        )


class CacheUnavailableError(CacheReadError):
    """The cache could not be read *now* (too many open files, no memory, no permission,
    an interrupted call): nothing says it is damaged, so it is kept and tried again."""

    def __init__(self, cache: str, detail: str):
        self.cache = cache
        self.detail = detail
        super().__init__(
            f"cache {cache} could not be read now: {detail}. It was kept; the data is "
            "read raw meanwhile"
        )


# The errnos that say the cache's files are missing or damaged. Any other OSError (EMFILE,
# ENFILE, ENOMEM, EAGAIN, EINTR, EACCES, EPERM, ETIMEDOUT, ESTALE, ...) says nothing about
# the cache: it is unavailable, never deleted. EIO is the kernel's word for an unreadable
# block. ESTALE (a stale NFS file handle: the server restarted, or the file was replaced
# on another client) is transient: the next open gets a fresh handle to the same files.
DAMAGED_ERRNOS = frozenset(
    e
    for e in (
        errno.ENOENT,
        errno.EIO,
        errno.ENOTDIR,
        errno.EISDIR,
        getattr(errno, "EBADMSG", None),
        getattr(errno, "EUCLEAN", None),
    )
    if e is not None
)
FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)


def read_error(cache: str, what: str, exc: OSError) -> CacheReadError:
    """The one place an ``OSError`` met while reading a cache is sorted: missing or
    damaged files -> :class:`CacheCorruptedError`; anything else ->
    :class:`CacheUnavailableError` (the cache is kept)."""
    detail = f"{what}: {type(exc).__name__}: {exc}"
    if exc.errno in DAMAGED_ERRNOS:
        return CacheCorruptedError(cache, detail)
    return CacheUnavailableError(cache, detail)


class CacheLockedError(CacheError):
    """Another live process holds the cache (writing it, reading it or deleting it)."""


class CacheExistsError(CacheError):
    """A complete cache with this key exists: open it for reading instead of rewriting it."""


class CacheWriteError(CacheError):
    """The background writer failed; the partial cache was removed."""


class DiskBudgetError(CacheWriteError):
    """A cache outgrew the disk budget it was admitted with (``--max-disk``, or the free
    disk when it was planned); the partial cache was removed."""


class DiskStalledError(CacheWriteError):
    """No write to a cache finished for ``IO_STALL_S``: the disk hangs (an NFS stall, a
    dying drive). The boundary is given up; the hung write's thread removes the partial
    cache when the write returns."""


class DiskFullError(CacheWriteError, OSError):
    """The disk filled up while writing a cache; the partial cache was removed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An error's first line, at most ``limit`` characters (its type's name when it has no
    text). obstore's messages go on with the server's reply body (on AWS, a signature
    error's body names the access key and the canonical request, with any session token in
    it), which no message of ours repeats."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def write_error(err: BaseException, where: str) -> CacheWriteError:
    """What a writer that failed raises: a full disk (or quota) as ``DiskFullError``, any
    other error as ``CacheWriteError`` naming it; ``where`` names the cache."""
    if isinstance(err, CacheWriteError):
        return err
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {where}; the partial cache was removed. Free space, "
            "pass --max-disk, or choose another --cache-dir",
        )
    first = first_line(err) if str(err).strip() else ""  # a server's reply body: never
    return CacheWriteError(
        f"writing {where} failed ({type(err).__name__}: {first}); the partial cache was removed"
    )


class CacheAllocationError(CacheError):
    """A memory tier's allocator refused a cache (CUDA or host out of memory, a failed
    pin): the governor takes the next tier."""

    def __init__(self, what: str, nbytes: int, where: str, cause: BaseException):
        self.what, self.nbytes, self.where = what, nbytes, where
        super().__init__(
            f"could not allocate {nbytes / 2**20:.1f} MiB on {where} for {what} "
            f"({type(cause).__name__}: {first_line(cause, 160)}); the next tier is used instead"
        )
