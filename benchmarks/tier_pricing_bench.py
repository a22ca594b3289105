"""Each boundary priced at its own tier's measured speed, on a CPU: a boundary that pays in
RAM but not on disk, and one that pays nowhere.

Claim under test: the planner prices a boundary in the tier the governor would put it in,
at that tier's bandwidth as measured on this machine (``prefast/caching/bandwidth.py``),
so (1) a boundary whose rows are read from RAM faster than its prefix computes, but
from disk slower, is planned in RAM, read from there, and prefast beats FreezeOut; and
(2) where no tier pays (the same boundary with a RAM budget too small for it: disk only),
nothing is planned and prefast costs what FreezeOut costs (no visible probe or feed
cost): the median over 3 seeds of the paired ratio freezeout/prefast at least 0.97.

The model has a wide, cheap first stage (a 5x5 convolution to 48 channels with batch norm
at 32 px: 96 KiB float16 rows from 3 KiB inputs), frozen from the first step
(``--freeze-prefix 1 --t0 1``), and a light trainable body, so the first stage's forward
is a visible part of a step. Each seed's two modes run side by side (``compare``).

    python benchmarks/tier_pricing_bench.py [OUT_DIR]   # default benchmarks/results (minutes)
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from prefast.config import TrainConfig

SEEDS = (0, 1, 2)
SETTINGS = {  # name -> config changes
    "RAM pays, disk does not": {},
    "nothing pays (RAM budget 1 MB: disk only)": {"max_ram": 2**20},
}


def model() -> nn.Module:
    from prefast.models.staged import StagedModel

    wide = nn.Sequential(nn.Conv2d(3, 48, 5, padding=2), nn.BatchNorm2d(48), nn.ReLU())
    body = nn.Sequential(
        nn.AvgPool2d(4), nn.Conv2d(48, 64, 1), nn.BatchNorm2d(64), nn.ReLU()
    )  # 8x8
    head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    return StagedModel([wide, body, head], name="wide-first-stage")


def base_config(cache: Path) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic", synthetic_size=(8192, 1024), epochs=8, batch_size=64,
        freeze_prefix=1, t0=1.0, augment="none", device="cpu", cache_dir=str(cache),
    )  # fmt: skip


def summarize(run: dict) -> dict:
    final = run["final"]
    bounds = [e for e in final.get("cache_events", []) if e["event"] == "boundary"]
    return {
        "wall_s": final["wall_s"],
        "feed_setup_s": final["feed_setup_s"],
        "test_acc": final["test_acc"],
        "tiers": [f"stage {b['stage']}: {b['tier']}" for b in bounds],
        "cached_batches": sum(e.get("cached_batches", 0) for e in run["epochs"]),
        "candidates": final.get("pricing", {}).get("candidates", []),
        "bandwidths": final.get("pricing", {}).get("bandwidths", {}),
    }


def run_bench(out: Path, cache: str | None = None) -> dict:
    from prefast.training.compare import compare

    work = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="prefast-tiers-"))
    doc: dict = {"settings": {}}
    try:
        # A first run in a process pays for warming up (allocator, thread pools): not a mode's.
        compare(base_config(work / "warm").replace(epochs=1), ["freezeout"], model=model())
        for name, changes in SETTINGS.items():
            rows = []
            for seed in SEEDS:
                cfg = base_config(work / "cache").replace(seed=seed, **changes)
                torch.manual_seed(seed)
                order = ["freezeout", "prefast"][:: 1 if seed % 2 == 0 else -1]  # no order bias
                runs = compare(cfg, order, model=model())
                fo, pf = summarize(runs["freezeout"]), summarize(runs["prefast"])
                rows.append({"seed": seed, "freezeout": fo, "prefast": pf,
                             "ratio": fo["wall_s"] / pf["wall_s"]})  # fmt: skip
                print(f"{name} seed {seed}: freezeout {fo['wall_s']:.2f}s prefast "
                      f"{pf['wall_s']:.2f}s ({fo['wall_s'] / pf['wall_s']:.3f}x) "
                      f"{pf['tiers'] or 'nothing cached'}, setup {pf['feed_setup_s']:.2f}s")  # fmt: skip
            doc["settings"][name] = {
                "config": {**base_config(work).to_json(), **changes, "cache_dir": None},
                "rows": rows,
                "median_ratio": statistics.median(r["ratio"] for r in rows),
            }
    finally:
        if not cache:
            shutil.rmtree(work, ignore_errors=True)
    from prefast.benchmarks.store_bench import machine

    doc["machine"] = machine()
    (out / "tier_pricing.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "tier_pricing.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    first = next(iter(doc["settings"].values()))["rows"][0]["prefast"]
    bw = first["bandwidths"]
    speeds = ", ".join(
        f"{k} {bw['write'][k] / 1e6:,.0f}/{bw['read'][k] / 1e6:,.0f}" for k in bw.get("write", {})
    )
    lines = [
        "Each boundary priced at its own tier's measured speed, on 2 CPU cores: a 3-stage "
        "model whose first stage (5x5 conv to 48 channels, batch norm, ReLU at 32 px: 96 KiB "
        "float16 rows) is frozen from the first step (`--freeze-prefix 1 --t0 1`), 8,192 "
        "synthetic images, 8 epochs, batch 64, `--augment none`; freezeout and prefast side "
        "by side per seed (freezeout first on even seeds, prefast first on odd ones, after "
        "one warm-up run). `python benchmarks/tier_pricing_bench.py`.",
        "",
        f"Bandwidths the plans were priced with, MB/s write/read ({bw.get('source', '?')}): "
        f"{speeds}.",
        "",
        "| setting | seed | freezeout s | prefast s | freezeout/prefast | boundary tier | "
        "batches read from the cache | prefast setup s (probe, bandwidths, plan) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in doc["settings"].items():
        for r in s["rows"]:
            fo, pf = r["freezeout"], r["prefast"]
            lines.append(
                f"| {name} | {r['seed']} | {fo['wall_s']:.2f} | {pf['wall_s']:.2f} | "
                f"{r['ratio']:.3f} | {', '.join(pf['tiers']) or 'none planned'} | "
                f"{pf['cached_batches']} | {pf['feed_setup_s']:.2f} |"
            )
        lines.append(f"| {name} | median | | | **{s['median_ratio']:.3f}** | | | |")
    lines += ["", "The plan's candidates (seed 0), priced in the tier each would land in:", ""]
    for name, s in doc["settings"].items():
        for c in s["rows"][0]["prefast"]["candidates"]:
            cost = "-" if c["cost_s"] is None else f"{c['cost_s']:.3f} s"
            lines.append(
                f"- {name}: epoch {c['epoch'] + 1}, stage {c['stage']}, {c['tier']} in "
                f"{c['dtype']}: saves {c['saving_s']:.3f} s, costs {cost}; "
                f"{'planned' if c['taken'] else 'not planned'}: {c['why']}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results")
    target.mkdir(parents=True, exist_ok=True)
    run_bench(target)
