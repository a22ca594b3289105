"""--freeze auto's boundaries, planned when the rule freezes (``PrefastFeed.begin_epoch``)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import prefast.distributed as distributed
from prefast.caching.costmodel import Boundary, boundary_value
from prefast.caching.pricing import pricer_for
from prefast.freezing.adaptive import AutoFreezeSchedule

if TYPE_CHECKING:
    from prefast.caching.transitions import BoundaryTransitions

log = logging.getLogger("prefast.caching.materialize")


def plan_online(self: BoundaryTransitions, epoch: int, frozen_prefix: int, first: bool) -> None:
    """--freeze auto, at an epoch start: record the rule's freezes since the last one,
    then decide, now, whether a boundary at the deeper frozen prefix pays for the epochs
    left (the cost model's question, asked late); if it does, it is planned for this
    epoch and the governor picks its tier and dtype as for any boundary; if not, an event
    says why and the prefix is computed to the end."""
    bpe = self.raw.batches_per_epoch
    assert isinstance(self.schedule, AutoFreezeSchedule)  # called for --freeze auto alone
    decisions = self.schedule.decisions
    if first:  # a resumed run tells the decisions of the epoch before it, as it would have
        self.freezes_told = sum(1 for d in decisions if d["iter"] <= (epoch - 1) * bpe)
        self.considered = self.schedule.frozen_prefix(max(0, (epoch - 1) * bpe))
    for d in decisions[self.freezes_told :]:
        self.ctx.event(
            (d["iter"] - 1) // bpe,  # the epoch whose step ended the interval
            "frozen",
            stages=d["stages"],
            iter=d["iter"],
            threshold=d["threshold"],
            rates=d["rates"],
        )
    self.freezes_told = len(decisions)
    considered = self.considered or 0
    self.considered = max(considered, frozen_prefix)
    have = max(
        [0, *(b.stage for b in (self.current, self.target) if b is not None)]
        + [s for e, s in self.plan.items() if e >= epoch]
    )
    decided: tuple[bool, str, Boundary] | None = None  # plan it?, why not, priced how
    if max(have, considered) < frozen_prefix < len(self.costs):
        decided = _decide(self, epoch, frozen_prefix)
    # Every rank takes the main rank's decision: a tier's price depends on its free memory.
    decided = distributed.broadcast(self.dist, decided)
    if decided is None:
        return
    take, why, value = decided
    self.considered_boundaries.append(replace(value, taken=take, why=why or "it pays"))
    if take:
        self.plan[epoch] = self.planned[epoch] = frozen_prefix
        return
    log.info("epoch %d: stage %d's prefix is not cached: %s", epoch + 1, frozen_prefix, why)
    self.ctx.event(epoch, "not_cached", stage=frozen_prefix, reason=why)


def _decide(
    self: BoundaryTransitions, epoch: int, frozen_prefix: int
) -> tuple[bool, str, Boundary]:
    """Whether a boundary at ``frozen_prefix`` pays from ``epoch`` on, priced in the tier
    it would land in; why not, if it does not."""
    bpe = self.raw.batches_per_epoch
    cached = self.current.stage if self.current is not None else 0
    price = pricer_for(self.governor, self.cfg, self.raw, self.costs, self.ctx.dtype, self.views)
    value = boundary_value(
        self.costs, cached, frozen_prefix, epoch, self.cfg.epochs, bpe, self.raw.num_train,
        price=price(frozen_prefix), views=self.views,
    )  # fmt: skip
    left = self.cfg.epochs - epoch - 1
    if not self._readable(epoch):
        return (
            False,
            (
                f"too late: {left} epoch(s) left, and a boundary of {self.views} view(s) "
                "written from now would have no epoch left to read it"
            ),
            value,
        )
    if self.cfg.cache_boundaries == "every" or value.saving_s > value.cost_s:
        return True, "", value
    if value.tier == "recompute":
        return False, f"no tier takes it ({value.reason})", value
    return (
        False,
        (
            f"too late to pay: over the {left} epoch(s) left it would save "
            f"{value.saving_s:.3g} s of stage {cached}..{frozen_prefix - 1} compute, and "
            f"writing and reading it in {value.tier} would cost {value.cost_s:.3g} s"
        ),
        value,
    )
