"""Cache dtype benchmark: what storing the frozen prefix's output in fewer bits costs.

Two parts, both on real boundary activations:

1. **Codecs** (no training): the first boundary cache a float32 run of each
   setting leaves on disk is re-encoded in every cache dtype, in numcodecs'
   ``BitRound`` (keeping 1..9 of float16's 10 mantissa bits) and in numcodecs'
   ``Quantize`` (fixed decimal digits, stored as float16). Each then goes through
   zstd-1 as the zarr tier writes it. Per codec: relative reconstruction error,
   bytes per value on disk, and encode (write) and decode (read) MB/s of float32
   activations in memory. The best bit-rounding is the one with the fewest bytes
   whose error is at most int8's: the same fidelity, compared on bytes.
2. **Accuracy**: scikit-learn digits (real images) and the synthetic CIFAR-shaped
   set, DenseNet-BC, ``--augment none`` and ``standard``, 5 seeds: freezeout,
   then prefast with the cache in the zarr tier at float32, float16, bfloat16,
   float8, int8 and the best bit-rounding. Per run: test accuracy, wall-clock, and
   the bytes per value its caches' activations take on disk (zstd included, the 8-bit
   rows' scales too; labels, ids and block rounding left out), and all they take.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import torch

from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import TrainConfig
from prefast.store import CacheRoot, encoding, open_reader
from prefast.store.layout import disk_usage
from prefast.store.manage import list_caches
from prefast.training.trainer import train

DTYPES = ("float32", "float16", "bfloat16", "float8", "int8")  # + the best bit-rounding
ZSTD = numcodecs.Zstd(level=1)


@dataclass(frozen=True)
class Setting:
    dataset: str
    augment: str

    @property
    def label(self) -> str:
        return f"{self.dataset}, augment {self.augment}"


def setting_config(s: Setting, quick: bool, cache: str) -> TrainConfig:
    """DenseNet-BC, t0 0.5 (half the run after the first freeze reads caches)."""
    common = dict(
        model="densenet-bc", depth=10 if quick else 16, growth_rate=12, batch_size=64,
        t0=0.5, augment=s.augment, device="cpu", cache_dir=cache, cache_tier="zarr",
    )  # fmt: skip
    if s.dataset == "digits":
        return TrainConfig(dataset="digits", epochs=6 if quick else 15, **common)  # type: ignore[arg-type]
    # CIFAR-shaped: 32x32x3, 10 classes; 1,000 training samples of a 50,000-sample set.
    return TrainConfig(
        dataset="synthetic", synthetic_size=(50_000, 1_000), subset=512 if quick else 1000,
        epochs=4 if quick else 8, **common,  # type: ignore[arg-type]
    )  # fmt: skip


# -- 1. codecs on real activations -------------------------------------------------------
def boundary_activations(cfg: TrainConfig, rows: int = 1024) -> tuple[np.ndarray, int]:
    """Train once at float32 and read back the first ``rows`` rows of the training cache
    its last boundary left on disk (float32: exactly what the stage computed)."""
    train(cfg.replace(mode="prefast", cache_dtype="float32"))
    root = CacheRoot(Path(cfg.cache_dir or ""))
    caches = [c for c in list_caches(root) if c["split"] == "train" and c["status"] == "complete"]
    last = max(caches, key=lambda c: c["boundary"])
    reader = open_reader(root, last["key"])
    try:
        n = min(rows, reader.spec.rows)
        acts = reader.read_rows(np.arange(n))[0].numpy().copy()
    finally:
        reader.close()
    shutil.rmtree(root.path, ignore_errors=True)
    return acts, int(last["boundary"])


def _timed(fn, reps: int = 3):  # type: ignore[no-untyped-def]
    best, out = math.inf, None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def codec_row(name: str, acts: np.ndarray, encode, decode) -> dict:  # type: ignore[no-untyped-def]
    """One codec: error, bytes per value after zstd-1, MB/s of float32 in and out."""
    stored, enc_s = _timed(lambda: np.ascontiguousarray(encode(acts)))
    frame, zstd_s = _timed(lambda: ZSTD.encode(stored))
    raw = np.frombuffer(ZSTD.decode(frame), dtype=stored.dtype).reshape(stored.shape).copy()
    back, dec_s = _timed(lambda: decode(raw))
    _, unzstd_s = _timed(lambda: ZSTD.decode(frame))
    back = np.asarray(back, dtype=np.float32).reshape(acts.shape)
    err = float(np.linalg.norm(back - acts)) / max(float(np.linalg.norm(acts)), 1e-30)
    mb = acts.nbytes / 1e6
    return {
        "codec": name,
        "rel_error": err,
        "bytes_per_value": len(frame) / acts.size,
        "stored_bytes_per_value": stored.nbytes / acts.size,
        "write_mb_s": mb / (enc_s + zstd_s),
        "read_mb_s": mb / (unzstd_s + dec_s),
    }


def codec_table(acts: np.ndarray) -> list[dict]:
    shape = acts.shape[1:]
    rows = []
    for d in (*DTYPES, *encoding.BITROUND):

        def enc(a: np.ndarray, d: str = d) -> np.ndarray:
            stored = encoding.encode(torch.from_numpy(a), d)
            return (stored.view(torch.int16) if d == "bfloat16" else stored).numpy()

        def dec(s: np.ndarray, d: str = d) -> np.ndarray:
            t = torch.from_numpy(s)
            t = t.view(torch.bfloat16) if d == "bfloat16" else t
            return encoding.decode(t, d, shape).float().numpy()

        rows.append(codec_row(d, acts, enc, dec))
    for digits in (1, 2):
        q = numcodecs.Quantize(digits=digits, dtype="<f4", astype="<f2")
        rows.append(codec_row(f"quantize{digits}", acts, q.encode, lambda s: s.astype(np.float32)))
    return rows


def best_bitround(rows: list[dict]) -> str:
    """Fewest bytes among the bit-roundings whose error is at most int8's."""
    int8 = next(r for r in rows if r["codec"] == "int8")["rel_error"]
    fits = [r for r in rows if r["codec"].startswith("bitround") and r["rel_error"] <= int8]
    if not fits:  # none is as faithful as int8: the most faithful one
        fits = [
            max((r for r in rows if r["codec"].startswith("bitround")), key=lambda r: r["codec"])
        ]
    return min(fits, key=lambda r: r["bytes_per_value"])["codec"]


