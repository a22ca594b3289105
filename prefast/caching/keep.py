"""A fixed prefix's cache outlives its run: found in any persistent tier, kept on disk.

A sweep (several ``prefast train`` processes over one frozen backbone,
``--freeze-prefix``) pays for the prefix once only when its cache outlives the
process that wrote it. Under ``--cache-tier auto`` such a boundary usually fits
RAM (or GPU memory), which dies with the run. So, for the fixed prefix only:

* ``existing``: before the governor picks a tier, a complete cache of the
  boundary's key in a disk tier (an earlier run's) is taken as it is and read
  from the first epoch, in whatever disk tier it is.
* ``KeepBehind``: when the boundary lands in memory, each of its complete
  caches (the training view, the test set) is copied to the disk tier the
  governor would give it, on a background thread while memory serves this run.
  The copy is priced like any boundary: kept only when reading it from disk
  beats computing the prefix and one later run of this length pays its write
  back, within ``--max-disk``. A run that cannot keep one says so once.

Deeper boundaries (progressive freezing past the fixed prefix) are not kept:
their prefix has trained weights that no other run shares.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from prefast.caching.cachectx import DISK_TIERS, CacheContext
from prefast.caching.costmodel import prefix_seconds
from prefast.caching.governor import Decision, lossy_candidates
from prefast.caching.spill import copy_rows
from prefast.errors import CacheError, CacheExistsError, CacheLockedError
from prefast.store import Reader, encoding
from prefast.store.memory import MemoryReader

if TYPE_CHECKING:
    from prefast.caching.costmodel import StageCost
    from prefast.config import TrainConfig

log = logging.getLogger("prefast.caching.materialize")
# One line each on the console (the CLI shows this logger's INFO): a reused cache, a kept one.
notice = logging.getLogger("prefast.notice")


def announce_reuse(reader: Reader, split: str, stage: int, spares: str) -> None:
    """The console's one line for a reused cache: key, tier, rows, what it spares."""
    spec = reader.spec
    notice.info(
        "reusing cache %s (%s, %s %s rows, %s): stages 0-%d are not computed %s",
        spec.key[:12], reader.tier, f"{spec.rows:,}", split, spec.dtype,
        stage - 1, spares,
    )  # fmt: skip


def existing(
    ctx: CacheContext,
    cfg: TrainConfig,
    costs: list[StageCost],
    rows: tuple[int, int],
    batches_per_epoch: float,
    where: tuple[int, int | None, str],
) -> Decision | None:
    """A complete disk cache of the boundary ``where`` = (stage, augmentation stream, dtype),
    an earlier run's, in any disk tier, as the governor's decision, when reading it beats
    computing the prefix; None when there is none to take (or ``--cache-tier`` names a
    tier: ``cachectx.reuse`` looks there). ``batches_per_epoch``: training and test."""
    stage, stream, dtype = where
    if cfg.cache_tier != "auto":
        return None
    prefix = ctx.model.prefix_digest(stage)  # one hash for every key looked up here
    for d in dict.fromkeys((dtype, *lossy_candidates(cfg.cache_dtype))):
        key = ctx.key("train", stage, stream, d, prefix)
        if not ctx.root.is_complete(key):
            continue
        try:
            marker = ctx.root.marker(key)
        except (OSError, ValueError, CacheError):  # unreadable: not taken here (reuse sorts it)
            continue
        tier = marker.get("tier")
        if tier not in DISK_TIERS:
            continue
        view = ctx.root.usage(key)
        test_key = ctx.key("test", stage, None, d, prefix)
        test = ctx.root.usage(test_key) if ctx.root.is_complete(test_key) else 0
        # Priced as any boundary: one epoch's read against computing the prefix for it.
        prefix_s = prefix_seconds(costs, stage, batches_per_epoch)
        logical = sum(rows) * encoding.row_bytes(costs[stage - 1].out_shape, d)
        read_s = logical / ctx.governor.bandwidths.of(tier, view < logical)[1]
        if read_s >= prefix_s > 0:
            log.info(
                "not reading cache %s: %.3gs to read vs %.3gs to compute", key, read_s, prefix_s
            )
            continue
        why = (
            f"a complete {tier} cache of an earlier run ({key[:12]}): an epoch reads in "
            f"~{read_s:.3g}s vs {prefix_s:.3g}s to compute"
        )
        return Decision(tier, view + test, why, view_bytes=view, dtype=d)
    return None


