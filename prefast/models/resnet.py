"""Pre-activation ResNet-18 and Wide ResNet: one residual block per stage."""

from __future__ import annotations

import torch
from torch import nn

from prefast.errors import ConfigError
from prefast.models.densenet import head


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 with an identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.drop(torch.relu(self.bn2(out))))
        return out + short


def _residual_stages(
    in_channels: int, num_classes: int, stem_ch: int, groups: list[tuple[int, int, int]]
) -> list[nn.Module]:
    """groups: (out_channels, blocks, first_stride) per group."""
    stages: list[nn.Module] = [nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False)]
    ch = stem_ch
    for out_ch, blocks, stride in groups:
        for b in range(blocks):
            stages.append(PreActBlock(ch, out_ch, stride if b == 0 else 1))
            ch = out_ch
    stages.append(head(ch, num_classes))
    return stages


def preact_resnet18_stages(in_channels: int, num_classes: int) -> list[nn.Module]:
    return _residual_stages(
        in_channels, num_classes, 64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    )


def wrn_stages(depth: int, width: int, in_channels: int, num_classes: int) -> list[nn.Module]:
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(
            f"--depth {depth} cannot build a WRN: use depth = 6n + 4 (e.g. 10, 16, 22, 28, 40)"
        )
    if width < 1:
        raise ConfigError(f"--width {width} must be at least 1 (e.g. WRN-28-10 uses 10)")
    n = (depth - 4) // 6
    return _residual_stages(
        in_channels, num_classes, 16, [(16 * width, n, 1), (32 * width, n, 2), (64 * width, n, 2)]
    )
