"""Fine-tuning benchmark: a pretrained backbone with a frozen prefix, computed every step
(``freezeout --freeze-prefix K --t0 1``) or cached (``prefast``, same flags).

No pretrained weights can be downloaded on this machine, so the backbones are made here
by ``pretrain_backbones.py``: a torchvision ResNet-18 (128 px) and a timm ViT-tiny with
8 px patches (64 px), each trained from scratch on scikit-learn digits 0-4 and saved
without its classifier. They are fine-tuned on the digits 5-9 they never saw, as PNG image
folders (about 750 train / 150 test), read through a DataLoader with 2 workers: ResNet-18
through ``--model torchvision:resnet18 --weights FILE``; the ViT (its position embedding
through ``load_weights``) as a model object through the Python API, since no timm name
has a tiny ViT with 8 px patches. Linear probes train at lr 0.2; cells that train backbone
stages (half frozen, full fine-tune) at the backbone's pretraining rate.

``--t0 1`` isolates the cache: the stages after the prefix follow one cosine to the
end, so freezeout and prefast differ in whether the prefix is computed, and in what
the cache stores: float16 rows (``--cache-dtype auto`` on a CPU) and, with
``--cache-views 2``, two fixed augmented views where freezeout draws a new one
every epoch. Every cell runs 10 epochs, the full fine-tunes too, so the reference is
like for like; each seed's modes run side by side in one process, each seed with a cache
dir of its own (a seed must not read the cache an earlier seed kept). Then a sweep of four
head learning rates on the ResNet-18 linear probe, twice: four ``train`` calls in one
process, and four ``prefast train`` processes as a user types them
(``cli_sweep.py``'s), each against the same runs computing the prefix (quick: two rates).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefast.benchmarks.imagefolder_bench import PARTS, summarize_run
from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.pretrain_backbones import (
    HELD_OUT,
    PROBE_LR,
    QUICK,
    QUICK_IMAGES,
    RECIPES,
    build,
    folders,
)  # fmt: skip
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import TrainConfig
from prefast.training.compare import compare
from prefast.training.trainer import train

SWEEP_LRS = (0.2, 0.1, 0.05, 0.02)
QUICK_SWEEP_LRS = SWEEP_LRS[:2]  # two runs still show the second one reading the first's cache
# A linear probe's rate (0.05 left the ResNet-18 probe at 0.81, 0.2: 0.88); a cell that
# trains backbone stages takes the backbone's own pretraining rate (SGD at 0.01 or more
# did not train the ViT), so its full fine-tune is a reference worth comparing with.
LR = PROBE_LR
EPOCHS = 10


@dataclass(frozen=True)
class Backbone:
    name: str  # resnet18 or vit_tiny
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
    recipes = QUICK if quick else RECIPES
    return {
        "resnet18": Backbone("resnet18", recipes["resnet"].image_size, 5,
                             "stem, layer1, layer2 (5 of 9)"),
        "vit_tiny": Backbone("vit_tiny", recipes["vit"].image_size, 7,
                             "patch embedding, blocks 0-5 (7 of 13)"),
    }  # fmt: skip


def grid(quick: bool) -> list[Cell]:
    """The main table, every cell 10 epochs: ResNet-18's linear probe (3 seeds) computed and
    cached, and cached on the zarr tier; half its stages frozen; its full fine-tune. The
    same for ViT-tiny, whose linear probe also runs with ``--augment standard
    --cache-views 2``. Quick: one seed, 2 epochs, ResNet-18 only as the linear probe,
    computed and cached, and ViT-tiny's cells but its plain linear probe (they cover a
    prefix as a stage count, the views and the baseline)."""
    three, both = (0, 1, 2), ("freezeout", "prefast")
    cells = [
        Cell("resnet18", "all", both, three, EPOCHS, label="linear probe"),
        Cell("resnet18", "all", ("prefast",), (0,), EPOCHS, tier="zarr",
             label="linear probe, zarr"),
        Cell("resnet18", 5, both, (0,), EPOCHS, label="half frozen"),
        Cell("resnet18", 0, ("baseline",), (0,), EPOCHS, label="full fine-tune"),
        Cell("vit_tiny", "all", both, three, EPOCHS, label="linear probe"),
        Cell("vit_tiny", "all", both, (0,), EPOCHS, augment="standard", views=2,
             label="linear probe, augment standard, 2 views"),
        Cell("vit_tiny", 7, both, (0,), EPOCHS, label="half frozen"),
        Cell("vit_tiny", 0, ("baseline",), (0,), EPOCHS, label="full fine-tune"),
    ]  # fmt: skip
    if quick:
        cells = [
            Cell(c.backbone, c.prefix, c.modes, (0,), 2, c.tier, c.augment, c.views, c.label)
            for c in cells
            if (c.label == "linear probe") == (c.backbone == "resnet18")
        ]
    return cells


class Runner:
    """Builds each cell's config and model; the data folders and backbones are shared."""

    def __init__(self, quick: bool, cache: Path, weights: Path):
        self.quick, self.cache, self.weights = quick, cache, weights
        self.sweep_lrs = QUICK_SWEEP_LRS if quick else SWEEP_LRS  # both sweeps' head rates
        self.backbones = backbones(quick)
        images = QUICK_IMAGES if quick else 1500
        self.folders = {
            size: folders(weights / "data", size, images)[1]  # the held-out digits 5-9
            for size in {b.image_size for b in self.backbones.values()}
        }
        self.recipes = {r.name: r for r in (QUICK if quick else RECIPES).values()}

    def config(self, cell: Cell, seed: int, cache_dir: Path) -> TrainConfig:
        b = self.backbones[cell.backbone]
        return TrainConfig(
            dataset="imagefolder", data_dir=str(self.folders[b.image_size]),
            image_size=b.image_size, model="torchvision:resnet18",
            weights=str(self.weights / "resnet18.pt") if cell.backbone == "resnet18" else None,
            epochs=cell.epochs, batch_size=64, lr=self.lr(cell), t0=1.0, seed=seed,
            freeze_prefix=cell.prefix, augment=cell.augment, cache_views=cell.views,
            cache_tier=cell.tier, workers=2, device="cpu", cache_dir=str(cache_dir),
        )  # fmt: skip

    def lr(self, cell: Cell) -> float:
        """The probe's rate for a linear probe, the pretraining rate for backbone stages."""
        return LR if cell.prefix == "all" else self.recipes[cell.backbone].lr

    def model(self, cell: Cell, seed: int) -> torch.nn.Module | None:
        """The ViT as a model object with the pretrained weights (None: ResNet-18 is built
        from the config, ``--weights`` and all)."""
        if cell.backbone != "vit_tiny":
            return None
        from prefast.models.weights import load_weights

        torch.manual_seed(seed)  # the new head's initial weights, as --seed draws them
        model = build(self.recipes["vit_tiny"], len(HELD_OUT))
        load_weights(model, str(self.weights / "vit_tiny.pt"))
        return model


