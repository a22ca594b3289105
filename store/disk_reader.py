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
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs.bytes import Endian

from .base import NUMPY_STORAGE, CacheSpec, Reader, TorchBatch, checksum, from_storage
from .chunkio import ChunkPrefetcher, io_workers
from .errors import CacheCorruptedError, CacheNotFoundError
from .layout import CacheRoot, KeyLock
from .shuffle import chunk_visit_order, windowed_order


def chunk_file(cache_dir: Path, array: zarr.Array, i: int) -> Path:
    """The file of chunk ``i`` of a cache's ``activations`` array (chunked along rows only)."""
    tail = (0,) * (len(array.shape) - 1)
    return cache_dir / "activations" / array.metadata.encode_chunk_key((i, *tail))


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
        return self._load(i, None)

    def _load(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        """Chunk ``i``, into ``buf`` when given; checked against the marker's crc32c.

        Runs on the prefetcher's threads: it must not touch shared state.
        """
        chunk = self._load_chunk(i, buf)
        if checksum(chunk) != self.chunk_crcs[i]:
            del chunk  # never keep a view into damaged data alive in the traceback
            raise CacheCorruptedError(
                self.key,
                f"chunk {i} of activations does not match its checksum (missing or damaged)",
            )
        return chunk

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _rows_of(self, i: int) -> int:
        return min(self.chunk_rows, self.spec.rows - i * self.chunk_rows)

    def _full(self, buf: np.ndarray | None) -> np.ndarray:
        """A whole chunk's buffer: ``buf`` when given (reused), else a new one."""
        if buf is None:
            buf = np.empty(
                (self.chunk_rows, *self.spec.shape), dtype=NUMPY_STORAGE[self.spec.dtype]
            )
        return buf

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

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = 256 * 2**20
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
        # Read ahead one window, and never fewer chunks than keep every I/O thread busy
        # (with a small window that is up to 2 x io_workers() chunks past the buffer).
        ahead = max(window, 2 * io_workers())
        with ChunkPrefetcher(self._load, order, ahead, self._release) as pf:
            for live, rows in windowed_order(
                self.num_chunks, self.chunk_rows, self.spec.rows, window, batch_size, seed, epoch
            ):
                for c in [c for c in decoded if c not in live]:
                    pf.done(c, decoded.pop(c))
                for c in live:
                    if c not in decoded:
                        decoded[c] = pf.get(c)
                # Group the batch by chunk (its order is random anyway) so each row is
                # copied once, straight from its chunk into the batch.
                rows = rows[np.argsort(rows // self.chunk_rows, kind="stable")]
                yield self._batch(self._gather_grouped(rows, decoded), rows)

    def _exact_epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[TorchBatch]:
        """Exact batches out of the whole cache, its chunks loaded (and checked) in parallel."""
        whole = self._whole()
        copy = whole is None
        if whole is None:
            whole = np.empty(
                (self.num_chunks * self.chunk_rows, *self.spec.shape),
                dtype=NUMPY_STORAGE[self.spec.dtype],
            )
        loaded: set[int] = set()
        with ChunkPrefetcher(
            self._load, range(self.num_chunks), self.num_chunks, self._release
        ) as pf:

            def read(rows: np.ndarray) -> TorchBatch:
                for c in np.unique(rows // self.chunk_rows).tolist():
                    if c not in loaded:
                        chunk = pf.get(c)
                        if copy:  # into the whole array; the chunk's own memory is free again
                            lo = c * self.chunk_rows
                            whole[lo : lo + len(chunk)] = chunk
                            pf.done(c, chunk)
                        loaded.add(c)
                return self._batch(np.take(whole, rows, axis=0), rows)

            yield from self.exact_batches(seed, epoch, batch_size, read)
            if not copy:  # the whole cache was read in place: let it leave resident memory
                for c in range(self.num_chunks):
                    self._release(c, whole)

    def _whole(self) -> np.ndarray | None:
        """The whole cache as one array without copying, where the tier allows it."""
        return None

    def _release(self, i: int, arr: np.ndarray) -> np.ndarray | None:
        """Chunk ``i`` is no longer needed; return its buffer for reuse, if it owns one."""
        return arr.base if isinstance(arr.base, np.ndarray) else None

    def _gather_grouped(self, rows: np.ndarray, chunks: dict[int, np.ndarray]) -> np.ndarray:
        """Rows sorted by chunk, each copied once from its chunk into the batch."""
        out = np.empty((len(rows), *self.spec.shape), dtype=NUMPY_STORAGE[self.spec.dtype])
        chunk_of = rows // self.chunk_rows
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)], strict=True):
            c = int(chunk_of[a])
            # mode="clip": the indices are ours and in range, and numpy's default
            # ("raise") copies through a temporary buffer when given out= (2x slower).
            local = rows[a:b] - c * self.chunk_rows
            np.take(chunks[c], local, axis=0, out=out[a:b], mode="clip")
        return out

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
        missing = [i for i in range(self.num_chunks) if not self.chunk_path(i).is_file()]
        if missing:
            raise CacheCorruptedError(
                self.key,
                f"{len(missing)} of {self.num_chunks} chunk files are missing "
                f"(first: {self.chunk_path(missing[0]).relative_to(self.dir)})",
            )

        # The codec pipeline our writer uses: raw little-endian bytes, zstd or not, then a
        # crc32c trailer. Such chunk files are read directly; anything else through zarr.
        codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
        names = [type(c).__name__ for c in codecs]
        little = bool(codecs) and getattr(codecs[0], "endian", None) in (None, Endian.little)
        self.codec: str | None = (
            {
                ("BytesCodec", "Crc32cCodec"): "none",
                ("BytesCodec", "ZstdCodec", "Crc32cCodec"): "zstd",
            }.get(tuple(names))
            if little
            else None
        )
        self.zstd = numcodecs.Zstd()
        self._maps: dict[int, mmap.mmap] = {}  # chunk -> its mapped file, while it is in use

    def chunk_path(self, i: int) -> Path:
        return chunk_file(self.dir, self.array, i)

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        """One read of the chunk file: raw bytes (+ 4-byte crc32c) or a zstd frame (+ crc)."""
        if self.codec is None:  # a codec pipeline we did not write: let zarr decode it
            lo = i * self.chunk_rows
            try:
                return np.asarray(self.array[lo : lo + self.chunk_rows])
            except (ValueError, RuntimeError, OSError) as exc:
                raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        # zarr stores the last chunk padded to a whole chunk; the marker's crc covers real rows.
        # The file is mapped, not read: a read would copy every byte once more.
        rows = self._rows_of(i)
        full_bytes = self.chunk_rows * self.spec.row_bytes
        try:
            with open(self.chunk_path(i), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 5 or (self.codec == "none" and size != full_bytes + 4):
                    raise CacheCorruptedError(
                        self.key, f"chunk {i} has {size} bytes, expected {full_bytes + 4}"
                    )
                mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CacheCorruptedError(self.key, f"chunk file of chunk {i} is missing") from None
        mapped.madvise(mmap.MADV_WILLNEED)  # one large read-ahead, not a fault per page
        if self.codec == "none":
            self._maps[i] = mapped  # closed by _release when the chunk leaves the window
            flat = np.frombuffer(
                mapped,
                dtype=NUMPY_STORAGE[self.spec.dtype],
                count=full_bytes // self.spec.row_bytes * int(np.prod(self.spec.shape)),
            )
            return flat.reshape(self.chunk_rows, *self.spec.shape)[:rows]
        full = self._full(buf)
        try:
            self.zstd.decode(memoryview(mapped)[: size - 4], out=full.reshape(-1).view(np.uint8))
        except Exception as exc:  # an undecodable frame
            raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        finally:
            with contextlib.suppress(BufferError):
                mapped.close()
        return full[:rows]

    def _release(self, i: int, arr: np.ndarray) -> np.ndarray | None:
        mapped = self._maps.pop(i, None)
        if mapped is None:
            return super()._release(i, arr)
        del arr
        with contextlib.suppress(BufferError):  # a view still alive: closed when it is freed
            mapped.close()
        return None


class MmapReader(DiskReader):
    """The raw tier: rows in one uncompressed file, memory-mapped.

    A chunk is "loaded" by asking the kernel to read its range ahead
    (``MADV_WILLNEED``) and checking its crc32c, which faults it in; batches
    are gathered straight from the mapping, so each byte is copied once. When
    a chunk leaves the shuffle window its pages leave this process's resident
    memory (``MADV_DONTNEED``; they stay in the page cache), so ``--max-ram``
    holds.
    """

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
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mm = np.frombuffer(self._map, dtype=NUMPY_STORAGE[self.spec.dtype]).reshape(
            self.spec.rows, *self.spec.shape
        )

    def _range(self, i: int) -> tuple[int, int]:
        """Chunk ``i``'s bytes, widened to whole pages (madvise wants aligned ranges)."""
        lo = i * self.chunk_rows * self.spec.row_bytes
        hi = lo + self._rows_of(i) * self.spec.row_bytes
        lo -= lo % mmap.PAGESIZE
        return lo, hi - lo

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        self._map.madvise(mmap.MADV_WILLNEED, *self._range(i))
        lo = i * self.chunk_rows
        return self.mm[lo : lo + self._rows_of(i)]

    def _release(self, i: int, arr: np.ndarray) -> np.ndarray | None:
        if not self._map.closed:
            self._map.madvise(mmap.MADV_DONTNEED, *self._range(i))
        return None

    def _whole(self) -> np.ndarray | None:
        return self.mm

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
