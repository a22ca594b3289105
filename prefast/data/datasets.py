"""The built-in datasets, as in-memory uint8 tensors (augmentation: ``augment.py``).

Every loader returns a (train, test) pair of map-style torch Datasets: the
same kind of object a user passes to ``prefast.train(cfg, train_data=...,
test_data=...)``. The built-in sets are :class:`TensorImageDataset`: keeping
them as tensors lets data and augmentation live on the training device.
``synthetic`` and ``digits`` need no download and serve tests, the demo and
CI; ``imagefolder`` reads a torchvision ImageFolder tree (``prefast/data/imagefolder.py``).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset

from prefast.data.normalize import imagenet_stats
from prefast.errors import ConfigError, DataUnavailableError
from prefast.store.device import to_device
from prefast.store.order import rng_for

DATASETS = ("synthetic", "digits", "cifar10", "cifar100", "mnist", "imagefolder")
AUGMENTS = ("none", "standard")


class TensorImageDataset(TorchDataset):
    """One split held in memory: (N, C, H, W) uint8 images and int64 labels.

    A map-style torch ``Dataset`` (``ds[i]`` is a normalized float image and its
    label), so it goes anywhere a Dataset goes. The trainer recognizes it and
    serves whole batches from device memory with batched augmentation instead
    of a DataLoader: CIFAR-10 is 150 MB, and per-sample Python work would cost
    more than a small model's step.
    """

    def __init__(
        self,
        name: str,
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        flip: bool,
        norm: Normalizer | None = None,
    ):
        self.name, self.x, self.y, self.classes, self.flip = name, x, y, classes, flip
        self.norm = norm or Normalizer(x)  # a test split shares its training split's

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.norm(self.x[i : i + 1])[0], int(self.y[i])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def identity(self) -> str:
        """Short digest of the data itself: part of every cache key."""
        h = hashlib.sha256(self.name.encode())
        if self.norm.fixed is not None:  # another normalization is other data for a cache
            h.update(repr(self.norm.fixed).encode())
        for t in (self.x, self.y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t[:: max(1, len(t) // 512)].cpu().numpy().tobytes())  # sampled rows: cheap
        return h.hexdigest()[:16]

    def to(self, device: torch.device) -> TensorImageDataset:
        return TensorImageDataset(
            self.name,
            to_device(self.x, device),
            to_device(self.y, device),
            self.classes,
            self.flip,
            self.norm,
        )

    def subset(self, keep: torch.Tensor, name: str) -> TensorImageDataset:
        return TensorImageDataset(
            name, self.x[keep], self.y[keep], self.classes, self.flip, self.norm
        )


Splits = tuple[TorchDataset, TorchDataset]


def tensor_splits(
    name: str,
    tx: torch.Tensor,
    ty: torch.Tensor,
    vx: torch.Tensor,
    vy: torch.Tensor,
    num_classes: int,
    flip: bool,
) -> tuple[TensorImageDataset, TensorImageDataset]:
    classes = [str(c) for c in range(num_classes)]
    train = TensorImageDataset(name, tx, ty, classes, flip)
    return train, TensorImageDataset(name, vx, vy, classes, flip, train.norm)


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    subset: int | None = None,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (50_000, 10_000),
    image_size: int | None = None,
    augment: str = "none",
    normalize: str = "data",
) -> Splits:
    """Training and test split of ``name``; ``subset`` keeps a seeded random subset
    of the training set. Built-in sets come as :class:`TensorImageDataset`;
    ``imagefolder`` as torchvision ``ImageFolder`` datasets (``augment`` and
    ``image_size`` become their transforms)."""
    if name == "imagefolder":
        from prefast.data.imagefolder import imagefolder_splits

        train, test = imagefolder_splits(Path(data_dir), image_size, augment, normalize)
        train = _subset(train, subset, seed, name)
        train.augment_applied = augment  # type: ignore[attr-defined]  # its transform has it
        train.normalize_applied = normalize  # type: ignore[attr-defined]  # and this one
        return train, test
    if name == "synthetic":
        # Memoized: benchmarks build many runs on the same data, and nothing
        # writes into a split's tensors (subsets below make new ones).
        splits = _synthetic_memo(*synthetic_size, seed)
    elif name == "digits":
        splits = digits()
    elif name in ("cifar10", "cifar100", "mnist"):
        splits = torchvision_dataset(name, Path(data_dir))
    else:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if normalize == "imagenet":
        splits = renormalized(*splits)
    train = _subset(splits[0], subset, seed, name)
    train.normalize_applied = normalize  # type: ignore[attr-defined]  # for build_run
    return train, splits[1]


def renormalized(
    train: TensorImageDataset, test: TensorImageDataset
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The same images standardized by ImageNet's statistics (the tensors are shared)."""
    norm = Normalizer(train.x, fixed=imagenet_stats(train.shape[0]))
    return (
        TensorImageDataset(train.name, train.x, train.y, train.classes, train.flip, norm),
        TensorImageDataset(test.name, test.x, test.y, test.classes, test.flip, norm),
    )


