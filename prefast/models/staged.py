"""A network as an ordered list of freeze units ("stages"), the last being the head.

Freezing a stage means: its parameters stop requiring gradients, it leaves the
optimizer (the trainer's job) and it runs in eval mode from then on, so its
BatchNorm layers use running statistics and its output is a deterministic
function of its input. That is what makes a frozen stage's output cacheable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prefast.errors import ConfigError


class StagedModel(nn.Module):
    """Runs ``stages[start:]`` in order; ``stages[-1]`` is the classification head."""

    def __init__(self, stages: Sequence[nn.Module], name: str = "model"):
        super().__init__()
        if len(stages) < 2:
            raise ConfigError(f"a staged model needs at least 2 stages, got {len(stages)}")
        self.stages = nn.ModuleList(stages)
        self.name = name
        self.num_frozen = 0  # frozen stages always form a prefix
        # Rows of 3-D stage outputs are (H, W, C) maps, not (C, H, W) ones (Swin keeps
        # channels last): --feature-augment's shift and flip would move the wrong axes.
        self.channels_last = False

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run stages ``start..end``; ``x`` is the input of stage ``start``."""
        for stage in self.stages[start:]:
            x = stage(x)
        return x

    def run_range(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def freeze_prefix(self, count: int) -> list[int]:
        """Freeze stages ``0..count-1``; returns the newly frozen indices."""
        newly = list(range(self.num_frozen, count))
        for i in newly:
            stage = self.stages[i]
            stage.requires_grad_(False)
            for p in stage.parameters():
                p.grad = None
            stage.eval()
        self.num_frozen = max(self.num_frozen, count)
        return newly

    def train(self, mode: bool = True) -> StagedModel:
        # nn.Module.train recurses into children; re-assert eval on the frozen
        # prefix so a parent's .train() can never flip BN back to batch stats.
        super().train(mode)
        for stage in self.stages[: self.num_frozen]:
            stage.eval()
        return self

    def prefix_digest(self, count: int) -> str:
        """Hash of the parameters and buffers of stages ``0..count-1`` (cache keys)."""
        import hashlib

        h = hashlib.sha256()
        for i in range(count):
            for name, t in self.stages[i].state_dict().items():
                h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(
                    t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                )
        return h.hexdigest()


def from_sequential(seq: nn.Sequential, name: str = "sequential") -> StagedModel:
    """Each child of ``seq`` becomes one stage; the last child is the head."""
    return StagedModel(list(seq.children()), name=name)


def from_torchvision_resnet(model: Any, name: str = "tv-resnet") -> StagedModel:
    """Split a torchvision ResNet into stem, one stage per residual block, and head."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks: list[nn.Module] = []
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        blocks.extend(getattr(model, layer_name).children())
    head = nn.Sequential(model.avgpool, nn.Flatten(), model.fc)
    return StagedModel([stem, *blocks, head], name=name)


def remember_state(module: nn.Module) -> Any:
    """A function that puts ``module`` back as it is now: each parameter's
    ``requires_grad``, train or eval mode (per submodule) and, for a StagedModel, its
    frozen count. Training changes all three; ``prefast.train`` hands your model back with
    them as you passed them (and its trained weights)."""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    frozen = module.num_frozen if isinstance(module, StagedModel) else None

    def restore() -> None:
        for p, flag in grads:
            p.requires_grad_(flag)
        if frozen is not None:
            module.num_frozen = frozen  # type: ignore[assignment]
        for m, training in modes:
            m.training = training  # per module: not .train(), which recurses

    return restore
