"""Models by name from torchvision and timm (``--model torchvision:NAME``, ``timm:NAME``).

The model is torchvision's own builder, untrained, with the dataset's class count, its
first convolution taking the dataset's channels, and, where the family takes an input
size (ViT), the dataset's image size; it is then split by its own structure
(prefast/models/split.py). ``--weights PATH`` is loaded before the split, with
torchvision's own key names (prefast/models/weights.py).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from prefast.errors import ConfigError
from prefast.models.split import split_model
from prefast.models.staged import StagedModel
from prefast.models.weights import first_conv_name, load_state, load_weights

log = logging.getLogger(__name__)
PREFIXES = ("torchvision:", "timm:")
BY_HAND = (
    "pass the stages by hand from Python: prefast.train(cfg, model=prefast.StagedModel("
    "[stage0, stage1, ..., head])) (docs/python-api.md)"
)


def is_library_model(name: str) -> bool:
    return name.startswith(PREFIXES)


def _first_conv_takes(model: nn.Module, in_channels: int) -> None:
    """Replace the first 2-D convolution by one taking ``in_channels`` (same geometry)."""
    name = first_conv_name(model)
    if name is None:
        return
    conv = model.get_submodule(name)
    assert isinstance(conv, nn.Conv2d)
    if conv.in_channels != in_channels:
        parent, _, attr = name.rpartition(".")
        geometry: dict[str, Any] = dict(
            kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        )  # fmt: skip
        setattr(model.get_submodule(parent), attr, nn.Conv2d(
            in_channels, conv.out_channels, padding_mode=conv.padding_mode, **geometry
        ))  # fmt: skip


def _takes_image_size(builder: object) -> bool:
    """Whether the class a torchvision builder returns takes ``image_size`` (asked of its
    signature, not by trying: a failed call would have drawn random weights already)."""
    import inspect
    import typing

    try:
        cls = typing.get_type_hints(builder).get("return")
    except Exception:  # an annotation that does not resolve: build at the default size
        return False
    return inspect.isclass(cls) and "image_size" in inspect.signature(cls).parameters


def _online(host: str, seconds: float = 3.0) -> bool:
    """Whether ``host`` answers on 443 within ``seconds`` (no hanging on a dead network)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=seconds).close()
        return True
    except OSError:
        return False


def _reachable(host: str) -> bool:
    """Whether a download from ``host`` may work: behind a proxy we cannot probe it (and
    assume so); otherwise it must answer on 443 within seconds."""
    import os

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    return _online(host)


def torchvision_pretrained(name: str) -> dict:
    """torchvision's default weights for ``name``, through its own loading: from the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded when absent and online; absent
    and offline, one line naming the file and where to put it."""
    import os
    from urllib.parse import urlparse

    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        raise ConfigError(f"--pretrained: torchvision has no weights for {name}") from None
    url = weights.url
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.exists(file) and not _reachable(urlparse(url).hostname or ""):
        raise ConfigError(
            f"--pretrained torchvision:{name}: {file} is not there and {url} cannot be reached "
            f"(offline?): download it elsewhere and put it at {file} (or set TORCH_HOME), or "
            "pass --weights PATH"
        )
    return weights.get_state_dict(progress=False, check_hash=False)


