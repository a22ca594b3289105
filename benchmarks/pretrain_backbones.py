"""Backbones that transfer, made here: nothing can be downloaded on these machines.

Each backbone is trained from scratch (PreFast's baseline mode, batch 32, no augmentation)
on scikit-learn digits of the classes 0-4, real handwriting, at the fine-tuning benchmark's
image size, and saved without its classifier. What makes it a backbone worth caching is
checked on the classes it never saw: a linear probe (``prefast`` mode, ``--freeze-prefix
all``, a new head trained on cached features) on the digits 5-9, beside the same probe on
the same architecture with random weights, so the figure says how much the pretraining
transfers. The fine-tuning benchmark (``finetune_bench.py``) fine-tunes on those held-out
classes.

    python benchmarks/pretrain_backbones.py                 # both backbones (~8 min, 2 cores)
    python benchmarks/pretrain_backbones.py --names resnet --out /tmp/x

Writes ``pretrain.json`` and ``pretrain.md`` under ``--out`` and the weights under
``--dir`` (not committed: ``make bench`` makes them).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prefast.benchmarks.imagefolder_bench import write_digits_folder
from prefast.config import TrainConfig
from prefast.training.trainer import train

SEEN, HELD_OUT = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
PROBE_EPOCHS, PROBE_LR = 10, 0.2


@dataclass(frozen=True)
class Recipe:
    """How one backbone is made: the architecture, the image size it is pretrained and
    fine-tuned at, and how long it trains (the held-out probe's 0.80 goal, at the least
    cost on 2 cores)."""

    name: str
    image_size: int
    epochs: int
    lr: float
    batch_size: int
    augment: str
    head: str  # the classifier's state-dict prefix, dropped from the saved weights


# ResNet-18, not ResNet-50: pretraining ResNet-50 at 128 px costs 96 ms a row here
# (a training step, 2 cores), 3.3 times ResNet-18's 29 ms.
RECIPES = {
    "resnet": Recipe("resnet18", 128, 10, 0.05, 32, "none", "fc."),
    "vit": Recipe("vit_tiny", 64, 20, 0.002, 32, "none", "head."),  # SGD at 0.01+: 0.51 on 0-4
}
# make bench-quick (CI): the same steps at 32 px, one epoch, on 256 images' share
QUICK = {k: replace(r, image_size=32, epochs=1) for k, r in RECIPES.items()}
QUICK_IMAGES = 256


def build(recipe: Recipe, classes: int) -> torch.nn.Module:
    """A fresh model: torchvision's ResNet-18, or timm's ViT-tiny with 8 px patches."""
    if recipe.name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=classes)
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", img_size=recipe.image_size, patch_size=8, num_classes=classes
    )


def folders(root: Path, size: int, train_images: int = 1500) -> tuple[Path, Path]:
    """Digits 0-4 (pretraining) and 5-9 (fine-tuning) as PNG image folders at ``size`` px:
    each class's share of the first ``train_images`` of a fixed shuffle to train, of the
    last 297 to test (about 750 and 150 each)."""
    return tuple(  # type: ignore[return-value]
        write_digits_folder(
            root / f"digits_{name}_{train_images}_{size}px_png", size, "png", train_images, classes
        )
        for name, classes in (("0-4", SEEN), ("5-9", HELD_OUT))
    )


def config(folder: Path, recipe: Recipe, cache: Path, **kw: Any) -> TrainConfig:
    kw = {"batch_size": 64, **kw}
    return TrainConfig(
        dataset="imagefolder", data_dir=str(folder), image_size=recipe.image_size,
        workers=2, device="cpu", cache_dir=str(cache), seed=0, **kw,
    )  # fmt: skip


def probe(
    recipe: Recipe, held: Path, cache: Path, weights: Path | None, epochs: int = PROBE_EPOCHS
) -> float:
    """Held-out test accuracy of a linear probe on ``weights`` (None: random weights)."""
    from prefast.models.weights import load_weights

    torch.manual_seed(0)
    model = build(recipe, len(HELD_OUT))
    if weights is not None:
        load_weights(model, str(weights))
    cfg = config(held, recipe, cache, mode="prefast", freeze_prefix="all", t0=1.0,
                 epochs=epochs, lr=PROBE_LR, augment="none")  # fmt: skip
    return float(train(cfg, model=model)["final"]["test_acc"])


def make(recipe: Recipe, root: Path, quick: bool = False, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Pretrain ``recipe`` on digits 0-4, save it as ``root/<name>.pt``, probe it on 5-9."""
    seen, held = folders(root / "data", recipe.image_size, QUICK_IMAGES if quick else 1500)
    probe_epochs = 2 if quick else PROBE_EPOCHS
    torch.manual_seed(0)
    model = build(recipe, len(SEEN))
    cfg = config(seen, recipe, root / "caches" / "pretrain", mode="baseline",
                 epochs=recipe.epochs, lr=recipe.lr, augment=recipe.augment,
                 batch_size=recipe.batch_size)  # fmt: skip
    start = time.perf_counter()
    run = train(cfg, model=model)
    seconds = time.perf_counter() - start
    out = root / f"{recipe.name}.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith(recipe.head)}, out)
    log(f"pretrained {recipe.name} on digits 0-4 at {recipe.image_size} px: {recipe.epochs} "
        f"epochs, {seconds:.0f} s, test acc on 0-4 {run['final']['test_acc']:.3f}")  # fmt: skip
    caches = root / "caches" / "probe"
    pretrained = probe(recipe, held, caches / recipe.name, out, probe_epochs)
    random = probe(recipe, held, caches / f"{recipe.name}_random", None, probe_epochs)
    log(f"  linear probe on digits 5-9 ({probe_epochs} epochs): {pretrained:.3f} "
        f"(random weights: {random:.3f})")  # fmt: skip
    return {
        "architecture": recipe.name,
        "image_size": recipe.image_size,
        "pretrain_classes": list(SEEN),
        "pretrain_epochs": recipe.epochs,
        "pretrain_lr": recipe.lr,
        "pretrain_images": sum(1 for _ in (seen / "train").rglob("*.png")),
        "probe_images": sum(1 for _ in (held / "train").rglob("*.png")),
        "probe_test_images": sum(1 for _ in (held / "val").rglob("*.png")),
        "pretrain_s": round(seconds, 1),
        "pretrain_test_acc": run["final"]["test_acc"],
        "probe_classes": list(HELD_OUT),
        "probe_epochs": probe_epochs,
        "probe_lr": PROBE_LR,
        "probe_test_acc": pretrained,
        "probe_test_acc_random_weights": random,
        "weights": str(out),
    }


