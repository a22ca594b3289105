"""Cost model and boundary planner: pure functions of measured per-stage costs.

No torch here. The probe (``prefast/caching/probe.py``) measures :class:`StageCost`
values; everything below only does arithmetic on them, so it is tested
against hand-computed numbers.

The ideal cost model charges each iteration the measured time of what it must
compute and nothing else:

- baseline:  forward + backward of every stage
- freezeout: forward only of the frozen prefix, forward + backward of the rest
- prefast:   like freezeout, minus the forward of the materialized prefix

Measured / predicted is then the overhead of everything the model ignores
(materialization writes, cache reads, the loader, Python).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from prefast.config import BOUNDARY_POLICIES


class Schedule(Protocol):
    """What the planner needs of a FreezeOut schedule."""

    @property
    def num_stages(self) -> int: ...

    def frozen_prefix(self, it: int) -> int: ...


@dataclass(frozen=True)
class StageCost:
    fwd_s: float  # forward, eval mode, no grad, one training batch
    fwd_bwd_s: float  # forward + backward, train mode, one training batch (NaN: not measured)
    out_row_bytes: int  # bytes of one sample's output at float32
    out_shape: tuple[int, ...]
    compress_ratio: float = 1.0  # zstd-1 on the output in the cache dtype (trial on one batch)
    # (dtype, relative reconstruction error, zstd-1 ratio) of each dtype tried on that batch
    trials: tuple[tuple[str, float, float], ...] = ()  # the run's dtype: compress_ratio

    def error(self, dtype: str) -> float | None:
        """Relative error of storing this output in ``dtype`` (None: not measured)."""
        return next((err for d, err, _ in self.trials if d == dtype), None)

    def ratio(self, dtype: str) -> float:
        """zstd-1 ratio of this output stored in ``dtype`` (the run's own if not tried)."""
        return next((r for d, _, r in self.trials if d == dtype), self.compress_ratio)


@dataclass(frozen=True)
class TierPrice:
    """Where a boundary would be stored and what moving its rows costs there: the tier and
    dtype the governor would give it, at that tier's measured bandwidths
    (``prefast/caching/pricing.py``). ``recompute``: no tier takes it; it is not planned."""

    tier: str
    dtype: str
    row_bytes: int  # one training row as stored (the dtype's bytes, before compression)
    write_bw: float  # bytes/s, logical
    read_bw: float
    bytes: int = 0  # what the tier would hold: every view and the test set (zarr: compressed)
    reason: str = ""  # the governor's


# Every boundary's price before tiers had their own: float32 rows at disk speeds. Used
# where no pricing is given (a test of the arithmetic alone).
DISK_WRITE_BW, DISK_READ_BW = 300e6, 1e9


@dataclass(frozen=True)
class Boundary:
    epoch: int  # materialized during this epoch, read from the next
    stage: int  # number of frozen stages before the boundary
    row_bytes: int  # per sample, as stored
    saving_s: float
    cost_s: float
    tier: str = ""  # where it was priced ("" : at disk speeds, no tier asked)
    dtype: str = ""
    bytes: int = 0
    reason: str = ""
    taken: bool = False  # planned (``plan_boundaries``'s candidates record the others too)
    why: str = ""  # why it was or was not planned


class Pricing(Protocol):
    """``stage -> TierPrice`` for the next candidate, and ``take``: a planned boundary
    now holds its tier's bytes (the next candidate is priced next to it)."""

    def __call__(self, stage: int) -> TierPrice: ...

    def take(self, stage: int, price: TierPrice) -> None: ...


def plan_boundaries(
    schedule: Schedule,
    batches_per_epoch: int,
    epochs: int,
    costs: list[StageCost],
    rows: int,
    write_bw: float = DISK_WRITE_BW,
    read_bw: float = DISK_READ_BW,
    policy: str = "auto",
    views: int = 1,
    price: Pricing | None = None,
    considered: list[Boundary] | None = None,
) -> list[Boundary]:
    """Epoch starts where materializing the frozen prefix pays for itself.

    Stages that freeze within one epoch share one materialization because
    boundaries are only taken at epoch starts. With ``policy="auto"`` a
    candidate is kept when the prefix compute it saves over the remaining
    epochs exceeds the cost of writing the cache once and reading it every
    remaining epoch, priced by ``price`` in the tier it would land in (without one:
    float32 rows at ``write_bw``/``read_bw``); ``policy="every"`` keeps every candidate
    (a plan that does not depend on timing: tests, and users who know better). A
    boundary of ``views`` augmented views is read only once all of them are written, so
    it is planned only where at least one epoch is left to read it. ``considered``
    collects every candidate, planned or not, with why.
    """
    if policy not in BOUNDARY_POLICIES:
        raise ValueError(f"boundary policy {policy!r}: choose one of {BOUNDARY_POLICIES}")
    chosen: list[Boundary] = []
    last = 0
    for epoch in range(epochs - views):  # epochs e..e+views-1 write; a later one reads
        p = schedule.frozen_prefix(epoch * batches_per_epoch)
        if p <= last or p >= schedule.num_stages:
            continue
        tier = price(p) if price is not None else None
        b = boundary_value(
            costs, last, p, epoch, epochs, batches_per_epoch, rows, write_bw, read_bw, tier, views
        )
        if policy == "every":
            b = replace(b, taken=True, why="cache_boundaries='every' plans every boundary")
        elif b.saving_s > b.cost_s:
            b = replace(b, taken=True, why="it saves more than it costs")
        elif tier is not None and tier.tier == "recompute":
            b = replace(b, why=f"no tier takes it: {tier.reason}")
        else:
            b = replace(
                b, why="writing it and reading it every epoch left costs more than it saves"
            )
        if considered is not None:
            considered.append(b)
        if b.taken:
            chosen.append(b)
            last = p
            if price is not None and tier is not None:
                price.take(p, tier)
    return chosen


def boundary_value(
    costs: list[StageCost],
    cached: int,
    stage: int,
    epoch: int,
    epochs: int,
    batches_per_epoch: int,
    rows: int,
    write_bw: float = DISK_WRITE_BW,
    read_bw: float = DISK_READ_BW,
    price: TierPrice | None = None,
    views: int = 1,
) -> Boundary:
    """What a boundary at ``stage`` materialized during ``epoch`` saves and costs over the
    epochs left, when stages ``0..cached-1`` are cached already: the forward of stages
    ``cached..stage-1`` in every later epoch, against writing the cache once and reading
    it every later epoch, at ``price``'s tier and dtype (without one: float32 rows at
    ``write_bw``/``read_bw``). The same freeze saves less the later it comes: ``--freeze
    auto`` asks this when a stage freezes (``plan_boundaries`` for every planned epoch)."""
    # ``views`` epochs write one view each, computing the prefix; the epochs after read
    remaining = epochs - epoch - views
    saving = remaining * batches_per_epoch * sum(c.fwd_s for c in costs[cached:stage])
    if price is None:
        row_bytes = costs[stage - 1].out_row_bytes
        cost = rows * row_bytes / write_bw + remaining * rows * row_bytes / read_bw
        return Boundary(epoch, stage, row_bytes, saving, cost)
    row_bytes, nbytes = price.row_bytes, rows * price.row_bytes
    cost = math.inf
    if price.tier != "recompute":
        cost = views * nbytes / price.write_bw + remaining * nbytes / price.read_bw
    return Boundary(
        epoch, stage, row_bytes, saving, cost, price.tier, price.dtype, price.bytes, price.reason
    )


def prefix_seconds(costs: list[StageCost], stage: int, batches: float) -> float:
    """Forward time of stages ``0..stage-1`` over ``batches`` batches."""
    return batches * sum(c.fwd_s for c in costs[:stage])


def predict_epochs(
    mode: str,
    schedule: Schedule,
    batches_per_epoch: int,
    epochs: int,
    costs: list[StageCost],
    boundaries: list[Boundary],
    eval_batches: float = 0.0,
) -> list[dict[str, float]]:
    """Ideal ``train_s`` and ``eval_s`` of each epoch of ``mode`` (no I/O, no overhead)."""
    fwd = [c.fwd_s for c in costs]
    fb = [c.fwd_bwd_s for c in costs]
    out = []
    for epoch in range(epochs):
        cached = max((b.stage for b in boundaries if b.epoch < epoch), default=0)
        if mode != "prefast":
            cached = 0
        train = 0.0
        for b in range(batches_per_epoch):
            it = epoch * batches_per_epoch + b
            f = getattr(schedule, "prefix", 0) if mode == "baseline" else schedule.frozen_prefix(it)
            train += sum(fwd[cached:f]) + sum(fb[max(f, cached) :])
        # The test set is read from the cache once the boundary exists.
        out.append({"train_s": train, "eval_s": eval_batches * sum(fwd[cached:])})
    return out
