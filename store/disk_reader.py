"""What the on-disk tiers' readers share (``zarr_reader.py``, ``mmap_reader.py``).

Opening a reader takes the key's lock *shared* (so nobody deletes or rewrites
the cache while it is open) and checks the completion marker against the
data: every chunk the marker lists must exist, and every chunk read is
checked against the marker's crc32c of its raw bytes. zarr returns the fill
value for an absent chunk by design; here an absent or damaged chunk is a
:class:`CacheCorruptedError`, never zeros.

A shuffled epoch loads each chunk once, ahead of need, on a thread pool
(``chunkio.ChunkPrefetcher``), and copies each row once, from its chunk into
its batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
import zarr

from .base import (
    SHUFFLE_BUFFER_BYTES,
    CacheSpec,
    Reader,
    TorchBatch,
    checksum,
    from_storage,
)
from .chunkio import ChunkPrefetcher, io_workers
from .errors import CacheCorruptedError, CacheError, CacheNotFoundError, read_error
from .iothreads import bounded
from .layout import CacheRoot, KeyLock
from .shuffle import chunk_visit_order, windowed_order


def chunk_file(cache_dir: PurePath, array: zarr.Array, i: int) -> PurePath:
    """The file of chunk ``i`` of a cache's ``activations`` array (chunked along rows only)."""
    tail = (0,) * (len(array.shape) - 1)
    return cache_dir / "activations" / array.metadata.encode_chunk_key((i, *tail))