def markdown(made: dict) -> str:
    any_ = next(iter(made.values()))
    lines = [
        "# Backbones pretrained here",
        "",
        "Trained from scratch on scikit-learn digits 0-4 (PNG folders, baseline mode), then "
        "probed on the digits 5-9 they never saw: a linear probe "
        f"(`--freeze-prefix all`, {any_['probe_epochs']} epochs, lr {PROBE_LR}, no augmentation) "
        "on the "
        "pretrained "
        "weights and on random ones. Regenerate: `python benchmarks/pretrain_backbones.py` "
        "(also run by `make bench`).",
        "",
        "| backbone | px | pretrain epochs | pretrain s | test acc on 0-4 "
        "| probe on 5-9, pretrained | probe on 5-9, random weights |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in made.values():
        lines.append(
            f"| {m['architecture']} | {m['image_size']} | {m['pretrain_epochs']} "
            f"| {m['pretrain_s']:.0f} | {m['pretrain_test_acc']:.3f} "
            f"| {m['probe_test_acc']:.3f} | {m['probe_test_acc_random_weights']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def pretrain_all(root: Path, names: list[str], quick: bool = False, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Every backbone of ``names`` (resnet, vit), made under ``root``; their records."""
    recipes = QUICK if quick else RECIPES
    return {recipes[n].name: make(recipes[n], root, quick, log) for n in names}


def write_results(out: Path, made: dict) -> list[Path]:
    """``out``/pretrain.json and pretrain.md (this script's, and the fine-tuning benchmark's)."""
    (out / "pretrain.json").write_text(json.dumps(made, indent=1) + "\n")
    (out / "pretrain.md").write_text(markdown(made))
    return [out / "pretrain.json", out / "pretrain.md"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--names", default="resnet,vit", help="which backbones: resnet, vit")
    p.add_argument("--dir", default="runs/backbones", help="weights, data and caches")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    made = pretrain_all(Path(a.dir), [n.strip() for n in a.names.split(",")])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, made)
    print(markdown(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
