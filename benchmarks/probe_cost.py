"""What planning costs a prefast run: its setup seconds against the predicted baseline run.

Claim under test: the probe (each stage timed on one batch, its output trial-compressed)
and the bandwidth measurement cost at most 1% of the baseline run they plan, in the
README's subset setting and in the fine-tuning benchmark's ResNet-50 128 px linear probe.
A prefast trainer is built (``Trainer``: the feed's setup is the probe, the bandwidths and
the plan) and its ``feed_setup_s`` read, with the bandwidths kept from an earlier run
(every run after a host's first) and measured afresh (a host's first run); the predicted
baseline is ``prefast plan``'s.

    python benchmarks/probe_cost.py [OUT_DIR]   # default benchmarks/results (a few minutes)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from prefast.config import TrainConfig


def settings(work: Path) -> dict[str, TrainConfig]:
    from prefast.benchmarks.imagefolder_bench import write_digits_folder

    folder = write_digits_folder(work / "digits_1500_128px_png", 128, "png", 1500)
    return {
        "subset (README: densenet-bc depth 16, 2000 of 50,000 synthetic, 6 epochs)": TrainConfig(
            dataset="synthetic", subset=2000, synthetic_size=(50_000, 2_000),
            model="densenet-bc", depth=16, growth_rate=12, epochs=6, batch_size=64,
            device="cpu",
        ),
        "resnet50 128 px linear probe (digits folder, 1500 images, 10 epochs)": TrainConfig(
            dataset="imagefolder", data_dir=str(folder), image_size=128,
            model="torchvision:resnet50", epochs=10, batch_size=64, t0=1.0,
            freeze_prefix="all", workers=2, device="cpu",
        ),
    }  # fmt: skip


def setup_seconds(cfg: TrainConfig, bandwidths: str | None) -> float:
    from prefast.training.trainer import Trainer

    if bandwidths is None:
        os.environ.pop("PREFAST_BANDWIDTHS", None)
    else:
        os.environ["PREFAST_BANDWIDTHS"] = bandwidths
    # The probe itself is measured: not the stage costs an earlier call kept (probe.py),
    # which a sweep's later processes take instead of probing (cli_sweep.py measures those).
    assert cfg.cache_dir is not None
    shutil.rmtree(Path(cfg.cache_dir) / ".costs", ignore_errors=True)
    trainer = Trainer(cfg.replace(mode="prefast"))
    try:
        return trainer.feed_setup_s
    finally:
        trainer.feed.close()


def run(out: Path) -> dict:
    from prefast.training.plan import measure_and_plan

    work = Path(tempfile.mkdtemp(prefix="prefast-probe-"))
    rows = []
    try:
        for name, cfg in settings(work).items():
            cfg = cfg.replace(cache_dir=str(work / "cache"))
            baseline = measure_and_plan(cfg)["predicted_s"]["baseline"]
            measured = setup_seconds(cfg, "measure")  # a host's first run
            kept = min(setup_seconds(cfg, None) for _ in range(2))  # every later run
            rows.append({
                "setting": name, "predicted_baseline_s": baseline,
                "setup_s_bandwidths_kept": kept, "setup_s_bandwidths_measured": measured,
                "kept_share": kept / baseline, "measured_share": measured / baseline,
            })  # fmt: skip
            print(f"{name}: setup {kept:.2f} s (bandwidths kept), {measured:.2f} s (measured); "
                  f"predicted baseline {baseline:.1f} s: {kept / baseline:.2%}, "
                  f"{measured / baseline:.2%}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from prefast.benchmarks.store_bench import machine

    doc = {"machine": machine(), "rows": rows}
    (out / "probe_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, out)
    return doc


def write_markdown(doc: dict, out: Path) -> None:
    rows = doc["rows"]
    lines = [
        "Planning's cost (`feed_setup_s`: the probe, the bandwidths, the plan) against the "
        "predicted baseline run, on 2 CPU cores; `python benchmarks/probe_cost.py`.",
        "",
        "| setting | predicted baseline s | setup s, bandwidths kept | share | setup s, "
        "bandwidths measured (a host's first run) | share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['predicted_baseline_s']:.1f} | "
            f"{r['setup_s_bandwidths_kept']:.2f} | {r['kept_share']:.2%} | "
            f"{r['setup_s_bandwidths_measured']:.2f} | {r['measured_share']:.2%} |"
        )
    before = out / "probe_cost_before.json"  # the same script run at 05f10cc (kept as run)
    if before.is_file():
        lines += ["", "Before (05f10cc: every stage timed 3 times after a warm-up, its whole "
                  "batch output trial-compressed, no bandwidths), the same script:", ""]  # fmt: skip
        for r in json.loads(before.read_text())["rows"]:
            lines.append(
                f"- {r['setting']}: setup {r['setup_s_bandwidths_kept']:.2f} s of a predicted "
                f"{r['predicted_baseline_s']:.1f} s baseline ({r['kept_share']:.2%})"
            )
    (out / "probe_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results")
    target.mkdir(parents=True, exist_ok=True)
    run(target)