def run_cells(runner: Runner, log=print) -> list[dict]:  # type: ignore[no-untyped-def]
    cells = []
    for i, cell in enumerate(grid(runner.quick)):
        runs: dict[str, list[dict]] = {m: [] for m in cell.modes}
        for seed in cell.seeds:
            log(f"=== {cell.backbone} {cell.label} seed {seed}: {', '.join(cell.modes)} ===")
            # A cache dir per seed: the defaults keep a linear probe's cache on disk, and a
            # seed reading the one an earlier seed kept would skip its computed epoch.
            cfg = runner.config(cell, seed, runner.cache / "caches" / f"cell{i}_seed{seed}")
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
    """Four head learning rates on the ResNet-18 linear probe (10 epochs; quick: 2), seed
    0, the defaults' tier: prefast runs sharing one cache directory, then freezeout runs.
    Each run is a ``train`` call in this process; its outer time counts building the model
    and reading the weights."""
    cell = Cell("resnet18", "all", ("freezeout", "prefast"), (0,), 2 if runner.quick else EPOCHS)
    shared = runner.cache / "caches" / "sweep"
    shutil.rmtree(shared, ignore_errors=True)  # the first run writes the cache, as in a sweep
    doc: dict = {"epochs": cell.epochs, "lrs": list(runner.sweep_lrs), "runs": {}}
    for mode in ("prefast", "freezeout"):
        rows = []
        for lr in runner.sweep_lrs:
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


def run_cli_sweep(runner: Runner, log=print) -> dict:  # type: ignore[no-untyped-def]
    """The same sweep as separate ``prefast train`` processes with the CLI's defaults."""
    from prefast.benchmarks.cli_sweep import sweep

    b = runner.backbones["resnet18"]
    common = [
        "--model", "torchvision:resnet18", "--weights", str(runner.weights / "resnet18.pt"),
        "--freeze-prefix", "all", "--t0", "1", "--dataset", "imagefolder",
        "--data-dir", str(runner.folders[b.image_size]), "--image-size", str(b.image_size),
        "--epochs", str(2 if runner.quick else EPOCHS), "--batch-size", "64",
        "--workers", "2", "--device", "cpu", "--seed", "0",
    ]  # fmt: skip
    work = runner.cache / "caches" / "cli_sweep"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return sweep(common, [str(lr) for lr in runner.sweep_lrs], work, log)


