"""The prefast mode's feed: materialize frozen prefixes, then train from the cache.

Life of a boundary at stage ``p`` (planned by ``plan_boundaries``, tier chosen
by the governor, states in ``prefast/caching/boundary.py``):

1. Epoch ``e0`` (planned): if a complete cache with the view's content key
   exists it is reused and read this very epoch. Otherwise batches come from
   the previous boundary's cache (or the raw data); this feed runs stages
   ``[start, p)`` once, in eval mode without gradients, writes the output
   through to the store and yields it with ``start = p``.
2. With ``--cache-views K`` and augmentation, epochs ``e0..e0+K-1`` each write
   one view; epoch ``e`` later reads view ``e mod K``.
3. Once every view is finished (atomically, for disk tiers) the boundary is
   *complete* and replaces the previous one, which is *superseded* (deleted).
   The test set is cached at the same boundary at the next evaluation.

Faults never stop training and never change what it sees. A damaged or
missing chunk (``CacheCorruptedError``) marks the boundary *corrupted*; the rest
of the epoch comes from raw data, exactly the samples not yet served, in the
same order, so every sample is seen once and the epoch has its usual number
of steps; the boundary is materialized again next epoch. A writer that fails
(full disk, I/O error) *abandons* the boundary and the run goes on as
FreezeOut. A memory tier whose allocator refuses the cache (CUDA or host out
of memory) is a tier decision: the boundary is planned again, at once, in the
next tier down. Memory pressure spills a boundary to a lower tier
(``prefast/caching/spill.py``); a spill that fails leaves the cache where it was.

Device boundary: batches read from a cache cross to the training device
through the reader's staging buffers (``store/device.py``); sample ids and
labels for the writers stay on the host, so this feed never reads a device
tensor back.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import prefast.distributed as distributed
from prefast.caching.boundary import BoundaryCache, State
from prefast.caching.budgets import budgets_for
from prefast.caching.cachectx import DISK_TIERS, CacheContext, cache_identity
from prefast.caching.costmodel import Boundary, StageCost, plan_boundaries
from prefast.caching.feature_augment import FeatureAugment, check_feature_ops
from prefast.caching.fits import Unfit
from prefast.caching.governor import Governor, cache_dtype, cache_views
from prefast.caching.keep import KeepBehind
from prefast.caching.online import plan_online
from prefast.caching.overflow import input_fault, not_kept
from prefast.caching.pricing import planned_on, pricer_for, pricing_record, run_bandwidths
from prefast.caching.probe import probed_costs
from prefast.caching.replay import check_plan
from prefast.caching.spill import relieve_pressure
from prefast.caching.testcache import TestCache
from prefast.caching.transitions import BoundaryTransitions
from prefast.config import TrainConfig, cache_root, parse_ops
from prefast.data.sources import Batch, BatchStream, RawSource
from prefast.distributed import SINGLE, Dist
from prefast.errors import (
    CacheError,
    CacheReadError,
    CacheUnavailableError,
)
from prefast.freezing.adaptive import AutoFreezeSchedule
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.models import StagedModel
from prefast.store import PrefetchLoader
from prefast.store.base import TorchBatch, shuffle_buffer_bytes
from prefast.store.device import Uploader, is_accelerator

log = logging.getLogger("prefast.caching.materialize")


class PrefastFeed(BoundaryTransitions):
    def __init__(
        self,
        cfg: TrainConfig,
        raw: RawSource,
        model: StagedModel,
        schedule: FreezeOutSchedule | AutoFreezeSchedule,  # on resume a ResumedSchedule
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        costs: list[StageCost] | None = None,
        ctx: Dist = SINGLE,
        amp: bool = False,
        resume: dict | None = None,
        replay: list[dict] | None = None,
    ):
        self.cfg, self.raw, self.model, self.device = cfg, raw, model, device
        self.schedule = schedule
        self.autocast = autocast  # ``amp``: it is an autocast (the model takes the cache dtype)
        # Host RAM and disk are the node's: its ranks share them; a GPU is a rank's own.
        self.governor = Governor(replace(budgets_for(cfg), share=ctx.local_world), device)
        self.dist = ctx  # the ranks: one plan for all (the main rank's)
        self.views = cache_views(cfg.cache_views, cfg.augment)
        dtype = cache_dtype(cfg.cache_dtype, device, amp)
        resume = resume or {}
        if costs is None:  # a resumed run plans with the costs its first part measured
            costs = resume.get("costs")
        root = cache_root(cfg.cache_dir, cfg)  # a local directory or an s3:// prefix
        if costs is None and ctx.is_main:  # forward times and compression ratios: the plan's
            # A fixed prefix (--freeze-prefix) is timed forward only, on a few rows: probe.py
            fixed = getattr(schedule, "prefix", 0)
            costs = probed_costs(cfg, raw, model, device, dtype, amp, root, fixed)  # or kept
        self.costs: list[StageCost] = distributed.broadcast(ctx, costs)  # one plan for all ranks
        self.governor.bandwidths = run_bandwidths(cfg, device, dtype, root, ctx, resume)
        self.planned_on = planned_on(self.governor)  # the rooms the plan saw, for the record
        # A replayed plan (--plan-from, or compare's one plan) fixes boundaries, tiers and
        # dtypes; else the plan is a function of the schedule that runs: on resume that is
        # the resumed schedule (``ResumedSchedule``: the checkpoint's frozen stages, this
        # run's epochs), never the plan the checkpoint was made with.
        self.replay = {(b["epoch"], b["stage"]): b for b in replay or []}
        self.considered_boundaries: list[Boundary] = []  # every candidate priced, for the record
        if replay is not None:
            check_plan(replay, schedule, raw.batches_per_epoch, cfg.epochs)
            self.planned = {b["epoch"]: b["stage"] for b in replay}
        else:
            price = pricer_for(self.governor, cfg, raw, self.costs, dtype, self.views)
            planned = plan_boundaries(
                schedule, raw.batches_per_epoch, cfg.epochs, self.costs, raw.num_train,
                policy=cfg.cache_boundaries, views=self.views, price=price,
                considered=self.considered_boundaries,
            )  # fmt: skip
            # The main rank's: the tiers priced depend on each rank's free memory.
            self.considered_boundaries = distributed.broadcast(ctx, self.considered_boundaries)
            planned = [b for b in self.considered_boundaries if b.taken]
            self.planned = {b.epoch: b.stage for b in planned}  # as planned, for the report
        self.decided: list[dict] = []  # the planned boundaries' tiers and dtypes, as taken
        # --freeze auto: boundaries are also planned when the rule freezes (``_plan_online``)
        self.online = isinstance(schedule, AutoFreezeSchedule) and replay is None
        self.considered: int | None = None  # the deepest frozen prefix planned for so far
        self.freezes_told = 0  # the rule's decisions recorded as events so far
        self.plan = dict(self.planned)  # plus re-materializations after faults
        # Stages whose rows overflowed their dtype (fits.py), and the view streams of a
        # damaged boundary to rebuild: kept by a checkpoint, so a resumed run goes on alike.
        self.wider: dict[int, str] = dict(resume.get("wider", {}))
        self.rebuild_streams: dict[int, dict] = dict(resume.get("rebuild_streams", {}))
        self.prefix_fault: str | None = None  # the frozen prefix computed NaN (overflow.py)
        # Resumed: the boundaries the first part of the run held, found again by their keys
        # (recomputed here, for this rank) at the first epoch. A run resumed with another
        # world size has other shards: their caches are built anew (resharding).
        self.resharded = bool(resume) and resume.get("world") != ctx.world
        self.restored: list[dict] = [] if self.resharded else list(resume.get("boundaries", []))
        self.resumed_from = resume  # what the checkpoint planned, for the ``resumed`` event
        identity = cache_identity(cfg, raw, ctx.rank, ctx.world)  # a rank caches its own shard
        self.ctx = CacheContext(root, self.governor, model, device, dtype, identity, autocast=amp)
        self.current: BoundaryCache | None = None  # complete: later epochs read it
        self.target: BoundaryCache | None = None  # being materialized
        self.test = TestCache(
            self.ctx, raw, self._run_prefix, self._ratio, self._test_allowance, cfg.cache_dtype
        )
        # A fixed prefix's cache, kept for later runs (prefast/caching/keep.py)
        self.keep = KeepBehind(self.ctx, cfg, getattr(schedule, "prefix", 0), self.views)
        self.test.keep = self.keep
        self.epoch: int | None = None
        self.warned_fixed_aug = False
        self.disk_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        ops = parse_ops(cfg.feature_augment)
        check_feature_ops(ops, self.costs, model.channels_last)
        self.features = FeatureAugment(ops, cfg.seed, raw.num_train) if ops else None
        self._reset_stats()

    @property
    def batches_per_epoch(self) -> int:
        return self.raw.batches_per_epoch

    # -- epoch protocol ------------------------------------------------------------------
    def begin_epoch(self, epoch: int, frozen_prefix: int) -> None:
        self.raw.begin_epoch(epoch, frozen_prefix)  # its data wait counts from here
        first = self.epoch is None
        self.epoch = epoch
        if first and epoch > 0:
            self._resume(epoch, frozen_prefix)
        for b in (self.current, self.target):  # the test cache is rebuilt at the next evaluation
            if b is not None:
                ratio = self._ratio(b.stage, b.dtype)
                relieve_pressure(b, self.ctx, ratio, epoch, self.test.drop)
        if self.online:
            plan_online(self, epoch, frozen_prefix, first)
        if epoch in self.plan:
            self._start_planned(epoch, frozen_prefix)
        if self.target is not None and self.target.state is State.PLANNED:
            self._prepare_view(epoch)
        if self.target is not None and self.target.state is State.COMPLETE:
            self._promote(epoch)  # every view reused: read it from this epoch on
        self._check()

    def train_batches(self, epoch: int) -> BatchStream:
        writing = self.target if self.target and self.target.state is State.WRITING else None
        source = self._source(epoch)
        # The augmentation stream of every batch this epoch: the cached view's, or the one
        # of the view being written, or the epoch's own; after a fault the rest of the
        # epoch comes from raw data *in that stream*, so nothing changes but the cost.
        stream = self._stream(epoch)
        seen = np.zeros(self.raw.num_train, dtype=bool)  # host bookkeeping, like the ids
        self.stats["input_stream"] = stream  # the frozen prefix's input augmentation
        try:
            if source is not None:
                batches = self._cached(source, epoch)
            else:
                batches = self.raw.train_batches(epoch, view=stream)
            for batch in batches:
                seen[batch.ids.numpy()] = True
                yield self._augmented(self._through(batch, writing, epoch), epoch)
            if source is not None:
                source.unavailable = 0  # read whole: "unreadable twice" means in a row
        except CacheReadError as exc:  # damaged, or unreadable now: the rest from raw data
            assert source is not None
            self._read_failed(epoch, source, exc)
            for batch in self.raw.train_batches(epoch, view=stream, seen=seen):
                batch = self._as_cached(batch, source)  # as the cache would have served it
                yield self._augmented(self._through(batch, writing, epoch), epoch)

    def end_epoch(self, epoch: int) -> None:
        t = self.target
        if t is not None and t.state is State.WRITING and (unfit := Unfit.read(t.signs)):
            not_kept(self, epoch, t, unfit)  # never a complete cache of NaN or inf
            t = None
        if t is not None and t.state is State.WRITING:
            try:
                with self.ctx.timed("write_s"):
                    t.finish_view()
            except CacheUnavailableError as exc:  # written, kept: reopened at its next epoch
                self._unreadable(epoch, t, exc)
            except CacheError as exc:
                self._abandon(epoch, str(exc))
        if self.target is not None and self.target.state is State.COMPLETE:
            self._promote(epoch)
        self._check()

    def input_fault(self) -> str | None:
        return input_fault(self)  # prefast/caching/overflow.py

    def test_batches(self) -> BatchStream:
        if self.current is None:
            yield from self.raw.test_batches()
            return
        c = self.current
        yield from self.test.batches(c.stage, c.tier, self.epoch, c.dtype)

    def take_epoch_stats(self) -> dict[str, Any]:
        self._charge(self.epoch)  # after evaluation: the test cache is written too
        stats = {**self.stats, **self.ctx.io_s, "data_s": self.raw.data_s}
        if self.features is not None:  # what the ops cost, for the per-batch figure
            stats["feature_s"], stats["feature_batches"] = self.features.take_seconds()
        self._reset_stats()
        return stats

    def close(self) -> None:
        try:
            for b in (self.target, self.current):
                if b is not None:
                    b.close()
            self.test.close()
            self.raw.close()
        finally:  # the kept copies complete, unless the run stopped early: then they abort
            self.keep.close(finished=self.epoch == self.cfg.epochs - 1)

    def report(self) -> dict:
        return {
            "cache_events": self.ctx.events,
            "planned_boundaries": self.planned,
            "plan": self.decided,  # what --plan-from replays
            "cache_dtype": self.ctx.dtype,
            "cache_views": self.views,
            "cache_peak_bytes": self.governor.peak,
            "pricing": pricing_record(
                self.governor.bandwidths, self.costs, self.considered_boundaries, self.planned_on
            ),
        }

    # -- batches -------------------------------------------------------------------------
    def _source(self, epoch: int) -> BoundaryCache | None:
        """The boundary whose cache this epoch reads: a reused view of the target, else the
        current; never one whose stream differs from the view being written (a view
        rebuilt on resume must come out as it was: then the epoch reads raw data)."""
        want = self._writing_stream()
        for b in (self.target, self.current):
            if b is None or b.reader_for(epoch) is None:
                continue
            if want is None or b.stream_for(epoch) == want:
                return b
        return None

    def _writing_stream(self) -> int | None:
        t = self.target
        if t is None or t.state is not State.WRITING or t.writing_view is None:
            return None
        return t.streams.get(t.writing_view)

    def _stream(self, epoch: int) -> int | None:
        """The augmentation stream this epoch's batches carry (None: no augmentation)."""
        if self.cfg.augment != "standard":
            return None
        source = self._source(epoch)
        if source is not None:
            return source.stream_for(epoch)
        want = self._writing_stream()
        return epoch if want is None else want

    def _cached(self, source: BoundaryCache, epoch: int) -> BatchStream:
        reader = source.reader_for(epoch)
        assert reader is not None
        buffer = shuffle_buffer_bytes(self.governor.ram_budget())

        def batches() -> Iterator[TorchBatch]:
            return reader.epoch_batches(self.raw.order_seed, epoch, self.cfg.batch_size, buffer)

        def note(event: str, detail: str) -> None:  # the loader could not pin its staging
            self.ctx.event(epoch, event, stage=source.stage, tier=reader.tier, detail=detail)

        # The loader thread pays off when there is work to overlap: disk decode, or a
        # host-to-device copy. A CPU run reading RAM does better in this thread: the
        # hand-off from a loader thread measured ~6 ms per batch (GIL switching) on
        # 2 cores, more than the gather itself. A gpu-tier cache is read on the device.
        accelerator = is_accelerator(self.device)
        overlap = reader.tier in DISK_TIERS or (reader.tier == "ram" and accelerator)
        loader = PrefetchLoader(batches, self.device, on_note=note) if overlap else None
        if loader is not None:
            stream = loader.batches()
        else:  # read in this thread: the uploader moves what is not on the device yet
            uploader = Uploader(self.device, on_note=note)
            stream = ((*uploader.upload(a, y).wait(), i, y) for a, y, i in batches())
        try:
            while True:
                with self.ctx.timed("read_s"):  # the time the trainer waits for its batch
                    item = next(stream, None)
                if item is None:
                    return
                acts, y, ids, labels = item  # y on the device, labels and ids on the host
                self.stats["cache_tier"], self.stats["cache_stage"] = reader.tier, source.stage
                self.stats["cached_batches"] += 1
                x = self.ctx.to_compute(acts, reader.spec.dtype, reader.spec.shape)
                yield Batch(x, y, ids, labels, source.stage, True, source.stream_for(epoch))
        finally:
            if loader is not None:
                loader.close()

    def _through(self, batch: Batch, writing: BoundaryCache | None, epoch: int) -> Batch:
        """Run the newly frozen stages and write their output, while a view is being written."""
        if writing is None or writing.state is not State.WRITING:
            return batch
        out = self._run_prefix(batch.x, batch.start, writing.stage)
        stored, x, signs = self.ctx.as_stored(out, writing.dtype)  # x: what stored decodes to
        writing.add_signs(signs)  # the check runs on what is stored (fits.py)
        try:
            with self.ctx.timed("write_s"):
                writing.write(stored, batch.labels, batch.ids)
        except CacheError as exc:  # the writer removed its partial cache
            self._abandon(epoch, str(exc))
        return Batch(x, batch.y, batch.ids, batch.labels, writing.stage, batch.cached, batch.stream)

    def _augmented(self, batch: Batch, epoch: int) -> Batch:
        """``--feature-augment``: the ops on a batch of cached activations (never on what a
        writer stores: ``_through`` wrote before this)."""
        if self.features is None or not batch.cached:
            return batch
        x, mix = self.features.apply(batch.x, batch.ids, batch.y, epoch)
        self.stats["feature_ops"] = list(self.features.ops)
        return replace(batch, x=x, mix=mix)

    def _as_cached(self, batch: Batch, source: BoundaryCache) -> Batch:
        """A raw batch as ``source``'s cache holds it: the prefix run and the rows encoded
        and decoded in its dtype, so the step (and the feature ops) see the very values a
        read would have given."""
        out = self._run_prefix(batch.x, batch.start, source.stage)
        _, x, _ = self.ctx.as_stored(out, source.dtype)
        return replace(batch, x=x, start=source.stage, cached=True)

    def _run_prefix(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad(), self.autocast():  # frozen: eval mode, no graph
            return self.model.run_range(x, start, stop)

    def _reset_stats(self) -> None:
        self.stats: dict[str, Any] = {
            "cache_tier": None,
            "cache_stage": None,
            "cached_batches": 0,
            "input_stream": None,
            "feature_ops": [],
        }
        self.ctx.io_s = {"write_s": 0.0, "read_s": 0.0}