def torchvision_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    pretrained: bool = False,
) -> StagedModel:
    """torchvision's ``NAME`` (``torchvision.models.list_models()``), split into stages."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(
            f"--model torchvision:{name} is not a torchvision classification model: choose "
            "one of torchvision.models.list_models(), e.g. torchvision:resnet50, "
            "torchvision:convnext_tiny, torchvision:vit_b_16"
        )
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if _takes_image_size(torchvision.models.get_model_builder(name)):
        kwargs["image_size"] = image_size  # a ViT is built at the data's size
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (AssertionError, ValueError) as err:
        raise ConfigError(
            f"--model torchvision:{name} cannot take {image_size} px images ({err}): "
            "choose an --image-size the family allows (a multiple of its patch size)"
        ) from None
    _first_conv_takes(model, in_channels)
    if pretrained:
        load_state(model, torchvision_pretrained(name), f"--pretrained torchvision:{name}")
    return _weighted_and_split(model, f"torchvision:{name}", weights)


def _weighted_and_split(model: nn.Module, name: str, weights: str | None) -> StagedModel:
    """``weights`` loaded with the library's own key names (before the split), then the
    model split by its structure, or refused in one line."""
    if weights:
        load_weights(model, weights)
    staged = split_model(model, name=name)
    if staged is None:
        raise ConfigError(f"cannot split {name} into freeze stages: {BY_HAND}")
    return staged


def library_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    pretrained: bool = False,
) -> StagedModel:
    source, _, model_name = name.partition(":")
    if source == "torchvision":
        return torchvision_model(
            model_name, in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, weights=weights, pretrained=pretrained,
        )  # fmt: skip
    if source == "timm":
        return timm_model(
            model_name, in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, weights=weights, pretrained=pretrained,
        )  # fmt: skip
    raise ConfigError(f"--model {name!r}: unknown model library {source!r}")


def hf_hub_cache() -> str:
    """The Hugging Face hub cache as the environment names it now, in huggingface_hub's
    order (``HF_HUB_CACHE``, the older ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``); read at each call,
    not at import as huggingface_hub's constants are."""
    import os

    env = os.environ
    xdg = env.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = env.get("HF_HOME", os.path.join(xdg, "huggingface"))
    hub = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return os.path.expanduser(os.path.expandvars(hub))


def timm_pretrained_file(name: str) -> str | None:
    """The file of timm's pretrained tag for ``name`` in the Hugging Face cache; None when
    it is not there and the hub answers (timm then downloads it as it always does); absent
    and offline, one line naming what to fetch and where."""
    import os

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"--pretrained: timm has no Hugging Face weights for {name}")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    cache = hf_hub_cache()
    for filename in ("model.safetensors", "pytorch_model.bin"):  # what timm looks for
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            return found
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if offline or not _reachable("huggingface.co"):
        why = (
            "HF_HUB_OFFLINE is set (unset it to let timm download it)"
            if offline
            else "huggingface.co cannot be reached (offline?)"
        )
        raise ConfigError(
            f"--pretrained timm:{name}: {repo} is not in the Hugging Face cache {cache} and "
            f"{why}: run `hf download {repo}` where there is a network and copy that cache "
            "here (or set HF_HUB_CACHE), or pass --weights PATH"
        )
    return None


def timm_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    pretrained: bool = False,
) -> StagedModel:
    """timm's ``NAME`` (``timm.list_models()``) built for the data (``in_chans``,
    ``num_classes`` and, for the families that take it, ``img_size``), split into stages.
    ``pretrained``: timm's pretrained tag through timm's own loading (its classifier
    dropped for another class count, its first convolution adapted to the channels, a ViT's
    position embedding resampled), from the Hugging Face cache or downloaded."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--model timm:{name} needs timm: pip install 'prefast[timm]'") from None
    if not timm.is_model(name):
        raise ConfigError(
            f"--model timm:{name} is not a timm model: choose one of timm.list_models(), e.g. "
            "timm:vit_tiny_patch16_224, timm:convnext_atto, timm:resnet18"
        )
    arch, _, tag = name.partition(".")
    known = timm.list_pretrained(f"{arch}.*") if tag else []
    if tag and name not in known:  # timm would raise deep inside create_model
        tags = [k.partition(".")[2] for k in known]
        raise ConfigError(
            f"--model timm:{name}: timm has no pretrained tag {tag!r} for {arch}: use "
            + (f"one of {', '.join(tags)}, or " if tags else "")
            + f"timm:{arch} for its default"
        )
    kwargs: dict[str, Any] = {
        "pretrained": pretrained,
        "num_classes": num_classes,
        "in_chans": in_channels,
    }
    if pretrained:
        file = timm_pretrained_file(name)
        if file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": file}
    try:  # a ViT is built at the data's size (timm resamples a position embedding itself)
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as err:  # raised binding the arguments: nothing was built yet
        if "img_size" not in str(err):
            raise
        model = timm.create_model(name, **kwargs)
    theirs = getattr(model, "pretrained_cfg", {})  # a dict timm sets on every model
    if pretrained and theirs.get("num_classes") != num_classes:
        log.warning(
            "--pretrained: classifier %s replaced for the dataset's classes (timm's weights "
            "have %s): it starts untrained", theirs.get("classifier"), theirs.get("num_classes")
        )  # fmt: skip
    return _weighted_and_split(model, f"timm:{name}", weights)
