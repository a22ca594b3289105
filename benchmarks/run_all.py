"""Regenerate every benchmark result under benchmarks/results/.

    python benchmarks/run_all.py            # full: storage at 8 GB, t0 sweeps, 3 seeds
    python benchmarks/run_all.py --quick    # CI-sized: minutes on 2 cores

Each benchmark prints the figure it claims and writes JSON + markdown (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefast.store.bench import markdown, run_store_bench

from prefast.bench_train import run_sweep
from prefast.config import TrainConfig


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()

    store = run_store_bench(64 * 2**20 if args.quick else 8 * 2**30, trials=1 if args.quick else 3)
    (out / "store.json").write_text(json.dumps(store, indent=1) + "\n")
    (out / "store.md").write_text(markdown(store))

    seeds = [0] if args.quick else [0, 1, 2]
    t0s = [0.6] if args.quick else [0.5, 0.6, 0.7, 0.8]
    small = TrainConfig(
        dataset="synthetic",
        subset=2000,
        synthetic_size=(50_000, 2_000),
        model="densenet-bc",
        depth=16 if args.quick else 22,
        epochs=3 if args.quick else 6,
        batch_size=64,
        device="cpu",
        cache_dir=str(out / ".cache"),
    )
    run_sweep(small, t0s, seeds, ["baseline", "freezeout", "prefast"], str(out / "train_subset"))
    if not args.quick:
        full = small.replace(
            subset=None, synthetic_size=(50_000, 10_000), depth=10, batch_size=256, epochs=4
        )
        run_sweep(full, t0s, seeds, ["baseline", "freezeout", "prefast"], str(out / "train_full"))
        digits = TrainConfig(
            dataset="digits",
            model="densenet-bc",
            depth=16,
            epochs=15,
            device="cpu",
            t0=0.6,
            cache_dir=str(out / ".cache"),
        )
        for aug, views in (("none", 1), ("standard", 1), ("standard", 4)):
            run_sweep(
                digits.replace(augment=aug, cache_views=views),
                [0.6],
                [0, 1, 2, 3, 4],
                ["baseline", "freezeout", "prefast"],
                str(out / f"digits_{aug}_views{views}"),
            )
    print(f"benchmarks done in {time.perf_counter() - t:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
