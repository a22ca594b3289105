"""Input statistics: ImageNet's, for ``--normalize imagenet`` (what pretrained weights
expect); the default, a training set's own, is computed where the data is loaded."""

from __future__ import annotations

from prefast.errors import ConfigError

# ImageNet's per-channel statistics (torchvision's and timm's pretrained weights expect
# them); one channel takes their mean, as timm does for in_chans=1.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = ("data", "imagenet")


def imagenet_stats(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's mean and std for ``channels`` input channels (1 or 3)."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if channels == 1:
        return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
    raise ConfigError(
        f"--normalize imagenet needs 1- or 3-channel images, not {channels}: use --normalize data"
    )
