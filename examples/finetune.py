"""Fine-tune a pretrained torchvision backbone on your image folder, its prefix cached.

    python examples/finetune.py DIR --weights backbone.pt [--freeze-prefix all] [--epochs 5]

DIR holds torchvision's ImageFolder layout (DIR/train/<class>/*, DIR/val/<class>/*).
``--weights`` is a state dict of torchvision's resnet18 (any class count: the classifier
is replaced for DIR's classes, as you would by hand). The first K stages (``all``: every
stage but the head, a linear probe) are frozen from the first iteration; FreezeOut's
schedule runs over the rest (``t0=1``: one cosine, nothing else freezes). Trains the
frozen prefix computed every step (``freezeout``), then cached (``prefast``), and prints
both: the same losses, and their wall-clock ratio (on a folder of a few dozen images the
cache's setup costs more than the one epoch it saves).
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torchvision import datasets
from torchvision import transforms as T

import prefast


def backbone(weights: str, num_classes: int) -> torch.nn.Module:
    """torchvision's resnet18 with your weights and a new classifier for your classes."""
    model = torchvision.models.resnet18()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):  # only fc may be new
        raise SystemExit(f"{weights} is not a state dict of resnet18: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")  # fmt: skip
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model  # prefast splits it: stem, 8 residual blocks, head


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir")
    ap.add_argument("--weights", required=True, help="a state dict of torchvision's resnet18")
    ap.add_argument("--freeze-prefix", default="all", help="K stages, or all (a linear probe)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()

    size = (args.image_size, args.image_size)
    imagenet = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tf = T.Compose([T.Resize(size), T.ToTensor(), imagenet])  # no augmentation: a fixed cache
    train_data = datasets.ImageFolder(f"{args.data_dir}/train", transform=tf)
    test_data = datasets.ImageFolder(f"{args.data_dir}/val", transform=tf)

    cfg = prefast.TrainConfig(
        epochs=args.epochs,
        batch_size=32,
        lr=0.05,
        t0=1.0,
        freeze_prefix=args.freeze_prefix,
        cache_dtype="float32",
        cache_dir=args.cache_dir,
        device="auto",
    )
    runs = {}
    for mode in ("freezeout", "prefast"):
        torch.manual_seed(cfg.seed)  # the same new classifier for both
        runs[mode] = prefast.train(
            cfg.replace(mode=mode),
            model=backbone(args.weights, len(train_data.classes)),
            train_data=train_data,
            test_data=test_data,
        )
    for mode, run in runs.items():
        losses = " ".join(f"{e['train_loss']:.4f}" for e in run["epochs"])
        final = run["final"]
        print(f"{mode:<10} losses {losses}  test_acc {final['test_acc']:.4f}  "
              f"wall {final['wall_s']:.1f}s")  # fmt: skip
    speedup = runs["freezeout"]["final"]["wall_s"] / runs["prefast"]["final"]["wall_s"]
    print(f"prefast vs the prefix computed every step: {speedup:.2f}x")


if __name__ == "__main__":
    main()
