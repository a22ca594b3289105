"""Weights from a file (``--weights PATH``): a state dict or a checkpoint holding one.

Layouts read: a bare state dict; ``{"state_dict": ...}`` (Lightning and many training
scripts); ``{"model": ...}`` (timm's and torchvision's reference training scripts, which
also hold their ``args``); ``{"model_state_dict": ...}``. A ``module.`` prefix (saved
from DistributedDataParallel) is dropped, as is a prefix every key shares when it names
a wrapper (Lightning's ``model.``). Files are read with ``weights_only=True``.

Keys match strictly, as ``load_state_dict`` matches them, except:

- the classifier (every head of a model with several, as timm's ``pretrained_cfg``
  names them: DeiT's ``head`` and ``head_dist``): when the file's has another shape
  (ImageNet's 1,000 classes against the dataset's 10) the model keeps its new, untrained
  one and the log says so;
- a single-channel dataset takes RGB weights for the first convolution summed over the
  colours (as timm does), when the filters are otherwise the same shape; also logged;
- what PyTorch and torchvision load themselves: BatchNorm's ``num_batches_tracked``
  absent (files from PyTorch before 0.4.1: the model's own count is kept, as BatchNorm
  does for a file without version metadata) and torchvision's DenseNet checkpoints with
  ``norm.1``-style names (renamed with torchvision's own pattern).

Anything else that does not match exits 2 with one line naming the first key that
differs. What was loaded (the entry of the file, the number of tensors) is logged.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from prefast.errors import ConfigError

log = logging.getLogger(__name__)
NESTED = ("state_dict", "model", "model_state_dict")
SAVE_STATE = "torch.save(model.state_dict(), PATH)"
# torchvision's own renaming of its DenseNet checkpoints (torchvision/models/densenet.py,
# _load_state_dict): "denselayer1.norm.1.weight" is "denselayer1.norm1.weight" today.
DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, whichever layout holds it."""
    return read_weights(path)[0]


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``path`` and where in the file it was, in words: its top level
    or its entry (``'state_dict'``, ``'model'``, ``'model_state_dict'``)."""
    if not Path(path).is_file():
        raise ConfigError(f"--weights {path}: no such file (a state dict or a checkpoint)")
    import argparse

    try:  # tensors and plain containers only; torchvision's and timm's scripts add their args
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(_unreadable(path, err)) from None
    where = "the file's top level"
    for key in NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj, where = obj[key], f"the file's {key!r} entry"
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"--weights {path} holds no state dict: expected tensors by name, at the top or "
            f"under one of {', '.join(NESTED)}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}, where


def _unreadable(path: str, err: Exception) -> str:
    """One clean line for a file ``torch.load(weights_only=True)`` refuses. A whole model
    saved with ``torch.save(model, PATH)`` is named as such (from the classes the pickle
    names, never by unpickling it); any other error keeps torch's first sentence, without
    its terminal escapes."""
    import pickle
    import sys

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if isinstance(err, pickle.UnpicklingError) and found:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # an older format: the class in torch's message is enough
            names = []
        names = [found.group(1), *(n for n in names if n != found.group(1))]

        def is_module(name: str) -> bool:  # only classes already imported: nothing is run
            module, _, attr = name.rpartition(".")
            cls = getattr(sys.modules.get(module), attr, None)
            return isinstance(cls, type) and issubclass(cls, nn.Module)

        if any(n.startswith("torch.nn.modules.") or is_module(n) for n in names):
            return (
                f"--weights {path} is a whole pickled model ({found.group(1)}), not a state "
                f"dict (--weights never unpickles code): save its weights with {SAVE_STATE} "
                "and pass that file"
            )
        return (
            f"--weights {path} holds pickled Python objects ({found.group(1)}), not only "
            f"tensors (--weights never unpickles code): pass a state dict saved with "
            f"{SAVE_STATE}"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (
        f"--weights {path} cannot be read as weights ({type(err).__name__}: {first[:200]}): "
        f"pass a file saved with {SAVE_STATE} (a PreFast --checkpoint is for --resume)"
    )


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


def classifier_names(model: nn.Module) -> list[str]:
    """The modules that map features to classes. A timm model names them itself (its
    ``pretrained_cfg["classifier"]``, what timm drops when it loads weights for another
    class count; two for a distilled DeiT: ``head``, ``head_dist``), or its
    ``get_classifier()`` returns them; any other model's is its last Linear (or, as in
    SqueezeNet, its last convolution) in registration order."""
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = [named] if isinstance(named, str) else list(named or ())
    found = [n for n in names if n in modules and n]
    if not found and callable(getattr(model, "get_classifier", None)):
        try:
            heads = model.get_classifier()  # type: ignore[operator]
        except Exception:  # a model whose get_classifier needs more than it has
            heads = None
        heads = heads if isinstance(heads, tuple | list) else [heads]
        by_id = {id(m): n for n, m in modules.items() if n}
        found = [by_id[id(h)] for h in heads if id(h) in by_id]
    if found:
        return found
    last = [n for n, m in modules.items() if isinstance(m, nn.Linear | nn.Conv2d)][-1:]
    return last


def first_conv_name(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def load_weights(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model`` (in place), as the module docstring says; the log
    (INFO) says which entry of the file was used and how many tensors it gave."""
    theirs, where = read_weights(path)
    loaded = load_state(model, theirs, f"--weights {path}")
    log.info("--weights %s: loaded %d tensors from %s (the model has %d)", path, loaded, where,
             len(model.state_dict()))  # fmt: skip


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