# -- 2. accuracy -------------------------------------------------------------------------
def run_one(cfg: TrainConfig) -> dict:
    """One training run in a fresh cache directory; the bytes its caches take on disk."""
    root = Path(cfg.cache_dir or "")
    shutil.rmtree(root, ignore_errors=True)
    run = train(cfg)
    final = run["final"]
    caches = [c for c in list_caches(CacheRoot(root)) if c["status"] == "complete"]
    values = sum(c["rows"] * math.prod(c["shape"]) for c in caches)
    on_disk = sum(disk_usage(root / c["key"]) for c in caches)
    # The activations' own files (chunks, and zarr's array metadata): labels, ids and the
    # file system's block rounding left out, so dtypes compare on what they store.
    stored = sum(
        f.stat().st_size
        for c in caches
        for f in (root / c["key"]).glob("activations*/**/*")
        if f.is_file()
    ) + sum(f.stat().st_size for c in caches for f in (root / c["key"]).glob("activations.bin"))
    shutil.rmtree(root, ignore_errors=True)
    return {
        "test_acc": final["test_acc"],
        "wall_s": final["wall_s"],
        "cache_bytes": on_disk,
        "bytes_per_value": stored / values if values else None,
        "boundaries": sorted({c["boundary"] for c in caches}),
        "cached_epochs": sum(
            e["cached_batches"] == final["batches_per_epoch"] for e in run["epochs"]
        ),
    }


def run_setting(s: Setting, seeds: list[int], quick: bool, cache: str) -> dict:
    cfg = setting_config(s, quick, cache)
    acts, stage = boundary_activations(cfg)
    codecs = codec_table(acts)
    bitround = best_bitround(codecs)
    variants = [("freezeout", None), *(("prefast", d) for d in (*DTYPES, bitround))]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        for mode, dtype in variants:
            name = mode if dtype is None else f"prefast {dtype}"
            run = run_one(cfg.replace(mode=mode, seed=seed, cache_dtype=dtype or "auto"))
            runs.setdefault(name, []).append({"seed": seed, **run})
            print(f"  {s.label} seed {seed} {name}: acc {run['test_acc']:.4f} "
                  f"wall {run['wall_s']:.1f}s bytes/value {run['bytes_per_value']}", flush=True)  # fmt: skip
    return {
        "setting": s.label,
        "config": cfg.to_json(),
        "codec_stage": stage,
        "codec_shape": list(acts.shape),
        "codecs": codecs,
        "best_bitround": bitround,
        "runs": runs,
    }