def _subset(train: TorchDataset, subset: int | None, seed: int, name: str) -> TorchDataset:
    if subset is None:
        return train
    n = len(train)  # type: ignore[arg-type]
    if not 0 < subset <= n:
        raise ConfigError(f"--subset {subset} must be between 1 and {n} for {name}")
    keep = np.sort(rng_for(seed, "subset").permutation(n)[:subset])
    label = f"{name}[subset={subset},seed={seed}]"
    if isinstance(train, TensorImageDataset):
        return train.subset(torch.from_numpy(keep), label)
    return Subset(train, keep.tolist())


@functools.lru_cache(maxsize=1)
def _synthetic_memo(
    n_train: int, n_test: int, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset]:
    return synthetic(n_train, n_test, seed)


def synthetic(
    n_train: int = 50_000, n_test: int = 10_000, seed: int = 0
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """A learnable CIFAR-shaped set: 10 classes of smooth prototypes plus noise.

    Each class mixes two low-frequency colour patterns; samples get a random
    contrast, a random shift and heavy pixel noise so the task is not solved in
    one epoch. 60,000 images take about two seconds.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 2, 3, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(
        protos.view(20, 3, 4, 4), size=(32, 32), mode="bicubic", align_corners=False
    ).view(10, 2, 3, 32, 32)

    def make(n: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        gs = torch.Generator().manual_seed(seed * 7919 + split)
        y = torch.randint(0, 10, (n,), generator=gs)
        mix = torch.rand(n, 1, 1, 1, generator=gs)
        img = mix * protos[y, 0] + (1 - mix) * protos[y, 1]  # (n, 3, 32, 32)
        img = img * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs))
        img = img + 0.35 * torch.randn(n, 3, 32, 32, generator=gs)
        shift = int(torch.randint(-3, 4, (1,), generator=gs))
        img = torch.roll(img, shifts=shift, dims=3)
        return (img.clamp(0, 1) * 255).to(torch.uint8), y

    tx, ty = make(n_train, 1)
    vx, vy = make(n_test, 2)
    return tensor_splits("synthetic", tx, ty, vx, vy, num_classes=10, flip=True)


def digits() -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images), fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return tensor_splits("digits", x[tr], y[tr], x[te], y[te], num_classes=10, flip=False)


_FILES = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (from cifar-10-python.tar.gz)", 10, True),
    "cifar100": ("CIFAR100", "cifar-100-python/ (from cifar-100-python.tar.gz)", 100, True),
    "mnist": ("MNIST", "MNIST/raw/ (train-images-idx3-ubyte etc.)", 10, False),
}


def torchvision_dataset(name: str, root: Path) -> tuple[TensorImageDataset, TensorImageDataset]:
    import torchvision

    cls_name, files, num_classes, flip = _FILES[name]
    cls = getattr(torchvision.datasets, cls_name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as exc:  # any network failure: offline machine
                raise DataUnavailableError(
                    f"{name} is not in --data-dir {root} and could not be downloaded "
                    f"({type(exc).__name__}). Put {files} under {root.resolve()}, "
                    "or run once on a machine with internet access."
                ) from None
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        splits += [x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)]
    tx, ty, vx, vy = splits
    return tensor_splits(name, tx, ty, vx, vy, num_classes, flip)


class Normalizer:
    """uint8 (B, C, H, W) -> float, per-channel standardized by train statistics, or by
    fixed ones (``--normalize imagenet``)."""

    def __init__(self, train_x: torch.Tensor, fixed: tuple[list[float], list[float]] | None = None):
        if fixed is not None:
            self.mean = torch.tensor(fixed[0]).view(1, -1, 1, 1)
            self.std = torch.tensor(fixed[1]).view(1, -1, 1, 1)
        else:
            x = train_x[:: max(1, len(train_x) // 10_000)].float() / 255.0
            self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
            self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)
        self.fixed = fixed
        self.on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self.on:
            self.on[x.device] = (to_device(self.mean, x.device), to_device(self.std, x.device))
        mean, std = self.on[x.device]
        x = x.float() / 255.0
        return (x - mean) / std
