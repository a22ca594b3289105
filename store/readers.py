"""Open a complete disk cache with the reader of the tier its marker names."""

from __future__ import annotations

from .disk_reader import DiskReader
from .errors import CacheCorruptedError, CacheNotFoundError, read_error
from .layout import CacheRoot, KeyLock
from .mmap_reader import MmapReader
from .objectstore import ObjectRoot
from .zarr_reader import ZarrReader


def open_reader(
    root: CacheRoot | ObjectRoot, key: str, lock: KeyLock | None = None, *, use: bool = True
) -> DiskReader:
    """Open a complete disk cache (a partial one is never read). ``use``: record a use
    (what ``cache purge --older-than`` goes by); ``cache verify`` and ``inspect`` read a
    cache without using it.

    Raises CacheNotFoundError (missing or partial), CacheLockedError (being
    written or deleted), CacheCorruptedError (metadata, marker or chunk
    files do not add up) or CacheUnavailableError (an I/O error that says nothing
    about the cache, e.g. too many open files: ``errors.read_error`` sorts them).
    """
    if getattr(root, "remote", False):  # an s3:// root: no lock, the record names the copy
        from .object_reader import ObjectZarrReader

        return ObjectZarrReader(root, key, use=use)  # type: ignore[arg-type]
    assert isinstance(root, CacheRoot)
    try:
        lock = lock or root.acquire(key, shared=True)
    except OSError as exc:  # the lock file could not be opened
        raise read_error(key, "opening its lock", exc) from exc
    try:
        if not root.is_complete(key):
            raise CacheNotFoundError(f"cache {key} under {root.path} is missing or partial")
        tier = root.marker(key).get("tier")
    except OSError as exc:
        lock.release()
        raise read_error(key, "reading the completion marker", exc) from exc
    except (ValueError, AttributeError) as exc:  # not JSON, or not a JSON object
        lock.release()
        raise CacheCorruptedError(key, f"unreadable completion marker ({exc})") from exc
    except BaseException:
        lock.release()
        raise
    cls = {"zarr": ZarrReader, "mmap": MmapReader}.get(str(tier))
    if cls is None:
        lock.release()
        raise CacheCorruptedError(key, f"the completion marker names an unknown tier {tier!r}")
    return cls(root, key, lock=lock, use=use)
