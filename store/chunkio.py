"""Reading chunks at the disk's speed: a thread pool that loads them ahead, in a known order.

An epoch's chunk order is known before it starts (``shuffle.windowed_order``
draws it from the seed), so the reader can keep the next chunks in flight
while the current ones are served: each chunk's file is mapped
(``map_for_reading``), decoded into a reused buffer (zstd releases the GIL)
and checked against its crc32c on a pool of threads. Zarr itself would read the
same files, but through its async machinery one request at a time; reading
the files directly, several at once, is what reaches the floors in
``benchmarks/store_floors.py``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

# Load chunk i, into ``buf`` when one is given (a free buffer of a full chunk's size).
LoadChunk = Callable[[int, "np.ndarray | None"], np.ndarray]
# Chunk i is no longer needed: free what it holds; return a buffer to reuse, if any.
ReleaseChunk = Callable[[int, np.ndarray], "np.ndarray | None"]


# Module-level so the map_advice benchmark (benchmarks/chunk_bench.py) can measure without it.
HUGE_PAGE_FAULTS = True


def map_for_reading(fileno: int, size: int = 0) -> mmap.mmap:
    """A read-only map of a file whose page faults read and map 2 MiB folios.

    ``MADV_HUGEPAGE`` on a file mapping makes a fault read ahead in PMD-sized
    folios and map each whole, so the crc32c pass, the zstd decode and the
    gathers take 512x fewer faults and TLB misses. No ``MADV_WILLNEED``: its
    forced read-ahead fills the page cache with small pages and undoes that.
    Measured: ``benchmarks/results/map_advice.md``.
    """
    mapped = mmap.mmap(fileno, size, access=mmap.ACCESS_READ)
    # Linux only, and refused (EINVAL) by a kernel built without THP: then pages stay 4 KiB.
    if HUGE_PAGE_FAULTS and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mapped.madvise(mmap.MADV_HUGEPAGE)
    return mapped


def io_workers() -> int:
    """Threads reading and decoding chunks: twice the cores, so reads waiting on the
    disk overlap decodes (zstd releases the GIL, so decodes run on every core)."""
    return max(4, 2 * (os.cpu_count() or 2))


class ChunkPrefetcher:
    """Loads chunks in ``order`` on a thread pool, at most ``ahead`` not yet taken.

    ``get(c)`` returns chunk ``c`` (waiting for it, or loading it now if it was
    not scheduled) and re-raises the loader's error, e.g. CacheCorruptedError.
    ``done(c, arr)`` says no batch needs chunk ``c`` any more: ``release`` frees it
    (a memory map is closed) or hands its buffer back for the next load.
    ``close()`` cancels what is pending and joins the threads; idempotent.
    """

    def __init__(
        self,
        load: LoadChunk,
        order: Iterable[int],
        ahead: int,
        release: ReleaseChunk | None = None,
        workers: int | None = None,
    ):
        self.load, self.release = load, release
        self.order = [int(c) for c in order]
        self.ahead = max(1, ahead)
        self.pool = ThreadPoolExecutor(workers or io_workers(), thread_name_prefix="prefast-chunks")
        self.pending: dict[int, Future[np.ndarray]] = {}
        self.free: list[np.ndarray] = []
        self.next = 0
        self._fill()

    def _submit(self, c: int) -> None:
        buf = self.free.pop() if self.free else None
        self.pending[c] = self.pool.submit(self.load, c, buf)

    def _fill(self) -> None:
        while self.next < len(self.order) and len(self.pending) < self.ahead:
            c = self.order[self.next]
            self.next += 1
            if c not in self.pending:
                self._submit(c)

    def get(self, c: int) -> np.ndarray:
        if c not in self.pending:
            self._submit(c)
        future = self.pending.pop(c)
        try:
            return future.result()
        finally:
            self._fill()

    def done(self, c: int, arr: np.ndarray) -> None:
        buf = self.release(c, arr) if self.release is not None else None
        if buf is not None:
            self.free.append(buf)

    def close(self) -> None:
        """Cancel what has not started; what was loaded but never taken is released
        (an epoch stopped early must not leave its read-ahead mapped)."""
        for c, future in self.pending.items():
            if not future.cancel() and self.release is not None:
                with contextlib.suppress(Exception):  # a failed load holds nothing
                    self.release(c, future.result())
        self.pending.clear()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> ChunkPrefetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
