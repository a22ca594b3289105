"""What the writers of the on-disk tiers share (``mmap_writer.py``: raw rows in one file;
``zarr_writer.py``: chunk files, crc32c, zstd when it pays).

Writes go through one background thread with a bounded queue, so the trainer
only waits on disk when the queue is full. Rows are grouped into chunks of the
spec's ``chunk_bytes`` (up to 32 MiB) and each chunk is written whole (no
read-modify-write).

Life of a writer: *open* (holding the key's exclusive lock) -> *finished*
(``finish()`` fsynced the data, atomically wrote the completion marker with
one crc32c per chunk, and handed the lock, downgraded to shared, to the
returned reader) or *aborted* (the partial directory is removed and the lock
released). A failure in the writer thread never blocks the trainer: the
thread keeps draining (and discarding) its queue, and the trainer's next
``append``/``finish`` raises :class:`CacheWriteError` (or ``DiskFullError``)
within one queue poll, after aborting. A disk that hangs instead of failing
blocks nobody either: ``append`` and ``finish`` give up (``DiskStalledError``)
once no chunk write has finished for ``iothreads.IO_STALL_S``, and ``abort``
returns within ``ABORT_WAIT_S`` whatever thread (writer or encode pool) is
stuck; the last one to return removes the partial cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from .base import CacheSpec, Writer, cache_attrs, checksum, to_storage
from .disk_reader import DiskReader
from .errors import (
    CacheExistsError,
    CacheWriteError,
    DiskBudgetError,
    DiskStalledError,
    write_error,
)
from .iothreads import bounded, stall_s
from .layout import MARKER, CacheRoot, atomic_write_json, fsync_tree
from .readers import open_reader

log = logging.getLogger("prefast.store")
_STOP = object()
ABORT_WAIT_S = 5.0  # what abort() waits for threads stuck in a hung write
POLL_S = 0.05  # how often a waiting trainer re-checks the writer thread for an error

# What the trainer may run ahead of the writer thread: at most this many bytes
# (and ``queue_batches`` batches) wait in the queue, so --max-ram holds while caching.
QUEUE_BYTES = 64 * 2**20


class DiskWriter(Writer):
    """Shared machinery: lock, partial directory, writer thread, completion."""

    tier = "disk"

    def __init__(self, root: CacheRoot, spec: CacheSpec, queue_batches: int = 8):
        self.root, self.spec = root, spec
        self.dir = root.dir_for(spec.key)
        self.lock = root.acquire(spec.key)  # exclusive: nobody reads or writes this key
        try:
            if root.is_complete(spec.key):
                raise CacheExistsError(
                    f"cache {spec.key} under {root.path} is already complete: open it with "
                    "open_reader() instead of rewriting it"
                )
            self.group = self._create_group()
            self._open_files()
        except BaseException:
            self.lock.release()
            raise
        self.chunk_rows = spec.chunk_rows()
        # What the chunk files take on disk so far, checked against max_bytes before each
        # chunk is written: a cache admitted at an estimated size never outgrows its budget.
        self.max_bytes: int | None = None
        self.bytes_written = 0
        self._bytes_lock = threading.Lock()
        self.labels = np.empty(spec.rows, dtype=np.int64)
        self.row_ids = np.empty(spec.rows, dtype=np.int64)
        self.pos = 0  # rows accepted from the trainer
        self.written = 0  # rows on disk
        self.chunk_crcs: list[int] = []  # crc32c of each chunk's raw bytes, for the marker
        self.pending: list[np.ndarray] = []
        self.error: BaseException | None = None
        self.extra: dict[str, Any] = {}
        self.queue_batches = queue_batches
        self.queue: queue.Queue = queue.Queue()  # bounded at the first append()
        self.closed = False
        self._handoff = threading.Lock()  # abort() vs. the thread's end: who cleans up
        self._thread_done = False
        self._orphaned = False
        self._completion_done = False  # finish's completion thread has returned
        self._completion_abandoned = False  # finish gave up on it (it removes the cache)
        self.progress_at = time.monotonic()  # when a chunk write last finished (stall bound)
        self.thread = threading.Thread(
            target=self._run, name=f"prefast-writer-{spec.key[:8]}", daemon=True
        )
        self.thread.start()

    def _create_group(self) -> zarr.Group:
        """The zarr group, in a fresh directory (a killed writer's partial removed first)."""
        self.root.remove_held(self.spec.key)
        self.dir.mkdir(parents=True)
        return zarr.open_group(zarr.storage.LocalStore(self.dir), mode="w", zarr_format=3)

    # -- trainer side --------------------------------------------------------------------
    def append(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError(f"append() to cache {self.spec.key} after finish() or abort()")
        self._raise_if_failed()
        n = len(acts)
        if self.pos + n > self.spec.rows:
            raise ValueError(f"cache {self.spec.key} holds {self.spec.rows} rows; got more")
        self.labels[self.pos : self.pos + n] = labels.cpu().numpy()
        self.row_ids[self.pos : self.pos + n] = ids.cpu().numpy()
        self.pos += n
        # The conversion to the storage dtype happens on the writer thread: the trainer
        # only waits when the queue is full, and write_s measures exactly that wait.
        data = acts.detach()
        if self.queue.maxsize == 0:  # first batch: bound the queue in bytes, not batches
            nbytes = data.numel() * data.element_size()
            self.queue.maxsize = max(
                1, min(self.queue_batches, self.queue_bytes() // max(1, nbytes))
            )
        self._put(data)

    def finish(self) -> DiskReader:
        if self.closed:
            raise RuntimeError(f"finish() of cache {self.spec.key} after finish() or abort()")
        self._put(_STOP)
        self._join_writer()
        self._raise_if_failed()
        if self.written != self.spec.rows:
            self.abort()
            raise ValueError(
                f"cache {self.spec.key}: wrote {self.written} of {self.spec.rows} rows"
            )
        try:  # on a thread of its own: a disk that hangs here must not hang the trainer
            bounded(f"completing cache {self.spec.key}", self._completing)
        except TimeoutError as exc:
            self._give_up_completion()
            raise DiskStalledError(
                f"completing cache {self.spec.key} under {self.root.path} ({exc}): the disk "
                "has stopped answering; the partial cache is removed when it answers"
            ) from exc
        except BaseException as exc:
            self.abort()
            if not isinstance(exc, Exception):  # SIGTERM, Ctrl-C: never a cache error
                raise
            raise self._wrapped(exc) from exc
        self.closed = True
        self.lock.downgrade()  # the reader keeps the lock: nobody deletes what we read
        return open_reader(self.root, self.spec.key, lock=self.lock)

    def _completing(self) -> None:
        """``_complete`` on the completion thread; if ``finish`` gave up on it meanwhile, this
        thread, the last that writes, removes the partial cache and releases the key."""
        try:
            self._complete()
        finally:
            with self._handoff:
                self._completion_done = True
                orphaned = self._completion_abandoned
            if orphaned:  # the last thread that writes: nobody waits on it
                self._discard(None)

    def _complete(self) -> None:
        """The small arrays, the tier's last bytes, fsync, then the completion marker; once
        ``finish`` has given up, no marker is left (the cleanup removes it first)."""
        self._write_small("labels", self.labels)
        self._write_small("ids", self.row_ids)
        self._finalize()
        self._sync()
        with self._handoff:
            if self._completion_abandoned:
                return
        # Given up while this writes: the marker is removed first, and until then the key
        # stays locked, so no reader ever opens the cache.
        self._commit(self._marker())

    def _sync(self) -> None:  # the data reaches the disk before the marker declares it
        fsync_tree(self.dir)

    def _commit(self, marker: dict) -> None:  # the cache is complete: the marker, atomically
        atomic_write_json(self.dir / MARKER, marker)

    def _give_up_completion(self) -> None:
        """``finish`` waited too long for the completion thread: that thread writes no
        marker from now on and removes the partial cache when it returns, so the key stays
        locked until then (nobody reads or rewrites it meanwhile)."""
        self.closed = True  # a later abort() is a no-op: the cleanup is the thread's
        with self._handoff:
            self._completion_abandoned = True
            done = self._completion_done
        if done:  # it returned between the timeout and here: clean up, within the bound
            self._discard(time.monotonic() + ABORT_WAIT_S)
        else:
            self._warn_hung()

    def abort(self) -> None:
        """Drop everything written and release the key; idempotent.

        Waits at most ``ABORT_WAIT_S`` in all for the threads that write (the writer
        thread, and the zarr tier's encode pool): a disk that hangs (rather than fails)
        must not hang training, a signal's exit or the process's own exit. A thread still
        stuck in a write then cleans up when its write returns; until then the key stays
        locked, so nobody reads or rewrites the partial cache.
        """
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + ABORT_WAIT_S
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            while self.thread.is_alive() and time.monotonic() < deadline:
                try:  # the thread drains after an error: STOP gets in
                    self.queue.put(_STOP, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            self.thread.join(max(0.0, deadline - time.monotonic()))
        with self._handoff:
            if self.thread.is_alive() and not self._thread_done:
                self._orphaned = True
                self._warn_hung()
                return
        self.thread.join()  # it is past its last write
        self._discard(deadline)

    def _warn_hung(self) -> None:
        log.warning("cache %s: the disk has not answered for %.0f s; the partial cache is "
                    "removed when the hung write returns", self.spec.key[:8], ABORT_WAIT_S)  # fmt: skip

    def _discard(self, deadline: float | None) -> None:
        """Remove the partial cache and release the key once no thread writes any more:
        now, or (a write still hung at ``deadline``) when the last one returns. ``None``
        waits as long as it takes (the writer thread's own cleanup: nobody waits on it)."""
        if not self._stop_io(deadline, then=self._remove):
            self._warn_hung()
        elif deadline is None:
            self._remove()
        else:  # the removal too waits no longer than the deadline
            try:
                bounded("removing the partial cache", self._remove,
                        timeout=deadline - time.monotonic())  # fmt: skip
            except TimeoutError:
                self._warn_hung()

    def _remove(self) -> None:
        self.root.remove_held(self.spec.key)
        self.lock.release()

    def _put(self, item: object) -> None:
        """Queue ``item``; if the writer thread fails meanwhile, raise instead of waiting,
        and if the disk has finished no write for ``IO_STALL_S``, give up on it."""
        waiting = time.monotonic()
        while True:
            try:
                self.queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                self._raise_if_failed()
                self._raise_if_stalled(waiting)

    def _join_writer(self) -> None:
        """Wait for the writer thread to write everything queued: as long as it makes
        progress, but no longer than ``IO_STALL_S`` without any."""
        waiting = time.monotonic()
        while self.thread.is_alive():
            self.thread.join(POLL_S)
            self._raise_if_stalled(waiting)

    def _raise_if_stalled(self, waiting: float) -> None:
        """Give up when the writer made no progress for ``IO_STALL_S`` *while the trainer
        waited* (since ``waiting``): a writer idle before the wait began is not stalled."""
        idle = time.monotonic() - max(self.progress_at, waiting)
        if idle > stall_s():
            self.error = self.error or DiskStalledError(
                f"no chunk write to cache {self.spec.key} under {self.root.path} finished "
                f"in {idle:.0f} s: the disk has stopped answering; the partial cache is "
                "removed when the hung write returns"
            )
            self._raise_if_failed()

    def _progressed(self) -> None:
        """A chunk write finished (the stall bound counts from here)."""
        self.progress_at = time.monotonic()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err = self.error
            self.abort()
            raise self._wrapped(err) from err

    def _wrapped(self, err: BaseException) -> CacheWriteError:
        return write_error(err, f"cache {self.spec.key} under {self.root.path}")

    def _marker(self) -> dict:
        return {
            "key": self.spec.key,
            "rows": self.spec.rows,
            "tier": self.tier,
            "chunk_rows": self.chunk_rows,
            "chunks": len(self.chunk_crcs),
            "chunk_crc32c": self.chunk_crcs,
            "completed_at": time.time(),
            "labels_crc32c": checksum(self.labels),
            "ids_crc32c": checksum(self.row_ids),
            **self.extra,
        }

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            self._progressed()  # taking an item is progress too: a full chunk takes many
            if item is _STOP or self._orphaned:  # abort() gave up on us: stop draining
                break
            if self.error is not None:
                continue  # failed or aborted: drain and discard so put() never blocks
            try:
                self.pending.append(to_storage(item, self.spec.dtype))
                self._flush(final=False)
            except BaseException as exc:  # reported to the trainer on its next call
                self.error = exc
        if self.error is None:
            try:
                self._flush(final=True)
                self._drain_chunk_writes()
            except BaseException as exc:
                self.error = exc
        with self._handoff:
            self._thread_done = True
            orphaned = self._orphaned
        if orphaned:  # abort() gave up waiting for us: the cleanup is ours
            self._discard(None)

    def _drain_chunk_writes(self) -> None:
        pass

    def _flush(self, final: bool) -> None:
        buffered = sum(len(a) for a in self.pending)
        while buffered >= self.chunk_rows or (final and buffered):
            rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            take = min(self.chunk_rows, len(rows))
            chunk = np.ascontiguousarray(rows[:take])
            self._write_chunk(self.written, chunk)
            self._progressed()
            self.chunk_crcs.append(checksum(chunk))
            self.written += take
            self.pending = [rows[take:]] if take < len(rows) else []
            buffered -= take

    queue_bytes = staticmethod(lambda: QUEUE_BYTES)  # read at call time (tests shrink it)

    def _charge(self, nbytes: int) -> None:
        """Count a chunk about to be written; DiskBudgetError when it would not fit."""
        with self._bytes_lock:
            total = self.bytes_written + nbytes
            if self.max_bytes is not None and total > self.max_bytes:
                raise DiskBudgetError(
                    f"cache {self.spec.key} would outgrow its disk budget: "
                    f"{total / 2**20:.1f} MiB written of {self.max_bytes / 2**20:.1f} MiB allowed "
                    "(--max-disk, or the free disk when it was planned); the partial cache "
                    "was removed"
                )
            self.bytes_written = total

    def _write_small(self, name: str, data: np.ndarray) -> None:
        arr = self.group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=data.shape, compressors=[Crc32cCodec()]
        )
        arr[:] = data

    # -- per tier ------------------------------------------------------------------------
    def _open_files(self) -> None:
        pass

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _finalize(self) -> None:
        pass

    def _stop_io(self, deadline: float | None, then: Callable[[], None]) -> bool:
        """Close the files and stop any I/O threads of the tier, waiting for them until
        ``deadline`` (None: until they end). True when nothing writes any more; else
        ``then`` runs once the last stuck write returns."""
        return True

    def _set_attrs(self, codec: str, ratio: float | None) -> None:
        self.group.attrs.update(cache_attrs(self.spec, self.tier, codec, ratio))