class KeepBehind:
    """Copies the fixed prefix's memory caches to disk for later runs, behind this one.

    ``prefix``: the stages frozen from the first iteration (the schedule's); only the
    boundary after them is kept (deeper ones hold trained stages no other run shares),
    and, superseded, its disk caches stay (``kept``) whatever the tier. Copies are made
    only under ``--cache-tier auto`` with one view per boundary.
    """

    def __init__(self, ctx: CacheContext, cfg: TrainConfig, prefix: int, views: int):
        self.ctx, self.cfg, self.prefix = ctx, cfg, prefix
        self.enabled = prefix > 0 and cfg.cache_tier == "auto" and views == 1
        self.stage: int | None = None  # the fixed prefix's boundary, once decided
        self.tier: str | None = None  # where its copies go (None: not kept)
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()  # a run that ended early: copies abort

    def kept(self, stage: int) -> bool:
        """The fixed prefix's boundary: its disk caches outlive the run when superseded."""
        return self.prefix > 0 and stage == self.prefix

    def plan(
        self,
        decision: Decision,
        costs: list[StageCost],
        stage: int,
        rows: tuple[int, int],
        batches_per_epoch: float,
    ) -> None:
        """The fixed prefix's boundary was decided: keep a disk copy if it lands in memory
        and a copy pays; say once when the cache will not outlive the run."""
        if not self.enabled or self.stage is not None or stage != self.prefix:
            return
        self.stage = stage
        if decision.tier in DISK_TIERS:  # persistent already, or an earlier run's copy
            return
        governor = self.ctx.governor
        if decision.tier == "recompute":
            return  # the boundary event says why; nothing is cached to keep
        disk = governor.choose_boundary(
            costs, stage, decision.dtype, rows, 1, batches_per_epoch, below="ram", quiet=True
        )
        epochs = self.cfg.epochs
        prefix_s = prefix_seconds(costs, stage, batches_per_epoch) * epochs
        if disk.tier in DISK_TIERS:
            write_bw, read_bw = governor.bandwidths.of(disk.tier, disk.bytes < decision.bytes)
            logical = decision.bytes
            cost_s = logical / write_bw + epochs * logical / read_bw
            if cost_s < prefix_s:
                self.tier = disk.tier
                governor.hold(f"keep@{stage}", disk.tier, disk.bytes)
                self.ctx.event(0, "keep", stage=stage, tier=disk.tier, bytes=disk.bytes)
                notice.info(
                    "the cache of stages 0-%d lives in %s for this run; a copy is kept on disk "
                    "(%s, %.1f MiB) for later runs with this prefix",
                    stage - 1, decision.tier, disk.tier, disk.bytes / 2**20,
                )  # fmt: skip
                return
            why = (
                f"writing it and reading it back ({cost_s:.3g}s) would not beat computing "
                f"the prefix ({prefix_s:.3g}s) in a later run"
            )
        else:
            why = disk.reason
        self.ctx.event(0, "not_kept", stage=stage, tier=decision.tier, detail=why)
        notice.info(
            "the cache of stages 0-%d lives in %s and will not outlive this run (%s); "
            "--cache-tier zarr keeps it on disk anyway",
            stage - 1, decision.tier, why,
        )  # fmt: skip

    def offer(self, reader: Reader, split: str, stage: int, epoch: int | None) -> None:
        """A complete cache of the fixed prefix: copied to disk on a thread of its own."""
        if self.tier is None or stage != self.stage or reader.tier in DISK_TIERS:
            return
        if not isinstance(reader, MemoryReader) or self.ctx.root.is_complete(reader.spec.key):
            return  # another run kept it first
        # Its own reader over the same tensors: the run may close its reader meanwhile. The
        # disk room is read here, on the thread that holds and releases ledger entries.
        own = MemoryReader(reader.spec, reader.acts, reader.labels, reader.row_ids, reader.tier)
        governor = self.ctx.governor
        allowance = (
            max(0, governor.room("disk")) + governor.ledger.get(f"keep@{stage}", (self.tier, 0))[1]
        )
        thread = threading.Thread(
            target=self._copy, args=(own, split, epoch, allowance), name="prefast-keep",
            daemon=True,
        )  # fmt: skip
        thread.start()
        self.threads.append(thread)

    def _copy(self, reader: MemoryReader, split: str, epoch: int | None, allowance: int) -> None:
        key, tier = reader.spec.key, self.tier
        assert tier is not None
        try:
            writer = self.ctx.writer(tier, reader.spec, allowance=allowance)
            with writer:  # aborts on error, and when the run stops early
                copy_rows(reader, writer, self.stop)
                writer.finish().close()
        except (CacheExistsError, CacheLockedError) as exc:  # another process keeps it
            self.ctx.event(epoch, "not_kept", split=split, key=key, detail=str(exc))
            log.info("the %s cache %s is kept by another process: %s", split, key, exc)
            return
        except Exception as exc:  # a full disk, a failed write, a stop: nothing kept, said
            self.ctx.event(epoch, "not_kept", split=split, key=key, detail=str(exc))
            log.warning("the %s cache %s was not kept on disk: %s", split, key, exc)
            return
        self.ctx.event(epoch, "kept", split=split, key=key, tier=tier)

    def close(self, finished: bool) -> None:
        """A run that ``finished`` waits for its copies (it ends with its kept caches
        complete); one that stopped early (an error, Ctrl-C, SIGTERM) aborts them."""
        if not finished:
            self.stop.set()
        elif any(t.is_alive() for t in self.threads):
            notice.info("finishing the disk copy of the cache for later runs ...")
        for t in self.threads:
            t.join()
        self.threads = []
        if self.tier is not None and self.stage is not None:
            self.ctx.governor.release(f"keep@{self.stage}")
