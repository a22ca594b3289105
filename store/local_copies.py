"""``--local-cache DIR``: a local copy of the chunk objects a run reads from an object store,
so later epochs (and later runs on this machine) read them at disk speed, as LitData's and
Mosaic Streaming's local caches do.

A chunk object never changes once its copy is complete: a cache rewritten under the same key
is another writer's copy, under another prefix (``objectstore.py``). So a local file named
after the object is either that object's bytes or damaged, and its own crc32c trailer (zarr's)
tells which: a damaged one is deleted and fetched again, never read as the cache's. Files are
written under a temporary name and renamed; the least recently used go first when the folder
would outgrow its size limit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import crc32c
import numpy as np

DEFAULT_BYTES = 20 * 2**30  # --local-cache-size's default


class LocalCopies:
    def __init__(self, folder: str | Path, max_bytes: int | None = None):
        self.dir = Path(folder).expanduser()
        self.max_bytes = DEFAULT_BYTES if max_bytes is None else int(max_bytes)
        self._lock = threading.Lock()  # the prefetcher's threads put at once
        self._total: int | None = None  # bytes held, walked once then kept up to date

    def path(self, bucket: str, name: str) -> Path:
        return self.dir / bucket / name

    def get(self, bucket: str, name: str, size: int) -> np.ndarray | None:
        """The object's bytes from the local copy, or None (absent, or damaged: deleted)."""
        path = self.path(bucket, name)
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            return None
        trailer = int.from_bytes(data[-4:].tobytes(), "little") if len(data) >= 4 else -1
        if len(data) != size or crc32c.crc32c(data[:-4].data) != trailer:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be evicted
        return data

    def put(self, bucket: str, name: str, data: np.ndarray) -> None:
        """Keep a copy (best effort: a full or read-only disk only means no copy)."""
        if data.nbytes > self.max_bytes:
            return
        path = self.path(bucket, name)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data.tofile(tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._lock:
            self._total = (self._held() if self._total is None else self._total) + data.nbytes
            if self._total > self.max_bytes:
                self._evict()

    def _files(self) -> list[Path]:
        return [p for p in self.dir.rglob("*") if p.is_file() and not p.name.startswith(".")]

    def _held(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _evict(self) -> None:
        """Delete the least recently used files until the folder fits its limit."""
        files = sorted(self._files(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                size = p.stat().st_size
                p.unlink()
                total -= size
        self._total = total
