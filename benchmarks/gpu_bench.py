"""The GPU check's measurements (run by ``benchmarks/gpu_check.sh`` on one CUDA GPU).

Claims under test, each printed with the figure that proves it:

1. **Exactness on CUDA**: with an fp32 cache and no augmentation, prefast gives
   FreezeOut's losses and accuracies with its cache in gpu, ram, mmap and zarr
   (scikit-learn digits, float32, ``--deterministic`` kernels, so both modes run
   the same kernels and sum in the same order); beside it, two freezeout runs
   against each other with and without ``--deterministic`` (the spread that
   "equal" is measured against). Written to ``gpu_exactness.{json,md}``.
2. **Full-size speed**: the synthetic CIFAR-shaped set at full size (50,000
   training / 10,000 test images), DenseNet-BC k=12 at the largest depth and
   epoch count the time budget allows, t0 0.6, freezeout / prefast side by side
   (baseline too when the budget holds it; bf16 autocast, channels_last, cuDNN
   autotuning), ``--augment none`` (with one cached view of standard augmentation
   prefast would train on one fixed crop). The size is chosen from a short timing of
   baseline steps at each candidate depth. First the plan is printed: each boundary's
   tier, bytes, saving and cost, the candidates not planned and why, and the
   bandwidths measured on this GPU. Written to ``gpu_full.{json,md,png}`` by the
   training benchmark's own code.

Usage: ``python -u benchmarks/gpu_bench.py --out DIR --budget-s SECONDS``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from prefast.benchmarks.train_bench import run_sweep
from prefast.config import TrainConfig
from prefast.data.datasets import load_dataset
from prefast.models import build_model

DEPTHS = (100, 76, 52, 40, 28)  # DenseNet-BC depths, largest first
MODES_COST = 2.4  # baseline + freezeout + prefast at t0 0.6, in baseline runs (conservative)
PAIR_COST = 1.5  # freezeout + prefast alone
TIERS = ("gpu", "ram", "mmap", "zarr")


def loss_diff(run: dict, ref: dict) -> float:
    """The largest relative difference of an epoch's training loss between two runs."""
    return max(
        abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"])
        for a, b in zip(run["epochs"], ref["epochs"], strict=True)
    )


def same_acc(run: dict, ref: dict) -> bool:
    return [e["test_acc"] for e in run["epochs"]] == [e["test_acc"] for e in ref["epochs"]]


def exactness(out: Path, cache_dir: Path) -> dict:
    """prefast vs freezeout per tier on CUDA (fp32 cache, augment none, deterministic
    kernels), and the run-to-run spread of freezeout itself with and without
    ``--deterministic``: what "equal" can mean on this GPU."""
    from prefast.training.trainer import train

    common: dict[str, Any] = dict(
        dataset="digits", model="densenet-bc", depth=16, epochs=6, batch_size=64, t0=0.5,
        augment="none", cache_dtype="float32", device="cuda", amp=False,
        cache_boundaries="every", workers=0,
    )  # fmt: skip
    runs = {
        det: [train(TrainConfig(mode="freezeout", deterministic=det, **common)) for _ in (0, 1)]
        for det in (False, True)
    }
    spread = [
        {
            "deterministic": det,
            "max_rel_loss_diff": loss_diff(a, b),
            "same_test_acc": same_acc(a, b),
        }
        for det, (a, b) in runs.items()
    ]
    for row in spread:
        print(f"freezeout vs freezeout: {row}", flush=True)
    ref = runs[True][0]
    rows = []
    for tier in TIERS:
        run = train(
            TrainConfig(
                mode="prefast",
                deterministic=True,
                cache_tier=tier,
                cache_dir=str(cache_dir / tier),
                **common,
            )
        )
        bpe = run["final"]["batches_per_epoch"]
        rows.append(
            {
                "tier": tier,
                "max_rel_loss_diff": loss_diff(run, ref),
                "same_test_acc": same_acc(run, ref),
                "cached_epochs": [e["epoch"] for e in run["epochs"] if e["cached_batches"] == bpe],
                "tiers_read": sorted({e["cache_tier"] for e in run["epochs"] if e["cache_tier"]}),
            }
        )
        print(f"exactness {tier}: {rows[-1]}", flush=True)
    doc: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": common,
        "spread": spread,
        "rows": rows,
    }
    (out / "gpu_exactness.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"Exactness on {doc['gpu']} (torch {doc['torch']}): digits, DenseNet-BC depth 16, "
        "6 epochs, fp32 cache, augment none, float32.",
        "",
        "Two freezeout runs of one command, against each other:",
        "",
        "| kernels | max relative loss difference | same test accuracy |",
        "|---|---:|---|",
    ]
    lines += [
        f"| {'--deterministic' if r['deterministic'] else 'default'} | "
        f"{r['max_rel_loss_diff']:.2e} | {r['same_test_acc']} |"
        for r in spread
    ]
    lines += [
        "",
        "prefast against freezeout, both `--deterministic`:",
        "",
        "| tier | max relative loss difference | same test accuracy | epochs read from cache |",
        "|---|---:|---|---|",
    ]
    lines += [
        f"| {r['tier']} | {r['max_rel_loss_diff']:.2e} | {r['same_test_acc']} | "
        f"{r['cached_epochs']} |"
        for r in rows
    ]
    (out / "gpu_exactness.md").write_text("\n".join(lines) + "\n")
    return doc


