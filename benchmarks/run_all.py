"""Regenerate every benchmark result under benchmarks/results/.

    python benchmarks/run_all.py            # `make bench`: every table and plot (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # `make bench-quick`: the same pipeline, CI-sized (minutes)

Writes JSON + markdown (+ PNG) per benchmark, then ``bench_run.json`` with the
machine and the run time. Exits 1 when any expected file was not produced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from prefast.store.bench import machine, markdown, plot, run_store_bench

from prefast.bench_train import accuracy_table, run_sweep
from prefast.config import TrainConfig

MODES = ["baseline", "freezeout", "prefast"]


def store(out: Path, quick: bool) -> list[Path]:
    doc = run_store_bench(64 * 2**20 if quick else 8 * 2**30, trials=1 if quick else 3)
    (out / "store.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "store.md").write_text(markdown(doc))
    plot(doc, out / "store.png")
    return [out / f"store.{ext}" for ext in ("json", "md", "png")]


def sweep(cfg: TrainConfig, t0s: list[float], seeds: list[int], prefix: Path) -> list[Path]:
    run_sweep(cfg, t0s, seeds, MODES, str(prefix))
    return [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="CI-sized: one seed, one t0, 64 MB store")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    quick = args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / ".cache")
    started = time.perf_counter()
    seeds = [0] if quick else [0, 1, 2]
    t0s = [0.5] if quick else [0.5, 0.6, 0.7, 0.8]
    expected: list[Path] = []
    sections: dict[str, float] = {}  # seconds per part, for bench_run.json

    def done(name: str, since: float) -> float:
        sections[name] = time.perf_counter() - since
        return time.perf_counter()

    # (a) The paper's setting: a 2000-image CIFAR-shaped subset of a 50,000-image set.
    subset = TrainConfig(
        dataset="synthetic",
        subset=2000,
        synthetic_size=(50_000, 2_000),
        model="densenet-bc",
        depth=10 if quick else 16,
        growth_rate=12,
        epochs=4 if quick else 6,
        batch_size=64,
        device="cpu",
        cache_dir=cache,
    )
    t = started
    expected += sweep(subset, t0s, seeds, out / "train_subset")
    t = done("train_subset", t)

    # (b) Full data: all 50,000 training and 10,000 test samples.
    if not quick:
        full = subset.replace(
            subset=None, synthetic_size=(50_000, 10_000), depth=10, growth_rate=6,
            batch_size=128, epochs=4,
        )  # fmt: skip
        expected += sweep(full, t0s, seeds, out / "train_full")
        t = done("train_full", t)

    # Accuracy on real images (scikit-learn digits): what freezing and caching cost.
    digits = TrainConfig(
        dataset="digits",
        model="densenet-bc",
        depth=16,
        growth_rate=12,
        epochs=6 if quick else 15,
        batch_size=64,
        device="cpu",
        t0=0.6,
        cache_dir=cache,
    )
    settings = [("none", 1)] if quick else [("none", 1), ("standard", 1), ("standard", 4)]
    docs = {}
    for aug, views in settings:
        prefix = out / f"digits_{aug}_views{views}"
        docs[f"augment {aug}, cache views {views}"] = run_sweep(
            digits.replace(augment=aug, cache_views=views),
            [0.6],
            [0] if quick else [0, 1, 2, 3, 4],
            MODES,
            str(prefix),
        )
        expected += [prefix.with_suffix(".json")]
    table = accuracy_table(docs)
    (out / "digits_accuracy.md").write_text(
        f"scikit-learn digits, densenet-bc depth {digits.depth} k={digits.growth_rate}, "
        f"{digits.epochs} epochs, t0 {digits.t0}, cubic scaling.\n\n{table}"
    )
    print(table)
    expected.append(out / "digits_accuracy.md")
    t = done("digits", t)

    expected += store(out, quick)
    done("store", t)

    shutil.rmtree(cache, ignore_errors=True)  # scratch caches of the training sweeps
    elapsed = time.perf_counter() - started
    (out / "bench_run.json").write_text(
        json.dumps(
            {"quick": quick, "seconds": elapsed, "sections_s": sections, "machine": machine()},
            indent=1,
        )
        + "\n"
    )
    missing = [str(p) for p in expected if not p.is_file() or p.stat().st_size == 0]
    if missing:
        print(f"benchmark results missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"benchmarks done in {elapsed:.0f}s -> {out} ({len(expected)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
