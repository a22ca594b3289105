"""Per-stage gradient norms for ``--freeze auto``, summed on the training device.

After each backward pass :meth:`GradNormMeter.add` adds every trainable stage's
gradient norm (the L2 norm over all its parameters' gradients) to a device vector,
with a few device ops and no read back; :meth:`GradNormMeter.after_step` reads the
vector once, at the end of an evaluation interval, between steps, lets the rule decide,
and starts the next. The rule
itself is ``prefast/freezing/adaptive.py``.
"""

from __future__ import annotations

import logging

import torch

import prefast.distributed as distributed
from prefast.freezing.adaptive import AutoFreezeSchedule
from prefast.models import StagedModel
from prefast.store.device import to_host

log = logging.getLogger("prefast")


class GradNormMeter:
    """The norms of one ``--freeze auto`` run, and its rule (the two are saved together)."""

    def __init__(self, model: StagedModel, device: torch.device, rule: AutoFreezeSchedule):
        self.model, self.rule = model, rule
        self.device = device
        # float64 where the device has it: an interval sums hundreds of norms
        self.wide = torch.float32 if device.type == "mps" else torch.float64
        self.sums = torch.zeros(model.num_stages, dtype=self.wide, device=device)
        self._layout: tuple[tuple[int, int], ...] | None = None  # (stage, param index) keys
        self._index: torch.Tensor | None = None  # each gradient's stage, on the device

    def add(self) -> None:
        """Add this step's per-stage gradient norms (call after backward, before the
        optimizer step). Device ops only: nothing is read back."""
        grads, layout = [], []
        for i in range(self.model.num_frozen, self.model.num_stages):
            for j, p in enumerate(self.model.stages[i].parameters()):
                if p.grad is not None:
                    grads.append(p.grad)
                    layout.append((i, j))
        if not grads:
            return
        key = tuple(layout)
        if key != self._layout:  # the trainable stages changed: upload their indices once
            stages = torch.tensor([i for i, _ in layout], dtype=torch.long)
            self._index, self._layout = stages.to(self.device), key
        assert self._index is not None
        squares = torch.stack(torch._foreach_norm(grads)).to(self.wide).square()
        per_stage = torch.zeros_like(self.sums).index_add_(0, self._index, squares)
        self.sums += per_stage.sqrt()

    def after_step(self, it: int, dist: distributed.Dist, batches_per_epoch: int) -> None:
        """Between steps, after ``it`` of them: at the end of an interval, read the sums once,
        average them over the ranks (DDP made them equal; every rank must take the same
        decision) and let the rule freeze; the trainer's next step applies it."""
        if not self.rule.due(it):
            return
        norms = to_host(self.sums).tolist()
        self.sums.zero_()
        if dist.enabled:
            norms = [v / dist.world for v in distributed.all_sum(dist, *norms)]
        decision = self.rule.decide(it, norms)
        if decision and dist.is_main:
            stages = decision["stages"]
            log.info(
                "iteration %d (epoch %d): --freeze auto froze stage%s %s (gradient-norm "
                "change below %.4g, the %gth percentile)",
                it, it // batches_per_epoch + 1, "s" if len(stages) > 1 else "",
                ", ".join(map(str, stages)), decision["threshold"], self.rule.percentile,
            )  # fmt: skip

    def state(self) -> dict:
        """The rule's decisions and the sums of the interval in progress (a checkpoint's;
        a read of the device)."""
        return {**self.rule.state(), "sums": to_host(self.sums).tolist()}

    def load_state(self, state: dict) -> None:
        """A checkpoint's: decided before, so repeated, never decided again."""
        self.rule.load_state(state)
        if "sums" in state:
            self.sums = torch.tensor(state["sums"], dtype=self.wide).to(self.device)


def meter_for(model: StagedModel, device: torch.device, schedule: object) -> GradNormMeter | None:
    """A meter for a ``--freeze auto`` run; None for any other schedule."""
    return (
        GradNormMeter(model, device, schedule) if isinstance(schedule, AutoFreezeSchedule) else None
    )
