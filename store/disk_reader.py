"""Readers of the on-disk tiers.

Opening a reader takes the key's lock *shared* (so nobody deletes or rewrites
the cache while it is open) and checks the completion marker against the
data: every chunk the marker lists must exist, and every chunk read is
checked against the marker's crc32c of its raw bytes. zarr returns the fill
value for an absent chunk by design; here an absent or damaged chunk is a
:class:`CacheCorruptedError`, never zeros.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import zarr

from .base import NUMPY_STORAGE, CacheSpec, Reader, TorchBatch, checksum, from_storage
from .errors import CacheCorruptedError, CacheNotFoundError
from .layout import CacheRoot, KeyLock


class DiskReader(Reader):
    def __init__(self, root: CacheRoot, key: str, lock: KeyLock | None = None):
        self.root, self.key, self.dir = root, key, root.dir_for(key)
        self.lock = lock or root.acquire(key, shared=True)
        try:
            if not root.is_complete(key):
                raise CacheNotFoundError(f"cache {key} under {root.path} is missing or partial")
            self._open()
        except BaseException:
            self.lock.release()
            raise
        root.touch(key)

    def _open(self) -> None:
        try:
            self.marker = self.root.marker(self.key)
            store = zarr.storage.LocalStore(self.dir, read_only=True)
            self.group = zarr.open_group(store, mode="r")
            a: dict[str, Any] = dict(self.group.attrs)
            self.spec = CacheSpec(self.key, a["rows"], tuple(a["shape"]), a["dtype"], a)
        except (OSError, ValueError, KeyError, TypeError) as exc:
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
            if checksum(arr) != self.marker[f"{name}_crc32c"]:
                raise CacheCorruptedError(self.key, f"the {name} array does not match its checksum")

    def _small(self, name: str) -> np.ndarray:
        try:
            array: Any = self.group[name]
            return np.asarray(array[:])
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise CacheCorruptedError(self.key, f"array {name!r} is unreadable ({exc})") from exc

    @property
    def num_chunks(self) -> int:
        return -(-self.spec.rows // self.chunk_rows)

    def ids(self) -> np.ndarray:
        return self._ids

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` decoded and checked against the marker's checksum."""
        chunk = self._load_chunk(i)
        if checksum(chunk) != self.chunk_crcs[i]:
            del chunk  # an mmap view: the traceback must not keep the mapping open
            raise CacheCorruptedError(
                self.key,
                f"chunk {i} of activations does not match its checksum (missing or damaged)",
            )
        return chunk

    def _load_chunk(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _batch(self, acts: np.ndarray, rows: np.ndarray) -> TorchBatch:
        return (
            from_storage(acts, self.spec.dtype),
            torch.from_numpy(self.labels[rows]),
            torch.from_numpy(self._ids[rows]),
        )

    def _gather(self, rows: np.ndarray, chunk: Callable[[int], np.ndarray]) -> np.ndarray:
        """Rows ``rows`` (any order) out of the chunks ``chunk(i)`` returns."""
        out = np.empty((len(rows), *self.spec.shape), dtype=NUMPY_STORAGE[self.spec.dtype])
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = chunk(int(c))[rows[sel] - c * self.chunk_rows]
        return out

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        # Random rows: decode (and check) each touched chunk once.
        return self._batch(self._gather(rows, self.read_chunk), rows)

    def close(self) -> None:
        """Release the shared lock; idempotent."""
        self.lock.release()


class ZarrReader(DiskReader):
    tier = "zarr"

    def _open(self) -> None:
        super()._open()
        try:
            array = self.group["activations"]
        except (KeyError, ValueError, OSError) as exc:
            raise CacheCorruptedError(self.key, f"no activations array ({exc})") from exc
        if not isinstance(array, zarr.Array):
            raise CacheCorruptedError(self.key, "'activations' is not an array")
        self.array = array
        tail = (0,) * len(self.spec.shape)
        missing = [
            key
            for key in (array.metadata.encode_chunk_key((i, *tail)) for i in range(self.num_chunks))
            if not (self.dir / "activations" / key).is_file()
        ]
        if missing:
            raise CacheCorruptedError(
                self.key,
                f"{len(missing)} of {self.num_chunks} chunk files are missing "
                f"(first: activations/{missing[0]})",
            )

    def _load_chunk(self, i: int) -> np.ndarray:
        lo = i * self.chunk_rows
        try:
            return np.asarray(self.array[lo : lo + self.chunk_rows])
        except (ValueError, RuntimeError, OSError) as exc:  # crc32c codec / undecodable zstd
            raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = 256 * 2**20
    ) -> Iterator[TorchBatch]:
        """Exact order when the whole cache fits the shuffle buffer; otherwise
        a seeded chunk order with rows shuffled inside windows of chunks.
        Chunks are decoded when a batch first needs them, so a damaged chunk
        surfaces at the batch that would have used it."""
        from .shuffle import windowed_order

        decoded: dict[int, np.ndarray] = {}

        def chunk(c: int) -> np.ndarray:
            if c not in decoded:
                decoded[c] = self.read_chunk(c)
            return decoded[c]

        if self.spec.logical_bytes <= buffer_bytes:
            yield from self.exact_batches(
                seed, epoch, batch_size, lambda rows: self._batch(self._gather(rows, chunk), rows)
            )
            return
        window = max(1, buffer_bytes // (self.chunk_rows * self.spec.row_bytes))
        for live, rows in windowed_order(
            self.num_chunks, self.chunk_rows, self.spec.rows, window, batch_size, seed, epoch
        ):
            for c in [c for c in decoded if c not in live]:
                del decoded[c]
            yield self._batch(self._gather(rows, chunk), rows)


class MmapReader(DiskReader):
    tier = "mmap"

    def _open(self) -> None:
        super()._open()
        path = self.dir / "activations.bin"
        expected = self.spec.logical_bytes
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise CacheCorruptedError(
                self.key, f"activations.bin has {size} bytes, expected {expected}"
            )
        # Our own mapping (not np.memmap) so we can madvise it and close it.
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mm = np.frombuffer(self._map, dtype=NUMPY_STORAGE[self.spec.dtype]).reshape(
            self.spec.rows, *self.spec.shape
        )
        self.verified = np.zeros(self.num_chunks, dtype=bool)

    def _load_chunk(self, i: int) -> np.ndarray:
        lo = i * self.chunk_rows
        return np.asarray(self.mm[lo : lo + self.chunk_rows])

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        for c in np.unique(rows // self.chunk_rows):  # checksum each chunk on first touch
            if not self.verified[c]:
                self.read_chunk(int(c))
                self.verified[c] = True
        acts = self.mm[rows]  # fancy indexing copies out of the mapping
        # Drop the mapped pages from our RSS: they stay in the page cache, but a
        # RAM budget (--max-ram) counts resident pages of this process.
        self._map.madvise(mmap.MADV_DONTNEED)
        return self._batch(acts, rows)

    def close(self) -> None:
        if hasattr(self, "_map") and not self._map.closed:
            self.__dict__.pop("mm", None)  # release our buffer export before closing the map
            # A batch still viewing the map keeps it open until that batch is freed.
            with contextlib.suppress(BufferError):
                self._map.close()
        super().close()


def open_reader(root: CacheRoot, key: str, lock: KeyLock | None = None) -> DiskReader:
    """Open a complete disk cache (a partial one is never read).

    Raises CacheNotFoundError (missing or partial), CacheLockedError (being
    written or deleted) or CacheCorruptedError (metadata, marker or chunk
    files do not add up).
    """
    lock = lock or root.acquire(key, shared=True)
    try:
        if not root.is_complete(key):
            raise CacheNotFoundError(f"cache {key} under {root.path} is missing or partial")
        tier = root.marker(key).get("tier")
    except (OSError, ValueError) as exc:
        lock.release()
        raise CacheCorruptedError(key, f"unreadable completion marker ({exc})") from exc
    except BaseException:
        lock.release()
        raise
    cls = {"zarr": ZarrReader, "mmap": MmapReader}.get(str(tier))
    if cls is None:
        lock.release()
        raise CacheCorruptedError(key, f"the completion marker names an unknown tier {tier!r}")
    return cls(root, key, lock=lock)
