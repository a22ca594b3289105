"""The prefast mode's feed: materialize frozen prefixes, then train from the cache.

Life of a boundary ``p`` (planned by ``plan_boundaries``, tier chosen by the
governor):

1. Epoch ``e0``: batches come from the previous boundary's cache (or the raw
   data); the trainer runs stages ``[prev, p)`` once in eval mode, hands the
   output to :meth:`PrefastFeed._write` (write-through) and trains on it.
2. With ``--cache-views K`` and augmentation, epochs ``e0..e0+K-1`` each write
   one view; epoch ``e`` later reads view ``e mod K``.
3. After the last view is finished (atomically, for disk tiers) the boundary
   becomes current: later epochs start at stage ``p`` and never run the prefix.
   The test set is cached at the same boundary at the next evaluation.

Failures never stop training: a full disk abandons the boundary (FreezeOut
continues), a corrupted chunk serves the rest of the epoch from raw data and
re-materializes, RAM pressure spills RAM caches to disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator

import numpy as np
import torch

from prefast.config import TrainConfig, default_cache_dir
from prefast.errors import CacheCorruptedError, CacheError, DiskFullError
from prefast.feed import Batch, RawFeed
from prefast.governor import Governor, boundary_cache_bytes, cache_dtype, cache_views
from prefast.models import StagedModel
from prefast.plan import measure_stage_costs, plan_boundaries
from prefast.schedule import FreezeOutSchedule
from prefast.store import (
    CacheRoot,
    CacheSpec,
    PrefetchLoader,
    Reader,
    Writer,
    cache_key,
    open_reader,
    open_writer,
)
from prefast.store.base import TorchBatch
from prefast.store.order import batch_slices

log = logging.getLogger("prefast.materialize")


class PrefastFeed:
    def __init__(
        self,
        cfg: TrainConfig,
        raw: RawFeed,
        model: StagedModel,
        schedule: FreezeOutSchedule,
        device: torch.device,
    ):
        self.cfg, self.raw, self.model, self.device = cfg, raw, model, device
        self.governor = Governor(cfg, device)
        self.root = CacheRoot(cfg.cache_dir or default_cache_dir())
        self.dtype = cache_dtype(cfg, device)
        self.views = cache_views(cfg)
        probe = next(iter(raw.train_batches(0))).x
        # Forward times are all the planner and governor use: skip the backward passes.
        self.costs = measure_stage_costs(copy.deepcopy(model), probe, backward=False)
        self.plan = {
            b.epoch: b.stage
            for b in plan_boundaries(
                schedule, raw.batches_per_epoch, cfg.epochs, self.costs, raw.num_train
            )
        }
        self.boundary = 0  # current caches hold the input of this stage
        self.readers: dict[int, Reader] = {}  # view -> train cache at self.boundary
        self.test_reader: Reader | None = None
        self.test_boundary = 0
        self.target: tuple[int, str] | None = None  # (stage, tier) being materialized
        self.target_readers: dict[int, Reader] = {}
        self.writer: Writer | None = None
        self.sink_boundary = 0
        self.events: list[dict] = []
        self.warned_fixed_aug = False
        self.epoch: int | None = None  # the epoch in progress; None before the first
        self.io_s = {"write_s": 0.0, "read_s": 0.0}  # since the last take_io_seconds()

    @property
    def sink(self):  # type: ignore[no-untyped-def]
        return self._write if self.writer is not None else None

    # -- epoch protocol ------------------------------------------------------------------
    def begin_epoch(self, epoch: int, frozen_prefix: int) -> str | None:
        # Resumed from a checkpoint past a planned boundary: materialize now (or reuse a
        # complete disk cache with the same key) instead of computing the frozen prefix
        # until the next planned boundary.
        resumed = epoch > 0 and self.epoch is None and epoch < self.cfg.epochs - 1
        if resumed and frozen_prefix > 0 and any(e < epoch for e in self.plan):
            self.plan[epoch] = frozen_prefix
        self.epoch = epoch
        self._spill_if_pressed(epoch)
        if self.target is None and epoch in self.plan and frozen_prefix > self.boundary:
            self._start_target(epoch, frozen_prefix)
        if self.target is not None:
            view = epoch % self.views
            if view not in self.target_readers:
                self._open_view_writer(epoch, view)
            return self.target[1]
        return self.readers[0].tier if self.readers else None

    def end_epoch(self, epoch: int) -> None:
        if self.writer is not None:
            view = epoch % self.views
            try:
                with self._timed("write_s"):
                    self.target_readers[view] = self.writer.finish()
            except (DiskFullError, CacheError) as exc:
                self._abandon(epoch, str(exc))
            self.writer = None
        if self.target is not None and len(self.target_readers) == self.views:
            self._close_readers(self.readers, delete=True)  # superseded by the new boundary
            self.boundary, self.readers = self.target[0], self.target_readers
            self.target, self.target_readers = None, {}
            if self.cfg.augment == "standard" and self.views == 1 and not self.warned_fixed_aug:
                log.warning(
                    "augmentation is fixed from stage %d on (one cached view); "
                    "use --cache-views K for K views",
                    self.boundary,
                )
                self.warned_fixed_aug = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self._close_readers(self.readers)
        self._close_readers(self.target_readers)
        if self.test_reader is not None:
            self.test_reader.close()

    def take_io_seconds(self) -> dict[str, float]:
        """Seconds the trainer waited on cache writes and reads since the last call."""
        taken, self.io_s = self.io_s, {"write_s": 0.0, "read_s": 0.0}
        return taken

    @contextlib.contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.io_s[kind] += time.perf_counter() - t

    def report(self) -> dict:
        return {
            "cache_events": self.events,
            "planned_boundaries": self.plan,
            "cache_dtype": self.dtype,
            "cache_views": self.views,
        }

    # -- batches -------------------------------------------------------------------------
    def train_batches(self, epoch: int) -> Iterator[Batch]:
        if not self.readers:
            yield from self.raw.train_batches(epoch)
            return
        reader = self.readers[epoch % self.views]
        seen = np.zeros(self.raw.num_train, dtype=bool)
        try:
            for batch in self._from_reader(reader, epoch):
                seen[batch.ids.numpy()] = True
                yield batch
        except CacheCorruptedError as exc:
            # Never train on garbage: serve the rest of the epoch from raw data,
            # drop the cache and materialize the boundary again next epoch.
            log.warning("%s; recomputing the frozen prefix", exc)
            self.events.append({"epoch": epoch, "event": "corrupted", "detail": str(exc)})
            self._close_readers(self.readers, delete=True)
            self.plan[epoch + 1] = self.boundary
            self.boundary, self.readers = 0, {}
            yield from self.raw.train_batches(epoch, skip=seen)

    def _from_reader(self, reader: Reader, epoch: int) -> Iterator[Batch]:
        buffer = min(256 * 2**20, self.governor.ram_budget() // 4)

        def batches() -> Iterator[TorchBatch]:
            return reader.epoch_batches(self.cfg.seed, epoch, self.cfg.batch_size, buffer)

        # The loader thread pays off when there is work to overlap: disk decode, or a
        # host-to-GPU copy. A CPU run reading RAM does better in this thread: the
        # hand-off from a loader thread measured ~6 ms per batch (GIL switching) on
        # 2 cores, more than the gather itself.
        overlap = reader.tier in ("mmap", "zarr") or (
            reader.tier == "ram" and self.device.type == "cuda"
        )
        loader = PrefetchLoader(batches, self.device) if overlap else None
        source = iter(loader) if loader is not None else batches()
        try:
            while True:
                with self._timed("read_s"):  # time the trainer waits for its batch
                    item = next(source, None)
                if item is None:
                    return
                acts, labels, ids = item
                yield Batch(self._compute_dtype(acts), labels.to(self.device), ids, self.boundary)
        finally:
            if loader is not None:
                loader.close()

    def test_batches(self) -> Iterator[Batch]:
        if self.boundary == 0:
            yield from self.raw.test_batches()
            return
        if self.test_reader is not None and self.test_boundary == self.boundary:
            yield from self._cached_test_batches(self.test_reader, self.boundary)
            return
        yield from self._materialize_test()

    def _cached_test_batches(self, reader: Reader, start: int) -> Iterator[Batch]:
        """The test set from its cache; after a corrupted chunk, the rest from raw data."""
        done = 0
        try:
            for batch in self._reader_batches(reader, start):
                done += len(batch.y)
                yield batch
        except CacheCorruptedError as exc:
            log.warning("%s; evaluating the rest from raw data", exc)
            self.events.append({"epoch": self.epoch, "event": "corrupted", "detail": str(exc)})
            self._close_readers({0: reader}, delete=True)
            if reader is self.test_reader:  # the next evaluation caches the test set again
                self.test_reader, self.test_boundary = None, 0
            # Same batch size, so raw batches line up with the cached ones already served.
            yield from (b for b in self.raw.test_batches() if int(b.ids[0]) >= done)

    def _materialize_test(self) -> Iterator[Batch]:
        """Run the prefix over the test set once (eval, exact) and cache it."""
        old, old_boundary = self.test_reader, self.test_boundary
        source = (
            self._cached_test_batches(old, old_boundary)
            if old is not None and old_boundary
            else self.raw.test_batches()
        )
        n, tier = len(self.raw.ds.test_x), self.readers[0].tier
        writer: Writer | None = None
        for batch in source:
            x = self.model.run_range(batch.x, batch.start, self.boundary)
            if writer is None:
                spec = CacheSpec(
                    self._key("test", self.boundary, None),
                    n,
                    tuple(x.shape[1:]),
                    self.dtype,
                    self._attrs("test", self.boundary),
                )
                writer = self._writer(tier, spec)
            if writer is not None:
                with self._timed("write_s"):
                    writer.append(x, batch.y, batch.ids)
            yield Batch(x, batch.y, batch.ids, self.boundary)
        with self._timed("write_s"):
            self.test_reader = writer.finish() if writer else None
        self.test_boundary = self.boundary
        if old is not None:  # superseded by the new boundary's test cache: free the disk
            self._close_readers({0: old}, delete=True)

    def _reader_batches(self, reader: Reader, start: int) -> Iterator[Batch]:
        """Rows in order, read in blocks of whole batches so a chunk is decoded once."""
        bs = self.cfg.batch_size
        block = bs * max(1, getattr(reader, "chunk_rows", bs) // bs)
        for blk in batch_slices(reader.spec.rows, block):
            with self._timed("read_s"):
                acts, labels, ids = reader.read_rows(np.arange(blk.start, blk.stop))
            for sl in batch_slices(len(ids), bs):
                yield Batch(
                    self._compute_dtype(acts[sl]), labels[sl].to(self.device), ids[sl], start
                )

    # -- writing -------------------------------------------------------------------------
    def _write(self, x: torch.Tensor, batch: Batch) -> None:
        assert self.writer is not None
        try:
            with self._timed("write_s"):
                self.writer.append(x, batch.y, batch.ids)
        except (DiskFullError, CacheError) as exc:
            self.writer = None  # the writer removed its partial cache
            self._abandon(-1, str(exc))

    def _start_target(self, epoch: int, stage: int) -> None:
        nbytes = boundary_cache_bytes(
            self.costs[stage - 1].out_row_bytes,
            self.dtype,
            self.raw.num_train,
            self.views,
            len(self.raw.ds.test_x),
        )
        prefix_s = self.raw.batches_per_epoch * sum(c.fwd_s for c in self.costs[:stage])
        decision = self.governor.choose(nbytes, prefix_s)
        self.events.append(
            {
                "epoch": epoch,
                "event": "boundary",
                "stage": stage,
                "tier": decision.tier,
                "bytes": nbytes,
                "reason": decision.reason,
            }
        )
        log.info(
            "epoch %d: boundary at stage %d -> %s (%s)",
            epoch,
            stage,
            decision.tier,
            decision.reason,
        )
        if decision.tier != "recompute":
            self.target = (stage, decision.tier)

    def _open_view_writer(self, epoch: int, view: int) -> None:
        assert self.target is not None
        stage, tier = self.target
        key = self._key("train", stage, epoch if self.cfg.augment == "standard" else None)
        if tier in ("mmap", "zarr") and self.root.is_complete(key):
            try:
                self.target_readers[view] = open_reader(self.root, key)
                self.events.append({"epoch": epoch, "event": "reused", "key": key})
                return
            except CacheError as exc:
                log.warning("not reusing cache %s: %s", key, exc)
        shape = self.costs[stage - 1].out_shape
        spec = CacheSpec(key, self.raw.num_train, shape, self.dtype, self._attrs("train", stage))
        self.writer = self._writer(tier, spec)
        self.sink_boundary = stage
        if self.writer is None:
            self._abandon(epoch, "could not open a writer")

    def _writer(self, tier: str, spec: CacheSpec) -> Writer | None:
        try:
            return open_writer(tier, spec, self.root, self.device)
        except (CacheError, OSError) as exc:
            log.warning("cannot write cache %s (%s): continuing without it", spec.key, exc)
            return None

    def _abandon(self, epoch: int, why: str) -> None:
        """Give up the boundary being materialized; training goes on as FreezeOut."""
        log.warning("abandoning cache boundary: %s", why)
        self.events.append({"epoch": epoch, "event": "abandoned", "detail": why})
        self._close_readers(self.target_readers, delete=True)
        self.target, self.target_readers = None, {}

    def _spill_if_pressed(self, epoch: int) -> None:
        if not self.governor.ram_pressure():
            return
        for view, reader in list(self.readers.items()):
            if reader.tier not in ("ram", "gpu"):
                continue
            spec = copy.copy(reader.spec)
            writer = self._writer("zarr", spec)
            if writer is None:
                continue
            for sl in batch_slices(spec.rows, 1024):
                writer.append(*reader.read_rows(np.arange(sl.start, sl.stop)))
            self.readers[view] = writer.finish()
            reader.close()
            self.events.append(
                {"epoch": epoch, "event": "spilled", "from": reader.tier, "to": "zarr"}
            )
            log.warning("RAM pressure: spilled cache %s to zarr on disk", spec.key)

    # -- helpers -------------------------------------------------------------------------
    def _compute_dtype(self, acts: torch.Tensor) -> torch.Tensor:
        acts = acts.to(self.device, non_blocking=True)
        return acts if self.device.type == "cuda" else acts.float()

    def _key(self, split: str, stage: int, aug_epoch: int | None) -> str:
        return cache_key(
            {
                "prefix": self.model.prefix_digest(stage),
                "data": self.raw.ds.identity,
                "split": split,
                "augment": self.cfg.augment if split == "train" else "none",
                "aug_epoch": aug_epoch,
                "seed": self.cfg.seed,
                "boundary": stage,
                "dtype": self.dtype,
                "model": self.model.name,
            }
        )

    def _attrs(self, split: str, stage: int) -> dict:
        return {
            "model": self.model.name,
            "boundary": stage,
            "split": split,
            "dataset": self.raw.ds.name,
            "augment": self.cfg.augment,
            "seed": self.cfg.seed,
        }

    def _close_readers(self, readers: dict[int, Reader], delete: bool = False) -> None:
        for reader in readers.values():
            reader.close()
            if delete and reader.tier in ("mmap", "zarr"):  # superseded: free the disk
                self.root.remove(reader.spec.key)
        readers.clear()
