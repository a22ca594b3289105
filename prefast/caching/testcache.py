"""The test set's cache at the current boundary: read in order, or materialized once.

Evaluation is exact (no augmentation), so one cache per boundary serves every
later evaluation. The first evaluation at a new boundary reads the previous
boundary's test cache (or the raw test set), runs the newly frozen stages and
writes through. Nothing here can stop training: a writer that cannot open is
not retried for that boundary, a writer whose tier cannot allocate the cache
is opened in the next tier down, a failing write is aborted and evaluation
goes on from the computed activations, a damaged chunk sends the rest of the
evaluation to raw data, and an evaluation that raises aborts its writer, so
no thread, lock or partial directory is left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from prefast.caching.boundary import discard
from prefast.caching.cachectx import DISK_TIERS, CacheContext
from prefast.caching.fits import Unfit, not_cached_fix, wider_dtype
from prefast.caching.keep import announce_reuse
from prefast.data.sources import Batch, BatchStream, RawSource
from prefast.errors import (
    CacheAllocationError,
    CacheCorruptedError,
    CacheError,
    CacheReadError,
    CacheUnavailableError,
)
from prefast.store import Reader, Writer
from prefast.store.device import Uploader
from prefast.store.encoding import row_bytes
from prefast.store.order import batch_slices

log = logging.getLogger("prefast.caching.materialize")

if TYPE_CHECKING:
    from prefast.caching.keep import KeepBehind

RunPrefix = Callable[[torch.Tensor, int, int], torch.Tensor]


class TestCache:
    def __init__(
        self,
        ctx: CacheContext,
        raw: RawSource,
        run_prefix: RunPrefix,
        ratio_of: Callable[[int, str], float],
        allowance: Callable[[str], int | None],
        requested_dtype: str = "auto",
    ):
        self.ctx, self.raw, self.run_prefix = ctx, raw, run_prefix
        self.requested_dtype = requested_dtype  # --cache-dtype as given: auto may widen one
        self.wider: dict[int, str] = {}  # stage -> the dtype its test rows fit in (fits.py)
        self.ratio_of = ratio_of  # a boundary's measured zstd ratio in a dtype (picks a disk tier)
        self.allowance = allowance  # tier -> bytes the test cache may put on disk there
        self.reader: Reader | None = None
        self.stage = 0  # the boundary self.reader holds (0: none)
        self.writer: Writer | None = None
        self.failed_stage: int | None = None  # a boundary whose test cache could not be written
        self.keep: KeepBehind | None = None  # the fixed prefix's cache, kept for later runs

    def batches(self, stage: int, tier: str, epoch: int | None, dtype: str) -> BatchStream:
        """The test set as input of stage ``stage``, in row order, cached in ``dtype`` (or in
        a wider one, where its rows overflowed ``dtype``)."""
        dtype = self.wider.get(stage, dtype)
        if self.reader is not None and self.stage == stage:
            yield from self._read(self.reader, stage, epoch)
            return
        write = self.failed_stage != stage  # do not retry a boundary that failed
        if write:
            try:
                reused = self.ctx.reuse(tier, self.ctx.key("test", stage, None, dtype), epoch)
            except CacheUnavailableError:  # kept: computed this time, read next time
                reused, write = None, False
            if reused is not None:
                announce_reuse(reused, "test", stage, "to evaluate")
                self._replace(reused, stage)
                yield from self._read(reused, stage, epoch)
                return
        yield from self._materialize(stage, tier, epoch, write, dtype)

    def _materialize(
        self, stage: int, tier: str, epoch: int | None, write: bool, dtype: str
    ) -> BatchStream:
        old = self.reader if self.reader is not None and self.stage < stage else None
        source = self._read(old, self.stage, epoch) if old is not None else self.raw.test_batches()
        opened = not write
        unfit: torch.Tensor | None = None  # fits.mend's signs, summed on the device
        try:
            for batch in source:
                x = self.run_prefix(batch.x, batch.start, stage)
                if not opened:
                    opened = True
                    self._open(stage, tier, tuple(x.shape[1:]), epoch, dtype)
                # x as the cache holds it: what later evaluations read, written or not (a
                # value that overflowed the dtype as computed: such rows are never kept)
                stored, x, signs = self.ctx.as_stored(x, dtype)
                if self.writer is not None:
                    unfit = signs if unfit is None else unfit + signs  # on what is stored
                    try:
                        with self.ctx.timed("write_s"):
                            self.writer.append(stored, batch.labels, batch.ids)
                    except CacheError as exc:  # the writer aborted itself
                        self.writer = None
                        self._failed(stage, epoch, exc)
                yield Batch(x, batch.y, batch.ids, batch.labels, stage)
            if self.writer is not None and (bad := Unfit.read(unfit)):  # never NaN or inf
                self.writer.abort()
                self.writer = None
                self._unfit(stage, epoch, dtype, bad, tier, tuple(x.shape[1:]))
            if self.writer is not None:
                writer, self.writer = self.writer, None
                try:
                    with self.ctx.timed("write_s"):
                        reader = writer.finish()
                except CacheUnavailableError as exc:  # complete: reused at the next evaluation
                    self.ctx.event(epoch, "unavailable", split="test", stage=stage, detail=str(exc))
                except CacheError as exc:
                    self._failed(stage, epoch, exc)
                else:
                    self._replace(reader, stage)
                    if self.keep is not None:
                        self.keep.offer(reader, "test", stage, epoch)
        finally:
            if self.writer is not None:  # evaluation raised or stopped early
                self.writer.abort()
                self.writer = None

    def _open(
        self, stage: int, tier: str, shape: tuple[int, ...], epoch: int | None, dtype: str
    ) -> None:
        """A writer in ``tier``, else (its allocator refused) in the next tier down."""
        key = self.ctx.key("test", stage, None, dtype)
        spec = self.ctx.spec(key, "test", stage, self.raw.num_test, shape, dtype)
        governor = self.ctx.governor
        while True:
            try:
                self.writer = self.ctx.writer(tier, spec, allowance=self.allowance(tier))
                return
            except CacheAllocationError as exc:
                self.ctx.allocation_refused(epoch, tier, exc, split="test", stage=stage)
                ratio = self.ratio_of(stage, dtype)
                lower = governor.lower_tiers(spec.logical_bytes, tier, ratio)
                if not lower:
                    self._failed(stage, epoch, exc)
                    return
                log.warning("test cache at stage %d: %s; trying %s", stage, exc, lower[0])
                tier = lower[0]
            except (CacheError, OSError) as exc:
                self._failed(stage, epoch, exc)
                return

    def _unfit(
        self, stage: int, epoch: int | None, dtype: str, bad: Unfit, tier: str, shape: tuple
    ) -> None:
        """The test rows hold values no cache keeps: where they only overflowed ``dtype``,
        under auto the next evaluation writes them in a wider one (if its budget holds
        the extra bytes); else not cached, and evaluations compute the prefix."""
        detail = bad.detail(stage, dtype, "test")
        if not bad.only_overflow:  # the prefix's own output: no dtype helps
            self._failed(stage, epoch, ValueError(detail))
            return
        wider = wider_dtype(dtype, self.requested_dtype)
        fits = wider is not None and self._hold_wider(stage, tier, shape, dtype, wider)
        if wider is not None and fits:
            self.wider[stage] = wider
            why = f"{detail}; written again as {wider} at the next evaluation"
            log.warning("%s", why)
            self.ctx.event(epoch, "dtype_changed", stage=stage, split="test", dtype=dtype,
                           to=wider, values=bad.overflowed, detail=why)  # fmt: skip
            return
        fix = f"as {wider} it would not fit the {tier} budget" if wider else not_cached_fix()
        detail += f"; not cached: {fix}"
        log.warning("not caching the test set at stage %d: %s", stage, detail)
        self.ctx.event(epoch, "not_cached", stage=stage, split="test", dtype=dtype,
                       values=bad.overflowed, reason=detail)  # fmt: skip
        self.failed_stage = stage

    def _hold_wider(self, stage: int, tier: str, shape: tuple, dtype: str, wider: str) -> bool:
        """A memory tier allocates what it holds: the wider rows' extra bytes go into the
        governor's ledger where its budget has room (a disk writer stops at its allowance)."""
        if tier in DISK_TIERS:
            return True
        extra = self.raw.num_test * (row_bytes(shape, wider) - row_bytes(shape, dtype))
        if self.ctx.governor.room(tier) < extra:
            return False
        self.ctx.governor.hold(f"test-widened@{stage}", tier, extra)
        return True

    def _failed(self, stage: int, epoch: int | None, exc: BaseException) -> None:
        log.warning("not caching the test set at stage %d: %s", stage, exc)
        self.ctx.event(epoch, "test_cache_failed", stage=stage, detail=str(exc))
        self.failed_stage = stage

    def _read(self, reader: Reader, start: int, epoch: int | None) -> BatchStream:
        """Rows in order, read in blocks of whole batches so a chunk is decoded once;
        after a damaged chunk, the rest of the test set from raw data."""
        bs = self.raw.batch_size
        block = bs * max(1, getattr(reader, "chunk_rows", bs) // bs)
        uploader = Uploader(self.ctx.device)  # one staging ring per evaluation
        done = 0
        try:
            for blk in batch_slices(reader.spec.rows, block):
                with self.ctx.timed("read_s"):
                    acts, labels, ids = reader.read_rows(np.arange(blk.start, blk.stop))
                for sl in batch_slices(len(ids), bs):
                    x, y = uploader.upload(acts[sl], labels[sl]).wait()
                    x = self.ctx.to_compute(x, reader.spec.dtype, reader.spec.shape)
                    yield Batch(x, y, ids[sl], labels[sl], start, cached=True)
                    done += len(ids[sl])
        except CacheReadError as exc:
            damaged = isinstance(exc, CacheCorruptedError)
            log.warning("%s: evaluating the rest from raw data", exc)
            name = "corrupted" if damaged else "unavailable"
            self.ctx.event(epoch, name, split="test", stage=start, detail=str(exc))
            if damaged and reader is self.reader:
                self.drop()
            # The rest as the cache holds it: raw rows (whole batches were served) through
            # the prefix, encoded and decoded in its dtype, entering stage ``start``.
            for batch in self.raw.test_batches(first_row=done):
                x = self.run_prefix(batch.x, batch.start, start)
                _, x, _ = self.ctx.as_stored(x, reader.spec.dtype)
                yield Batch(x, batch.y, batch.ids, batch.labels, start, cached=True)

    def _replace(self, reader: Reader, stage: int) -> None:
        self.drop(keep=stage, superseded=True)
        self.reader, self.stage = reader, stage

    def drop(self, keep: int | None = None, superseded: bool = False) -> None:
        """Forget the test cache (superseded, damaged, or memory is short); deletes it on
        disk, but the fixed prefix's when superseded (later runs read it). The extra bytes
        held for widened test caches are released, but ``keep``'s."""
        if self.reader is not None:
            kept = superseded and self.keep is not None and self.keep.kept(self.stage)
            reader, self.reader, self.stage = self.reader, None, 0
            discard(reader, None if kept else self.ctx.root)
        for stage in self.wider:
            if stage != keep:
                self.ctx.governor.release(f"test-widened@{stage}")

    def close(self) -> None:
        """End of run: abort a writer, close the reader (a complete disk cache stays)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
