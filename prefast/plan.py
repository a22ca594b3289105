"""Cost model and boundary planner (pure functions), plus the timing probe.

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
import time
from dataclasses import dataclass

import torch

from prefast.models import StagedModel
from prefast.schedule import FreezeOutSchedule


@dataclass(frozen=True)
class StageCost:
    fwd_s: float  # forward, eval mode, no grad, one training batch
    fwd_bwd_s: float  # forward + backward, train mode, one training batch
    out_row_bytes: int  # bytes of one sample's output at float32
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class Boundary:
    epoch: int  # materialized during this epoch, read from the next
    stage: int  # number of frozen stages before the boundary
    row_bytes: int  # per sample at float32
    saving_s: float
    cost_s: float


def plan_boundaries(
    schedule: FreezeOutSchedule,
    batches_per_epoch: int,
    epochs: int,
    costs: list[StageCost],
    rows: int,
    write_bw: float = 300e6,
    read_bw: float = 1e9,
) -> list[Boundary]:
    """Epoch starts where materializing the frozen prefix pays for itself.

    Stages that freeze within one epoch share one materialization because
    boundaries are only taken at epoch starts. A candidate is kept when the
    prefix compute it saves over the remaining epochs exceeds the cost of
    writing the cache once and reading it every remaining epoch.
    """
    chosen: list[Boundary] = []
    last = 0
    for epoch in range(1, epochs - 1):  # the last epoch has no later epoch to serve
        p = schedule.frozen_prefix(epoch * batches_per_epoch)
        if p <= last or p >= schedule.num_stages:
            continue
        remaining = epochs - epoch - 1
        row_bytes = costs[p - 1].out_row_bytes
        saving = remaining * batches_per_epoch * sum(c.fwd_s for c in costs[last:p])
        cost = rows * row_bytes / write_bw + remaining * rows * row_bytes / read_bw
        if saving > cost:
            chosen.append(Boundary(epoch, p, row_bytes, saving, cost))
            last = p
    return chosen


def predict_epochs(
    mode: str,
    schedule: FreezeOutSchedule,
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
            f = 0 if mode == "baseline" else schedule.frozen_prefix(epoch * batches_per_epoch + b)
            train += sum(fwd[cached:f]) + sum(fb[max(f, cached) :])
        # The test set is read from the cache once the boundary exists.
        out.append({"train_s": train, "eval_s": eval_batches * sum(fwd[cached:])})
    return out


def measure_stage_costs(
    model: StagedModel, x: torch.Tensor, reps: int = 3, backward: bool = True
) -> list[StageCost]:
    """Time each stage's forward (and forward+backward) on one batch ``x``.

    The planner needs only forward times; ``backward=False`` skips the backward
    passes (``fwd_bwd_s`` is then NaN), which makes the probe ~5x cheaper.
    """
    costs = []
    was_training = model.training
    for stage in model.stages:
        fwd_bwd = math.nan
        if backward:
            stage.train()
            inp = x.detach().requires_grad_(x.is_floating_point())
            times_fb = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                out = stage(inp)
                out.float().sum().backward()
                _sync(x)
                times_fb.append(time.perf_counter() - t)
            stage.zero_grad(set_to_none=True)
            fwd_bwd = min(times_fb[1:])
        stage.eval()
        times_f = []
        with torch.no_grad():
            for _ in range(reps + 1):
                t = time.perf_counter()
                out = stage(x)
                _sync(x)
                times_f.append(time.perf_counter() - t)
        shape = tuple(out.shape[1:])
        costs.append(StageCost(min(times_f[1:]), fwd_bwd, out[0].numel() * 4, shape))
        x = out.detach()
    model.train(was_training)
    return costs


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def measure_and_plan(cfg) -> dict:  # type: ignore[no-untyped-def]
    """Build the run's model and data, time its stages, plan, predict every mode."""
    import copy

    from prefast.governor import Governor, boundary_cache_bytes, cache_dtype, cache_views
    from prefast.trainer import Trainer, schedule_for

    tr = Trainer(cfg.replace(mode="freezeout", resume=False, checkpoint=None))
    model = copy.deepcopy(tr.model)
    batch = next(iter(tr.raw.train_batches(0)))
    costs = measure_stage_costs(model, batch.x)
    bpe, rows = tr.raw.batches_per_epoch, tr.raw.num_train
    sched_f = tr.schedule
    boundaries = plan_boundaries(sched_f, bpe, cfg.epochs, costs, rows)
    eval_batches = math.ceil(len(tr.raw.ds.test_x) / cfg.batch_size)
    predicted, predicted_epochs = {}, {}
    for mode in ("baseline", "freezeout", "prefast"):
        sched = schedule_for(cfg.replace(mode=mode), model.num_stages, bpe)
        per_epoch = predict_epochs(mode, sched, bpe, cfg.epochs, costs, boundaries, eval_batches)
        predicted_epochs[mode] = per_epoch
        predicted[mode] = sum(e["train_s"] + e["eval_s"] for e in per_epoch)
    governor = Governor(cfg, tr.device)
    dtype, views, test_rows = cache_dtype(cfg, tr.device), cache_views(cfg), len(tr.raw.ds.test_x)
    decisions = []
    for b in boundaries:
        d = governor.choose(
            boundary_cache_bytes(b.row_bytes, dtype, rows, views, test_rows),
            prefix_epoch_s=bpe * sum(c.fwd_s for c in costs[: b.stage]),
        )
        decisions.append(
            {
                "epoch": b.epoch,
                "stage": b.stage,
                "tier": d.tier,
                "bytes": d.bytes,
                "reason": d.reason,
            }
        )
    return {
        "stages": [
            {
                "stage": i,
                "freeze_iter": sched_f.freeze_iter(i),
                "freeze_epoch": sched_f.freeze_iter(i) / bpe,
                "fwd_ms": c.fwd_s * 1e3,
                "fwd_bwd_ms": c.fwd_bwd_s * 1e3,
                "out_shape": list(c.out_shape),
            }
            for i, c in enumerate(costs)
        ],
        "boundaries": decisions,
        "predicted_s": predicted,
        "predicted_epochs": predicted_epochs,
        "batches_per_epoch": bpe,
        "budgets": governor.budgets(),
        "costs": costs,
    }
