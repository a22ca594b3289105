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

import concurrent.futures
import contextlib
import errno
import functools
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import crc32c
import numpy as np

from .iothreads import IOPool, stall_s

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


def read_into(fd: int, buffers: list[memoryview]) -> int:
    """Fill ``buffers`` with the file's bytes from offset 0 (``os.preadv``, retried on a
    short read); returns the bytes read, fewer than asked at end of file.

    A read, not a map: a block the disk cannot read, or a file truncated meanwhile, is
    an ``OSError`` (``EIO``) or a short count here, where touching a mapped page would
    raise SIGBUS and kill the process.
    """
    views = [v.cast("B") for v in buffers]
    total = 0
    while views:
        n = os.preadv(fd, views, total)
        if n == 0:  # end of file
            break
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


# Pieces a chunk is read in, each checked while it is still in the CPU's cache: one pass
# over memory less than checking the whole chunk after reading it (32 MiB chunks, cold,
# 4 threads on 2 cores: 1.8 GB/s whole, 1.9-2.4 GB/s in 256 KiB-2 MiB pieces).
PIECE_BYTES = 1 << 20


def read_checking(fd: int, dest: np.ndarray, checked: int, trailer: bytearray) -> tuple[int, int]:
    """Fill ``dest`` (uint8), then ``trailer``, with the file's bytes from offset 0, in
    ``PIECE_BYTES`` reads; returns (bytes read, crc32c of the first ``checked`` bytes of
    ``dest``), computed piece by piece as each lands. Fewer bytes than asked: end of file.
    A read, not a map, as ``read_into``."""
    total, crc, size = 0, 0, len(dest)
    while total < size:
        n = os.preadv(fd, [dest[total : total + PIECE_BYTES].data], total)
        if n == 0:
            return total, crc
        if total < checked:
            crc = crc32c.crc32c(dest[total : min(total + n, checked)].data, crc)
        total += n
    view = memoryview(trailer)
    while view:
        n = os.preadv(fd, [view], total)
        if n == 0:
            break
        total, view = total + n, view[n:]
    return total, crc


def io_workers() -> int:
    """Threads reading and decoding chunks: twice the cores, so reads waiting on the
    disk overlap decodes (zstd releases the GIL, so decodes run on every core)."""
    return max(4, 2 * (os.cpu_count() or 2))


def _let_go(release: ReleaseChunk, c: int, future: Future[np.ndarray]) -> None:
    """Release a chunk loaded ahead that no batch took (when its load returns)."""
    if future.exception() is None:  # a failed load holds nothing
        release(c, future.result())


# What close() waits for loads still running (a hung read is left to finish on its own).
CLOSE_WAIT_S = 5.0


class ChunkPrefetcher:
    """Loads chunks in ``order`` on a thread pool, at most ``ahead`` not yet taken.

    ``get(c)`` returns chunk ``c`` (waiting for it, or loading it now if it was
    not scheduled) and re-raises the loader's error, e.g. CacheCorruptedError; a
    load that has not finished after ``iothreads.IO_STALL_S`` raises ``TimeoutError``
    (``ETIMEDOUT``: the disk stopped answering; the reader sorts it as unavailable).
    ``done(c, arr)`` says no batch needs chunk ``c`` any more: ``release`` frees it
    (a memory map is closed) or hands its buffer back for the next load.
    ``close()`` cancels what is pending and stops the threads, waiting at most
    ``CLOSE_WAIT_S`` for a load still running; idempotent.
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
        self.pool = IOPool(workers or io_workers(), "prefast-chunks")  # never joined if hung
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
            return future.result(timeout=stall_s())
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                errno.ETIMEDOUT, f"chunk {c} did not load in {stall_s():.0f} s"
            ) from None
        finally:
            self._fill()

    def done(self, c: int, arr: np.ndarray) -> None:
        buf = self.release(c, arr) if self.release is not None else None
        if buf is not None:
            self.free.append(buf)

    def close(self) -> None:
        """Cancel what has not started; what was loaded but never taken is released
        (an epoch stopped early must not leave its read-ahead mapped)."""
        release = self.release
        for c, future in self.pending.items():
            if not future.cancel() and release is not None:  # loaded, or loading: let go
                future.add_done_callback(functools.partial(_let_go, release, c))
        self.pending.clear()
        self.pool.shutdown(CLOSE_WAIT_S)

    def __enter__(self) -> ChunkPrefetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