class DiskReader(Reader):
    def __init__(self, root: CacheRoot, key: str, lock: KeyLock | None = None, *, use: bool = True):
        self.root, self.key, self.dir = root, key, root.dir_for(key)
        self.lock = lock or root.acquire(key, shared=True)
        try:
            if not root.is_complete(key):
                raise CacheNotFoundError(f"cache {key} under {root.path} is missing or partial")
            self._open()
            if use:  # verifying or inspecting is not using (``cache purge --older-than``)
                with contextlib.suppress(OSError, CacheError):  # unrecorded use: still readable
                    root.touch(key)
        except OSError as exc:  # from anything not sorted where it happened
            self.close()
            raise read_error(key, "opening it", exc) from exc
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            self.marker = self.root.marker(self.key)
            self.group = self._zarr_group()
            a: dict[str, Any] = dict(self.group.attrs)
            self.spec = CacheSpec(self.key, a["rows"], tuple(a["shape"]), a["dtype"], a)
        except OSError as exc:
            raise read_error(self.key, "reading its metadata", exc) from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CacheCorruptedError(self.key, f"unreadable metadata ({exc})") from exc
        self.attrs = a
        self.chunk_rows = int(self.marker.get("chunk_rows", 0))
        crcs = self.marker.get("chunk_crc32c")
        if not self.chunk_rows or crcs is None or len(crcs) != self.num_chunks:
            raise CacheCorruptedError(
                self.key,
                "the completion marker does not list one checksum per chunk "
                "(a cache from an older PreFast, or a damaged marker)",
            )
        self.chunk_crcs: list[int] = crcs
        self._ids = self._small("ids")
        self.labels = self._small("labels")
        for name, arr in (("ids", self._ids), ("labels", self.labels)):
            if checksum(arr) != self.marker.get(f"{name}_crc32c"):  # absent: damaged marker
                raise CacheCorruptedError(self.key, f"the {name} array does not match its checksum")

    def _small(self, name: str) -> np.ndarray:
        try:
            array: Any = self.group[name]
            return np.asarray(array[:])
        except OSError as exc:
            raise read_error(self.key, f"reading array {name!r}", exc) from exc
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CacheCorruptedError(self.key, f"array {name!r} is unreadable ({exc})") from exc

    def _zarr_group(self) -> zarr.Group:
        return zarr.open_group(zarr.storage.LocalStore(self.dir, read_only=True), mode="r")

    @property
    def num_chunks(self) -> int:
        return -(-self.spec.rows // self.chunk_rows)

    def ids(self) -> np.ndarray:
        return self._ids

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` decoded and checked against the marker's checksum; a read that does
        not return within ``IO_STALL_S`` is unavailable (the cache is kept)."""
        try:
            return bounded(f"chunk {i}", self._load, i, None)
        except TimeoutError as exc:
            raise read_error(self.key, f"reading chunk {i} of activations", exc) from exc

    def _load(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        """Chunk ``i``, into ``buf`` when given; checked against the marker's crc32c.

        Runs on the prefetcher's threads: it must not touch shared state.
        """
        try:
            chunk = self._load_chunk(i, buf)
        except OSError as exc:  # EIO: damaged; EMFILE, EACCES...: unavailable, kept
            raise read_error(self.key, f"reading chunk {i} of activations", exc) from exc
        if self._crc_of(i, chunk) != self.chunk_crcs[i]:
            del chunk  # never keep a view into damaged data alive in the traceback
            raise CacheCorruptedError(
                self.key,
                f"chunk {i} of activations does not match its checksum (missing or damaged)",
            )
        return chunk

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _crc_of(self, i: int, chunk: np.ndarray) -> int:
        """crc32c of chunk ``i``'s rows, just loaded on this thread (a reader that checked
        it while reading returns that figure)."""
        return checksum(chunk)

    def _get(self, pf: ChunkPrefetcher, c: int) -> np.ndarray:
        """Chunk ``c`` from the prefetcher; a load that stalls is unavailable (kept)."""
        try:
            return pf.get(c)
        except TimeoutError as exc:
            raise read_error(self.key, f"reading chunk {c} of activations", exc) from exc

    def _rows_of(self, i: int) -> int:
        return min(self.chunk_rows, self.spec.rows - i * self.chunk_rows)

    def _full(self, buf: np.ndarray | None) -> np.ndarray:
        """A whole chunk's buffer: ``buf`` when given (reused), else a new one."""
        return self._empty(self.chunk_rows) if buf is None else buf

    def _batch(self, acts: np.ndarray, rows: np.ndarray) -> TorchBatch:
        return (
            from_storage(acts, self.spec.dtype),
            torch.from_numpy(self.labels[rows]),
            torch.from_numpy(self._ids[rows]),
        )

    def _empty(self, rows: int) -> np.ndarray:
        return np.empty((rows, *self.spec.stored_shape), dtype=self.spec.storage)

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        # Any rows: grouped by chunk, so each touched chunk is decoded (and checked) once.
        by_chunk = np.argsort(rows // self.chunk_rows, kind="stable")
        acts = self._empty(len(rows))
        self._gather_grouped(rows[by_chunk], acts, self.read_chunk)
        if np.any(by_chunk != np.arange(len(rows))):  # back to the order asked for
            acts = acts[np.argsort(by_chunk)]
        return self._batch(acts, rows)

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = SHUFFLE_BUFFER_BYTES
    ) -> Iterator[TorchBatch]:
        """Every row once per epoch, chunks loaded ahead on a thread pool.

        Exact (seed, epoch) order when the whole cache fits ``buffer_bytes``;
        otherwise a seeded chunk order with rows shuffled inside windows of
        chunks: the window being served plus the next one being read fit
        ``buffer_bytes``. A damaged chunk surfaces at the first batch that needs it.
        """
        if self.spec.logical_bytes <= buffer_bytes:
            yield from self._exact_epoch(seed, epoch, batch_size)
            return
        chunk_bytes = self.chunk_rows * self.spec.row_bytes
        window = max(1, buffer_bytes // (2 * chunk_bytes))
        order = chunk_visit_order(self.num_chunks, seed, epoch)
        decoded: dict[int, np.ndarray] = {}
        # The buffer's second half: the next window is read while this one is served,
        # on no more threads than it has chunks (more would only hold more memory).
        with ChunkPrefetcher(
            self._load, order, window, self._release, workers=min(io_workers(), window)
        ) as pf:

            def take(c: int) -> np.ndarray:
                if c not in decoded:
                    decoded[c] = self._get(pf, c)
                return decoded[c]

            plan = windowed_order(
                self.num_chunks, self.chunk_rows, self.spec.rows, window, batch_size, seed, epoch
            )
            try:
                for chunks, rows in plan:
                    # Rows carried over from earlier windows first, then this window's; each
                    # group by chunk (a batch's order is random anyway), so every row is
                    # copied once, straight from its chunk into the batch.
                    chunk_of = rows // self.chunk_rows
                    fresh = np.isin(chunk_of, chunks)
                    rows = rows[np.lexsort((chunk_of, fresh))]
                    carried = int(len(rows) - fresh.sum())
                    out = self._empty(len(rows))
                    self._gather_grouped(rows[:carried], out[:carried], take)
                    # The carried rows are copied: earlier windows' chunks can go before this
                    # window's are taken, so the buffer never holds three windows.
                    for c in [c for c in decoded if c not in chunks]:
                        pf.done(c, decoded.pop(c))
                    self._gather_grouped(rows[carried:], out[carried:], take)
                    yield self._batch(out, rows)
            finally:  # the last window (or, when stopped early, the current one) lets go too
                for c in list(decoded):
                    pf.done(c, decoded.pop(c))

    def _exact_epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[TorchBatch]:
        """Exact batches out of the whole cache, its chunks loaded (and checked) in parallel."""
        whole = self._whole()
        copy = whole is None
        if whole is None:
            whole = self._empty(self.num_chunks * self.chunk_rows)
        loaded: set[int] = set()
        with ChunkPrefetcher(
            self._load, range(self.num_chunks), self.num_chunks, self._release
        ) as pf:

            def read(rows: np.ndarray) -> TorchBatch:
                for c in np.unique(rows // self.chunk_rows).tolist():
                    if c not in loaded:
                        chunk = self._get(pf, c)
                        if copy:  # into the whole array; the chunk's own memory is free again
                            lo = c * self.chunk_rows
                            whole[lo : lo + len(chunk)] = chunk
                            pf.done(c, chunk)
                        loaded.add(c)
                return self._batch(np.take(whole, rows, axis=0), rows)

            try:
                yield from self.exact_batches(seed, epoch, batch_size, read)
            finally:
                if not copy:  # the cache was read in place: let it leave resident memory
                    for c in loaded:
                        pf.done(c, whole)

    def _whole(self) -> np.ndarray | None:
        """The whole cache as one array without copying, where the tier allows it."""
        return None

    def _release(self, i: int, arr: np.ndarray) -> np.ndarray | None:
        """Chunk ``i`` is no longer needed; return its buffer for reuse, if it owns one."""
        return arr.base if isinstance(arr.base, np.ndarray) else None

    def _gather_grouped(
        self, rows: np.ndarray, out: np.ndarray, chunk: Callable[[int], np.ndarray]
    ) -> None:
        """Rows sorted by chunk into ``out``, each copied once from ``chunk(c)``."""
        if not len(rows):
            return
        chunk_of = rows // self.chunk_rows
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]]).tolist()
        for a, b in zip(starts, [*starts[1:], len(rows)], strict=True):
            c = int(chunk_of[a])
            # mode="clip": the indices are ours and in range, and numpy's default
            # ("raise") copies through a temporary buffer when given out= (2x slower).
            local = rows[a:b] - c * self.chunk_rows
            np.take(chunk(c), local, axis=0, out=out[a:b], mode="clip")

    def close(self) -> None:
        """Release the shared lock; idempotent."""
        if hasattr(self, "lock"):
            self.lock.release()
