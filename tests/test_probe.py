"""The timing probe (prefast/caching/probe.py): what a stage's figure is made of."""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from prefast.caching.probe import PREFIX_ROWS, measure_stage_costs, typical, whole_batch
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


class RowClock(nn.Module):
    """A stage whose forward takes ``per_row`` seconds a row plus ``per_call`` a call, and
    records how many rows each call saw."""

    def __init__(self, per_row: float = 1e-3, per_call: float = 0.0) -> None:
        super().__init__()
        self.per_row, self.per_call = per_row, per_call
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        time.sleep(self.per_row * x.shape[0] + self.per_call)
        return x


def test_a_fixed_prefix_is_timed_on_a_few_rows_and_priced_for_the_whole_batch():
    # Planning a fine-tune ran the whole prefix on a whole batch (ResNet-50 at 128 px on 2
    # cores: 4.5 s of the plan); its stages are now timed on PREFIX_ROWS rows, scaled.
    prefix = [RowClock() for _ in range(3)]
    head = RowClock()
    model = StagedModel([*prefix, head])
    costs = measure_stage_costs(model, torch.randn(64, 8), tried=(), frozen=3)
    assert all(s.seen == [PREFIX_ROWS] for s in prefix)  # one call each, a few rows
    assert set(head.seen) == {64}  # a trainable stage is timed on a whole batch
    for c in costs[:3]:  # 16 ms measured, priced as the 64 ms a batch takes
        assert 0.064 <= c.fwd_s < 0.2
    assert costs[3].fwd_s >= 0.064


def test_a_short_prefix_stage_is_timed_on_a_whole_batch_not_scaled():
    # A stage of 3 ms a call whatever its rows: scaled from 16 rows it would read 12 ms, and
    # a cheap early stage priced dearer is a boundary planned where it does not pay.
    short = RowClock(per_row=0.0, per_call=3e-3)
    model = StagedModel([short, RowClock(per_row=0.0), RowClock(per_row=0.0)])
    costs = measure_stage_costs(model, torch.randn(64, 8), tried=(), frozen=2)
    assert short.seen[0] == PREFIX_ROWS and set(short.seen[1:]) == {64}
    assert 3e-3 <= costs[0].fwd_s < 8e-3


def test_a_run_probes_its_fixed_prefix_as_plan_does(tmp_path, monkeypatch):
    # A run's probe is handed the schedule's fixed prefix, so its kept figures (which the
    # next process and `prefast plan` take) are timed as plan times them.
    from prefast import TrainConfig, train
    from prefast.caching import probe

    asked: list[int] = []
    original = probe.measure_stage_costs

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(kwargs.get("frozen", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(probe, "measure_stage_costs", recording)
    cfg = TrainConfig(dataset="digits", model="densenet-bc", depth=10, epochs=2, device="cpu",
                      freeze_prefix=2, cache_dir=str(tmp_path))  # fmt: skip
    train(cfg)
    assert asked == [2]


def test_a_whole_batch_of_repeated_rows_keeps_the_memory_format():
    # The stage after a prefix is timed on a whole batch of the prefix's few rows; on a GPU
    # the model runs channels_last, and an NCHW batch would time other kernels.
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    whole = whole_batch(x, 40)
    assert whole.shape == (40, 3, 8, 8)
    assert whole.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(whole[16:32], x)
