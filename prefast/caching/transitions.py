"""The prefast feed's boundaries as an explicit state machine over three slots.

``current`` (complete: the cache epochs read), ``target`` (planned or being
written, deeper than ``current``) and ``plan`` (epoch -> stage still to
materialize). Each method here is one transition of the slots, recorded in the
run's cache events; ``_check`` asserts the invariants after every epoch step.
A planned epoch that meets a K-view target still in progress is *deferred* to
the next epoch (or *dropped* when no epoch would be left to read it), never
lost without a word. Resume (``state`` / ``_resume``) lives here too; what the disk
caches take, and what each writer may take, in ``prefast/caching/diskcharges.py``.
``PrefastFeed`` (``prefast/caching/materialize.py``) owns the batches; this mixin owns
the slots.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefast.caching.boundary import BoundaryCache, State
from prefast.caching.cachectx import DISK_TIERS, CacheContext
from prefast.caching.diskcharges import DiskCharges
from prefast.caching.governor import Decision, Governor, lossy_candidates, tier_bytes
from prefast.caching.keep import KeepBehind, announce_reuse, existing
from prefast.errors import (
    CacheAllocationError,
    CacheCorruptedError,
    CacheError,
    CacheReadError,
    CacheUnavailableError,
)
from prefast.store import Reader, encoding
from prefast.store.order import batch_slices

if TYPE_CHECKING:
    from prefast.caching.costmodel import Boundary, StageCost
    from prefast.caching.testcache import TestCache
    from prefast.config import TrainConfig
    from prefast.data.sources import RawSource
    from prefast.distributed import Dist
    from prefast.freezing.adaptive import AutoFreezeSchedule
    from prefast.freezing.schedule import FreezeOutSchedule

log = logging.getLogger("prefast.caching.materialize")


class BoundaryTransitions(DiskCharges):
    cfg: TrainConfig
    raw: RawSource
    ctx: CacheContext
    governor: Governor
    costs: list[StageCost]
    views: int
    test: TestCache
    current: BoundaryCache | None
    target: BoundaryCache | None
    planned: dict[int, int]
    plan: dict[int, int]
    replay: dict[tuple[int, int], dict]  # (epoch, stage) -> a replayed plan's boundary
    decided: list[dict]
    restored: list[dict]
    resharded: bool
    resumed_from: dict
    warned_fixed_aug: bool
    schedule: FreezeOutSchedule | AutoFreezeSchedule
    considered: int | None  # --freeze auto (prefast/caching/online.py)
    wider: dict[int, str]  # stage -> the dtype its rows fit in, after they overflowed (fits.py)
    rebuild_streams: dict[int, dict]  # a damaged boundary's view streams (view -> stream)
    prefix_fault: str | None  # the frozen prefix computed NaN or inf (overflow.py)
    freezes_told: int
    dist: Dist  # the ranks (online.py takes the main rank's decisions)
    considered_boundaries: list[Boundary]  # every candidate priced (pricing.py)
    keep: KeepBehind  # the fixed prefix's cache, kept on disk for later runs (keep.py)

    def _stream(self, epoch: int) -> int | None:
        raise NotImplementedError

    def _ratio(self, stage: int, dtype: str) -> float:
        """The probe's zstd-1 ratio of the output before ``stage`` stored in ``dtype``."""
        return self.costs[stage - 1].ratio(dtype)

    # -- checkpoints --------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run reads the same caches and plans
        the same boundaries: the probe's costs, the plan, and each live boundary."""
        return {
            "world": self.ctx.identity["world"],
            "epochs": self.cfg.epochs,
            "costs": self.costs,
            "bandwidths": self.governor.bandwidths.to_json(),
            "planned": self.planned,
            "plan": self.plan,
            # after an overflow and after damage: the dtype and streams rebuilt in
            "wider": self.wider,
            "rebuild_streams": self.rebuild_streams,
            "boundaries": [
                {"role": role, **b.record()}
                for role, b in (("current", self.current), ("target", self.target))
                if b is not None
            ],
        }

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
        """First epoch of a resumed run: reopen the boundaries the checkpoint names that the
        running plan still wants, and say what was kept, dropped and re-planned."""
        if self.resharded:
            self.ctx.event(epoch, "resharded", world=self.ctx.identity["world"])
        # The stage the running plan has materialized by now (0: none yet).
        due = max((s for e, s in self.plan.items() if e <= epoch), default=0)
        has_target = any(rec["role"] == "target" for rec in self.restored)
        kept, dropped = [], []
        for rec in self.restored:
            b = self._reopen(epoch, rec)
            if b is None:  # written with another number of views
                dropped.append(int(rec["stage"]))
                continue
            complete = b.state is State.COMPLETE
            current = rec["role"] == "current"
            # A current that is gone (RAM died with the process; or the crashed epoch
            # completed a deeper boundary, planned now and looked up by key, and deleted it)
            # is not rebuilt: the deeper target, or the planned boundary, replaces it.
            superseded = current and (has_target or epoch in self.plan and frozen_prefix > b.stage)
            # Nothing of it on disk, and the running plan has passed it (resumed with fewer
            # epochs: deeper stages are frozen by now): not worth writing.
            passed = not b.readers and b.stage < due
            if current and complete:
                self.current = b
            elif complete or (
                not superseded
                and not passed
                and self.target is None
                and (self.current is None or b.stage > self.current.stage)
            ):
                self.target = b  # views still missing are written again, in their streams
            else:
                b.close()  # closes readers; its caches stay on disk
                dropped.append(b.stage)
                continue
            kept.append(b.stage)
        self.restored = []
        # Past a boundary the running plan has (memory tiers die with the process, the
        # shards changed, or another epoch count froze deeper stages by now): materialize
        # at once instead of computing the prefix until the next planned boundary.
        have = max((b.stage for b in (self.current, self.target) if b is not None), default=0)
        if due > have and frozen_prefix > have and self._readable(epoch):
            self.plan[epoch] = max(self.plan.get(epoch, 0), frozen_prefix)
        ahead = {e: s for e, s in sorted(self.plan.items()) if e >= epoch}
        resumed: dict = {"kept": kept, "dropped": dropped, "plan": ahead}
        was = self.resumed_from.get("epochs")
        if was is not None and was != self.cfg.epochs:  # another schedule: another plan
            old = {int(e): s for e, s in self.resumed_from.get("plan", {}).items()}
            resumed["replanned"] = {
                "epochs": [was, self.cfg.epochs],
                "was": {e: s for e, s in sorted(old.items()) if e >= epoch},
            }
        self.ctx.event(epoch, "resumed", **resumed)

    def _reopen(self, epoch: int, rec: dict) -> BoundaryCache | None:
        stage, tier, views = int(rec["stage"]), rec["tier"], int(rec["views"])
        if views != self.views:
            return None
        name, dtype = f"train@{stage}", rec.get("dtype", self.ctx.dtype)
        b = BoundaryCache(name, stage, tier, views, self.ctx.root, self.governor.release, dtype)
        b.kept = self.keep.kept(stage)
        row = encoding.row_bytes(self.costs[stage - 1].out_shape, dtype)
        ratio = self._ratio(stage, dtype)
        b.view_bytes = tier_bytes(tier, self.raw.num_train * row, ratio)
        b.test_bytes = tier_bytes(tier, self.raw.num_test * row, ratio)
        self.governor.hold(name, tier, views * b.view_bytes + b.test_bytes)
        for view, stream in rec["streams"].items():
            key = self.ctx.key("train", stage, stream, dtype)
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
        replayed = self.replay.get((epoch, stage)) if below is None else None
        dtype = self.wider.get(stage, self.ctx.dtype)
        rows, batches = (self.raw.num_train, self.raw.num_test), self.raw.batches_per_epoch
        # --cache-tier auto: an earlier run's complete disk cache of this boundary (keep.py)
        where, found = (stage, self._stream(epoch), dtype), None
        if not replayed and not below and self.views == 1:
            found = existing(self.ctx, self.cfg, self.costs, rows, batches + test_batches, where)
        if found is not None:
            decision = self.governor._log(found)
        elif replayed is not None and replayed["tier"] == "recompute":
            why = "recomputed, as in the replayed plan (--plan-from)"
            decision = Decision("recompute", 0, why, dtype=self.ctx.dtype)
        else:
            decision = self.governor.choose_boundary(
                self.costs,
                stage,
                replayed["dtype"] if replayed else dtype,
                rows,
                self.views,
                batches + test_batches,
                below,
                # a dtype widened after an overflow is taken as it is (the event named it)
                () if replayed or stage in self.wider else lossy_candidates(self.cfg.cache_dtype),
                replayed=replayed["tier"] if replayed else None,
            )
        if self.planned.get(epoch) == stage and below is None:
            self.decided.append(
                {"epoch": epoch, "stage": stage, "tier": decision.tier, "dtype": decision.dtype}
            )
        self.ctx.event(
            epoch,
            "boundary",
            stage=stage,
            tier=decision.tier,
            dtype=decision.dtype,
            bytes=decision.bytes,
            compress_ratio=round(self._ratio(stage, decision.dtype), 3),
            reason=decision.reason,
            **({"rel_error": round(decision.rel_error, 5)} if decision.rel_error else {}),
        )
        log.info("epoch %d: boundary at stage %d -> %s (%s)",
                 epoch + 1, stage, decision.tier, decision.reason)  # fmt: skip
        if below is None:  # the fixed prefix's first decision: keep a disk copy for later runs?
            self.keep.plan(decision, self.costs, stage, rows, batches + test_batches)
        if decision.tier == "recompute":
            return
        name = f"train@{stage}"
        self.governor.hold(name, decision.tier, decision.bytes)
        self.target = BoundaryCache(
            name,
            stage,
            decision.tier,
            self.views,
            self.ctx.root,
            self.governor.release,
            decision.dtype,
        )
        self.target.streams.update(self.rebuild_streams.pop(stage, {}))  # after damage
        self.target.kept = self.keep.kept(stage)
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
        key = self.ctx.key("train", t.stage, stream, t.dtype)
        shape = self.costs[t.stage - 1].out_shape
        spec = self.ctx.spec(key, "train", t.stage, self.raw.num_train, shape, t.dtype)
        allowance = self._allowance(t) if t.tier in DISK_TIERS else None
        try:
            opened = self.ctx.open_view(t.tier, spec, epoch, allowance=allowance)
        except CacheUnavailableError as exc:  # kept; this epoch computes the prefix
            self._unreadable(epoch, t, exc, said=True)
            return
        except CacheAllocationError as exc:
            self._out_of_memory(epoch, t, exc)
            return
        except (CacheError, OSError) as exc:
            self._abandon(epoch, f"cannot open a writer for cache {key}: {exc}")
            return
        t.unavailable = 0  # "unreadable twice" means twice in a row
        if isinstance(opened, Reader):
            t.reuse_view(view, opened, stream)
            announce_reuse(opened, "training", t.stage, f"in epochs {epoch + 1}-{self.cfg.epochs}")
        else:
            t.begin_view(view, opened, stream)

    def _unreadable(
        self, epoch: int, t: BoundaryCache, exc: CacheUnavailableError, said: bool = False
    ) -> None:
        """A view of ``t`` could not be opened now (its cache is kept): its next epoch tries
        again; twice in a row, the boundary is given up (the cache stays on disk).
        ``said``: the ``unavailable`` event is recorded already (``CacheContext.reuse``)."""
        t.unavailable += 1
        if not said:
            self.ctx.event(epoch, "unavailable", stage=t.stage, detail=str(exc))
        if t.unavailable > 1:
            self._abandon(epoch, f"stage {t.stage}'s cache stays unreadable: {exc}")

    def _promote(self, epoch: int) -> None:
        assert self.target is not None
        if self.current is not None:
            self.current.supersede()
        self.current, self.target = self.target, None
        self.ctx.event(epoch, "complete", stage=self.current.stage, tier=self.current.tier)
        for reader in self.current.readers.values():  # the fixed prefix's, in memory: kept
            self.keep.offer(reader, "train", self.current.stage, epoch)
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
        # Unavailable (too many open files, no permission, a stalled read...): nothing says
        # the cache is bad, so it is kept and read again next epoch; this epoch ends on raw
        # data. Twice in a row, reading it is given up (its files stay on disk): a disk that
        # stays hung would otherwise cost IO_STALL_S every epoch to the end of the run.
        log.warning("%s: the rest of the epoch comes from raw data", exc)
        self.ctx.event(epoch, "unavailable", stage=source.stage, detail=str(exc))
        source.unavailable += 1
        if source.unavailable > 1:
            why = f"stage {source.stage}'s cache unreadable twice in a row; its files are kept"
            log.warning("not reading %s any more: %s", source.name, why)
            self.ctx.event(epoch, "abandoned", stage=source.stage, detail=why)
            source.close()
            if source is self.current:
                self.current = None
                self.test.close()
            if source is self.target:
                self.target = None

    def _corrupted(self, epoch: int, source: BoundaryCache, exc: CacheCorruptedError) -> None:
        """Never train on garbage: drop the boundary; rebuild it next epoch unless a
        boundary being written this epoch replaces it anyway."""
        log.warning(
            "cache %s is corrupted (%s): the rest of the epoch comes from raw data",
            exc.cache,
            exc.detail,
        )
        exc.root = self.ctx.root.path  # the purge hint names this run's --cache-dir
        self.ctx.event(epoch, "corrupted", stage=source.stage, detail=str(exc))
        source.corrupt(str(exc))
        if source is self.current:
            self.current = None
            self.test.drop()
        if source is self.target:
            self.target = None
        if self.target is None and self._readable(epoch + 1):
            self.plan[epoch + 1] = source.stage
            # Rebuilt in the augmentation streams of the views it replaces: the same rows,
            # so the same keys (the next run finds it) and the same numbers as a clean run.
            self.rebuild_streams[source.stage] = dict(source.streams)
