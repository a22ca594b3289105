"""Cache root layout, content keys, completion markers and per-key locks.

::

    <root>/<key>/zarr.json            Zarr v3 group; attributes = metadata
    <root>/<key>/activations/         zarr tier: chunked, crc32c (+ zstd) array
    <root>/<key>/activations.bin      mmap tier: raw rows (N, C, H, W)
    <root>/<key>/labels/, ids/        small zarr arrays
    <root>/<key>/COMPLETE.json        written last, atomically: the cache is readable
    <root>/.locks/<key>.lock          flock: shared by readers, exclusive for a writer
                                      or a deleter

A directory without ``COMPLETE.json`` is *partial*: never read, shown as
such by ``prefast cache ls``, removed by the next writer of the same key.
A cache is deleted only under its exclusive lock, so never while any process
reads it; a complete cache is never rewritten (writers raise
``CacheExistsError`` and the caller opens it for reading instead).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CacheLockedError, CacheNotFoundError

MARKER = "COMPLETE.json"
MIB = 2**20


def cache_key(parts: dict[str, Any]) -> str:
    """Content address: hash of everything that determines the cached values."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (data before the marker)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def drop_page_cache(path: Path) -> None:
    """Write ``path``'s files (a file or a folder) back and drop them from the page cache,
    so the next read of them comes from the disk (the store benchmark's cold reads, and
    the bandwidth measurement's)."""
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows: the next read may be cached
        return
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def atomic_write_json(path: Path, doc: dict) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class KeyLock:
    """A non-blocking ``flock`` on one key's lock file: shared or exclusive.

    Readers hold it shared for as long as they are open; a writer or a
    deleter needs it exclusive. flock belongs to the open file, so it dies
    with its process: a lock left by a killed writer is never stale.
    (filelock's ``FileLock`` is exclusive only, and its SQLite-backed
    ``ReadWriteLock`` raises when one process holds both modes on a key, which
    a run does while it reads a boundary and removes a superseded one.)
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.shared = False

    def try_acquire(self, shared: bool) -> bool:
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this KeyLock")
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # A deleter unlinks the lock file while it holds it (remove_file): a lock taken
            # on the unlinked file locks nothing anyone else sees. Take the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.shared = fd, shared
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def remove_file(self) -> None:
        """Unlink the lock file while holding it exclusive (the key's cache is gone), then
        release: nothing of a purged key is left behind."""
        assert self.fd is not None and not self.shared
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.release()

    def downgrade(self) -> None:
        """Exclusive -> shared: a writer hands its finished cache to a reader."""
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.shared = True

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Idempotent."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@dataclass
class CacheRoot:
    """A directory holding caches, one sub-directory per key."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()

    def dir_for(self, key: str) -> Path:
        return self.path / key

    def lock(self, key: str) -> KeyLock:
        return KeyLock(self.path / ".locks" / f"{key}.lock")

    def acquire(self, key: str, shared: bool = False) -> KeyLock:
        """The key's lock, or CacheLockedError naming what to do."""
        lock = self.lock(key)
        if not lock.try_acquire(shared):
            raise CacheLockedError(
                f"cache {key} is "
                + (
                    "being written or deleted by another live process"
                    if shared
                    else "in use by another live process (reading or writing it)"
                )
                + f" (lock {lock.path}); wait for it to finish or use another --cache-dir"
            )
        return lock

    def is_complete(self, key: str) -> bool:
        return (self.dir_for(key) / MARKER).is_file()

    def marker(self, key: str) -> dict:
        return json.loads((self.dir_for(key) / MARKER).read_text())

    def cache_keys(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def resolve(self, key_or_prefix: str) -> str:
        """Accept a unique key prefix, as git does for commits."""
        return resolve_key(self.cache_keys(), key_or_prefix, str(self.path))

    def remove(self, key: str, copy: str | None = None) -> bool:
        """Delete a cache unless a live process holds it; True when it is gone. (``copy``:
        an object store's; a local key has one.)"""
        lock = self.lock(key)
        if not lock.try_acquire(shared=False):
            return False
        try:
            self.remove_held(key)
        except BaseException:
            lock.release()
            raise
        lock.remove_file()
        return True

    def remove_held(self, key: str) -> None:
        """Delete a cache whose exclusive lock the caller holds."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir_for(key) / MARKER).unlink()  # first: no reader may see a half-deleted cache
        shutil.rmtree(self.dir_for(key), ignore_errors=True)

    def touch(self, key: str) -> None:
        """Record a use (for `cache purge --older-than`): the marker's mtime."""
        marker = self.dir_for(key) / MARKER
        if marker.exists():
            os.utime(marker)

    # -- what `cache ls` and the run's side files need (``objectstore.ObjectRoot`` too) ----
    remote = False

    def check(self) -> None:
        pass

    def sub(self, name: str) -> CacheRoot:
        return CacheRoot(self.path / name)

    def names(self) -> list[str]:
        """The first level of names in the directory (keys, and dot-named side data)."""
        return sorted(os.listdir(self.path)) if self.path.is_dir() else []

    def clear(self) -> None:
        """Delete the directory and all it holds (a scratch root)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def usage(self, key: str) -> int:
        return disk_usage(self.dir_for(key))

    def attrs(self, key: str) -> dict:
        """The cache's zarr group attributes ({} when its writer died before writing them)."""
        import zarr

        try:
            store = zarr.storage.LocalStore(self.dir_for(key), read_only=True)
            return dict(zarr.open_group(store, mode="r").attrs)
        except Exception:  # a writer killed before its group existed: nothing to read
            return {}

    def times(self, key: str) -> tuple[float | None, float | None]:
        """(created, last used): the directory's and the marker's modification times."""
        with contextlib.suppress(OSError):
            created = self.dir_for(key).stat().st_mtime
            marker = self.dir_for(key) / MARKER
            return created, marker.stat().st_mtime if marker.is_file() else None
        return None, None

    def live_writer(self, key: str) -> bool:
        """True when a live process holds the key's lock (don't purge under it)."""
        lock = self.lock(key)
        if not lock.try_acquire(shared=False):
            return True
        lock.release()
        return False

    def orphans(self, key: str) -> list[str]:
        return []  # a local key holds one copy

    def remove_orphans(self, key: str) -> int:
        return 0

    def purge(self, key: str) -> bool:
        """`cache purge`: delete the cache unless a live process holds it."""
        return self.remove(key)

    def read_side(self, name: str) -> bytes | None:
        """A file kept beside the caches (bandwidths.json, .costs/...), None if absent."""
        try:
            return (self.path / name).read_bytes()
        except OSError:
            return None

    def write_side(self, name: str, doc: dict) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / name, doc)


def resolve_key(keys: list[str], key_or_prefix: str, where: str) -> str:
    """The one key ``key_or_prefix`` starts (a unique prefix is enough, as git's commits)."""
    matches = [k for k in keys if k.startswith(key_or_prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CacheNotFoundError(
            f"no cache {key_or_prefix!r} under {where}: list them with `prefast cache ls`"
        )
    raise CacheNotFoundError(
        f"{key_or_prefix!r} matches {len(matches)} caches: give more characters of the key"
    )


def process_alive(pid: int) -> bool:
    """Is process ``pid`` of this host there (signal 0)? Another user's counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path``, directories included (an empty partial is not free)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(dirpath).st_blocks * 512
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(Path(dirpath) / name).st_blocks * 512
    return total
