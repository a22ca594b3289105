"""A vision transformer's cached rows are token maps (tokens x dim): every tier, dtype and
K views take them (int8 and float8 scale per token: the row's first axis)."""

from __future__ import annotations

import pytest
import torch
from helpers import DIGITS, rel_diff
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from prefast import TrainConfig, train
from prefast.errors import ConfigError
from prefast.store import CacheRoot
from prefast.store.manage import list_caches

# float32 reads back the computed rows bit for bit; the others within their rounding
# (measured on this run: float16 3e-5, int8 3e-4, float8 7e-3 relative loss at most)
TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "int8": 2e-3, "float8": 3e-2}
_REFERENCE: list[dict] = []


def tiny_vit() -> VisionTransformer:
    """torchvision's ViT at digits' size: 8 px, 4 px patches, 4 + 1 tokens of 16 values."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=8, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )  # fmt: skip
    vit.conv_proj = nn.Conv2d(1, 16, 4, 4)
    return vit


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**DIGITS, "epochs": 4, "t0": 0.5, **kw})


def reference() -> dict:
    """FreezeOut computing every prefix (K views change nothing without augmentation)."""
    if not _REFERENCE:
        _REFERENCE.append(train(config(mode="freezeout"), model=tiny_vit()))
    return _REFERENCE[0]


@pytest.mark.parametrize(
    "tier, dtype, views",
    [
        ("ram", "float32", 1),
        pytest.param("mmap", "float16", 1, marks=pytest.mark.slow),
        ("zarr", "int8", 1),
        pytest.param("zarr", "float32", 1, marks=pytest.mark.slow),
        pytest.param("ram", "float8", 1, marks=pytest.mark.slow),
        pytest.param("mmap", "float32", 2, marks=pytest.mark.slow),
        pytest.param("ram", "int8", 1, marks=pytest.mark.slow),
        pytest.param("mmap", "float8", 1, marks=pytest.mark.slow),
    ],
)
def test_token_rows_go_through_every_tier_and_dtype(tmp_path, tier, dtype, views):
    run = train(
        config(mode="prefast", cache_tier=tier, cache_dtype=dtype, cache_views=views,
               cache_boundaries="every", cache_dir=str(tmp_path)),
        model=tiny_vit(),
    )  # fmt: skip
    read = [e["cache_stage"] for e in run["epochs"] if e["cached_batches"]]
    assert read, "no epoch read the cache"
    assert rel_diff(run, reference()) <= TOLERANCE[dtype]
    if tier in ("mmap", "zarr"):
        shapes = {tuple(c["shape"]) for c in list_caches(CacheRoot(tmp_path))
                  if c["split"] == "train"}  # fmt: skip
        assert shapes and all(len(s) == 2 and s[0] == 5 for s in shapes), shapes


def test_feature_augment_refuses_token_rows_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="stage 0's output is a 5x16 row") as err:
        train(config(mode="prefast", feature_augment="shift,mix", cache_dir=str(tmp_path)),
              model=tiny_vit())  # fmt: skip
    assert "\n" not in str(err.value) and "--feature-augment shift moves" in str(err.value)
    run = train(
        config(mode="prefast", feature_augment="mix", cache_dir=str(tmp_path)), model=tiny_vit()
    )  # fmt: skip  (mix takes token rows)
    assert run["epochs"][-1]["cached_batches"]


def test_feature_augment_refuses_swins_channels_last_maps(tmp_path):
    """torchvision's Swin keeps its maps (H, W, C): shift and flip would move channels."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                           window_size=[2, 2], num_classes=10)  # fmt: skip
    swin.features[0][0] = nn.Conv2d(1, 8, 2, 2)  # digits have one channel
    with pytest.raises(ConfigError, match=r"stage 0's output is a 4x4x8 \(H, W, C\) map") as err:
        train(config(mode="prefast", feature_augment="flip", cache_dir=str(tmp_path)),
              model=swin)  # fmt: skip
    assert "\n" not in str(err.value)
