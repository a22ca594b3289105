"""The timing probe (prefast/caching/probe.py): what a stage's figure is made of."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from prefast.caching.probe import measure_stage_costs, typical
from prefast.models.staged import StagedModel


def test_a_figure_is_the_median_of_its_calls_after_the_warm_up():
    # Warm-up 9 ms, then 1, 5 and 2 ms: the figure is 2 ms. A minimum (what the probe took
    # before) said 1 ms: one lucky call, and a forward reported above its forward+backward.
    figures = iter([9e-3, 1e-3, 5e-3, 2e-3])
    assert typical(lambda: next(figures), reps=3) == 2e-3
    # reps 0 (a fixed prefix's stage, timed once): the first call is the figure.
    assert typical(lambda: 7e-3, reps=0) == 7e-3
    # A call past LONG_S ends the timing: its noise is a small part of it.
    calls = itertools.count()
    figures = iter([0.01, 0.06, 0.001, 0.001])
    assert typical(lambda: (next(calls), next(figures))[1], reps=3) == 0.06
    assert next(calls) == 2


def test_no_stage_reports_a_forward_above_its_forward_and_backward():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(5)]
    model = StagedModel([*stages, nn.Flatten(), nn.Linear(32, 4)])
    costs = measure_stage_costs(model, torch.randn(64, 32), tried=())
    for cost in costs:  # tiny stages: a few microseconds each, where noise is largest
        assert 0 < cost.fwd_s <= cost.fwd_bwd_s
    frozen = measure_stage_costs(model, torch.randn(64, 32), tried=(), frozen=5)
    assert all(c.fwd_bwd_s != c.fwd_bwd_s for c in frozen[:5])  # NaN: no backward timed
    assert frozen[-1].fwd_bwd_s >= frozen[-1].fwd_s


def test_a_remembered_prefix_digest_follows_every_change_of_the_weights():
    # A run keys the same frozen prefix several times, so the digest is remembered; a stale
    # one would be a silent wrong cache key (another model's rows read as this one's).
    import copy
    import io

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(3)]
    model = StagedModel([*stages, nn.Linear(8, 2)])
    seen = {model.prefix_digest(3)}
    assert model.prefix_digest(3) in seen
    with torch.no_grad():  # an optimizer step: in place
        model.stages[1][0].weight.add_(1e-3)
    seen.add(model.prefix_digest(3))
    model.train()
    model.stages[2](torch.randn(4, 8))  # BatchNorm's running statistics move
    seen.add(model.prefix_digest(3))
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()
                           if v.is_floating_point()}, strict=False)  # fmt: skip
    seen.add(model.prefix_digest(3))
    model.stages[0][0].weight.data = torch.zeros(8, 8)  # the storage swapped
    seen.add(model.prefix_digest(3))
    assert len(seen) == 5
    twin = copy.deepcopy(model)  # a copy has tensors of its own: its digest is its own
    with torch.no_grad():
        twin.stages[0][0].bias.add_(1.0)
    assert twin.prefix_digest(3) != model.prefix_digest(3)
    torch.save(model, io.BytesIO())  # the memo never travels with the model
