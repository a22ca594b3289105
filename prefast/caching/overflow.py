"""The transition of a view whose stored values no cache keeps (``fits.py`` says which):
``PrefastFeed.end_epoch`` calls it before the view would be marked complete; and what
such a view tells when the loss diverged (``PrefastFeed.input_fault``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefast.caching.boundary import State
from prefast.caching.fits import Unfit, not_cached_fix, wider_dtype

if TYPE_CHECKING:
    from prefast.caching.boundary import BoundaryCache
    from prefast.caching.transitions import BoundaryTransitions

log = logging.getLogger("prefast.caching.materialize")


def not_kept(self: BoundaryTransitions, epoch: int, t: BoundaryCache, unfit: Unfit) -> None:
    """The view of ``t`` being written holds values no cache keeps: give it up. Values that
    only overflowed its dtype: under ``--cache-dtype auto`` the boundary is written again
    from the next epoch in a dtype that holds them (``dtype_changed``), else it is not
    cached (``not_cached``). Values the prefix computed as NaN or inf: abandoned."""
    detail = unfit.detail(t.stage, t.dtype, "training")
    if not unfit.only_overflow:  # the prefix's own output: no dtype helps
        self.prefix_fault = detail  # what a loss that diverges later is told (input_fault)
        self._abandon(epoch, detail)
        return
    wider = wider_dtype(t.dtype, self.cfg.cache_dtype)
    t.abandon(detail)
    self.target = None
    if wider is not None and self._readable(epoch + 1):
        self.wider[t.stage] = wider
        self.plan[epoch + 1] = max(self.plan.get(epoch + 1, 0), t.stage)
        why = f"{detail}; written again as {wider} from epoch {epoch + 2}"
        self.ctx.event(epoch, "dtype_changed", stage=t.stage, split="train", dtype=t.dtype,
                       to=wider, values=unfit.overflowed, detail=why)  # fmt: skip
    else:
        fix = "no epoch is left to write it again" if wider is not None else not_cached_fix()
        why = f"{detail}; not cached: {fix}"
        self.ctx.event(epoch, "not_cached", stage=t.stage, split="train", dtype=t.dtype,
                       values=unfit.overflowed, reason=why)  # fmt: skip
    log.warning("epoch %d: %s", epoch + 1, why)


def input_fault(self: BoundaryTransitions) -> str | None:
    """Why the loss diverged, where the feed knows: the view being written found the
    frozen prefix computing NaN or inf (or an earlier view did, and the prefix has been
    computed since), or a 16-bit cache overflowed where the step (under autocast) takes
    the cache's own dtype. Values that only overflowed the cache dtype otherwise never
    reach the step (``fits.mend``)."""
    t = self.target
    if t is not None and t.state is State.WRITING:
        unfit = Unfit.read(t.signs)
        detail = unfit.detail(t.stage, t.dtype, "training")
        if unfit.unmended:
            return (
                f"the cache dtype, not the learning rate: {detail}, and under autocast the "
                f"step takes {t.dtype} too: pass --cache-dtype bfloat16 or auto"
            )
        if unfit and not unfit.only_overflow:
            return f"the frozen prefix, not the learning rate: {detail}"
    if self.prefix_fault is not None:
        return f"the frozen prefix, not the learning rate: {self.prefix_fault}"
    return None
