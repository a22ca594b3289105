"""The run's optimizer: one SGD parameter group per stage, so a frozen stage leaves it."""

from __future__ import annotations

import torch

from prefast.models import StagedModel


def make_optimizer(model: StagedModel, lr: float) -> torch.optim.SGD:
    groups = [{"params": list(s.parameters()), "stage": i} for i, s in enumerate(model.stages)]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def drop_from_optimizer(opt: torch.optim.Optimizer, stages: list[int]) -> None:
    """Remove frozen stages' parameter groups and their momentum buffers."""
    for group in [g for g in opt.param_groups if g["stage"] in stages]:
        for p in group["params"]:
            opt.state.pop(p, None)
        opt.param_groups.remove(group)
