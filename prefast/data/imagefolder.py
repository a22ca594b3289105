"""``--dataset imagefolder``: a torchvision ImageFolder tree as (train, test) datasets.

::

    DIR/train/<class>/*.png|jpg|...
    DIR/val/<class>/...          (or DIR/test/<class>/...)

Images are resized to ``--image-size`` (default: the first training image's
size), converted to tensors and standardized with per-channel statistics of
up to 256 training images; ``--augment standard`` adds a random crop with
padding (1/8 of the side) and a horizontal flip to the training transform.
These are ordinary map-style datasets: the trainer reads them through a
DataLoader, exactly as it reads a user's own dataset. Every image is read as RGB
(torchvision's loader): grayscale images become three identical channels, and the log
says so once (a warning) when the training images are grayscale.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from prefast.errors import DataUnavailableError, UnreadableImageError

log = logging.getLogger(__name__)
GRAY = ("1", "L", "LA", "I", "I;16", "F")  # PIL's one-channel modes (LA: with alpha)


def imagefolder_splits(root: Path, image_size: int | None, augment: str, normalize: str = "data"):  # type: ignore[no-untyped-def]
    from torchvision import datasets
    from torchvision import transforms as T

    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = train_dir if not train_dir.is_dir() else root / "val"
        raise DataUnavailableError(
            f"--dataset imagefolder needs {missing} (layout: DIR/train/<class>/*.png and "
            f"DIR/val/<class>/* or DIR/test/<class>/*); --data-dir is {root}"
        )
    probe = _folder(datasets, train_dir, None)
    _say_if_grayscale(probe, train_dir)
    if image_size is None:
        width, height = probe.loader(probe.samples[0][0]).size
        size: tuple[int, int] = (height, width)
    else:
        size = (image_size, image_size)
    base = [T.Resize(size), T.ToTensor()]
    if normalize == "imagenet":  # what pretrained weights expect
        from prefast.data.normalize import imagenet_stats

        mean, std = imagenet_stats(T.Compose(base)(probe.loader(probe.samples[0][0])).shape[0])
    else:
        mean, std = _channel_stats(probe, T.Compose(base))
    normalize = T.Normalize(mean, std)
    train_tf = [*base]
    if augment == "standard":
        train_tf += [T.RandomCrop(size, padding=max(1, size[0] // 8)), T.RandomHorizontalFlip()]
    train = _folder(datasets, train_dir, T.Compose([*train_tf, normalize]))
    test = _folder(datasets, test_dir, T.Compose([*base, normalize]))
    if test.classes != train.classes:
        raise DataUnavailableError(
            f"{test_dir} has classes {test.classes} but {train_dir} has {train.classes}: "
            "the two splits need the same class folders"
        )
    return train, test


def load_image(path: str):  # type: ignore[no-untyped-def]
    """torchvision's loader, with a file it cannot decode named in one line (also from a
    DataLoader worker: a module-level function, so workers can unpickle it)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is OSError
        word = re.split(r" ['<]", str(exc))[0] or type(exc).__name__  # cut PIL's repeated path
        raise UnreadableImageError(
            f"{UnreadableImageError.MARK}{path} ({word}): remove the file or replace it"
        ) from None


def _folder(datasets, path: Path, transform):  # type: ignore[no-untyped-def]
    try:
        return datasets.ImageFolder(str(path), transform=transform, loader=load_image)
    except (FileNotFoundError, OSError) as exc:  # an empty class folder, or no classes
        detail = str(exc).split(". Supported extensions")[0]
        raise DataUnavailableError(f"{path}: {detail}") from None


def _say_if_grayscale(folder, train_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Warn once when the training images are grayscale (up to 16 evenly spaced ones, read
    by their headers only): the loader makes three identical channels of each."""
    from PIL import Image

    n = len(folder.samples)
    picks = [folder.samples[i][0] for i in range(0, n, max(1, n // 16))][:16]
    modes = set()
    for path in picks:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
        except (OSError, ValueError, SyntaxError):  # load_image names it when it is read
            return
    if modes and modes <= set(GRAY):
        log.warning(
            "imagefolder: the images in %s are grayscale (mode %s): each is read as three "
            "identical RGB channels, as torchvision's ImageFolder reads it",
            train_dir, "/".join(sorted(modes)),
        )  # fmt: skip


def _channel_stats(folder, transform) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Per-channel mean and std of up to 256 evenly spaced training images."""
    n = len(folder.samples)
    picks = range(0, n, max(1, n // 256))
    x = torch.stack([transform(folder.loader(folder.samples[i][0])) for i in picks])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