def step_seconds(depth: int, batch: int, steps: int = 20) -> float:
    """Seconds per baseline training step of DenseNet-BC ``depth`` on CIFAR-shaped input,
    with the run's GPU habits (bf16 autocast, channels_last, cuDNN autotuning)."""
    torch.backends.cudnn.benchmark = True
    model = build_model("densenet-bc", in_channels=3, num_classes=10, image_size=32, depth=depth)
    model = model.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up: autotuning, allocator
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def choose_size(budget_s: float, batch: int, n_train: int, n_test: int) -> dict:
    """The largest depth, then the most epochs (4..30), whose freezeout and prefast runs
    fit ``budget_s``; ``baseline``: whether a baseline run fits beside them."""
    steps = -(-n_train // batch) + 0.4 * -(-n_test // batch)  # evaluation ~ 0.4 of a step
    timings = {}
    for depth in DEPTHS:
        timings[depth] = step_seconds(depth, batch)
        epoch_s = timings[depth] * steps
        epochs = int(budget_s / (PAIR_COST * epoch_s))
        print(f"sizing: depth {depth}: {timings[depth] * 1e3:.1f} ms/step, "
              f"{epoch_s:.1f} s/epoch -> {epochs} epochs fit", flush=True)  # fmt: skip
        if epochs >= 4:
            epochs = min(epochs, 30)
            baseline = MODES_COST * epoch_s * epochs <= budget_s
            return {"depth": depth, "epochs": epochs, "step_s": timings, "baseline": baseline}
    return {"depth": DEPTHS[-1], "epochs": 4, "step_s": timings, "baseline": False}


def print_plan(cfg: TrainConfig) -> None:
    """``prefast plan``'s pricing on this GPU: bandwidths, boundaries, candidates."""
    from prefast.training.plan import measure_and_plan

    t = time.perf_counter()
    plan = measure_and_plan(cfg)
    bw = plan["pricing"]["bandwidths"]
    print(f"plan ({time.perf_counter() - t:.1f} s): bandwidths MB/s write/read "
          f"({bw['source']}): " + ", ".join(
              f"{k} {bw['write'][k] / 1e6:,.0f}/{bw['read'][k] / 1e6:,.0f}" for k in bw["write"]
          ), flush=True)  # fmt: skip
    for c in plan["pricing"]["candidates"]:
        cost = "-" if c["cost_s"] is None else f"{c['cost_s']:.3g}s"
        print(f"plan: epoch {c['epoch'] + 1} stage {c['stage']}: {c['tier']} in {c['dtype']}, "
              f"{c['bytes'] / 2**20:.0f} MiB, saves {c['saving_s']:.3g}s, costs {cost}: "
              f"{'planned' if c['taken'] else 'not planned'} ({c['why']})", flush=True)  # fmt: skip
    print(f"plan: predicted {plan['predicted_s']}", flush=True)


def full_size(out: Path, cache_dir: Path, budget_s: float, batch: int) -> dict:
    load_dataset("synthetic", synthetic_size=(50_000, 10_000))  # generated once, memoized
    size = choose_size(budget_s, batch, 50_000, 10_000)
    cfg = TrainConfig(
        dataset="synthetic", model="densenet-bc", depth=size["depth"], growth_rate=12,
        epochs=size["epochs"], batch_size=batch, t0=0.6, device="cuda", workers=0,
        augment="none", cache_dir=str(cache_dir / "full"),
    )  # fmt: skip
    modes = (["baseline"] if size["baseline"] else []) + ["freezeout", "prefast"]
    print(f"full size: depth {cfg.depth}, {cfg.epochs} epochs, batch {batch}, augment none, "
          f"modes {', '.join(modes)}", flush=True)  # fmt: skip
    print_plan(cfg)
    doc = run_sweep(cfg, [0.6], [0], modes, str(out / "gpu_full"))
    doc["sizing"] = size
    (out / "gpu_full.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu", help="results folder (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for the full-size part")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache-dir", default="/tmp/prefast-gpu-cache")
    p.add_argument(
        "--exactness-only", action="store_true", help="skip the full-size benchmark (a rerun)"
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA GPU is visible")
    out, cache = Path(args.out), Path(args.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    exactness(out, cache)
    left = args.budget_s - (time.perf_counter() - t)
    if not args.exactness_only:
        full_size(out, cache, max(60.0, left), args.batch_size)
    print(f"gpu_bench: done in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