def summary_rows(doc: dict) -> list[dict]:
    out = []
    fo = doc["runs"]["freezeout"]
    for name, runs in doc["runs"].items():
        acc, acc_std = mean_std([r["test_acc"] for r in runs])
        wall, wall_std = mean_std([r["wall_s"] for r in runs])
        bpv = [r["bytes_per_value"] for r in runs if r["bytes_per_value"]]
        # Paired by seed: the accuracy this dtype gives up against freezeout's same seed.
        delta, delta_std = mean_std(
            [r["test_acc"] - f["test_acc"] for r, f in zip(runs, fo, strict=True)]
        )
        out.append({
            "variant": name, "seeds": len(runs), "test_acc": acc, "test_acc_std": acc_std,
            "delta": delta, "delta_std": delta_std, "wall_s": wall, "wall_std": wall_std,
            "bytes_per_value": float(np.mean(bpv)) if bpv else None,
            "cache_mib": float(np.mean([r["cache_bytes"] for r in runs])) / 2**20,
        })  # fmt: skip
    return out


def markdown(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        c = doc["config"]
        lines += [
            f"### {doc['setting']}",
            "",
            f"densenet-bc depth {c['depth']} k={c['growth_rate']}, {c['epochs']} epochs, "
            f"t0 {c['t0']}, zarr tier; {len(doc['runs']['freezeout'])} seeds. "
            "Δ acc: paired by seed against freezeout.",
            "",
            "| variant | test acc (mean ± std) | Δ acc vs freezeout | bytes/value on disk "
            "| cache MiB | wall s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in summary_rows(doc):
            bpv = "-" if r["bytes_per_value"] is None else f"{r['bytes_per_value']:.3f}"
            lines.append(
                f"| {r['variant']} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} "
                f"| {r['delta']:+.4f} ± {r['delta_std']:.4f} | {bpv} | {r['cache_mib']:.1f} "
                f"| {r['wall_s']:.1f} ± {r['wall_std']:.1f} |"
            )
        lines += [
            "",
            f"Codecs on {doc['codec_shape'][0]} rows of stage {doc['codec_stage']}'s output "
            f"({'x'.join(map(str, doc['codec_shape'][1:]))}) from a float32 run; zstd-1 "
            f"after each; MB/s of float32 in memory. Best bit-rounding: {doc['best_bitround']}.",
            "",
            "| codec | relative error | bytes/value (zstd-1) | write MB/s | read MB/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in doc["codecs"]:
            lines.append(
                f"| {r['codec']} | {r['rel_error']:.5f} | {r['bytes_per_value']:.3f} "
                f"| {r['write_mb_s']:.0f} | {r['read_mb_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(docs: list[dict], path: Path) -> None:
    fig, axes = panels(len(docs), 4.2, 3.8)
    for ax, doc in zip(axes, docs, strict=True):
        # The accuracy each dtype gives up, paired by seed against freezeout: the seed-to-seed
        # spread of accuracy itself is far wider than any dtype's effect.
        ax.axhline(0.0, color="grey", ls="--", lw=1, label="freezeout")
        for r in summary_rows(doc):
            if r["bytes_per_value"] is None:
                continue
            ax.errorbar(r["bytes_per_value"], r["delta"], yerr=r["delta_std"], fmt="o",
                        capsize=3, label=r["variant"].removeprefix("prefast "))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per cached value on disk (zstd-1 where it pays)")
        ax.set_ylabel("test accuracy - freezeout's (same seed)")
        ax.set_title(doc["setting"], fontsize=9)
        ax.legend(fontsize=7)
    save(fig, path)


def run_cache_dtype_bench(out: Path, cache: str, quick: bool) -> list[Path]:
    settings = [Setting(d, a) for d in ("digits", "synthetic") for a in ("none", "standard")]
    if quick:
        settings = settings[:1]
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    docs = []
    for s in settings:
        print(f"cache_dtype: {s.label}", flush=True)
        docs.append(run_setting(s, seeds, quick, str(Path(cache) / "cache_dtype")))
    prefix = out / "cache_dtype"
    prefix.with_suffix(".json").write_text(json.dumps(docs, indent=1, default=str))
    prefix.with_suffix(".md").write_text(markdown(docs))
    plot(docs, prefix.with_suffix(".png"))
    print(markdown(docs))
    return [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]
