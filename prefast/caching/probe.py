"""The timing probe: measure each stage's cost on one real batch.

Separate from the cost model (``prefast/caching/costmodel.py``, pure arithmetic) so
the planner can be tested on numbers and the probe on a model. What it measures is
kept beside the caches (``probed_costs``): a later run with the same model and
starting weights, data, batch size, device and dtype (a sweep's next process over one
frozen backbone) plans with those figures and does not probe.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from prefast.caching.costmodel import StageCost
from prefast.store import encoding
from prefast.store.base import to_storage
from prefast.store.device import synchronize
from prefast.store.errors import CacheError
from prefast.store.layout import cache_key
from prefast.store.manage import Root
from prefast.store.zarr_writer import trial_ratio

if TYPE_CHECKING:
    from prefast.config import TrainConfig
    from prefast.data.sources import RawSource
    from prefast.models import StagedModel

# Dtypes every probe tries on each stage's output: --cache-dtype auto chooses among them.
TRIED = ("float16", "bfloat16", "int8", "float8")
# Rows of each stage's output that the compression and dtype trials see: up to 16, fewer
# for wide rows (ResNet-50's at 128 px: 1 MiB each, and 8-bit trials of 16 of them took 9 s)
SAMPLE_ROWS, SAMPLE_BYTES = 16, 512 * 1024


# A fixed prefix's stages (--freeze-prefix) are timed on this many rows of the batch, their
# figures scaled to the whole batch: a stage's forward on a CPU grows with its rows (ResNet-50
# at 128 px on 2 cores: 16 rows x4 within a few % of 64 rows, measured), and its outputs'
# trials see at most SAMPLE_ROWS rows anyway. Planning a fine-tune then costs a quarter of one
# prefix forward (on a GPU, a small batch under-fills the device: the prefix is priced
# dearer, which makes its cache, whose write is one pass, look better, not worse).
PREFIX_ROWS = 16

# A call this long is timed once after the warm-up: its noise is a small part of it, and a
# heavy stage (ResNet-50 at 128 px on a CPU: seconds) dominates what the probe costs.
LONG_S = 0.05


def typical(run: Callable[[], float | None], reps: int) -> float:
    """The median of ``reps`` timed calls of ``run`` after a warm-up (first calls allocate,
    fault pages in, let cuDNN pick kernels). A median, not a minimum: the planner prices
    whole epochs, and one lucky call said a stage's forward cost more than its
    forward+backward. A first call past four times ``LONG_S`` is the figure (seconds of
    work: its one-time costs are noise, and a second call doubles what the probe costs);
    ``reps`` 0: the first call is the figure; a call past ``LONG_S`` is the last one.
    ``run`` may return its own figure (a part of what it did, e.g. the step without the
    gradients' reset before it), else its wall time counts."""

    def timed() -> float:
        t = time.perf_counter()
        part = run()
        return time.perf_counter() - t if part is None else part

    first = timed()
    if first > 4 * LONG_S or reps == 0:
        return first
    times: list[float] = []
    for _ in range(reps):
        times.append(timed())
        if times[-1] > LONG_S:  # long enough that its noise is small: enough calls
            break
    return statistics.median(times)


def whole_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x``'s rows repeated to ``batch`` rows (a stage's time does not depend on values), in
    ``x``'s memory format (``repeat`` would turn channels_last into NCHW: other kernels)."""
    return torch.cat([x] * math.ceil(batch / x.shape[0]))[:batch]


