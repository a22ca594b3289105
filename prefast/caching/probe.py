"""The timing probe: measure each stage's cost on one real batch.

Separate from the cost model (``prefast/caching/costmodel.py``, pure arithmetic) so
the planner can be tested on numbers and the probe on a model.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from prefast.caching.costmodel import StageCost
from prefast.store import encoding
from prefast.store.base import to_storage
from prefast.store.device import synchronize
from prefast.store.zarr_writer import trial_ratio

# Dtypes every probe tries on each stage's output: --cache-dtype auto chooses among them.
TRIED = ("float16", "bfloat16", "int8", "float8")
SAMPLE_ROWS = 16  # rows of each stage's output that the compression and dtype trials see


def measure_stage_costs(
    model: nn.Module,
    x: torch.Tensor,
    reps: int = 2,
    backward: bool = True,
    cache_dtype: str = "float32",
) -> list[StageCost]:
    """Time each stage's forward (and forward+backward) on one batch ``x``.

    The planner needs only forward times; ``backward=False`` skips the backward
    passes (``fwd_bwd_s`` is then NaN), which makes the probe ~5x cheaper.
    Each time is the fastest of ``reps`` after one untimed warm-up run. Each stage's
    output (``SAMPLE_ROWS`` of it) is also trial-compressed (zstd-1, in ``cache_dtype``)
    so the governor knows whether a compressed disk tier pays before it chooses,
    and stored in each of ``TRIED``: its relative reconstruction error and zstd ratio
    let ``--cache-dtype auto`` store a boundary in 8 bits where that buys a faster tier.
    ``model`` must have a ``stages`` list; pass a copy: BatchNorm statistics move.
    """
    costs = []
    was_training = model.training
    stages: nn.ModuleList = model.stages  # type: ignore[assignment]
    for stage in stages:
        fwd_bwd = math.nan
        if backward:
            stage.train()
            inp = x.detach().requires_grad_(x.is_floating_point())
            times_fb = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                out = stage(inp)
                out.float().sum().backward()
                synchronize(x.device)
                times_fb.append(time.perf_counter() - t)
            stage.zero_grad(set_to_none=True)
            fwd_bwd = min(times_fb[1:])
        stage.eval()
        times_f = []
        with torch.no_grad():
            for _ in range(reps + 1):
                t = time.perf_counter()
                out = stage(x)
                synchronize(x.device)
                times_f.append(time.perf_counter() - t)
        # Compression is tried on a sample of rows, not the whole batch: on a GPU the whole
        # batch crossed to the host and went through zstd for each of dozens of stages
        # (most of a 14.7 s probe); a sample's ratio is what the governor needs.
        few = out[:SAMPLE_ROWS]
        ratio = trial_ratio(to_storage(few, cache_dtype)) if out.dim() > 1 else 1.0
        trials = tuple(
            (
                d,
                encoding.relative_error(few, d),
                ratio if d == cache_dtype else trial_ratio(to_storage(few, d)),
            )
            for d in TRIED
            if out.dim() > 1
        )
        shape = tuple(out.shape[1:])
        cost = StageCost(min(times_f[1:]), fwd_bwd, out[0].numel() * 4, shape, ratio, trials)
        costs.append(cost)
        x = out.detach()
    model.train(was_training)
    return costs
