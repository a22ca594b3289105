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

from dataclasses import dataclass
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
class Boundary:
    epoch: int  # materialized during this epoch, read from the next
    stage: int  # number of frozen stages before the boundary
    row_bytes: int  # per sample at float32
    saving_s: float
    cost_s: float


def plan_boundaries(
    schedule: Schedule,
    batches_per_epoch: int,
    epochs: int,
    costs: list[StageCost],
    rows: int,
    write_bw: float = 300e6,
    read_bw: float = 1e9,
    policy: str = "auto",
    views: int = 1,
) -> list[Boundary]:
    """Epoch starts where materializing the frozen prefix pays for itself.

    Stages that freeze within one epoch share one materialization because
    boundaries are only taken at epoch starts. With ``policy="auto"`` a
    candidate is kept when the prefix compute it saves over the remaining
    epochs exceeds the cost of writing the cache once and reading it every
    remaining epoch; ``policy="every"`` keeps every candidate (a plan that does
    not depend on timing: tests, and users who know better). A boundary of
    ``views`` augmented views is read only once all of them are written, so it is
    planned only where at least one epoch is left to read it.
    """
    if policy not in BOUNDARY_POLICIES:
        raise ValueError(f"boundary policy {policy!r}: choose one of {BOUNDARY_POLICIES}")
    chosen: list[Boundary] = []
    last = 0
    for epoch in range(epochs - views):  # epochs e..e+views-1 write; a later one reads
        p = schedule.frozen_prefix(epoch * batches_per_epoch)
        if p <= last or p >= schedule.num_stages:
            continue
        b = boundary_value(
            costs, last, p, epoch, epochs, batches_per_epoch, rows, write_bw, read_bw
        )
        if b.saving_s > b.cost_s or policy == "every":
            chosen.append(b)
            last = p
    return chosen


def boundary_value(
    costs: list[StageCost],
    cached: int,
    stage: int,
    epoch: int,
    epochs: int,
    batches_per_epoch: int,
    rows: int,
    write_bw: float = 300e6,
    read_bw: float = 1e9,
) -> Boundary:
    """What a boundary at ``stage`` materialized during ``epoch`` saves and costs over the
    epochs left, when stages ``0..cached-1`` are cached already: the forward of stages
    ``cached..stage-1`` in every later epoch, against writing the cache once and reading
    it every later epoch. The same freeze saves less the later it comes: ``--freeze auto``
    asks this when a stage freezes (``plan_boundaries`` for every planned epoch)."""
    remaining = epochs - epoch - 1
    row_bytes = costs[stage - 1].out_row_bytes
    saving = remaining * batches_per_epoch * sum(c.fwd_s for c in costs[cached:stage])
    cost = rows * row_bytes / write_bw + remaining * rows * row_bytes / read_bw
    return Boundary(epoch, stage, row_bytes, saving, cost)


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
