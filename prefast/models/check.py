"""A library model checked when it is built (``--model torchvision:NAME``, ``timm:NAME``).

Its split is a rule applied to a model PreFast has not seen, so the split model runs
once against the unsplit one, on two random images of the data's shape (a generator of
its own: the run's random stream is not touched), as a user's own model is checked on
two of its samples. What can go wrong is said in one line, before any training:

- the image is smaller than the model takes (a ViT's 16 px patch on 8 px digits, VGG's
  five poolings on 8 px): the line names the size and the smallest one it runs at;
- the split does not run, or computes other logits than the model's own forward (timm's
  CaiT, LeViT, HRNet...): the line says to pass the stages by hand.

A model that cuts its images into patches and sees fewer than 4 of them (a 16 px patch
ViT on 24 px images sees one) is logged as a warning, once per model and size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prefast.errors import ConfigError
from prefast.models.split import BY_HAND, check_split
from prefast.models.staged import StagedModel, remember_state

log = logging.getLogger(__name__)
SMALL_MODELS = "a model for small images (densenet-bc, preact-resnet18, wrn)"
# sizes tried when the model's forward fails, to name one it runs at
SIZES = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
PROBE_SECONDS = 30.0
_warned: set[tuple[str, int]] = set()


def larger(size: int) -> str:
    return f"images of at least {size} px (--dataset imagefolder --image-size {size})"


def patch_grid(model: nn.Module) -> Callable[[int], tuple[int, int]] | None:
    """The patch grid the model cuts an ``N`` px image into, by its own arithmetic (timm's
    ``patch_embed.dynamic_feat_size``, a torchvision ViT's ``patch_size``); None for a
    model without patches."""
    embed: Any = getattr(model, "patch_embed", None)
    if callable(getattr(embed, "dynamic_feat_size", None)):
        return lambda n: tuple(embed.dynamic_feat_size((n, n)))  # type: ignore[return-value]
    patch = getattr(model, "patch_size", None)
    if hasattr(model, "conv_proj") and isinstance(patch, int):
        return lambda n: (n // patch, n // patch)
    return None


def check_patches(model: nn.Module, name: str, image_size: int) -> None:
    """No patch at all: refused. Fewer than 4: a warning (once per model and size)."""
    grid = patch_grid(model)
    if grid is None:
        return
    try:
        rows, cols = grid(image_size)
    except Exception:  # an embedding whose arithmetic needs more: the forward decides
        return
    if rows * cols >= 4:
        return
    four = next((n for n in range(image_size + 1, 4097) if _count(grid, n) >= 4), None)
    if rows * cols == 0:
        one = next((n for n in range(image_size + 1, 4097) if _count(grid, n) >= 1), None)
        raise ConfigError(
            f"--model {name} cannot take {image_size} px images: it cuts images into patches "
            f"and {image_size} px holds none (it needs {one} px for one patch): use "
            f"{larger(four or one or image_size)} or {SMALL_MODELS}"
        )
    if (name, image_size) not in _warned:
        _warned.add((name, image_size))
        log.warning(
            "--model %s sees %d patch%s in %d px images: a ViT learns little from fewer than "
            "4 (use --image-size %s or more)", name, rows * cols,
            "" if rows * cols == 1 else "es", image_size, four,
        )  # fmt: skip


def _count(grid: Callable[[int], tuple[int, int]], n: int) -> int:
    rows, cols = grid(n)
    return rows * cols


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def runs_at(model: nn.Module, in_channels: int, above: int) -> int | None:
    """The smallest of ``SIZES`` above ``above`` the model's forward runs at (eval mode,
    one image), within ``PROBE_SECONDS``; None when none does."""
    restore = remember_state(model)
    start = time.perf_counter()
    try:
        model.eval()
        with torch.no_grad():
            for size in (s for s in SIZES if s > above):
                if time.perf_counter() - start > PROBE_SECONDS:
                    return None
                try:
                    model(torch.zeros(1, in_channels, size, size))
                    return size
                except Exception:  # too small still (or another size altogether)
                    continue
    finally:
        restore()
    return None


def check_built(
    model: nn.Module, staged: StagedModel, name: str, in_channels: int, image_size: int
) -> None:
    """``staged`` (split from ``model``) against ``model``'s own forward, as the module
    docstring says; the modes of both are put back."""
    check_patches(model, name, image_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, image_size, image_size, generator=generator)

    def too_small(err: Exception) -> ConfigError:
        size = runs_at(model, in_channels, image_size)
        if size is None:
            return ConfigError(
                f"--model {name} fails on {image_size} px images ({_first_line(err)}): use "
                f"images of the size it was made for, or {SMALL_MODELS}"
            )
        return ConfigError(
            f"--model {name} cannot take {image_size} px images (its forward fails: "
            f"{_first_line(err)}; it runs at {size} px): use {larger(size)} or {SMALL_MODELS}"
        )

    def split_fails(err: Exception) -> ConfigError:
        return ConfigError(
            f"cannot split {name} into freeze stages: the split model fails where the model "
            f"runs ({_first_line(err)}): {BY_HAND}"
        )

    check_split(model, staged, x, label=name, unsplit_error=too_small, split_error=split_fails)
