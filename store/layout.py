"""Cache root layout, content keys, completion markers and writer locks.

::

    <root>/<key>/zarr.json            Zarr v3 group; attributes = metadata
    <root>/<key>/activations/         zarr tier: chunked, crc32c (+ zstd) array
    <root>/<key>/activations.bin      mmap tier: raw rows (N, C, H, W)
    <root>/<key>/labels/, ids/        small zarr arrays
    <root>/<key>/COMPLETE.json        written last, atomically: the cache is readable
    <root>/.locks/<key>.lock          flock held by the one live writer

A directory without ``COMPLETE.json`` is *partial*: never read, shown as
such by ``prefast cache ls``, removed by the next writer of the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from prefast.errors import CacheLockedError, CacheNotFoundError

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


def atomic_write_json(path: Path, doc: dict) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


@dataclass
class CacheRoot:
    """A directory holding caches, one sub-directory per key."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()

    def dir_for(self, key: str) -> Path:
        return self.path / key

    def lock(self, key: str) -> FileLock:
        """A non-blocking writer lock. flock dies with its process, so a lock
        left by a killed writer is never stale: the next writer just takes it."""
        (self.path / ".locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path / ".locks" / f"{key}.lock"), timeout=0)

    def acquire(self, key: str) -> FileLock:
        lock = self.lock(key)
        try:
            lock.acquire()
        except Timeout:
            raise CacheLockedError(
                f"cache {key} is being written by another live process (lock "
                f"{lock.lock_file}); wait for it to finish or use another --cache-dir"
            ) from None
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
        matches = [k for k in self.cache_keys() if k.startswith(key_or_prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CacheNotFoundError(
                f"no cache {key_or_prefix!r} under {self.path}: list them with `prefast cache ls`"
            )
        raise CacheNotFoundError(
            f"{key_or_prefix!r} matches {len(matches)} caches: give more characters of the key"
        )

    def remove(self, key: str) -> None:
        shutil.rmtree(self.dir_for(key), ignore_errors=True)

    def touch(self, key: str) -> None:
        """Record a use (for `cache purge --older-than`): the marker's mtime."""
        marker = self.dir_for(key) / MARKER
        if marker.exists():
            os.utime(marker)


def disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(Path(dirpath) / name).st_blocks * 512
    return total
