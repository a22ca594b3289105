"""Weights from a file (``--weights PATH``): a state dict or a checkpoint holding one.

Layouts read: a bare state dict; ``{"state_dict": ...}`` (Lightning and many training
scripts); ``{"model": ...}`` (timm's and torchvision's reference training scripts, which
also hold their ``args``); ``{"model_state_dict": ...}``. A ``module.`` prefix (saved
from DistributedDataParallel) is dropped, as is a prefix every key shares when it names
a wrapper (Lightning's ``model.``). Files are read with ``weights_only=True``.

Keys match strictly, except the classifier's: when the file's classifier has another
shape (ImageNet's 1,000 classes against the dataset's 10) the model keeps its new,
untrained classifier and the log says so. A single-channel dataset takes RGB weights for
the first convolution summed over the colours (as timm does), also logged. Anything else
that does not match exits 2 with one line naming the first key that differs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from prefast.errors import ConfigError

log = logging.getLogger(__name__)
NESTED = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, whichever layout holds it."""
    if not Path(path).is_file():
        raise ConfigError(f"--weights {path}: no such file (a state dict or a checkpoint)")
    import argparse

    try:  # tensors and plain containers only; torchvision's and timm's scripts add their args
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"--weights {path} cannot be read as weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): pass a file saved with "
            "torch.save(model.state_dict(), PATH) (a PreFast --checkpoint is for --resume)"
        ) from None
    for key in NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"--weights {path} holds no state dict: expected tensors by name, at the top or "
            f"under one of {', '.join(NESTED)}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _strip_wrapper_prefix(ours: dict, theirs: dict) -> dict:
    """Keys saved from a wrapper (a LightningModule's ``self.model``, a ``backbone``
    attribute) carry its name first: drop a prefix that every file key shares when that
    makes the model's first key appear."""
    first = next(iter(ours), None)
    if first is None or first in theirs:
        return theirs
    for key in theirs:
        if key.endswith("." + first):
            prefix = key[: -len(first)]
            if all(k.startswith(prefix) for k in theirs):
                return {k[len(prefix) :]: v for k, v in theirs.items()}
            break
    return theirs


def classifier_name(model: nn.Module) -> str | None:
    """The module that maps features to classes: the model's last Linear (or, as in
    SqueezeNet, its last convolution) in registration order."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            last = name
    return last


def first_conv_name(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def load_weights(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model`` (in place), as the module docstring says."""
    load_state(model, read_state_dict(path), f"--weights {path}")


def _resample_vit_positions(
    model: nn.Module, state: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]
) -> None:
    """A ViT built at another image size than its weights: resample the position
    embedding over the patch grid (bicubic) as its library does, torchvision's
    ``interpolate_embeddings`` or timm's ``resample_abs_pos_embed``."""
    for key in ("encoder.pos_embedding", "pos_embed"):  # torchvision's, timm's
        ours = state.get(key)
        if ours is not None and key in theirs and theirs[key].shape != ours.shape:
            break
    else:
        return
    before = theirs[key].shape[1]
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if key == "pos_embed" and grid is not None and ours.dim() == 3:
        from timm.layers import resample_abs_pos_embed

        # the positions beyond the grid's are the prefix tokens' (none in CaiT, ConViT)
        prefix = ours.shape[1] - grid[0] * grid[1]
        side = math.isqrt(max(before - prefix, 0))
        if prefix < 0 or side * side != before - prefix:
            return  # not a square grid plus prefix: load_state names the key that differs
        theirs[key] = resample_abs_pos_embed(theirs[key], new_size=grid, num_prefix_tokens=prefix)
        pixels = grid[0] * model.patch_embed.patch_size[0]  # type: ignore[union-attr,index]
    elif key == "encoder.pos_embedding" and hasattr(model, "patch_size"):
        from torchvision.models.vision_transformer import interpolate_embeddings

        theirs.update(interpolate_embeddings(model.image_size, model.patch_size, theirs))  # type: ignore[arg-type]
        pixels = model.image_size  # type: ignore[assignment]
    else:
        return
    log.warning("weights: %s resampled from %d to %d positions for %d px images", key, before,
                ours.shape[1], pixels)  # fmt: skip


def load_state(model: nn.Module, theirs: dict[str, torch.Tensor], label: str) -> None:
    """Load a state dict into ``model`` (in place); ``label`` names it in messages."""
    ours = model.state_dict()
    theirs = _strip_wrapper_prefix(ours, theirs)
    _resample_vit_positions(model, ours, theirs)
    head = classifier_name(model)
    conv = first_conv_name(model)
    replaced, summed, headless = [], None, False
    for key in [*ours, *(k for k in theirs if k not in ours)]:  # the model's order first
        in_head = head is not None and key.startswith(head + ".")
        if key not in theirs or key not in ours:
            if in_head:
                replaced.append(key)
                headless |= key not in theirs  # saved without its classifier
                theirs.pop(key, None)
                continue
            where = "the model has it, the file not" if key in ours else "only the file has it"
            raise ConfigError(
                f"{label} does not fit --model: the first key that differs is {key!r} ({where})"
            )
        mine, file_value = ours[key], theirs[key]
        if mine.shape == file_value.shape:
            continue
        if in_head:
            replaced.append(key)
            theirs[key] = mine
        elif conv is not None and key == conv + ".weight" and mine.shape[1] == 1:
            theirs[key] = file_value.sum(dim=1, keepdim=True)  # RGB filters for one channel
            summed = f"{key} summed over its {file_value.shape[1]} input channels"
        else:
            raise ConfigError(
                f"{label} does not fit --model: the first key that differs is {key!r} "
                f"(file {tuple(file_value.shape)}, model {tuple(mine.shape)})"
            )
    model.load_state_dict(theirs, strict=not replaced)
    if summed:  # logged once the whole file fits
        log.warning("%s: %s for one-channel images", label, summed)
    if replaced:
        why = "the file has none" if headless else "the file's has another shape"
        log.warning(
            "%s: classifier %s replaced for the dataset's classes (%s): it starts untrained",
            label.split(" ")[0], head, why,
        )  # fmt: skip
