"""Image-folder benchmark: where caching pays most, measured on real image files.

scikit-learn's digits are written (never committed) as torchvision image folders
at 32, 64 and 128 px, as PNG and as JPEG (quality 90): 1,500 training and 297
test images, upscaled with bicubic filtering. Every cell of the grid trains
freezeout and prefast (and, where asked, baseline) side by side in one process
on the same folder, reading it through a DataLoader (``--workers 0`` or ``N``)
that opens, decodes and transforms every file of every epoch, as an
ImageFolder user's training does. Per run it keeps the wall-clock, test
accuracy, the share of training time spent waiting for data
(``final.data_share``) and where the time went: setup, cache writes, cache
reads, data wait, the rest of training (compute), evaluation.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import TrainConfig
from prefast.training.compare import compare

TRAIN_IMAGES = 1500
PARTS = ("setup", "write", "read", "data", "compute", "eval")


def write_digits_folder(
    root: Path,
    size: int,
    codec: str,
    train_images: int = TRAIN_IMAGES,
    classes: tuple[int, ...] | None = None,
) -> Path:
    """``root/train/<digit>/*`` (those of the first ``train_images`` of a fixed shuffle) and
    ``root/val/<digit>/*`` (those of its last 297), made once: a marker says the folder is
    complete. ``classes``: only these digits (a backbone pretrained on some digits and
    probed on the others)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / ".complete"
    if done.is_file():
        return root
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 1,797 images, 8x8
    order = np.random.default_rng(0).permutation(len(pixels))
    ext = {"png": "png", "jpeg": "jpg"}[codec]
    quality = 90 if codec == "jpeg" else None  # PNG is lossless: no quality setting
    for split, rows in (("train", order[:train_images]), ("val", order[TRAIN_IMAGES:])):
        for row in rows.tolist():
            if classes is not None and digits.target[row] not in classes:
                continue
            folder = root / split / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[row], mode="L").resize(
                (size, size), Image.Resampling.BICUBIC
            )
            path = folder / f"{row}.{ext}"
            if quality is None:
                image.convert("RGB").save(path)
            else:
                image.convert("RGB").save(path, quality=quality)
    done.touch()
    return root


@dataclass(frozen=True)
class Cell:
    """One setting of the grid: image size, codec, DataLoader workers, augmentation."""

    size: int
    codec: str
    workers: int
    augment: str
    seeds: tuple[int, ...]
    modes: tuple[str, ...] = ("freezeout", "prefast")

    @property
    def model(self) -> str:
        # DenseNet-BC has a CIFAR stem (32 px); torchvision's ResNet-18 an ImageNet one.
        return "densenet-bc" if self.size <= 32 else "resnet18"

    @property
    def label(self) -> str:
        return f"{self.size}px {self.codec} workers {self.workers} augment {self.augment}"


def cell_config(cell: Cell, folder: Path, cache: str, epochs: int, t0: float) -> TrainConfig:
    return TrainConfig(
        dataset="imagefolder",
        data_dir=str(folder),
        image_size=cell.size,
        model=cell.model,
        depth=16,
        growth_rate=12,
        epochs=epochs,
        batch_size=64,
        t0=t0,
        augment=cell.augment,
        # Two augmented views: later epochs alternate between two crops and flips per
        # sample instead of repeating one (issue-sized: K views cost K write epochs).
        cache_views=2 if cell.augment == "standard" else 1,
        workers=cell.workers,
        device="cpu",
        cache_dir=cache,
    )


def time_split(run: dict) -> dict[str, float]:
    """Seconds of one run by where they went; the parts add up to its wall-clock."""
    epochs = run["epochs"]
    parts = {
        "write": sum(e["write_s"] for e in epochs),
        "read": sum(e["read_s"] for e in epochs),
        "data": sum(e["data_s"] for e in epochs),
        "eval": sum(e["eval_s"] for e in epochs),
    }
    train_s = sum(e["train_s"] for e in epochs)
    # What is left of training after its waits is the step's own work. (write_s/read_s
    # also count the test cache's I/O, which happens during evaluation: that small part
    # is taken from compute instead of eval, and the parts still add up to wall_s.)
    parts["compute"] = train_s - parts["write"] - parts["read"] - parts["data"]
    parts["setup"] = run["final"]["wall_s"] - sum(e["time_s"] for e in epochs)
    return {k: parts[k] for k in PARTS}


def summarize_run(run: dict) -> dict:
    final = run["final"]
    events = [e for e in final.get("cache_events", []) if e["event"] == "boundary"]
    return {
        "wall_s": final["wall_s"],
        "test_acc": final["test_acc"],
        "data_share": final["data_share"],
        "parts_s": time_split(run),
        "cache": [
            {"stage": e.get("stage"), "tier": e["tier"], "bytes": e["bytes"]} for e in events
        ],
        "epochs": [
            {
                k: e[k]
                for k in (
                    "epoch",
                    "train_s",
                    "eval_s",
                    "data_s",
                    "read_s",
                    "write_s",
                    "cached_batches",
                    "test_acc",
                )
            }
            for e in run["epochs"]
        ],
    }


def grid(quick: bool) -> list[Cell]:
    """The cells run by ``make bench`` (or, CI-sized, by ``make bench-quick``).

    Every (size, codec, workers) cell with ``--augment standard``; three seeds at
    32 px, one at 64 and 128 px (a 128 px freezeout + prefast pair takes about four
    minutes on 2 cores); ``--augment none`` and baseline at 32 and 64 px only.
    """
    if quick:
        return [Cell(32, "png", 0, "standard", (0,), ("baseline", "freezeout", "prefast"))]
    cells = []
    for size in (32, 64, 128):
        seeds = (0, 1, 2) if size == 32 else (0,)
        for codec in ("png", "jpeg"):
            for workers in (0, 2):
                with_baseline = size <= 64 and codec == "png" and workers == 2
                modes = ("baseline", *Cell.modes) if with_baseline else Cell.modes
                cells.append(Cell(size, codec, workers, "standard", seeds, modes))
        if size <= 64:
            cells.append(Cell(size, "png", 2, "none", seeds))
    return cells


def run_imagefolder_bench(out: Path, cache: str, quick: bool, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Run the grid; write ``out``/imagefolder.json, .md and .png; return the document."""
    from prefast.benchmarks.store_bench import machine

    epochs, t0 = (4, 0.5) if quick else (6, 0.5)
    train_images = 400 if quick else TRAIN_IMAGES
    cells = []
    for cell in grid(quick):
        name = f"digits_{train_images}_{cell.size}px_{cell.codec}"
        folder = write_digits_folder(Path(cache) / name, cell.size, cell.codec, train_images)
        runs: dict[str, list[dict]] = {m: [] for m in cell.modes}
        for seed in cell.seeds:
            log(f"=== {cell.label} seed {seed}: {', '.join(cell.modes)} ===")
            cfg = cell_config(cell, folder, str(Path(cache) / "caches"), epochs, t0)
            for mode, run in compare(cfg.replace(seed=seed), list(cell.modes)).items():
                runs[mode].append(summarize_run(run))
                f = run["final"]
                log(f"  {mode:<10} wall {f['wall_s']:.1f}s data share {f['data_share']:.3f} "
                    f"acc {f['test_acc']:.4f}")  # fmt: skip
        cells.append({**cell.__dict__, "model": cell.model, "label": cell.label, "runs": runs})
    doc = {
        "machine": machine(),
        "setting": {
            "train_images": train_images,
            "test_images": 297,
            "epochs": epochs,
            "t0": t0,
            "batch_size": 64,
            "scale": "cubic",
            "densenet_bc": "depth 16, k 12",
            "cache_views": "2 with augment standard, else 1",
        },
        "cells": cells,
    }
    md = markdown(doc)
    log(md)
    (out / "imagefolder.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "imagefolder.md").write_text(md)
    plot(doc, out / "imagefolder.png")
    return doc


def _ms(values: list[float]) -> str:
    mean, sd = mean_std(values)
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def _ratio(runs: dict, num: str, den: str) -> str:
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[num], runs[den], strict=True)]
    return _ms(ratios) + "×"


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def markdown(doc: dict) -> str:
    s, m = doc["setting"], doc["machine"]
    head = (
        f"Image folders from scikit-learn digits ({s['train_images']} train / {s['test_images']} "
        f"test images), {s['epochs']} epochs, t0 {s['t0']}, batch {s['batch_size']}, "
        f"{s['scale']} scaling; DenseNet-BC ({s['densenet_bc']}) at 32 px, torchvision "
        f"ResNet-18 at 64 and 128 px; cache views: {s['cache_views']}. {m['cores']} cores "
        f"({m.get('cpu', '?')}), GPU {m['gpu']}, torch {m['torch']}. Each seed's modes ran side "
        "by side in one process; ratios are per seed (mean ± std where there are several).\n\n"
    )
    lines = [
        "| size | model | codec | workers | augment | seeds | freezeout s | prefast s "
        "| prefast vs freezeout | data share freezeout | data share prefast "
        "| test acc freezeout | test acc prefast | cache |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in doc["cells"]:
        fo, pf = c["runs"]["freezeout"], c["runs"]["prefast"]
        caches = pf[0]["cache"]
        cache = ", ".join(f"{e['tier']} {e['bytes'] / 2**20:.0f} MiB" for e in caches) or "none"
        lines.append(
            f"| {c['size']} | {c['model']} | {c['codec']} | {c['workers']} | {c['augment']} "
            f"| {len(c['seeds'])} | {_mean(fo, 'wall_s'):.1f} | {_mean(pf, 'wall_s'):.1f} "
            f"| {_ratio(c['runs'], 'freezeout', 'prefast')} | {_mean(fo, 'data_share'):.3f} "
            f"| {_mean(pf, 'data_share'):.3f} | {_mean(fo, 'test_acc'):.4f} "
            f"| {_mean(pf, 'test_acc'):.4f} | {cache} |"
        )
    lines += ["", "Against baseline (same process, same seeds):", "",
              "| size | codec | workers | seeds | baseline s | freezeout vs baseline "
              "| prefast vs baseline | data share baseline | test acc baseline |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in doc["cells"]:
        if "baseline" in c["runs"]:
            b = c["runs"]["baseline"]
            lines.append(
                f"| {c['size']} | {c['codec']} | {c['workers']} | {len(c['seeds'])} "
                f"| {_mean(b, 'wall_s'):.1f} | {_ratio(c['runs'], 'baseline', 'freezeout')} "
                f"| {_ratio(c['runs'], 'baseline', 'prefast')} | {_mean(b, 'data_share'):.3f} "
                f"| {_mean(b, 'test_acc'):.4f} |"
            )
    lines += ["", "Where the time went (seconds, mean over seeds; compute = training minus "
              "its cache I/O and data wait; write/read include the test cache's):", "",
              "| size | codec | workers | augment | mode | wall | " + " | ".join(PARTS) + " |",
              "|---:|---|---:|---|---|---:|" + "---:|" * len(PARTS)]  # fmt: skip
    for c in doc["cells"]:
        for mode, runs in c["runs"].items():
            parts = " | ".join(
                f"{statistics.mean(r['parts_s'][k] for r in runs):.1f}" for k in PARTS
            )
            lines.append(
                f"| {c['size']} | {c['codec']} | {c['workers']} | {c['augment']} | {mode} "
                f"| {_mean(runs, 'wall_s'):.1f} | {parts} |"
            )
    return head + "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    sizes = sorted({c["size"] for c in doc["cells"]})
    fig, axes = panels(len(sizes), 4.2, 3.8)
    style = {"baseline": ("s", "tab:gray"), "freezeout": ("o", "tab:blue"),
             "prefast": ("^", "tab:orange")}  # fmt: skip
    for ax, size in zip(axes, sizes, strict=True):
        for c in (c for c in doc["cells"] if c["size"] == size):
            for mode, runs in c["runs"].items():
                marker, color = style[mode]
                x = [r["wall_s"] for r in runs]
                y = [100 * (1 - r["test_acc"]) for r in runs]
                filled = c["augment"] == "standard"
                ax.scatter(x, y, marker=marker, color=color if filled else "none",
                           edgecolors=color, s=28)  # fmt: skip
        for mode, (marker, color) in style.items():
            ax.scatter([], [], marker=marker, color=color, label=mode)
        model = next(c["model"] for c in doc["cells"] if c["size"] == size)
        ax.set_title(f"{size} px ({model})", fontsize=9)
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("test error (%)")
    axes[0].legend(fontsize=7, title="hollow: --augment none", title_fontsize=7)
    fig.suptitle("image folders (digits): error vs wall-clock, every codec and worker count",
                 fontsize=9)  # fmt: skip
    save(fig, path)
