"""Fine-tuning benchmark: a pretrained backbone with a frozen prefix, computed every step
(``freezeout --freeze-prefix K --t0 1``) or cached (``prefast``, same flags).

No pretrained weights can be downloaded on this machine, so the backbones are
pretrained here, briefly, and that is what they are: a torchvision ResNet-50 and a
timm ViT-tiny with 8 px patches, each trained by PreFast's baseline mode on 10,000
images of the synthetic set (32 px) and saved as a state dict without its classifier.
They are then fine-tuned on scikit-learn digits written as PNG image folders
(1,500 train / 297 test), read through a DataLoader with 2 workers: ResNet-50 at
128 px through ``--model torchvision:resnet50 --weights FILE``; the ViT at 64 px
(its position embedding resampled from 4x4 to 8x8 patches by ``--weights``'s loader,
as timm does) as a model object through the Python API, since no timm name has a
tiny ViT with 8 px patches.

``--t0 1`` isolates the cache: the stages after the prefix follow one cosine to the
end, so freezeout and prefast differ in whether the prefix is computed, and in what
the cache stores: float16 rows (``--cache-dtype auto`` on a CPU) and, with
``--cache-views 2``, two fixed augmented views where freezeout draws a new one
every epoch. Each
seed's modes run side by side in one process. Then a sweep of four head learning
rates on the ViT linear probe: four prefast runs sharing one zarr cache against four
runs computing the prefix, total time. (ResNet-50 at 128 px costs about 45 s per epoch
computed on 2 cores, so its half-frozen and full fine-tune cells run 2 and 1 epochs.)
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefast.benchmarks.imagefolder_bench import PARTS, summarize_run, write_digits_folder
from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import TrainConfig
from prefast.training.compare import compare
from prefast.training.trainer import train

SWEEP_LRS = (0.2, 0.1, 0.05, 0.02)


@dataclass(frozen=True)
class Backbone:
    name: str  # resnet50 or vit_tiny
    image_size: int  # fine-tuning size
    half: int  # the "half the stages frozen" prefix
    cuts: str  # where that prefix ends, for the table


@dataclass(frozen=True)
class Cell:
    backbone: str
    prefix: int | str  # --freeze-prefix (0: a full fine-tune)
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    tier: str = "auto"
    augment: str = "none"
    views: int = 1
    label: str = field(default="", compare=False)


def backbones(quick: bool) -> dict[str, Backbone]:
    r50, vit = (32, 32) if quick else (128, 64)
    return {
        "resnet50": Backbone("resnet50", r50, 8, "stem, layer1, layer2 (8 of 17)"),
        "vit_tiny": Backbone("vit_tiny", vit, 7, "patch embedding, blocks 0-5 (7 of 13)"),
    }


def grid(quick: bool) -> list[Cell]:
    """The main table. ResNet-50: the linear probe over 10 epochs (the project's 5x goal),
    2 seeds, and on the zarr tier; half the stages frozen over 2 epochs and a full
    fine-tune over 1 (each computed epoch of ResNet-50 at 128 px costs about a minute
    here). ViT: the linear probe over 10 epochs, 3 seeds, also with ``--augment standard
    --cache-views 2``; half frozen over 5, full fine-tune over 3. Quick: one seed, 2 epochs,
    ResNet-50 only as the linear probe, computed and cached (its computed epochs were
    most of the quick run's time), and ViT-tiny's cells but its plain linear probe (they
    cover a prefix as a stage count, the views and the baseline); the sweep covers zarr."""
    three, both = (0, 1, 2), ("freezeout", "prefast")
    cells = [
        Cell("resnet50", "all", both, (0, 1), 10, label="linear probe"),
        Cell("resnet50", "all", ("prefast",), (0,), 10, tier="zarr", label="linear probe, zarr"),
        Cell("resnet50", 8, both, (0,), 2, label="half frozen"),
        Cell("resnet50", 0, ("baseline",), (0,), 1, label="full fine-tune"),
        Cell("vit_tiny", "all", both, three, 10, label="linear probe"),
        Cell(
            "vit_tiny",
            "all",
            both,
            (0,),
            10,
            augment="standard",
            views=2,
            label="linear probe, augment standard, 2 views",
        ),  # fmt: skip
        Cell("vit_tiny", 7, both, (0,), 5, label="half frozen"),
        Cell("vit_tiny", 0, ("baseline",), (0,), 3, label="full fine-tune"),
    ]
    if quick:
        cells = [
            Cell(c.backbone, c.prefix, c.modes, (0,), 2, c.tier, c.augment, c.views, c.label)
            for c in cells
            if (c.label == "linear probe") == (c.backbone == "resnet50")
        ]
    return cells


def _vit(image_size: int, num_classes: int) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", img_size=image_size, patch_size=8, num_classes=num_classes
    )


def pretrain(  # type: ignore[no-untyped-def]
    folder: Path, quick: bool, cache: str, log=print,
    names: tuple[str, ...] = ("resnet50", "vit_tiny"),
) -> dict:  # fmt: skip
    """Train the backbones ``names`` briefly on the synthetic set (baseline mode) and save
    each without its classifier: ``folder``/resnet50.pt and vit_tiny.pt."""
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    size = (512, 128) if quick else (10_000, 1_000)
    cfg = TrainConfig(
        mode="baseline", dataset="synthetic", synthetic_size=size, batch_size=64,
        lr=0.05, device="cpu", cache_dir=cache, augment="standard",
    )  # fmt: skip
    made = {}
    for name, build, epochs, head in (
        ("resnet50", lambda: torchvision.models.resnet50(num_classes=10), 1, "fc."),
        ("vit_tiny", lambda: _vit(32, 10), 1 if quick else 2, "head."),
    ):
        if name not in names:
            continue
        torch.manual_seed(0)
        model = build()
        run = train(cfg.replace(epochs=epochs), model=model)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        torch.save(state, folder / f"{name}.pt")
        made[name] = {
            "images": size[0], "image_size": 32, "epochs": epochs,
            "wall_s": run["final"]["wall_s"], "test_acc": run["final"]["test_acc"],
        }  # fmt: skip
        log(f"pretrained {name}: {epochs} epochs on {size[0]} synthetic images, "
            f"{run['final']['wall_s']:.0f}s, synthetic test acc {run['final']['test_acc']:.3f}")  # fmt: skip
    return made


class Runner:
    """Builds each cell's config and model; the data folders and backbones are shared."""

    def __init__(
        self, quick: bool, cache: Path, weights: Path,
        names: tuple[str, ...] = ("resnet50", "vit_tiny"),
    ):  # fmt: skip
        self.quick, self.cache, self.weights = quick, cache, weights
        self.backbones = {k: b for k, b in backbones(quick).items() if k in names}
        train_images = 256 if quick else 1500
        self.folders = {
            size: write_digits_folder(
                cache / f"digits_{train_images}_{size}px_png", size, "png", train_images
            )
            for size in {b.image_size for b in self.backbones.values()}
        }

    def config(self, cell: Cell, seed: int, cache_dir: Path) -> TrainConfig:
        b = self.backbones[cell.backbone]
        return TrainConfig(
            dataset="imagefolder", data_dir=str(self.folders[b.image_size]),
            image_size=b.image_size, model="torchvision:resnet50",
            weights=str(self.weights / "resnet50.pt") if cell.backbone == "resnet50" else None,
            epochs=cell.epochs, batch_size=64, lr=0.05, t0=1.0, seed=seed,
            freeze_prefix=cell.prefix, augment=cell.augment, cache_views=cell.views,
            cache_tier=cell.tier, workers=2, device="cpu", cache_dir=str(cache_dir),
        )  # fmt: skip

    def model(self, cell: Cell, seed: int) -> torch.nn.Module | None:
        """The ViT as a model object with the pretrained weights (None: ResNet-50 is built
        from the config, ``--weights`` and all)."""
        if cell.backbone != "vit_tiny":
            return None
        from prefast.models.weights import load_weights

        torch.manual_seed(seed)  # the new head's initial weights, as --seed draws them
        model = _vit(self.backbones["vit_tiny"].image_size, 10)
        load_weights(model, str(self.weights / "vit_tiny.pt"))
        return model


def run_cells(runner: Runner, log=print) -> list[dict]:  # type: ignore[no-untyped-def]
    cells = []
    for i, cell in enumerate(grid(runner.quick)):
        runs: dict[str, list[dict]] = {m: [] for m in cell.modes}
        for seed in cell.seeds:
            log(f"=== {cell.backbone} {cell.label} seed {seed}: {', '.join(cell.modes)} ===")
            cfg = runner.config(cell, seed, runner.cache / "caches" / f"cell{i}")
            for mode, run in compare(cfg, list(cell.modes), model=runner.model(cell, seed)).items():
                runs[mode].append(summarize_run(run))
                f = run["final"]
                log(f"  {mode:<10} wall {f['wall_s']:.1f}s acc {f['test_acc']:.4f} "
                    f"data share {f['data_share']:.3f}")  # fmt: skip
        b = runner.backbones[cell.backbone]
        cells.append({**cell.__dict__, "image_size": b.image_size,
                      "cuts": b.cuts if cell.prefix == b.half else None, "runs": runs})  # fmt: skip
    return cells


def run_sweep(runner: Runner, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Four head learning rates on the ViT linear probe (10 epochs; quick: 2), seed 0:
    prefast runs sharing one zarr cache directory, then freezeout runs. Each run is a
    ``train`` call, as four ``prefast train`` commands would be; its outer time counts
    building the model and reading the weights."""
    cell = Cell("vit_tiny", "all", ("freezeout", "prefast"), (0,), 2 if runner.quick else 10,
                tier="zarr")  # fmt: skip
    shared = runner.cache / "caches" / "sweep"
    shutil.rmtree(shared, ignore_errors=True)  # the first run writes the cache, as in a sweep
    doc: dict = {"epochs": cell.epochs, "lrs": list(SWEEP_LRS), "runs": {}}
    for mode in ("prefast", "freezeout"):
        rows = []
        for lr in SWEEP_LRS:
            cfg = runner.config(cell, 0, shared).replace(mode=mode, lr=lr)
            start = time.perf_counter()
            run = train(cfg, model=runner.model(cell, 0))
            outer = time.perf_counter() - start
            first = run["epochs"][0]
            reused = [e for e in run["final"].get("cache_events", []) if e["event"] == "reused"]
            rows.append({
                "lr": lr, "outer_s": outer, "wall_s": run["final"]["wall_s"],
                "test_acc": run["final"]["test_acc"],
                "first_epoch_cached": first["cached_batches"],
                "batches_per_epoch": run["final"]["batches_per_epoch"],
                "reused": bool(reused), "first_epoch_s": first["time_s"],
            })  # fmt: skip
            log(f"  sweep {mode:<10} lr {lr}: {outer:.1f}s acc {run['final']['test_acc']:.4f} "
                f"epoch 1 from cache {first['cached_batches']}/{run['final']['batches_per_epoch']}")  # fmt: skip
        doc["runs"][mode] = rows
    return doc


def run_finetune_bench(out: Path, cache: str, quick: bool, log=print) -> list[Path]:  # type: ignore[no-untyped-def]
    """Pretrain, run the grid and the sweep; write ``out``/finetune.json, .md, .png."""
    from prefast.benchmarks.store_bench import machine

    root = Path(cache) / "finetune"
    shutil.rmtree(root / "caches", ignore_errors=True)  # every cell writes its own cache
    pretrained = pretrain(root / "backbones", quick, str(root / "caches" / "pretrain"), log)
    runner = Runner(quick, root, root / "backbones")
    doc = {
        "machine": machine(),
        "quick": quick,
        "pretrained": pretrained,
        "setting": {
            "train_images": 256 if quick else 1500,
            "test_images": 297,
            "batch_size": 64,
            "lr": 0.05,
            "t0": 1.0,
            "workers": 2,
            "codec": "png",
            "cache_dtype": "auto",
        },  # fmt: skip
        "cells": run_cells(runner, log),
        "sweep": run_sweep(runner, log),
    }
    md = markdown(doc)
    log(md)
    (out / "finetune.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "finetune.md").write_text(md)
    plot(doc, out / "finetune.png")
    return [out / f"finetune.{ext}" for ext in ("json", "md", "png")]


def _ms(values: list[float], digits: int = 2) -> str:
    mean, sd = mean_std(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _frozen(cell: dict) -> str:
    if cell["prefix"] == "all":
        return "all but the head (linear probe)"
    return f"first {cell['prefix']}: {cell['cuts']}" if cell["prefix"] else "none (full fine-tune)"


def _cache(runs: list[dict]) -> str:
    events = runs[0]["cache"]
    return ", ".join(f"{e['tier']} {e['bytes'] / 2**20:.0f} MiB" for e in events) or "-"


def speedup(cell: dict, reference: dict | None = None) -> list[float]:
    """Per-seed wall-clock of the prefix computed every step over the cached prefix."""
    computed = (reference or cell)["runs"]["freezeout"]
    cached = cell["runs"]["prefast"]
    return [a["wall_s"] / b["wall_s"] for a, b in zip(computed, cached, strict=False)]


def markdown(doc: dict) -> str:
    s, m, p = doc["setting"], doc["machine"], doc["pretrained"]
    pre = "; ".join(
        f"{k} {v['epochs']} epochs on {v['images']} synthetic 32 px images ({v['wall_s']:.0f} s, "
        f"synthetic test acc {v['test_acc']:.3f})"
        for k, v in p.items()
    )
    head = (
        "Fine-tuning with a frozen prefix: computed every step (`freezeout --freeze-prefix K "
        "--t0 1`) or cached (`prefast`, same flags). Backbones pretrained here, briefly "
        f"(nothing can be downloaded): {pre}. Fine-tuned on scikit-learn digits as PNG image "
        f"folders ({s['train_images']} train / {s['test_images']} test), DataLoader with "
        f"{s['workers']} workers, batch {s['batch_size']}, lr {s['lr']}, t0 {s['t0']}, cache "
        f"dtype {s['cache_dtype']}. {m['cores']} cores ({m.get('cpu', '?')}), GPU {m['gpu']}, "
        f"torch {m['torch']}. Each seed's modes ran side by side in one process.\n\n"
    )
    lines = [
        "| backbone | px | frozen | augment | tier | epochs | seeds | computed prefix s "
        "| cached prefix s | speedup | test acc computed | test acc cached | data share cached "
        "| cache |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base_lines = []
    for c in doc["cells"]:
        runs = c["runs"]
        if "baseline" in runs:
            b = runs["baseline"]
            base_lines.append(
                f"| {c['backbone']} | {c['image_size']} | {c['epochs']} "
                f"| {_ms([r['wall_s'] for r in b], 1)} | {_ms([r['test_acc'] for r in b], 4)} |"
            )
            continue
        ref = None
        if "freezeout" not in runs:  # the zarr row: against the same cell's computed prefix
            ref = next(
                x for x in doc["cells"] if x["backbone"] == c["backbone"]
                and x["prefix"] == c["prefix"] and "freezeout" in x["runs"]
                and x["augment"] == c["augment"]
            )  # fmt: skip
        fo = (ref or c)["runs"]["freezeout"][: len(runs["prefast"])]
        pf = runs["prefast"]
        lines.append(
            f"| {c['backbone']} | {c['image_size']} | {_frozen(c)} | {c['augment']}"
            f"{', ' + str(c['views']) + ' views' if c['views'] > 1 else ''} | {c['tier']} "
            f"| {c['epochs']} | {len(pf)} | {_ms([r['wall_s'] for r in fo], 1)} "
            f"| {_ms([r['wall_s'] for r in pf], 1)} | {_ms(speedup(c, ref))}× "
            f"| {_ms([r['test_acc'] for r in fo], 4)} | {_ms([r['test_acc'] for r in pf], 4)} "
            f"| {_ms([r['data_share'] for r in pf], 3)} | {_cache(pf)} |"
        )
    lines += ["", "The zarr row's computed prefix is its linear-probe cell's seed 0.", "",
              "Full fine-tune (`baseline`, every stage trains, one cosine), for reference:", "",
              "| backbone | px | epochs | wall s | test acc |", "|---|---:|---:|---:|---:|",
              *base_lines]  # fmt: skip
    lines += ["", "Where the seconds went (mean over seeds; compute = training minus its cache "
              "I/O and data wait; write/read include the test cache's):", "",
              "| backbone | frozen | augment | tier | mode | wall | " + " | ".join(PARTS) + " |",
              "|---|---|---|---|---|---:|" + "---:|" * len(PARTS)]  # fmt: skip
    for c in doc["cells"]:
        for mode, runs in c["runs"].items():
            parts = " | ".join(
                f"{statistics.mean(r['parts_s'][k] for r in runs):.1f}" for k in PARTS
            )
            lines.append(
                f"| {c['backbone']} | {c['prefix'] if c['prefix'] else 'none'} | {c['augment']} "
                f"| {c['tier']} | {mode} | {statistics.mean(r['wall_s'] for r in runs):.1f} "
                f"| {parts} |"
            )
    sw = doc["sweep"]
    pf, fo = sw["runs"]["prefast"], sw["runs"]["freezeout"]
    lines += [
        "",
        f"Sweep of {len(sw['lrs'])} head learning rates, ViT-tiny linear probe, "
        f"{sw['epochs']} epochs, zarr tier, seed 0: each run a `train` call (outer seconds "
        "include building the model and reading the weights); the prefast runs share one "
        "cache directory.",
        "",
        "| lr | computed prefix s | cached prefix s | test acc computed | test acc cached "
        "| epoch 1 batches from the cache |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(fo, pf, strict=True):
        lines.append(
            f"| {a['lr']} | {a['outer_s']:.1f} | {b['outer_s']:.1f} | {a['test_acc']:.4f} "
            f"| {b['test_acc']:.4f} | {b['first_epoch_cached']}/{b['batches_per_epoch']} |"
        )
    total_fo, total_pf = sum(r["outer_s"] for r in fo), sum(r["outer_s"] for r in pf)
    lines.append(
        f"| total | {total_fo:.1f} | {total_pf:.1f} | | | {total_fo / total_pf:.2f}× faster |"
    )
    return head + "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    fig, axes = panels(3, 4.6, 3.6)
    colors = {"freezeout": "tab:blue", "prefast": "tab:orange", "baseline": "tab:gray"}
    for ax, name in zip(axes, ("resnet50", "vit_tiny"), strict=False):
        cells = [c for c in doc["cells"] if c["backbone"] == name]
        labels, y = [], 0
        for c in cells:
            for mode, runs in c["runs"].items():
                wall = statistics.mean(r["wall_s"] for r in runs)
                ax.barh(y, wall, color=colors[mode])
                labels.append(f"{c['label']} ({c['epochs']} ep): {mode}")
                y += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("wall-clock (s)")
        ax.set_title(f"{name} at {cells[0]['image_size']} px", fontsize=9)
    sw = doc["sweep"]
    for mode in ("freezeout", "prefast"):
        totals = [0.0]
        for r in sw["runs"][mode]:
            totals.append(totals[-1] + r["outer_s"])
        ax = axes[2]
        ax.plot(range(len(totals)), totals, marker="o", color=colors[mode], label=mode)
    axes[2].set_xlabel("runs of the sweep (head learning rates)")
    axes[2].set_ylabel("cumulative seconds")
    axes[2].set_title("sweep: ViT-tiny linear probe", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle("fine-tuning with a frozen prefix: computed every step (freezeout) or "
                 "cached (prefast)", fontsize=9)  # fmt: skip
    save(fig, path)