def _as_pytorch_loads(ours: dict, theirs: dict[str, torch.Tensor]) -> list[str]:
    """What ``load_state_dict`` and torchvision accept besides exact keys, made exact in
    ``theirs`` (in place): torchvision's old DenseNet names renamed, and a BatchNorm's
    ``num_batches_tracked`` the file lacks taken from the model. Returns the keys taken."""
    for key in [k for k in theirs if k not in ours]:
        old = DENSENET_OLD.match(key)
        if old and old.group(1) + old.group(2) in ours:
            theirs[old.group(1) + old.group(2)] = theirs.pop(key)
    kept = [k for k in ours if k.endswith(".num_batches_tracked") and k not in theirs]
    theirs.update({k: ours[k] for k in kept})
    return kept


def _differs(label: str, key: str, detail: str) -> ConfigError:
    return ConfigError(
        f"{label} does not fit --model: the first key that differs is {key!r} ({detail}): "
        "pass weights saved from --model's architecture, or the --model they were saved from"
    )


def load_state(model: nn.Module, theirs: dict[str, torch.Tensor], label: str) -> int:
    """Load a state dict into ``model`` (in place); ``label`` names it in messages.
    Returns how many of the file's tensors went into the model."""
    ours = model.state_dict()
    theirs = _strip_wrapper_prefix(ours, theirs)
    _resample_vit_positions(model, ours, theirs)
    kept = _as_pytorch_loads(ours, theirs)
    heads = classifier_names(model)
    conv = first_conv_name(model)
    replaced, summed, headless = [], None, False
    for key in [*ours, *(k for k in theirs if k not in ours)]:  # the model's order first
        in_head = any(key.startswith(head + ".") for head in heads)
        if key not in theirs or key not in ours:
            if in_head:
                replaced.append(key)
                headless |= key not in theirs  # saved without its classifier
                theirs.pop(key, None)
                continue
            where = "the model has it, the file not" if key in ours else "only the file has it"
            raise _differs(label, key, where)
        mine, file_value = ours[key], theirs[key]
        if mine.shape == file_value.shape:
            continue
        shapes = f"file {tuple(file_value.shape)}, model {tuple(mine.shape)}"
        if in_head:
            replaced.append(key)
            theirs[key] = mine
        elif (
            conv is not None
            and key == conv + ".weight"
            and mine.dim() == file_value.dim() == 4
            and mine.shape[1] == 1
            and (mine.shape[0], *mine.shape[2:]) == (file_value.shape[0], *file_value.shape[2:])
        ):  # RGB filters for one channel: only the input channels may differ
            theirs[key] = file_value.sum(dim=1, keepdim=True)
            summed = f"{key} summed over its {file_value.shape[1]} input channels"
        else:
            raise _differs(label, key, shapes)
    model.load_state_dict(theirs, strict=not replaced)
    if kept:
        log.info("%s: the file has no num_batches_tracked for %d BatchNorm layers (saved by "
                 "PyTorch before 0.4.1?): the model's own kept, as PyTorch loads it", label,
                 len(kept))  # fmt: skip
    if summed:  # logged once the whole file fits
        log.warning("%s: %s for one-channel images", label, summed)
    if replaced:
        why = "the file has none" if headless else "the file's has another shape"
        named = ", ".join(h for h in heads if any(k.startswith(h + ".") for k in replaced))
        log.warning(
            "%s: classifier %s replaced for the dataset's classes (%s): it starts untrained",
            label.split(" ")[0], named, why,
        )  # fmt: skip
    return len(theirs) - len(kept) - sum(k in theirs for k in replaced)
