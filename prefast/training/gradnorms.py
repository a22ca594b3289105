"""Per-stage gradient norms for ``--freeze auto``, summed on the training device.

After each backward pass :meth:`GradNormMeter.add` adds every trainable stage's
gradient norm (the L2 norm over all its parameters' gradients) to a device vector,
with a few device ops and no read back; :meth:`GradNormMeter.take` reads the
vector once, at the end of an evaluation interval, and starts the next. The rule
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
    def __init__(self, model: StagedModel, device: torch.device):
        self.model = model
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

    def take(self) -> list[float]:
        """The interval's sums, read from the device (once per interval), and a fresh start."""
        values = to_host(self.sums).tolist()
        self.sums.zero_()
        return values

    def state(self) -> list[float]:
        """The sums of the interval in progress (a checkpoint's; a read of the device)."""
        return to_host(self.sums).tolist()

    def load_state(self, values: list[float]) -> None:
        self.sums = torch.tensor(values, dtype=self.wide).to(self.device)


def decide_freezes(
    rule: AutoFreezeSchedule | None,
    meter: GradNormMeter | None,
    dist: distributed.Dist,
    it: int,
    batches_per_epoch: int,
) -> None:
    """The end of an interval, between steps: read the summed norms once, average them over
    the ranks (DDP made them equal; every rank must take the same decision) and let the rule
    freeze; the trainer's next step applies it."""
    assert rule is not None and meter is not None
    norms = meter.take()
    if dist.enabled:
        norms = [v / dist.world for v in distributed.all_sum(dist, *norms)]
    decision = rule.decide(it, norms)
    if decision and dist.is_main:
        stages = decision["stages"]
        log.info(
            "iteration %d (epoch %d): --freeze auto froze stage%s %s (gradient-norm change "
            "below %.4g, the %gth percentile)",
            it, it // batches_per_epoch + 1, "s" if len(stages) > 1 else "",
            ", ".join(map(str, stages)), decision["threshold"], rule.percentile,
        )  # fmt: skip
