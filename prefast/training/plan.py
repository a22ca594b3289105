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
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from prefast.caching import bandwidth
from prefast.caching.bandwidth import Bandwidths
from prefast.caching.budgets import budgets_for
from prefast.caching.cachectx import CacheContext, cache_identity
from prefast.caching.costmodel import (
    Boundary,
    StageCost,
    boundary_value,
    plan_boundaries,
    predict_epochs,
)
from prefast.caching.governor import (
    Decision,
    Governor,
    cache_dtype,
    cache_views,
    lossy_candidates,
)
from prefast.caching.keep import existing
from prefast.caching.pricing import costs_from_rows, planned_on, pricer_for, pricing_record
from prefast.caching.probe import kept_costs, measure_stage_costs
from prefast.config import TrainConfig, cache_root
from prefast.data.sources import RawSource
from prefast.errors import ConfigError
from prefast.freezing.adaptive import AutoFreezeSchedule
from prefast.models import StagedModel
from prefast.store.manage import Root
from prefast.training.build import build_run, schedule_for


def measure_and_plan(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    costs_from: str | None = None,
) -> dict:
    """Per-stage costs, freeze points, boundaries with their tiers, predicted seconds.

    Takes what ``train`` takes; a given ``model`` is copied, never trained. ``costs_from``:
    a run record (``--json-out``) whose measured stage costs and bandwidths price the
    plan instead of this machine's (a GPU run's numbers, planned against on a CPU).
    """
    model = copy.deepcopy(model) if model is not None else None
    cfg, staged, raw = build_run(cfg, model, train_data, test_data)
    device = raw.device
    dtype = cache_dtype(cfg.cache_dtype, device, cfg.amp)
    root = cache_root(cfg.cache_dir, cfg)  # a local directory or an s3:// prefix
    if costs_from:
        costs, bandwidths, there = recorded_pricing(costs_from, staged.num_stages)
        if cfg.bandwidths:  # --bandwidths given as well: it wins
            bandwidths = bandwidth.for_run(cfg.bandwidths, device, dtype, root)
        # Planned as there: its device (a GPU's tier on a CPU) and the room its tiers had,
        # unless this command names a budget.
        device = torch.device("meta") if there.get("device", "cpu") != "cpu" else device
        rooms = there.get("rooms") or {}
        cfg = cfg.replace(
            max_gpu_mem=cfg.max_gpu_mem or rooms.get("gpu") or None,  # 0: no GPU there
            max_ram=cfg.max_ram or rooms.get("ram") or None,
            max_disk=cfg.max_disk or rooms.get("disk") or None,
        )
    else:
        # A fixed prefix (--freeze-prefix) never runs backward: its stages are timed forward
        # only (ResNet-50's 17 stages at 128 px: the backward passes were most of the plan).
        frozen = schedule_for(cfg.replace(mode="freezeout"), staged.num_stages, 1).prefix
        amp = cfg.amp and device.type == "cuda"
        kept = kept_costs(cfg, raw, staged, device, dtype, amp, root) if frozen else None
        if kept is not None:  # a run of this setting measured the prefix: time the rest only
            costs = kept[:frozen] + stage_costs_after(staged, frozen, kept, cfg.batch_size, device)
        else:
            with contextlib.closing(raw.train_batches(0)) as batches:
                probe = next(batches).x
            costs = measure_stage_costs(staged, probe, cache_dtype=dtype, frozen=frozen)
        bandwidths = bandwidth.for_run(cfg.bandwidths, device, dtype, root)
    bpe, rows = raw.batches_per_epoch, raw.num_train
    sched_f = schedule_for(cfg.replace(mode="freezeout"), staged.num_stages, bpe)
    online = isinstance(sched_f, AutoFreezeSchedule)  # --freeze auto: freeze points come later
    views = cache_views(cfg.cache_views, cfg.augment)
    planner = Governor(budgets_for(cfg), device)
    planner.bandwidths = bandwidths
    considered: list[Boundary] = []
    boundaries = plan_boundaries(
        sched_f, bpe, cfg.epochs, costs, rows, policy=cfg.cache_boundaries, views=views,
        price=pricer_for(planner, cfg, raw, costs, dtype, views), considered=considered,
    )  # fmt: skip
    eval_batches = math.ceil(raw.num_test / cfg.batch_size)
    # Boundaries an earlier run left on disk (a sweep's): read from their first epoch, not
    # written (priced so, as training takes them: prefast/caching/keep.py).
    reused = (
        {}
        if views > 1
        else reused_boundaries(cfg, staged, raw, costs, dtype, root, boundaries, planner)
    )
    read_early = [replace(b, epoch=b.epoch - 1) if b.stage in reused else b for b in boundaries]
    predicted, predicted_epochs = {}, {}
    # With --freeze auto only baseline's time is known beforehand: the others depend on
    # when the rule freezes.
    for mode in ("baseline",) if online else ("baseline", "freezeout", "prefast"):
        sched = schedule_for(cfg.for_mode(mode), staged.num_stages, bpe)
        per_epoch = predict_epochs(mode, sched, bpe, cfg.epochs, costs, read_early, eval_batches)
        predicted_epochs[mode] = per_epoch
        predicted[mode] = sum(e["train_s"] + e["eval_s"] for e in per_epoch)
    governor = Governor(budgets_for(cfg), device)
    governor.bandwidths = bandwidths
    decisions, held = [], None
    for b in boundaries:  # as in training: the current boundary is held while the next is chosen
        d = reused.get(b.stage) or governor.choose_boundary(
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
                "reused": b.stage in reused,
                "tier": d.tier,
                "dtype": d.dtype,
                "bytes": d.bytes,
                "saving_s": b.saving_s,
                "cost_s": None if math.isinf(b.cost_s) else b.cost_s,
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
        # --freeze auto: decided during the run; per stage, what a boundary there would be
        "freeze_rule": sched_f.describe() if isinstance(sched_f, AutoFreezeSchedule) else None,
        "if_frozen": if_frozen(costs, cfg, planner, raw, dtype, views) if online else None,
        "stages": [
            {
                "stage": i,
                "freeze_iter": None if online and i >= sched_f.prefix else sched_f.freeze_iter(i),
                "freeze_epoch": None
                if online and i >= sched_f.prefix
                else sched_f.freeze_iter(i) / bpe,
                "fwd_ms": c.fwd_s * 1e3,
                # None: a fixed prefix's stage, whose backward never runs (not timed)
                "fwd_bwd_ms": None if math.isnan(c.fwd_bwd_s) else c.fwd_bwd_s * 1e3,
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
        "pricing": pricing_record(bandwidths, costs, considered, planned_on(planner)),
        "costs_from": costs_from,
    }


def stage_costs_after(
    staged: StagedModel, frozen: int, kept: list[StageCost], batch: int, device: torch.device
) -> list[StageCost]:
    """The costs of the stages after a fixed prefix whose kept costs are known, timed on a
    batch of the prefix's output shape (a stage's time does not depend on its values; no
    batch is loaded, no prefix run)."""
    tail = nn.Module()
    tail.stages = nn.ModuleList(copy.deepcopy(list(staged.stages[frozen:])))
    x = torch.randn(batch, *kept[frozen - 1].out_shape, device=device)
    timed = measure_stage_costs(tail.to(device), x, tried=())
    # Only the times are new: compression ratios and 8-bit errors are the kept ones (of real
    # activations), as training takes them.
    return [
        replace(k, fwd_s=t.fwd_s, fwd_bwd_s=t.fwd_bwd_s)
        for k, t in zip(kept[frozen:], timed, strict=True)
    ]


def reused_boundaries(
    cfg: TrainConfig,
    staged: StagedModel,
    raw: RawSource,
    costs: list[StageCost],
    dtype: str,
    root: Root,
    boundaries: list[Boundary],
    governor: Governor,
) -> dict[int, Decision]:
    """stage -> the decision to read an earlier run's complete disk cache of that boundary
    (``keep.existing``, the keys a one-process run of ``cfg`` would compute)."""
    identity = cache_identity(cfg, raw, rank=0, world=1)
    ctx = CacheContext(root, governor, staged, raw.device, dtype, identity)
    rows = (raw.num_train, raw.num_test)
    batches = raw.batches_per_epoch + math.ceil(raw.num_test / cfg.batch_size)
    found = {}
    for b in boundaries:
        stream = b.epoch if cfg.augment == "standard" else None
        if d := existing(ctx, cfg, costs, rows, batches, (b.stage, stream, dtype)):
            found[b.stage] = d
    return found


def if_frozen(
    costs: list[StageCost],
    cfg: TrainConfig,
    governor: Governor,
    raw: RawSource,
    dtype: str,
    views: int,
) -> list[dict]:
    """--freeze auto: for each boundary a freeze could make (after stage i), the tier and
    dtype the governor would give it and the last epoch whose start it still pays at (the
    cost model's test in that tier, with nothing cached before it), so a user sees how
    late a freeze may come and still be cached."""
    bpe, rows = raw.batches_per_epoch, raw.num_train
    out = []
    for stage in range(1, len(costs)):
        price = pricer_for(governor, cfg, raw, costs, dtype, views)(stage)
        paying = [
            e
            for e in range(cfg.epochs - views)  # a later epoch must be left to read it
            if cfg.cache_boundaries == "every"
            or (
                v := boundary_value(costs, 0, stage, e, cfg.epochs, bpe, rows, price=price)
            ).saving_s
            > v.cost_s
        ]
        out.append(
            {
                "stage": stage,
                "tier": price.tier,
                "dtype": price.dtype,
                "bytes": price.bytes,
                "last_paying_epoch": max(paying) if paying else None,
            }
        )
    return out


def recorded_pricing(path: str, num_stages: int) -> tuple[list[StageCost], Bandwidths, dict]:
    """The stage costs and bandwidths a run record (or a compare record's prefast run, or
    ``prefast plan --json``'s output) was priced with: ``prefast plan --costs-from``. A
    training run's probe times forwards only: baseline and freezeout are then not
    predicted (a plan's record has both)."""
    pricing = bandwidth.pricing_of(bandwidth.read_json(path, f"--costs-from {path}"))
    if pricing is None or not pricing.get("stage_costs"):
        raise ConfigError(
            f"--costs-from {path}: no measured costs in it: pass the --json-out record of a "
            "prefast run, or `prefast plan --json`'s output (made with this version or later)"
        )
    try:
        costs = costs_from_rows(pricing["stage_costs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"--costs-from {path}: a stage's costs are malformed ({type(exc).__name__}: {exc}): "
            "pass a record PreFast wrote"
        ) from None
    if len(costs) != num_stages:
        raise ConfigError(
            f"--costs-from {path}: its model has {len(costs)} stages and this one "
            f"{num_stages}: price a plan with a record of the same --model"
        )
    recorded = pricing.get("bandwidths", {})
    bw = Bandwidths.from_json(recorded, f"--costs-from {path}")
    there = recorded.get("source", "?") if isinstance(recorded, dict) else "?"
    return costs, replace(bw, source=f"--costs-from {path}; there: {there}"), pricing
