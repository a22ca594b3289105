"""Regenerate every benchmark result under benchmarks/results/.

    python benchmarks/run_all.py               # `make bench`: every table and plot (about 5 h 15 min on 2 cores)
    python benchmarks/run_all.py --quick       # `make bench-quick`: the same pipeline, CI-sized (minutes)
    python benchmarks/run_all.py --only store  # one section again (train_subset, train_full, digits,
                                               # imagefolder, finetune, auto_freeze, cache_dtype,
                                               # feature_augment, store, store_8bit, objectstore,
                                               # chunk_size, map_advice, ddp)

Writes JSON + markdown (+ PNG) per benchmark, then ``bench_run.json`` with the
machine and the run time per section (a section rerun with ``--only`` replaces
its own time there and is listed under ``"rerun"``). Exits 1 when any expected
file was not produced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

from prefast.benchmarks.store_bench import machine, markdown, plot, run_store_bench
from prefast.benchmarks.train_bench import accuracy_table, run_sweep
from prefast.config import TrainConfig
from prefast.store.base import SHUFFLE_BUFFER_BYTES

MODES = ["baseline", "freezeout", "prefast"]


def subset_config(quick: bool, cache: str) -> TrainConfig:
    """The paper's setting: a 2000-image CIFAR-shaped subset of a 50,000-image set (quick,
    for CI: 1000 of 10,000, tested on 1000)."""
    return TrainConfig(
        dataset="synthetic",
        subset=1000 if quick else 2000,
        synthetic_size=(10_000, 1_000) if quick else (50_000, 2_000),
        model="densenet-bc",
        depth=10 if quick else 16,
        growth_rate=12,
        epochs=4 if quick else 6,
        batch_size=64,
        device="cpu",
        cache_dir=cache,
    )


def sweep(cfg: TrainConfig, quick: bool, prefix: Path) -> list[Path]:
    seeds = [0] if quick else [0, 1, 2]
    t0s = [0.5] if quick else [0.5, 0.6, 0.7, 0.8]
    run_sweep(cfg, t0s, seeds, MODES, str(prefix))
    return [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]


def train_subset(out: Path, quick: bool, cache: str) -> list[Path]:
    return sweep(subset_config(quick, cache), quick, out / "train_subset")


def train_full(out: Path, quick: bool, cache: str) -> list[Path]:
    """All 50,000 training and 10,000 test samples (skipped in quick mode).

    8 epochs at t0 0.5 and 0.7: with 4 epochs a cache served one epoch at t0 0.5 and
    none at 0.7, so the section measured the planner more than the cache.
    """
    if quick:
        return []
    full = subset_config(quick, cache).replace(
        subset=None, synthetic_size=(50_000, 10_000), depth=10, growth_rate=6,
        batch_size=128, epochs=8,
    )  # fmt: skip
    prefix = out / "train_full"
    run_sweep(full, [0.5, 0.7], [0, 1, 2], MODES, str(prefix))
    return [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]


def digits(out: Path, quick: bool, cache: str) -> list[Path]:
    """Accuracy on real images (scikit-learn digits): what freezing and caching cost."""
    cfg = TrainConfig(
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
    docs, files = {}, []
    for aug, views in settings:
        prefix = out / f"digits_{aug}_views{views}"
        # Without augmentation the cache is exact only at float32: that row claims exactness.
        dtype = "float32" if aug == "none" else "auto"
        docs[f"augment {aug}, cache views {views}, cache {dtype}"] = run_sweep(
            cfg.replace(augment=aug, cache_views=views, cache_dtype=dtype),
            [0.6],
            [0] if quick else [0, 1, 2, 3, 4],
            MODES,
            str(prefix),
        )
        files.append(prefix.with_suffix(".json"))
    table = accuracy_table(docs)
    (out / "digits_accuracy.md").write_text(
        f"scikit-learn digits, densenet-bc depth {cfg.depth} k={cfg.growth_rate}, "
        f"{cfg.epochs} epochs, t0 {cfg.t0}, cubic scaling.\n\n{table}"
    )
    print(table)
    return [*files, out / "digits_accuracy.md"]


def store(out: Path, quick: bool, cache: str) -> list[Path]:
    doc = run_store_bench(64 * 2**20 if quick else 8 * 2**30, trials=1 if quick else 3)
    (out / "store.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "store.md").write_text(markdown(doc))
    plot(doc, out / "store.png")
    return [out / f"store.{ext}" for ext in ("json", "md", "png")]


def store_8bit(out: Path, quick: bool, cache: str) -> list[Path]:
    """The same tiers and floors with rows stored in float16, int8 and float8 (2 GB of
    float16 activations, 2 trials; quick: 32 MB, 1 trial)."""
    size, trials = (32 * 2**20, 1) if quick else (2 * 2**30, 2)
    doc = run_store_bench(size, trials=trials, dtypes=("float16", "int8", "float8"))
    (out / "store_8bit.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "store_8bit.md").write_text(markdown(doc))
    plot(doc, out / "store_8bit.png")
    return [out / f"store_8bit.{ext}" for ext in ("json", "md", "png")]


def objectstore(out: Path, quick: bool, cache: str) -> list[Path]:
    """The zarr tier in an object store against raw range GETs, on moto's S3 server on
    127.0.0.1 (functional: it shares the cores; 1 GB, 3 trials; quick: 64 MB, 1)."""
    from prefast.benchmarks import objectstore_bench as ob

    size, trials = (64 * 2**20, 1) if quick else (2**30, 3)
    with ob.local_server() as url:
        doc = ob.run_object_store_bench(url, size, trials)
    (out / "objectstore.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "objectstore.md").write_text(ob.markdown(doc))
    return [out / "objectstore.json", out / "objectstore.md"]


def chunk_size(out: Path, quick: bool, cache: str) -> list[Path]:
    """Shuffled-epoch reads at 4, 16 and 32 MiB chunks (quick: 1 and 4 MiB, 64 MB)."""
    from prefast.benchmarks.chunk_bench import setting

    if quick:
        settings, size, trials, buffer = [setting(1), setting(4)], 64 * 2**20, 1, 16 * 2**20
    else:
        settings = [setting(m) for m in (4, 16, 32)]
        size, trials, buffer = 2 * 2**30, 3, SHUFFLE_BUFFER_BYTES
    return _chunk_section(out, "chunk_size", "Chunk size", settings, size, trials, buffer)


def map_advice(out: Path, quick: bool, cache: str) -> list[Path]:
    """32 MiB chunks read with 4 KiB page faults, then 2 MiB ones (quick: 4 MiB chunks, 64 MB)."""
    from prefast.benchmarks.chunk_bench import setting

    quick_run, full_run = (4, 64 * 2**20, 1, 16 * 2**20), (32, 2**30, 5, SHUFFLE_BUFFER_BYTES)
    mib, size, trials, buffer = quick_run if quick else full_run
    settings = [setting(mib, huge_page_faults=False), setting(mib)]
    title = "Page-fault size (MADV_HUGEPAGE on the mapped files)"
    return _chunk_section(out, "map_advice", title, settings, size, trials, buffer)


def _chunk_section(
    out: Path, name: str, title: str, settings: list, size: int, trials: int, buffer: int
) -> list[Path]:
    from prefast.benchmarks.chunk_bench import markdown as chunk_markdown
    from prefast.benchmarks.chunk_bench import run_chunk_bench

    doc = run_chunk_bench(size, settings, trials, buffer_bytes=buffer)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{name}.md").write_text(chunk_markdown(doc, title))
    return [out / f"{name}.json", out / f"{name}.md"]


def ddp(out: Path, quick: bool, cache: str) -> list[Path]:
    """torchrun with 1 and 2 gloo ranks: cache bytes per rank, exactness (quick: 4 epochs, t0 0.5)."""
    from prefast.benchmarks.ddp_bench import markdown as ddp_markdown
    from prefast.benchmarks.ddp_bench import run_ddp_bench

    doc = run_ddp_bench(*((4, 0.5) if quick else (10, 0.8)))
    (out / "ddp_digits.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "ddp_digits.md").write_text(ddp_markdown(doc))
    return [out / "ddp_digits.json", out / "ddp_digits.md"]


def cache_dtype(out: Path, quick: bool, cache: str) -> list[Path]:
    """Accuracy, bytes and codec speed of every cache dtype (quick: digits, one seed)."""
    from prefast.benchmarks.cache_dtype_bench import run_cache_dtype_bench

    return run_cache_dtype_bench(out, cache, quick)


def feature_augment(out: Path, quick: bool, cache: str) -> list[Path]:
    """Feature ops on one cached view against four views and FreezeOut (quick: digits)."""
    from prefast.benchmarks.feature_augment_bench import run_feature_augment_bench

    return run_feature_augment_bench(out, cache, quick)


def finetune(out: Path, quick: bool, cache: str) -> list[Path]:
    """ResNet-18 (128 px) and ViT-tiny (64 px) pretrained here on digits 0-4, fine-tuned on
    5-9 with a frozen prefix computed every step or cached; a sweep of four head learning
    rates in one process and as CLI processes (quick: 32 px, 256 images' share, two rates)."""
    from prefast.benchmarks.finetune_bench import run_finetune_bench

    return run_finetune_bench(out, cache, quick)


def auto_freeze(out: Path, quick: bool, cache: str) -> list[Path]:
    """--freeze auto against FreezeOut's clock, computed and cached: the subset setting from
    scratch and a ViT-tiny fine-tune, 3 seeds (quick: depth 10 and 32 px, one seed)."""
    from prefast.benchmarks.auto_freeze_bench import run_auto_freeze_bench

    return run_auto_freeze_bench(out, cache, quick, subset_config(quick, cache))


def imagefolder(out: Path, quick: bool, cache: str) -> list[Path]:
    """Image files at 32/64/128 px, PNG and JPEG, 0 and 2 workers: data wait and speedup."""
    from prefast.benchmarks.imagefolder_bench import run_imagefolder_bench

    run_imagefolder_bench(out, cache, quick)
    return [out / f"imagefolder.{ext}" for ext in ("json", "md", "png")]


SECTIONS = {
    "train_subset": train_subset,
    "train_full": train_full,
    "digits": digits,
    "imagefolder": imagefolder,
    "finetune": finetune,
    "auto_freeze": auto_freeze,
    "cache_dtype": cache_dtype,
    "feature_augment": feature_augment,
    "store": store,
    "store_8bit": store_8bit,
    "objectstore": objectstore,
    "chunk_size": chunk_size,
    "map_advice": map_advice,
    "ddp": ddp,
}


def record_run(path: Path, quick: bool, sections: dict[str, float], partial: bool) -> None:
    """Write bench_run.json; a partial (--only) run updates the full run's record."""
    doc = {"quick": quick, "seconds": sum(sections.values()), "sections_s": sections}
    if partial and path.is_file():
        doc = json.loads(path.read_text())
        doc["sections_s"].update(sections)
        today = datetime.date.today().isoformat()
        doc.setdefault("rerun", {}).update({name: today for name in sections})
    doc["machine"] = machine()
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="CI-sized: one seed, one t0, 64 MB store")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}); default: all",
    )  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / ".cache")
    expected: list[Path] = []
    sections: dict[str, float] = {}  # seconds per part, for bench_run.json
    for name in args.only or SECTIONS:
        t = time.perf_counter()
        expected += SECTIONS[name](out, args.quick, cache)
        sections[name] = time.perf_counter() - t
    shutil.rmtree(cache, ignore_errors=True)  # scratch caches of the training sweeps
    record_run(out / "bench_run.json", args.quick, sections, partial=bool(args.only))
    missing = [str(p) for p in expected if not p.is_file() or p.stat().st_size == 0]
    if missing:
        print(f"benchmark results missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"benchmarks done in {sum(sections.values()):.0f}s -> {out} ({len(expected)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
