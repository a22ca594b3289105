"""Model zoo: every model is a :class:`StagedModel` (ordered stages, head last)."""

from __future__ import annotations

from torch import nn

from prefast.errors import ConfigError
from prefast.models.densenet import densenet_bc_stages
from prefast.models.library import is_library_model, library_model
from prefast.models.resnet import preact_resnet18_stages, wrn_stages
from prefast.models.split import as_staged_model
from prefast.models.staged import (
    StagedModel,
    from_sequential,
    from_torchvision_resnet,
)
from prefast.models.vgg import vgg16_stages
from prefast.models.weights import load_weights

MODELS = ("densenet-bc", "preact-resnet18", "wrn", "vgg16", "resnet18")


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    depth: int | None = None,
    growth_rate: int = 12,
    width: int = 4,
    weights: str | None = None,
    pretrained: bool = False,
) -> StagedModel:
    """Build a model by name; input shape and class count come from the dataset.

    ``depth`` defaults to FreezeOut's 76 for DenseNet-BC and 16 for WRN. ``weights``: a
    state dict or checkpoint file to start from (prefast/models/weights.py).
    """
    if is_library_model(name):
        return library_model(
            name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            weights=weights, pretrained=pretrained,
        )  # fmt: skip
    if pretrained:
        raise ConfigError(
            f"--pretrained: the built-in {name} has no published weights: use "
            "--model torchvision:NAME or timm:NAME with --pretrained, or --weights PATH"
        )
    if name == "densenet-bc":
        stages = densenet_bc_stages(depth or 76, growth_rate, in_channels, num_classes)
    elif name == "preact-resnet18":
        stages = preact_resnet18_stages(in_channels, num_classes)
    elif name == "wrn":
        stages = wrn_stages(depth or 16, width, in_channels, num_classes)
    elif name == "vgg16":
        stages = vgg16_stages(in_channels, num_classes, image_size)
    elif name == "resnet18":
        stages = list(torchvision_resnet18(in_channels, num_classes).stages)
    else:
        raise ConfigError(
            f"unknown model {name!r}: choose one of {', '.join(MODELS)} or torchvision:NAME"
        )
    model = StagedModel(stages, name=name)
    if weights:  # a built-in model's keys are its stages': stages.0.…
        load_weights(model, weights)
    return model


def torchvision_resnet18(in_channels: int, num_classes: int) -> StagedModel:
    """torchvision's ``resnet18`` (ImageNet stem: 7x7 stride-2 conv and max pool, so it
    suits 64 px and larger images), untrained: stem, 8 basic blocks, head."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return from_torchvision_resnet(net, name="resnet18")


__all__ = [
    "MODELS",
    "StagedModel",
    "as_staged_model",
    "build_model",
    "is_library_model",
    "from_sequential",
    "from_torchvision_resnet",
]