def measure_stage_costs(
    model: nn.Module,
    x: torch.Tensor,
    reps: int = 3,
    backward: bool = True,
    cache_dtype: str = "float32",
    tried: tuple[str, ...] = TRIED,
    frozen: int = 0,
) -> list[StageCost]:
    """Time each stage's forward (and forward+backward) on one batch ``x``.

    The planner needs only forward times; ``backward=False`` skips the backward
    passes (``fwd_bwd_s`` is then NaN), which makes the probe ~5x cheaper.
    Each time is ``typical``'s: the median of ``reps`` calls after a warm-up, one call for a
    long stage. ``fwd_bwd_s`` is a training step's (train mode, the forward recording the
    graph, then the backward), never below the eval forward it holds, so no stage reports
    a forward above its forward+backward. Each stage's
    output (``SAMPLE_ROWS`` of it) is also trial-compressed (zstd-1, in ``cache_dtype``)
    so the governor knows whether a compressed disk tier pays before it chooses,
    and stored in each of ``tried`` (a run whose dtype is not auto tries none): its relative reconstruction error and zstd ratio
    let ``--cache-dtype auto`` store a boundary in 8 bits where that buys a faster tier.
    ``model`` must have a ``stages`` list; pass a copy: BatchNorm statistics move.
    ``frozen``: stages frozen from the first iteration (``--freeze-prefix``), whose backward
    never runs in any mode: not timed (NaN), and their forward timed in one call on
    ``PREFIX_ROWS`` rows, scaled to the batch (a stage that comes out shorter than
    ``LONG_S`` so is timed on a whole batch instead: scaled, one call's fixed costs made a
    0.1 ms stage look several times dearer); the stages after them see those rows repeated
    to a whole batch. Planning a fine-tune costs a quarter of one forward of its prefix
    (ResNet-50 at 128 px on 2 cores: ``prefast plan`` beyond loading the model and data
    4.5 s with a whole batch, 1.7 s so).
    """
    costs = []
    was_training = model.training
    stages: nn.ModuleList = model.stages  # type: ignore[assignment]
    batch = x.shape[0]
    rows = min(batch, PREFIX_ROWS) if frozen else batch  # what the prefix's stages see
    x = x[:rows]
    for i, stage in enumerate(stages):
        if i == frozen and rows < batch:  # a trainable stage is timed on a whole batch
            x = whole_batch(x, batch)
        step = math.nan
        if backward and i >= frozen:
            stage.train()
            inp = x.detach().requires_grad_(x.is_floating_point())

            def train_step(stage: nn.Module = stage, inp: torch.Tensor = inp) -> float:
                stage.zero_grad(set_to_none=True)  # each call's backward writes new grads
                inp.grad = None
                synchronize(inp.device)
                t = time.perf_counter()
                stage(inp).float().sum().backward()
                synchronize(inp.device)
                return time.perf_counter() - t

            step = typical(train_step, reps)
            stage.zero_grad(set_to_none=True)
        stage.eval()
        outputs: list[torch.Tensor] = []

        def forward(stage: nn.Module = stage, x: torch.Tensor = x, outputs: list = outputs) -> None:
            outputs[:] = [stage(x)]
            synchronize(x.device)

        with torch.no_grad():  # a fixed prefix's stage: one call (planning a fine-tune)
            if i < frozen and x.device.type != "cpu":
                # On an accelerator a first call on a new shape loads modules and lets cuDNN
                # pick kernels: an untimed one first, or that one-time cost is scaled below.
                forward()
            fwd = typical(forward, reps if i >= frozen else 0)
        out = outputs[0]
        if i < frozen:  # timed on PREFIX_ROWS rows: priced for the whole batch
            fwd *= batch / rows
            if fwd < LONG_S and rows < batch:
                # A short stage: one call's fixed costs (dispatch, first-call allocation)
                # are a large part of it and must not be scaled; a whole batch is cheap to
                # time the usual way (its output is not needed: the next stage takes ``out``).
                whole = functools.partial(forward, x=whole_batch(x, batch), outputs=[])
                with torch.no_grad():
                    fwd = typical(whole, reps)
        # Compression is tried on a sample of rows, not the whole batch: on a GPU the whole
        # batch crossed to the host and went through zstd for each of dozens of stages
        # (most of a 14.7 s probe); a sample's ratio is what the governor needs.
        row = out[0].numel() * out.element_size()
        few = out[: max(2, min(SAMPLE_ROWS, SAMPLE_BYTES // max(1, row)))]
        ratio = trial_ratio(to_storage(few, cache_dtype)) if out.dim() > 1 else 1.0
        trials = tuple(
            (
                d,
                encoding.relative_error(few, d),
                ratio if d == cache_dtype else trial_ratio(to_storage(few, d)),
            )
            for d in tried
            if out.dim() > 1
        )
        shape = tuple(out.shape[1:])
        # A training step holds its forward: one reported below the forward alone is noise
        # (microsecond stages), and the planner would price a step cheaper than inference.
        fwd_bwd = step if math.isnan(step) else max(fwd, step)
        cost = StageCost(fwd, fwd_bwd, out[0].numel() * 4, shape, ratio, trials)
        costs.append(cost)
        x = out.detach()
    model.train(was_training)
    return costs


COSTS_DIR = ".costs"  # in the cache root: one JSON of stage costs per probed setting


def _kept_path(
    cfg: TrainConfig, raw: RawSource, model: StagedModel, device: torch.device, dtype: str,
    amp: bool, root: Root,
) -> tuple[str, dict]:  # fmt: skip
    """Where the stage costs of this setting are kept (a name in ``root``), and the setting."""
    from prefast.caching.bandwidth import _identity

    setting = {
        **_identity(device, dtype),
        "model": model.name,
        "weights": model.prefix_digest(model.num_stages),
        "data": raw.identity,
        "batch_size": cfg.batch_size,
        "amp": amp,
        "channels_last": model.channels_last,
        "augment": cfg.augment,  # crops change the stages' outputs, so their zstd ratios
        "deterministic": cfg.deterministic,  # other kernels, other times
        "tried": list(TRIED if cfg.cache_dtype == "auto" else ()),  # auto's 8-bit candidates
        # How a fixed prefix was timed (measure_stage_costs): figures kept by a probe that
        # timed it otherwise are not taken for this one's.
        "prefix_rows": PREFIX_ROWS,
    }
    return f"{COSTS_DIR}/{cache_key(setting)}.json", setting


def kept_costs(
    cfg: TrainConfig, raw: RawSource, model: StagedModel, device: torch.device, dtype: str,
    amp: bool, root: Root,
) -> list[StageCost] | None:  # fmt: skip
    """The stage costs an earlier run of this setting measured (``probed_costs``), if any."""
    return _read_kept(root, _kept_path(cfg, raw, model, device, dtype, amp, root)[0])


def _read_kept(root: Root, name: str) -> list[StageCost] | None:
    from prefast.caching.pricing import costs_from_rows

    with contextlib.suppress(CacheError, ValueError, KeyError, TypeError):
        data = root.read_side(name)
        return None if data is None else costs_from_rows(json.loads(data)["stage_costs"])
    return None


def probed_costs(
    cfg: TrainConfig,
    raw: RawSource,
    model: StagedModel,
    device: torch.device,
    dtype: str,
    amp: bool,
    root: Root,
    frozen: int = 0,
) -> list[StageCost]:
    """The stage costs of ``model`` on ``raw``'s first batch: kept under ``root`` for the next
    run of the same setting (model, starting weights, data, batch size, device, dtype), which
    takes them instead of probing again. An unreadable kept file is probed over. ``frozen``:
    the fixed prefix's stages, timed as ``measure_stage_costs`` says."""
    from prefast.caching.pricing import stage_cost_rows

    # The setting's key hashes every weight: made once, for reading and for keeping.
    name, setting = _kept_path(cfg, raw, model, device, dtype, amp, root)
    kept = _read_kept(root, name)
    if kept is not None:
        return kept
    with contextlib.closing(raw.train_batches(0)) as batches:
        probe = next(batches).x
    tried = TRIED if cfg.cache_dtype == "auto" else ()
    costs = measure_stage_costs(
        copy.deepcopy(model), probe, backward=False, cache_dtype=dtype, tried=tried, frozen=frozen
    )
    with contextlib.suppress(OSError, CacheError):  # kept if it can be; never fails a run
        root.write_side(name, {"setting": setting, "stage_costs": stage_cost_rows(costs)})
    return costs
