"""The mmap tier's reader: rows in one raw file, memory-mapped."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

import numpy as np

from .base import SHUFFLE_BUFFER_BYTES, TorchBatch
from .chunkio import map_for_reading
from .disk_reader import DiskReader
from .errors import CacheCorruptedError, read_error


class MmapReader(DiskReader):
    """The raw tier: rows in one uncompressed file, memory-mapped.

    A chunk is "loaded" by checking its crc32c, which faults it in (in 2 MiB
    folios: ``chunkio.map_for_reading``); batches are gathered straight from
    the mapping, so each byte is copied once. When a chunk leaves the shuffle
    window its pages leave this process's resident memory (``MADV_DONTNEED``;
    they stay in the page cache), so ``--max-ram`` holds.

    What a map cannot survive: a page the disk cannot read, or a file truncated
    *while an epoch reads it*, raises SIGBUS when touched, and the process dies
    (as with ``numpy.memmap`` or LMDB). The file's size is checked again before
    every epoch and every ``read_rows``, so a file truncated between epochs is a
    :class:`CacheCorruptedError` (the epoch runs on raw data, the cache is
    rebuilt); the zarr tier, which reads its chunk files, survives both.
    """

    tier = "mmap"

    def _open(self) -> None:
        super()._open()
        path = self.dir / "activations.bin"
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - kept open: its size is checked again
            self._check_size()
            self._map = map_for_reading(self._file.fileno())
        except FileNotFoundError as exc:
            raise CacheCorruptedError(self.key, "activations.bin is missing") from exc
        except OSError as exc:
            raise read_error(self.key, "mapping activations.bin", exc) from exc
        self.mm = np.frombuffer(self._map, dtype=self.spec.storage).reshape(
            self.spec.rows, *self.spec.stored_shape
        )

    def _check_size(self) -> None:
        """The mapped file still holds every row (reading a page past its end is SIGBUS)."""
        expected = self.spec.logical_bytes
        try:
            size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise read_error(self.key, "checking activations.bin", exc) from exc
        if size != expected:
            raise CacheCorruptedError(
                self.key, f"activations.bin has {size} bytes, expected {expected}"
            )

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = SHUFFLE_BUFFER_BYTES
    ) -> Iterator[TorchBatch]:
        self._check_size()
        yield from super().epoch_batches(seed, epoch, batch_size, buffer_bytes)

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        self._check_size()
        return super().read_rows(rows)

    def _range(self, i: int) -> tuple[int, int]:
        """Chunk ``i``'s bytes, widened to whole pages (madvise wants aligned ranges)."""
        lo = i * self.chunk_rows * self.spec.row_bytes
        hi = lo + self._rows_of(i) * self.spec.row_bytes
        lo -= lo % mmap.PAGESIZE
        return lo, hi - lo

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
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
        if hasattr(self, "_file"):
            self._file.close()
        super().close()
