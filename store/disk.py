"""The on-disk tiers: ``zarr`` (chunked, crc32c, zstd when it pays) and ``mmap``.

Writes go through one background thread with a bounded queue, so the trainer
only waits on disk when the queue is full. Rows are grouped into ~4 MiB chunks
and each chunk is written whole (no read-modify-write). The cache becomes
readable only when ``finish()`` has fsynced the data and atomically written
the completion marker; any failure before that removes the directory.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
import time
from typing import Any

import crc32c
import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from prefast.errors import CacheCorruptedError, DiskFullError

from .base import NUMPY_STORAGE, CacheSpec, Reader, TorchBatch, Writer, from_storage, to_storage
from .layout import MARKER, CacheRoot, atomic_write_json, fsync_tree

log = logging.getLogger("prefast.store")
_STOP = object()
ZSTD_MIN_RATIO = 1.10  # below this, decoding costs more than the bytes it saves

zarr.config.set(
    {
        "async.concurrency": max(2, os.cpu_count() or 2),
        "threading.max_workers": max(2, os.cpu_count() or 2),
    }
)


# What the trainer may run ahead of the writer thread: at most this many bytes
# (and ``queue_batches`` batches) wait in the queue, so --max-ram holds while caching.
QUEUE_BYTES = 64 * 2**20


def trial_ratio(chunk: np.ndarray) -> float:
    """Compression ratio of zstd level 1 on one chunk (the codec decision)."""
    raw = np.ascontiguousarray(chunk).tobytes()
    return len(raw) / max(1, len(numcodecs.Zstd(level=1).encode(raw)))


class DiskWriter(Writer):
    """Shared machinery: lock, partial directory, writer thread, completion."""

    tier = "disk"

    def __init__(self, root: CacheRoot, spec: CacheSpec, queue_batches: int = 8):
        self.root, self.spec = root, spec
        self.lock = root.acquire(spec.key)
        self.dir = root.dir_for(spec.key)
        root.remove(spec.key)  # a partial left by a killed writer; we hold the lock
        self.dir.mkdir(parents=True)
        self.group = zarr.open_group(zarr.storage.LocalStore(self.dir), mode="w", zarr_format=3)
        self.chunk_rows = spec.chunk_rows()
        self.labels = np.empty(spec.rows, dtype=np.int64)
        self.row_ids = np.empty(spec.rows, dtype=np.int64)
        self.pos = 0  # rows accepted from the trainer
        self.written = 0  # rows on disk
        self.pending: list[np.ndarray] = []
        self.error: BaseException | None = None
        self.extra: dict[str, Any] = {}
        self.queue_batches = queue_batches
        self.queue: queue.Queue = queue.Queue()  # bounded at the first append()
        self.thread = threading.Thread(
            target=self._run, name=f"prefast-writer-{spec.key[:8]}", daemon=True
        )
        self.thread.start()
        self.closed = False

    # -- trainer side --------------------------------------------------------------------
    def append(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        self._raise_if_failed()
        n = len(acts)
        if self.pos + n > self.spec.rows:
            raise ValueError(f"cache {self.spec.key} holds {self.spec.rows} rows; got more")
        self.labels[self.pos : self.pos + n] = labels.cpu().numpy()
        self.row_ids[self.pos : self.pos + n] = ids.cpu().numpy()
        self.pos += n
        data = to_storage(acts, self.spec.dtype)
        if self.queue.maxsize == 0:  # first batch: bound the queue in bytes, not batches
            self.queue.maxsize = max(1, min(self.queue_batches, QUEUE_BYTES // max(1, data.nbytes)))
        self.queue.put(data)

    def finish(self) -> Reader:
        if self.closed:
            raise RuntimeError("finish() after abort()")
        self.queue.put(_STOP)
        self.thread.join()
        try:
            self._raise_if_failed()
            if self.written != self.spec.rows:
                raise ValueError(
                    f"cache {self.spec.key}: wrote {self.written} of {self.spec.rows} rows"
                )
            self._write_small("labels", self.labels)
            self._write_small("ids", self.row_ids)
            self._finalize()
            fsync_tree(self.dir)
            atomic_write_json(
                self.dir / MARKER,
                {
                    "key": self.spec.key,
                    "rows": self.spec.rows,
                    "tier": self.tier,
                    "chunk_rows": self.chunk_rows,
                    "completed_at": time.time(),
                    "labels_crc32c": crc32c.crc32c(self.labels.tobytes()),
                    "ids_crc32c": crc32c.crc32c(self.row_ids.tobytes()),
                    **self.extra,
                },
            )
        except BaseException:
            self.abort()
            raise
        self._release()
        return open_reader(self.root, self.spec.key)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            while self.thread.is_alive():  # unblock a thread waiting on a full queue
                try:
                    self.queue.put(_STOP, timeout=0.1)
                except queue.Full:
                    self._drain()
            self.thread.join()
        self.root.remove(self.spec.key)
        self._release()

    def _release(self) -> None:
        self.closed = True
        self.lock.release()

    def _drain(self) -> None:
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        err = self.error
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            self.abort()
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing cache {self.spec.key} under {self.root.path}; "
                "the partial cache was removed. Free space, pass --max-disk, or choose "
                "another --cache-dir",
            ) from err
        self.abort()
        raise err

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _STOP or self.error is not None:
                    break
                self.pending.append(item)
                self._flush(final=False)
            if self.error is None:
                self._flush(final=True)
        except BaseException as exc:  # reported to the trainer on its next call
            self.error = exc

    def _flush(self, final: bool) -> None:
        buffered = sum(len(a) for a in self.pending)
        while buffered >= self.chunk_rows or (final and buffered):
            rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            take = min(self.chunk_rows, len(rows))
            self._write_chunk(self.written, rows[:take])
            self.written += take
            self.pending = [rows[take:]] if take < len(rows) else []
            buffered -= take

    def _write_small(self, name: str, data: np.ndarray) -> None:
        arr = self.group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=data.shape, compressors=[Crc32cCodec()]
        )
        arr[:] = data

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _finalize(self) -> None:
        pass

    def _set_attrs(self, codec: str, ratio: float | None) -> None:
        self.group.attrs.update(
            {
                **self.spec.attrs,
                "key": self.spec.key,
                "tier": self.tier,
                "rows": self.spec.rows,
                "shape": list(self.spec.shape),
                "dtype": self.spec.dtype,
                "codec": codec,
                "compression_ratio": ratio,
                "chunk_rows": self.chunk_rows,
                "logical_bytes": self.spec.logical_bytes,
                "created": time.time(),
                "versions": {
                    "zarr": zarr.__version__,
                    "numcodecs": numcodecs.__version__,
                    "torch": torch.__version__,
                },
            }
        )


class ZarrWriter(DiskWriter):
    tier = "zarr"

    def __init__(self, root: CacheRoot, spec: CacheSpec, codec: str = "auto", **kw: Any):
        self.codec = codec
        self.array: Any = None
        super().__init__(root, spec, **kw)

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        if self.array is None:  # decide the codec on the first real chunk
            ratio = trial_ratio(rows)
            use_zstd = self.codec == "zstd" or (self.codec == "auto" and ratio >= ZSTD_MIN_RATIO)
            compressors: list[Any] = [ZstdCodec(level=1)] if use_zstd else []
            self.array = self.group.create_array(
                "activations",
                shape=(self.spec.rows, *self.spec.shape),
                dtype=NUMPY_STORAGE[self.spec.dtype],
                chunks=(self.chunk_rows, *self.spec.shape),
                compressors=[*compressors, Crc32cCodec()],
                fill_value=0,
                config={"write_empty_chunks": True},
            )
            self._set_attrs("zstd1" if use_zstd else "none", round(ratio, 3) if use_zstd else 1.0)
            log.info(
                "cache %s: zstd-1 trial ratio %.2f -> %s",
                self.spec.key[:8],
                ratio,
                "zstd" if use_zstd else "none",
            )
        self.array[start : start + len(rows)] = rows


class MmapWriter(DiskWriter):
    """Raw rows in one file; per-chunk crc32c in the marker (checked on read)."""

    tier = "mmap"

    def __init__(self, root: CacheRoot, spec: CacheSpec, **kw: Any):
        self.crcs: list[int] = []
        super().__init__(root, spec, **kw)
        self.file = open(self.dir / "activations.bin", "wb")  # noqa: SIM115 - closed in _finalize
        self._set_attrs("none", 1.0)

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).tobytes()
        self.file.write(data)
        self.crcs.append(crc32c.crc32c(data))

    def _finalize(self) -> None:
        self.file.close()
        self.extra["chunk_crc32c"] = self.crcs

    def abort(self) -> None:
        if hasattr(self, "file"):
            self.file.close()
        super().abort()


# -- readers ------------------------------------------------------------------------------
class DiskReader(Reader):
    def __init__(self, root: CacheRoot, key: str):
        self.root, self.key, self.dir = root, key, root.dir_for(key)
        self.marker = root.marker(key)
        self.group = zarr.open_group(zarr.storage.LocalStore(self.dir, read_only=True), mode="r")
        a: dict[str, Any] = dict(self.group.attrs)
        self.attrs = a
        self.spec = CacheSpec(key, a["rows"], tuple(a["shape"]), a["dtype"], a)
        self.chunk_rows = int(a["chunk_rows"])
        self._ids = self._small("ids")
        self.labels = self._small("labels")
        if crc32c.crc32c(self._ids.tobytes()) != self.marker["ids_crc32c"]:
            raise CacheCorruptedError(key, "the ids array does not match its checksum")
        if crc32c.crc32c(self.labels.tobytes()) != self.marker["labels_crc32c"]:
            raise CacheCorruptedError(key, "the labels array does not match its checksum")
        root.touch(key)

    def _small(self, name: str) -> np.ndarray:
        try:
            array: Any = self.group[name]
            return np.asarray(array[:])
        except ValueError as exc:
            raise CacheCorruptedError(
                self.key, f"array {name!r} failed its crc32c checksum"
            ) from exc

    @property
    def num_chunks(self) -> int:
        return -(-self.spec.rows // self.chunk_rows)

    def ids(self) -> np.ndarray:
        return self._ids

    def read_chunk(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _batch(self, acts: np.ndarray, rows: np.ndarray) -> TorchBatch:
        return (
            from_storage(acts, self.spec.dtype),
            torch.from_numpy(self.labels[rows]),
            torch.from_numpy(self._ids[rows]),
        )


class ZarrReader(DiskReader):
    tier = "zarr"

    def __init__(self, root: CacheRoot, key: str):
        super().__init__(root, key)
        self.array: Any = self.group["activations"]

    def read_chunk(self, i: int) -> np.ndarray:
        lo = i * self.chunk_rows
        try:
            return np.asarray(self.array[lo : lo + self.chunk_rows])
        except (ValueError, RuntimeError) as exc:  # crc32c mismatch / undecodable zstd
            raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        # Random rows from compressed chunks: decode each touched chunk once.
        out = np.empty((len(rows), *self.spec.shape), dtype=NUMPY_STORAGE[self.spec.dtype])
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self.read_chunk(int(c))[rows[sel] - c * self.chunk_rows]
        return self._batch(out, rows)

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = 256 * 2**20
    ):
        """Exact order when the whole cache fits the shuffle buffer; otherwise
        a seeded chunk order with rows shuffled inside windows of chunks."""
        from .shuffle import windowed_order

        if self.spec.logical_bytes <= buffer_bytes:
            all_rows = np.concatenate([self.read_chunk(i) for i in range(self.num_chunks)])
            yield from self.exact_batches(
                seed, epoch, batch_size, lambda rows: self._batch(all_rows[rows], rows)
            )
            return
        window = max(1, buffer_bytes // (self.chunk_rows * self.spec.row_bytes))
        decoded: dict[int, np.ndarray] = {}
        for live, rows in windowed_order(
            self.num_chunks, self.chunk_rows, self.spec.rows, window, batch_size, seed, epoch
        ):
            for c in [c for c in decoded if c not in live]:
                del decoded[c]
            for c in live:
                if c not in decoded:
                    decoded[c] = self.read_chunk(c)
            acts = np.empty((len(rows), *self.spec.shape), dtype=NUMPY_STORAGE[self.spec.dtype])
            chunk_of = rows // self.chunk_rows
            for c in np.unique(chunk_of):
                sel = chunk_of == c
                acts[sel] = decoded[int(c)][rows[sel] - c * self.chunk_rows]
            yield self._batch(acts, rows)


class MmapReader(DiskReader):
    tier = "mmap"

    def __init__(self, root: CacheRoot, key: str):
        super().__init__(root, key)
        path = self.dir / "activations.bin"
        expected = self.spec.logical_bytes
        if path.stat().st_size != expected:
            raise CacheCorruptedError(
                key, f"activations.bin has {path.stat().st_size} bytes, expected {expected}"
            )
        # Our own mapping (not np.memmap) so we can madvise it and close it.
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mm = np.frombuffer(self._map, dtype=NUMPY_STORAGE[self.spec.dtype]).reshape(
            self.spec.rows, *self.spec.shape
        )
        self.verified = np.zeros(self.num_chunks, dtype=bool)

    def read_chunk(self, i: int) -> np.ndarray:
        lo = i * self.chunk_rows
        chunk = np.asarray(self.mm[lo : lo + self.chunk_rows])
        if crc32c.crc32c(chunk.tobytes()) != self.marker["chunk_crc32c"][i]:
            raise CacheCorruptedError(
                self.key, f"chunk {i} of activations.bin failed its crc32c checksum"
            )
        self.verified[i] = True
        return chunk

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        for c in np.unique(rows // self.chunk_rows):  # checksum each chunk on first touch
            if not self.verified[c]:
                self.read_chunk(int(c))
        acts = self.mm[rows]  # fancy indexing copies out of the mapping
        # Drop the mapped pages from our RSS: they stay in the page cache, but a
        # RAM budget (--max-ram) counts resident pages of this process.
        self._map.madvise(mmap.MADV_DONTNEED)
        return self._batch(acts, rows)

    def close(self) -> None:
        if not self._map.closed:
            del self.mm  # release the buffer export before closing the map
            self._map.close()


def open_reader(root: CacheRoot, key: str) -> DiskReader:
    """Open a complete disk cache; a partial one is never read."""
    from prefast.errors import CacheNotFoundError

    if not root.is_complete(key):
        raise CacheNotFoundError(f"cache {key} under {root.path} is missing or partial")
    tier = root.marker(key)["tier"]
    return ZarrReader(root, key) if tier == "zarr" else MmapReader(root, key)


def disk_writer(tier: str, root: CacheRoot, spec: CacheSpec) -> DiskWriter:
    return ZarrWriter(root, spec) if tier == "zarr" else MmapWriter(root, spec)
