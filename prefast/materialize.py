"""The prefast mode's feed: materialize frozen prefixes, then train from the cache.

Life of a boundary at stage ``p`` (planned by ``plan_boundaries``, tier chosen
by the governor, states in ``prefast/boundary.py``):

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
(``prefast/spill.py``); a spill that fails leaves the cache where it was.

Device boundary: batches read from a cache cross to the training device
through the reader's staging buffers (``store/device.py``); sample ids and
labels for the writers stay on the host, so this feed never reads a device
tensor back.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import prefast.distributed as distributed
from prefast.boundary import BoundaryCache, State
from prefast.cachectx import DISK_TIERS, CacheContext
from prefast.config import TrainConfig, default_cache_dir
from prefast.costmodel import StageCost, plan_boundaries
from prefast.distributed import SINGLE, Dist
from prefast.errors import (
    CacheAllocationError,
    CacheCorruptedError,
    CacheError,
    CacheReadError,
    CacheUnavailableError,
)
from prefast.feed import Batch, BatchStream, RawSource
from prefast.governor import Governor, cache_dtype, cache_views, row_bytes_in, tier_bytes
from prefast.models import StagedModel
from prefast.probe import measure_stage_costs
from prefast.schedule import FreezeOutSchedule
from prefast.spill import relieve_pressure
from prefast.store import CacheRoot, PrefetchLoader, Reader
from prefast.store.base import TorchBatch, shuffle_buffer_bytes
from prefast.store.device import Uploader, is_accelerator
from prefast.store.disk_writer import DiskWriter
from prefast.store.layout import disk_usage
from prefast.store.order import batch_slices
from prefast.testcache import TestCache

log = logging.getLogger("prefast.materialize")


class PrefastFeed:
    def __init__(
        self,
        cfg: TrainConfig,
        raw: RawSource,
        model: StagedModel,
        schedule: FreezeOutSchedule,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        costs: list[StageCost] | None = None,
        ctx: Dist = SINGLE,
        amp: bool = False,
        resume: dict | None = None,
    ):
        self.cfg, self.raw, self.model, self.device = cfg, raw, model, device
        self.autocast = autocast  # ``amp``: it is an autocast (the model takes the cache dtype)
        # Host RAM and disk are the node's: its ranks share them; a GPU is a rank's own.
        self.governor = Governor(replace(cfg.budgets(), share=ctx.local_world), device)
        self.views = cache_views(cfg.cache_views, cfg.augment)
        dtype = cache_dtype(cfg.cache_dtype, device, amp)
        resume = resume or {}
        if costs is None:  # a resumed run plans with the costs its first part measured
            costs = resume.get("costs")
        if (
            costs is None and ctx.is_main
        ):  # forward times and compression ratios: all planning needs
            with contextlib.closing(raw.train_batches(0)) as batches:
                probe = next(batches).x
            costs = measure_stage_costs(
                copy.deepcopy(model), probe, backward=False, cache_dtype=dtype
            )
        self.costs: list[StageCost] = distributed.broadcast(ctx, costs)  # one plan for all ranks
        planned = plan_boundaries(
            schedule,
            raw.batches_per_epoch,
            cfg.epochs,
            self.costs,
            raw.num_train,
            policy=cfg.cache_boundaries,
            views=self.views,
        )
        self.planned = {b.epoch: b.stage for b in planned}  # as planned, for the report
        self.plan = dict(self.planned)  # plus re-materializations after faults
        # Resumed: the boundaries the first part of the run held, found again by their keys
        # (recomputed here, for this rank) at the first epoch. A run resumed with another
        # world size has other shards: their caches are built anew (resharding).
        self.resharded = bool(resume) and resume.get("world") != ctx.world
        self.restored: list[dict] = [] if self.resharded else list(resume.get("boundaries", []))
        if resume and not self.resharded:
            self.planned = {int(e): s for e, s in resume["planned"].items()}
            self.plan = {int(e): s for e, s in resume["plan"].items()}
        identity = {
            "data": raw.identity,
            "data_name": raw.name,
            "augment": cfg.augment,
            "seed": cfg.seed,
            "rank": ctx.rank,  # a rank caches its own shard
            "world": ctx.world,
        }
        root = CacheRoot(cfg.cache_dir or default_cache_dir())
        self.ctx = CacheContext(root, self.governor, model, device, dtype, identity, autocast=amp)
        self.current: BoundaryCache | None = None  # complete: later epochs read it
        self.target: BoundaryCache | None = None  # being materialized
        self.test = TestCache(self.ctx, raw, self._run_prefix, self._ratio)
        self.epoch: int | None = None
        self.warned_fixed_aug = False
        self._reset_stats()

    @property
    def batches_per_epoch(self) -> int:
        return self.raw.batches_per_epoch

    # -- epoch protocol ------------------------------------------------------------------
    def begin_epoch(self, epoch: int, frozen_prefix: int) -> None:
        first = self.epoch is None
        self.epoch = epoch
        if first and epoch > 0:
            self._resume(epoch, frozen_prefix)
        for b in (self.current, self.target):  # the test cache is rebuilt at the next evaluation
            if b is not None:
                relieve_pressure(b, self.ctx, self._ratio(b.stage), epoch, self.test.drop)
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
        try:
            if source is not None:
                batches = self._cached(source, epoch)
            else:
                batches = self.raw.train_batches(epoch, view=stream)
            for batch in batches:
                seen[batch.ids.numpy()] = True
                yield self._through(batch, writing, epoch)
        except CacheReadError as exc:  # damaged, or unreadable now: the rest from raw data
            assert source is not None
            self._read_failed(epoch, source, exc)
            for batch in self.raw.train_batches(epoch, view=stream, seen=seen):
                yield self._through(batch, writing, epoch)

    def end_epoch(self, epoch: int) -> None:
        t = self.target
        if t is not None and t.state is State.WRITING:
            try:
                with self.ctx.timed("write_s"):
                    t.finish_view()
            except CacheError as exc:
                self._abandon(epoch, str(exc))
        if self.target is not None and self.target.state is State.COMPLETE:
            self._promote(epoch)
        self._check()

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run reads the same caches and plans
        the same boundaries: the probe's costs, the plan, and each live boundary."""
        return {
            "world": self.ctx.identity["world"],
            "costs": self.costs,
            "planned": self.planned,
            "plan": self.plan,
            "boundaries": [
                {"role": role, **b.record()}
                for role, b in (("current", self.current), ("target", self.target))
                if b is not None
            ],
        }

    def test_batches(self) -> BatchStream:
        if self.current is None:
            yield from self.raw.test_batches()
            return
        yield from self.test.batches(self.current.stage, self.current.tier, self.epoch)

    def take_epoch_stats(self) -> dict[str, Any]:
        self._charge(self.epoch)  # after evaluation: the test cache is written too
        stats = {**self.stats, **self.ctx.io_s}
        self._reset_stats()
        return stats

    def close(self) -> None:
        for b in (self.target, self.current):
            if b is not None:
                b.close()
        self.test.close()

    def report(self) -> dict:
        return {
            "cache_events": self.ctx.events,
            "planned_boundaries": self.planned,
            "cache_dtype": self.ctx.dtype,
            "cache_views": self.views,
            "cache_peak_bytes": self.governor.peak,
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
                x = self.ctx.to_compute(acts)
                yield Batch(x, y, ids, labels, source.stage, True, source.stream_for(epoch))
        finally:
            if loader is not None:
                loader.close()

    def _through(self, batch: Batch, writing: BoundaryCache | None, epoch: int) -> Batch:
        """Run the newly frozen stages and write their output, while a view is being written."""
        if writing is None or writing.state is not State.WRITING:
            return batch
        x = self.ctx.as_stored(self._run_prefix(batch.x, batch.start, writing.stage))
        try:
            with self.ctx.timed("write_s"):
                writing.write(x, batch.labels, batch.ids)
        except CacheError as exc:  # the writer removed its partial cache
            self._abandon(epoch, str(exc))
        return Batch(x, batch.y, batch.ids, batch.labels, writing.stage, batch.cached, batch.stream)

    def _run_prefix(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad(), self.autocast():  # frozen: eval mode, no graph
            return self.model.run_range(x, start, stop)

    def _ratio(self, stage: int) -> float:
        return self.costs[stage - 1].compress_ratio

    # -- transitions of the boundaries ----------------------------------------------------
    # Invariants (``_check``): ``current`` is complete and is what epochs read; ``target``
    # is planned or writing and deeper than ``current``; ``plan`` maps epochs to stages
    # still to materialize. A planned epoch that meets a target still in progress is
    # deferred to the next epoch (recorded), never dropped without a word.
    def _check(self) -> None:
        c, t = self.current, self.target
        assert c is None or c.state is State.COMPLETE, c
        assert t is None or t.state in (State.PLANNED, State.WRITING), t
        assert c is None or t is None or t.stage > c.stage, (c, t)

    def _readable(self, epoch: int) -> bool:
        """A boundary started at ``epoch`` has all its views written before the last epoch,
        so at least one epoch reads it."""
        return epoch + self.views <= self.cfg.epochs - 1

    def _start_planned(self, epoch: int, frozen_prefix: int) -> None:
        stage = frozen_prefix  # the deepest stage frozen now (deeper than planned after a fault)
        done = self.current.stage if self.current else 0
        if self.target is not None and self.target.stage >= stage or stage <= done:
            return  # that stage (or a deeper one) is already cached or being cached
        if self.target is not None:  # a K-view target in progress: after it, if in time
            nxt = epoch + 1
            if self._readable(nxt):
                self.plan[nxt] = max(self.plan.get(nxt, 0), stage)
            why = f"stage {self.target.stage}'s views are still being written"
            self.ctx.event(epoch, "deferred" if self._readable(nxt) else "dropped",
                           stage=stage, detail=why)  # fmt: skip
            return
        self._plan_target(epoch, stage)

    def _resume(self, epoch: int, frozen_prefix: int) -> None:
        """First epoch of a resumed run: reopen the boundaries the checkpoint names."""
        if self.resharded:
            self.ctx.event(epoch, "resharded", world=self.ctx.identity["world"])
        for rec in self.restored:
            b = self._reopen(epoch, rec)
            if b is None:
                continue
            if rec["role"] == "current" and b.state is State.COMPLETE:
                self.current = b
            elif self.target is None and (self.current is None or b.stage > self.current.stage):
                self.target = b  # views still missing are written again, in their streams
            else:
                b.close()
        self.restored = []
        # Nothing to reopen (memory tiers die with the process, or the shards changed):
        # materialize at once instead of computing the prefix until the next boundary.
        nothing = self.current is None and self.target is None
        if nothing and frozen_prefix > 0 and any(e < epoch for e in self.plan):
            self.plan[epoch] = max(self.plan.get(epoch, 0), frozen_prefix)

    def _reopen(self, epoch: int, rec: dict) -> BoundaryCache | None:
        stage, tier, views = int(rec["stage"]), rec["tier"], int(rec["views"])
        if views != self.views:
            return None
        name = f"train@{stage}"
        b = BoundaryCache(name, stage, tier, views, self.ctx.root, self.governor.release)
        row = row_bytes_in(self.ctx.dtype, self.costs[stage - 1].out_row_bytes)
        ratio = self._ratio(stage)
        b.view_bytes = tier_bytes(tier, self.raw.num_train * row, ratio)
        b.test_bytes = tier_bytes(tier, self.raw.num_test * row, ratio)
        self.governor.hold(name, tier, views * b.view_bytes + b.test_bytes)
        for view, stream in rec["streams"].items():
            key = self.ctx.key("train", stage, stream)
            try:
                reader = self.ctx.reuse(tier, key, epoch)
            except CacheError:
                reader = None
            b.streams[int(view)] = stream
            if reader is not None:
                b.reuse_view(int(view), reader, stream)
        return b

    def _plan_target(self, epoch: int, stage: int, below: str | None = None) -> None:
        test_batches = len(batch_slices(self.raw.num_test, self.cfg.batch_size))
        decision = self.governor.choose_boundary(
            self.costs,
            stage,
            self.ctx.dtype,
            (self.raw.num_train, self.raw.num_test),
            self.views,
            self.raw.batches_per_epoch + test_batches,
            below,
        )
        self.ctx.event(
            epoch,
            "boundary",
            stage=stage,
            tier=decision.tier,
            bytes=decision.bytes,
            compress_ratio=round(self.costs[stage - 1].compress_ratio, 3),
            reason=decision.reason,
        )
        log.info(
            "epoch %d: boundary at stage %d -> %s (%s)",
            epoch,
            stage,
            decision.tier,
            decision.reason,
        )
        if decision.tier == "recompute":
            return
        name = f"train@{stage}"
        self.governor.hold(name, decision.tier, decision.bytes)
        self.target = BoundaryCache(
            name, stage, decision.tier, self.views, self.ctx.root, self.governor.release
        )
        self.target.view_bytes = decision.view_bytes
        self.target.test_bytes = decision.bytes - self.views * decision.view_bytes

    def _prepare_view(self, epoch: int) -> None:
        """Reuse this epoch's view if a complete cache has its key, else open its writer."""
        t = self.target
        assert t is not None
        view = t.missing_view(epoch)
        if view is None:
            return
        # The view's content is the data in its augmentation stream: the one recorded for
        # it (rebuilt on resume), else what this epoch feeds (a cached view's, or the epoch's).
        stream = t.streams[view] if view in t.streams else self._stream(epoch)
        key = self.ctx.key("train", t.stage, stream)
        shape = self.costs[t.stage - 1].out_shape
        spec = self.ctx.spec(key, "train", t.stage, self.raw.num_train, shape)
        try:
            opened = self.ctx.open_view(t.tier, spec, epoch)
        except CacheUnavailableError:  # kept; this epoch computes the prefix, the next retries
            return
        except CacheAllocationError as exc:
            self._out_of_memory(epoch, t, exc)
            return
        except (CacheError, OSError) as exc:
            self._abandon(epoch, f"cannot open a writer for cache {key}: {exc}")
            return
        if isinstance(opened, Reader):
            t.reuse_view(view, opened, stream)
        else:
            if isinstance(opened, DiskWriter):  # the writer stops at what the budget has left
                opened.max_bytes = self._allowance(t)
            t.begin_view(view, opened, stream)

    def _promote(self, epoch: int) -> None:
        assert self.target is not None
        if self.current is not None:
            self.current.supersede()
        self.current, self.target = self.target, None
        self.ctx.event(epoch, "complete", stage=self.current.stage, tier=self.current.tier)
        if self.cfg.augment == "standard" and self.views == 1 and not self.warned_fixed_aug:
            log.warning(
                "augmentation is fixed from stage %d on (one cached view); "
                "use --cache-views K for K views",
                self.current.stage,
            )
            self.warned_fixed_aug = True

    def _out_of_memory(self, epoch: int, t: BoundaryCache, exc: CacheAllocationError) -> None:
        """The tier's allocator refused the view: plan the boundary in the next tier down,
        at once when nothing was written yet (else from the next epoch)."""
        log.warning("stage %d's cache does not fit the %s tier: %s", t.stage, t.tier, exc)
        written = bool(t.readers)
        t.abandon(str(exc))  # releases its ledger entry first: the refusal must outlive it
        self.target = None
        self.ctx.allocation_refused(epoch, t.tier, exc, stage=t.stage)
        if written:  # views of the old tier are gone with it: write them all again
            self.plan[epoch + 1] = t.stage
            return
        self._plan_target(epoch, t.stage, below=t.tier)
        if self.target is not None:
            self._prepare_view(epoch)

    def _abandon(self, epoch: int, why: str) -> None:
        """Give up the boundary being materialized; training goes on as FreezeOut."""
        log.warning("abandoning cache boundary: %s", why)
        self.ctx.event(epoch, "abandoned", detail=why)
        if self.target is not None:
            self.target.abandon(why)
            self.target = None

    def _read_failed(self, epoch: int, source: BoundaryCache, exc: CacheReadError) -> None:
        if isinstance(exc, CacheCorruptedError):
            self._corrupted(epoch, source, exc)
            return
        # Unavailable (too many open files, no permission, ...): nothing says the cache is
        # bad, so it is kept and read again next epoch; this epoch ends on raw data.
        log.warning("%s: the rest of the epoch comes from raw data", exc)
        self.ctx.event(epoch, "unavailable", stage=source.stage, detail=str(exc))

    def _corrupted(self, epoch: int, source: BoundaryCache, exc: CacheCorruptedError) -> None:
        """Never train on garbage: drop the boundary; rebuild it next epoch unless a
        boundary being written this epoch replaces it anyway."""
        log.warning(
            "cache %s is corrupted (%s): the rest of the epoch comes from raw data",
            exc.cache,
            exc.detail,
        )
        self.ctx.event(epoch, "corrupted", stage=source.stage, detail=str(exc))
        source.corrupt(str(exc))
        if source is self.current:
            self.current = None
            self.test.drop()
        if source is self.target:
            self.target = None
        if self.target is None and self._readable(epoch + 1):
            self.plan[epoch + 1] = source.stage

    # -- what the disk caches really take -----------------------------------------------
    def _measured(self, b: BoundaryCache) -> tuple[int, int]:
        """Bytes on disk of ``b``'s written views, and of its test cache (0: not written)."""
        views = sum(disk_usage(self.ctx.root.dir_for(r.spec.key)) for r in b.readers.values())
        test = self.test.reader
        if test is None or self.test.stage != b.stage or test.tier not in DISK_TIERS:
            return views, 0
        return views, disk_usage(self.ctx.root.dir_for(test.spec.key))

    def _charge(self, epoch: int | None) -> None:
        """Charge each disk boundary what its caches take on disk (estimates for what is not
        written yet), so a compressible boundary never holds budget it does not use."""
        for b in (self.current, self.target):
            if b is None or b.tier not in DISK_TIERS or b.name not in self.governor.ledger:
                continue
            views, test = self._measured(b)
            missing = b.views - len(b.readers)
            charge = views + missing * b.view_bytes + (test or b.test_bytes)
            before = self.governor.ledger[b.name][1]
            if charge != before:
                self.governor.hold(b.name, b.tier, charge)
                self.ctx.event(epoch, "charged", stage=b.stage, bytes=charge, was=before,
                               on_disk=views + test)  # fmt: skip

    def _allowance(self, b: BoundaryCache) -> int:
        """What the view being opened may write: what the budget leaves once the other
        caches, this boundary's written views and its test set's share are counted."""
        views, test = self._measured(b)
        charged = self.governor.ledger.get(b.name, (b.tier, 0))[1]
        return max(0, self.governor.room("disk") + charged - views - (test or b.test_bytes))

    def _reset_stats(self) -> None:
        self.stats: dict[str, Any] = {"cache_tier": None, "cache_stage": None, "cached_batches": 0}
        self.ctx.io_s = {"write_s": 0.0, "read_s": 0.0}
