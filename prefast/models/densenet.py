"""DenseNet-BC (Huang et al.), as in FreezeOut: every dense layer is one stage.

Depth L gives (L - 4) / 6 bottleneck layers per block, three blocks, growth
rate k, compression 0.5. FreezeOut's default is k=12, L=76.
"""

from __future__ import annotations

import torch
from torch import nn

from prefast.errors import ConfigError


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output concatenated to the input."""

    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def transition(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.AvgPool2d(2, ceil_mode=True),
    )


def head(in_ch: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_ch, num_classes),
    )


def densenet_bc_stages(
    depth: int, growth: int, in_channels: int, num_classes: int
) -> list[nn.Module]:
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(
            f"--depth {depth} cannot build a DenseNet-BC: use depth = 6n + 4 with n >= 1 "
            "(e.g. 10, 16, 22, 40, 76, 100)"
        )
    if growth < 1:
        raise ConfigError(f"--growth-rate {growth} must be at least 1 (FreezeOut uses 12)")
    per_block = (depth - 4) // 6
    ch = 2 * growth
    stages: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)]
    for block in range(3):
        for _ in range(per_block):
            stages.append(DenseLayer(ch, growth))
            ch += growth
        if block < 2:
            stages.append(transition(ch, ch // 2))
            ch //= 2
    stages.append(head(ch, num_classes))
    for m in nn.ModuleList(stages).modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    return stages
