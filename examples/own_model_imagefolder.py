"""Your own network on your own image folder, with PreFast.

    python examples/own_model_imagefolder.py DIR [--epochs 10] [--image-size 32]

DIR holds torchvision's ImageFolder layout: DIR/train/<class>/*.png and
DIR/val/<class>/*.png. The model is a plain ``nn.Sequential``: each child is a
freeze stage, the last is the classifier head. Trains FreezeOut, then PreFast
(which caches the frozen stages' outputs instead of recomputing them), and
prints both.
"""

from __future__ import annotations

import argparse

from torch import nn
from torchvision import datasets
from torchvision import transforms as T

import prefast


def block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


def my_model(num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        block(3, 32),
        block(32, 64, pool=True),
        block(64, 128),
        block(128, 128, pool=True),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()

    size = (args.image_size, args.image_size)
    normalize = T.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    train_tf = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(size), T.ToTensor(), normalize])
    train_data = datasets.ImageFolder(f"{args.data_dir}/train", transform=train_tf)
    test_data = datasets.ImageFolder(f"{args.data_dir}/val", transform=test_tf)

    cfg = prefast.TrainConfig(
        epochs=args.epochs,
        batch_size=32,
        t0=0.5,
        augment="none",  # the dataset's transform is the augmentation
        cache_dir=args.cache_dir,
        workers=2,
        device="auto",
    )
    runs = prefast.compare(
        cfg,
        ["freezeout", "prefast"],
        model=my_model(len(train_data.classes)),
        train_data=train_data,
        test_data=test_data,
    )
    for mode, run in runs.items():
        final = run["final"]
        print(f"{mode:<10} test_acc {final['test_acc']:.4f}  wall {final['wall_s']:.1f}s")
    speedup = runs["freezeout"]["final"]["wall_s"] / runs["prefast"]["final"]["wall_s"]
    print(f"prefast vs freezeout: {speedup:.2f}x")


if __name__ == "__main__":
    main()
