"""VGG-16 with BatchNorm; one conv layer (plus its pooling) per stage."""

from __future__ import annotations

from torch import nn

# VGG-16's configuration: channels, "M" = 2x2 max-pool.
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_stages(in_channels: int, num_classes: int, image_size: int) -> list[nn.Module]:
    stages: list[nn.Module] = []
    ch, size = in_channels, image_size
    for item in VGG16:
        if item == "M":
            # Small inputs (8x8 digits) cannot be halved five times: skip the
            # pools that would shrink the map below 1 pixel.
            if size >= 2:
                stages[-1] = nn.Sequential(stages[-1], nn.MaxPool2d(2))
                size //= 2
            continue
        assert isinstance(item, int)
        stages.append(
            nn.Sequential(
                nn.Conv2d(ch, item, 3, padding=1, bias=False),
                nn.BatchNorm2d(item),
                nn.ReLU(inplace=True),
            )
        )
        ch = item
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes)))
    return stages
