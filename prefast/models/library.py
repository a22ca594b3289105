"""Models by name from torchvision and timm (``--model torchvision:NAME``, ``timm:NAME``).

The model is torchvision's own builder, untrained, with the dataset's class count, its
first convolution taking the dataset's channels, and, where the family takes an input
size (ViT), the dataset's image size; it is then split by its own structure
(prefast/models/split.py). ``--weights PATH`` is loaded before the split, with
torchvision's own key names (prefast/models/weights.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from torch import nn

from prefast.errors import ConfigError
from prefast.models.check import check_built
from prefast.models.hub import (
    bounded_download,
    timm_pretrained_file,
    timm_weight_source,
    torchvision_pretrained,
)
from prefast.models.split import BY_HAND, split_model
from prefast.models.staged import StagedModel
from prefast.models.weights import first_conv_name, load_state, load_weights

log = logging.getLogger(__name__)
PREFIXES = ("torchvision:", "timm:")


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
    return _weighted_and_split(model, f"torchvision:{name}", weights, in_channels, image_size)


def _weighted_and_split(
    model: nn.Module, name: str, weights: str | None, in_channels: int, image_size: int
) -> StagedModel:
    """``weights`` loaded with the library's own key names (before the split), then the
    model split by its structure and checked against its own forward
    (prefast/models/check.py), or refused in one line."""
    if weights:
        load_weights(model, weights)
    staged = split_model(model, name=name)
    if staged is None:
        raise ConfigError(f"cannot split {name} into freeze stages: {BY_HAND}")
    check_built(model, staged, name, in_channels, image_size)
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


def _create_timm(timm: Any, name: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    try:  # a ViT is built at the data's size (timm resamples a position embedding itself)
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as err:  # raised binding the arguments: nothing was built yet
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **kwargs)


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
    download: Any = contextlib.nullcontext()
    if pretrained:
        file = timm_pretrained_file(name)
        if file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": file}
        else:  # timm downloads it: a stall is bounded, a failure one line
            download = bounded_download(f"--pretrained timm:{name}", timm_weight_source(name)[1])
    try:
        with download:
            model = _create_timm(timm, name, image_size, kwargs)
    except ConfigError:
        raise
    except Exception as err:  # timm's own error, deep in a builder or a download
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:200]
        what = (
            "timm could not load its weights" if pretrained
            else f"timm cannot build it for {in_channels}-channel {image_size} px images"
        )  # fmt: skip
        raise ConfigError(
            f"--model timm:{name}: {what} ({type(err).__name__}: {first}): "
            + (
                "try again, or pass --weights PATH"
                if pretrained
                else "choose another --image-size or another model"
            )
        ) from None
    theirs = getattr(model, "pretrained_cfg", {})  # a dict timm sets on every model
    if pretrained and theirs.get("num_classes") != num_classes:
        log.warning(
            "--pretrained: classifier %s replaced for the dataset's classes (timm's weights "
            "have %s): it starts untrained", theirs.get("classifier"), theirs.get("num_classes")
        )  # fmt: skip
    return _weighted_and_split(model, f"timm:{name}", weights, in_channels, image_size)