def run_finetune_bench(out: Path, cache: str, quick: bool, log=print) -> list[Path]:  # type: ignore[no-untyped-def]
    """Pretrain, run the grid and both sweeps; write ``out``/finetune.json, .md, .png and
    the backbones' ``out``/pretrain.json, .md."""
    from prefast.benchmarks.pretrain_backbones import pretrain_all, write_results
    from prefast.benchmarks.store_bench import machine

    root = Path(cache) / "finetune"
    shutil.rmtree(root, ignore_errors=True)  # backbones, data and every cell's caches anew
    pretrained = pretrain_all(root / "backbones", ["resnet", "vit"], quick, log)
    written = write_results(out, pretrained)
    runner = Runner(quick, root, root / "backbones")
    held_out = pretrained["resnet18"]  # its probe ran on the folder every cell fine-tunes on
    doc = {
        "machine": machine(),
        "quick": quick,
        "pretrained": pretrained,
        "setting": {
            "classes": list(HELD_OUT),
            "train_images": held_out["probe_images"],
            "test_images": held_out["probe_test_images"],
            "batch_size": 64,
            "lr": LR,
            "lr_backbone_stages": {r.name: r.lr for r in runner.recipes.values()},
            "t0": 1.0,
            "workers": 2,
            "codec": "png",
            "cache_dtype": "auto",
        },  # fmt: skip
        "cells": run_cells(runner, log),
        "sweep": run_sweep(runner, log),
        "cli_sweep": run_cli_sweep(runner, log),
    }
    md = markdown(doc)
    log(md)
    (out / "finetune.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "finetune.md").write_text(md)
    plot(doc, out / "finetune.png")
    return [out / f"finetune.{ext}" for ext in ("json", "md", "png")] + written


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
        f"{k} at {v['image_size']} px, {v['pretrain_epochs']} epochs on {v['pretrain_images']} "
        f"images of digits 0-4 ({v['pretrain_s']:.0f} s; test acc on 0-4 "
        f"{v['pretrain_test_acc']:.3f}; linear probe on 5-9 {v['probe_test_acc']:.3f}, "
        f"random weights {v['probe_test_acc_random_weights']:.3f})"
        for k, v in p.items()
    )
    head = (
        "Fine-tuning with a frozen prefix: computed every step (`freezeout --freeze-prefix K "
        "--t0 1`) or cached (`prefast`, same flags). Backbones pretrained here "
        "([pretrain.md](pretrain.md); nothing can be downloaded): "
        f"{pre}. Fine-tuned on the digits {s['classes'][0]}-{s['classes'][-1]} they never "
        f"saw, as PNG image folders ({s['train_images']} train / {s['test_images']} test), "
        f"DataLoader with {s['workers']} workers, batch {s['batch_size']}, lr {s['lr']} "
        "(cells that train backbone stages: "
        + ", ".join(f"{k} {v}" for k, v in s["lr_backbone_stages"].items())
        + "), "
        f"t0 {s['t0']}, cache dtype {s['cache_dtype']}. {m['cores']} cores "
        f"({m.get('cpu', '?')}), GPU {m['gpu']}, torch {m['torch']}. Each seed's modes ran "
        "side by side in one process, each seed with its own cache dir; mean ± std over "
        "the seeds where a cell has more than one.\n\n"
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
                f"| {c['backbone']} | {c['image_size']} | {c['epochs']} | {len(b)} "
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
              "Full fine-tune (`baseline`, every stage trains, one cosine), for reference, "
              "over as many epochs as the cells above:", "",
              "| backbone | px | epochs | seeds | wall s | test acc |",
              "|---|---:|---:|---:|---:|---:|",
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
        f"Sweep of {len(sw['lrs'])} head learning rates, ResNet-18 linear probe, "
        f"{sw['epochs']} epochs, seed 0, **in one process**: each run a `train` call (outer "
        "seconds include building the model and reading the weights); the prefast runs share "
        "one cache directory, with the defaults' tier.",
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
    cli = doc["cli_sweep"]
    c = cli["freezeout_run"]
    lines += [
        "",
        "The same sweep **as separate processes**, as a user types it (no `--mode`, "
        f"`--cache-tier` or `--augment`): `{cli['command']}`, each with one shared "
        "`--cache-dir`. Each process's seconds include starting Python and loading the data.",
        "",
        "| run | lr | seconds (process) | feed setup s | epoch 1 batches from the cache "
        "| test acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(cli["prefast_runs"]):
        lines.append(
            f"| prefast {i + 1} | {r['lr']} | {r['outer_s']:.1f} | {r['feed_setup_s']:.2f} "
            f"| {r['first_epoch_cached']}/{r['batches_per_epoch']} | {r['test_acc']:.4f} |"
        )
    lines += [
        f"| freezeout (prefix computed) | {cli['lrs'][0]} | {c['outer_s']:.1f} | - "
        f"| 0/{c['batches_per_epoch']} | {c['test_acc']:.4f} |",
        "",
        f"{len(cli['lrs'])} processes: {cli['prefast_total_s']:.1f} s as prefast against "
        f"{cli['computed_total_s']:.1f} s computing the prefix ({cli['computed_total_is']}): "
        f"**{cli['speedup']:.2f}×**.",
    ]
    return head + "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    fig, axes = panels(3, 4.6, 3.6)
    colors = {"freezeout": "tab:blue", "prefast": "tab:orange", "baseline": "tab:gray"}
    for ax, name in zip(axes, ("resnet18", "vit_tiny"), strict=False):
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
    axes[2].set_title("sweep in one process: ResNet-18 linear probe", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle("fine-tuning with a frozen prefix: computed every step (freezeout) or "
                 "cached (prefast)", fontsize=9)  # fmt: skip
    save(fig, path)
