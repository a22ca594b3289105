"""`prefast plan`: time the stages once, then plan and predict every mode.

Builds the model and one batch the way a training run does (``prefast/training/build.py``),
measures per-stage costs with the probe, and hands them to the pure cost model
and the governor. No Trainer is built; ``compare`` passes its dataset in so it
is loaded once.
"""

from __future__ import annotations

import contextlib
import copy
import math

from torch import nn
from torch.utils.data import Dataset

from prefast.caching.budgets import budgets_for
from prefast.caching.costmodel import plan_boundaries, predict_epochs
from prefast.caching.governor import Governor, cache_dtype, cache_views, lossy_candidates
from prefast.caching.probe import measure_stage_costs
from prefast.config import TrainConfig
from prefast.training.build import build_run, schedule_for


def measure_and_plan(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
) -> dict:
    """Per-stage costs, freeze points, boundaries with their tiers, predicted seconds.

    Takes what ``train`` takes; a given ``model`` is copied, never trained.
    """
    model = copy.deepcopy(model) if model is not None else None
    cfg, staged, raw = build_run(cfg, model, train_data, test_data)
    device = raw.device
    dtype = cache_dtype(cfg.cache_dtype, device, cfg.amp)
    with contextlib.closing(raw.train_batches(0)) as batches:
        probe = next(batches).x
    costs = measure_stage_costs(staged, probe, cache_dtype=dtype)
    bpe, rows = raw.batches_per_epoch, raw.num_train
    sched_f = schedule_for(cfg.replace(mode="freezeout"), staged.num_stages, bpe)
    views = cache_views(cfg.cache_views, cfg.augment)
    boundaries = plan_boundaries(
        sched_f, bpe, cfg.epochs, costs, rows, policy=cfg.cache_boundaries, views=views
    )
    eval_batches = math.ceil(raw.num_test / cfg.batch_size)
    predicted, predicted_epochs = {}, {}
    for mode in ("baseline", "freezeout", "prefast"):
        sched = schedule_for(cfg.replace(mode=mode), staged.num_stages, bpe)
        per_epoch = predict_epochs(mode, sched, bpe, cfg.epochs, costs, boundaries, eval_batches)
        predicted_epochs[mode] = per_epoch
        predicted[mode] = sum(e["train_s"] + e["eval_s"] for e in per_epoch)
    governor = Governor(budgets_for(cfg), device)
    decisions, held = [], None
    for b in boundaries:  # as in training: the current boundary is held while the next is chosen
        d = governor.choose_boundary(
            costs,
            b.stage,
            dtype,
            (rows, raw.num_test),
            views,
            bpe + eval_batches,
            lossy=lossy_candidates(cfg.cache_dtype),
        )
        decisions.append(
            {
                "epoch": b.epoch,
                "stage": b.stage,
                "tier": d.tier,
                "dtype": d.dtype,
                "bytes": d.bytes,
                "reason": d.reason,
            }
        )
        if d.tier != "recompute":
            if held:
                governor.release(held)
            held = f"train@{b.stage}"
            governor.hold(held, d.tier, d.bytes)
    return {
        "scaling_warning": sched_f.scaling_warning(),
        "stages": [
            {
                "stage": i,
                "freeze_iter": sched_f.freeze_iter(i),
                "freeze_epoch": sched_f.freeze_iter(i) / bpe,
                "fwd_ms": c.fwd_s * 1e3,
                "fwd_bwd_ms": c.fwd_bwd_s * 1e3,
                "out_shape": list(c.out_shape),
                "zstd_ratio": round(c.compress_ratio, 3),
                "rel_error": {d: round(err, 5) for d, err, _ in c.trials},
            }
            for i, c in enumerate(costs)
        ],
        "boundaries": decisions,
        "predicted_s": predicted,
        "predicted_epochs": predicted_epochs,
        "batches_per_epoch": bpe,
        "budgets": Governor(budgets_for(cfg), device).report(),
        "costs": costs,
    }
