"""The Zarr tier's writer: chunk files encoded (zstd level 1 when it pays) on a thread pool."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from .base import CacheSpec
from .disk_reader import chunk_file
from .disk_writer import DiskWriter, log
from .iothreads import IOPool
from .layout import CacheRoot

ZSTD_MIN_RATIO = 1.10  # below this, decoding costs more than the bytes it saves


def trial_ratio(chunk: np.ndarray) -> float:
    """Compression ratio of zstd level 1 on one chunk (the codec decision)."""
    raw = np.ascontiguousarray(chunk).tobytes()
    return len(raw) / max(1, len(numcodecs.Zstd(level=1).encode(raw)))


class ZarrWriter(DiskWriter):
    """Chunk files are encoded (zstd level 1 when it pays) and written on a thread pool.

    Each file holds what zarr's own codec pipeline would write for that chunk
    (raw little-endian bytes or a zstd frame, then a crc32c of them), so the
    cache stays a plain Zarr v3 group that zarr-python reads; zarr writes the
    metadata and the small arrays.
    """

    tier = "zarr"

    def __init__(self, root: CacheRoot, spec: CacheSpec, codec: str = "auto", **kw: Any):
        self.codec = codec
        self.array: Any = None
        self.zstd = numcodecs.Zstd(level=1)
        self.workers = max(2, os.cpu_count() or 2)  # zstd encodes release the GIL
        # Daemon threads (not a ThreadPoolExecutor, which is joined at exit): a chunk write
        # hung on the disk must not keep the process from exiting (store/iothreads.py).
        # Started by the writer thread at its first chunk, so a writer that fails to open
        # leaves no thread behind.
        self.pool: IOPool | None = None
        self.in_flight: deque[Future[None]] = deque()
        super().__init__(root, spec, **kw)

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        if self.array is None:  # decide the codec on the first real chunk
            ratio = trial_ratio(rows)
            use_zstd = self.codec == "zstd" or (self.codec == "auto" and ratio >= ZSTD_MIN_RATIO)
            compressors: list[Any] = [ZstdCodec(level=1)] if use_zstd else []
            self.array = self.group.create_array(
                "activations",
                shape=(self.spec.rows, *self.spec.stored_shape),
                dtype=self.spec.storage,
                chunks=(self.chunk_rows, *self.spec.stored_shape),
                compressors=[*compressors, Crc32cCodec()],
                fill_value=0,
                config={"write_empty_chunks": True},
            )
            self.use_zstd = use_zstd
            self._set_attrs("zstd1" if use_zstd else "none", round(ratio, 3) if use_zstd else 1.0)
            log.info(
                "cache %s: zstd-1 trial ratio %.2f -> %s",
                self.spec.key[:8],
                ratio,
                "zstd" if use_zstd else "none",
            )
        i = start // self.chunk_rows
        if len(rows) < self.chunk_rows:  # zarr stores the last chunk padded to a whole one
            padded = np.zeros((self.chunk_rows, *rows.shape[1:]), dtype=rows.dtype)
            padded[: len(rows)] = rows
            rows = padded
        # Bounded in bytes as the queue is, so --max-ram holds whatever the chunk size.
        max_in_flight = max(1, min(2 * self.workers, self.queue_bytes() // max(1, rows.nbytes)))
        while len(self.in_flight) >= max_in_flight:
            self.in_flight.popleft().result()
        if self.pool is None:
            self.pool = IOPool(self.workers, "prefast-encode")
        self.in_flight.append(self.pool.submit(self._encode_and_write, i, rows))

    def _encode_and_write(self, i: int, rows: np.ndarray) -> None:
        raw = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        payload = self.zstd.encode(raw) if self.use_zstd else raw.data
        self._charge(len(payload) + 4)
        trailer = crc32c.crc32c(payload).to_bytes(4, "little")
        self._put_chunk(i, memoryview(payload), trailer)
        self._progressed()

    def _put_chunk(self, i: int, view: memoryview, trailer: bytes) -> None:
        """Chunk ``i``'s file: its encoded bytes, then zarr's crc32c trailer."""
        path = Path(chunk_file(self.dir, self.array, i))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, [view, trailer])
            if written != len(view) + 4:  # short write (rare): finish it
                rest = (bytes(view) + trailer)[written:]
                while rest:
                    rest = rest[os.write(fd, rest) :]
        finally:
            os.close(fd)

    def _drain_chunk_writes(self) -> None:
        while self.in_flight:
            self.in_flight.popleft().result()

    def _finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()  # every write has returned: the threads end at once

    def _stop_io(self, deadline: float | None, then: Callable[[], None]) -> bool:
        for future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
        if self.pool is None:  # the writer thread (which starts it) has ended
            return True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.pool.shutdown(left, then=then)
