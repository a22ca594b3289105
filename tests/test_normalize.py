"""--normalize imagenet: inputs standardized by ImageNet's statistics (what pretrained
weights expect), for built-in sets and image folders; a cache keyed by it."""

from __future__ import annotations

import pytest
import torch
from helpers import DIGITS
from test_user_data import write_image_folder

from prefast import TrainConfig, train
from prefast.data.datasets import load_dataset
from prefast.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from prefast.errors import ConfigError


def test_digits_are_standardized_by_imagenets_grey_statistics():
    raw, _ = load_dataset("digits")
    train_ds, test_ds = load_dataset("digits", normalize="imagenet")
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    expected = (raw.x[3].float() / 255.0 - mean) / std
    assert torch.allclose(train_ds[3][0], expected) and not torch.allclose(raw[3][0], expected)
    assert train_ds.identity != raw.identity  # other inputs, other cache keys


def test_an_image_folder_takes_imagenets_rgb_statistics(tmp_path):
    data = write_image_folder(tmp_path / "imgs", per_class=(4, 2))
    train_ds, _ = load_dataset("imagefolder", data, normalize="imagenet")
    normalize = train_ds.transform.transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == (IMAGENET_MEAN, IMAGENET_STD)


def test_a_cache_of_other_normalization_is_not_reused(tmp_path):
    base = {**DIGITS, "epochs": 3, "t0": 1.0, "freeze_prefix": "all", "mode": "prefast",
            "cache_tier": "zarr", "augment": "none", "cache_dir": str(tmp_path)}  # fmt: skip
    train(TrainConfig(**base))
    again = train(TrainConfig(**base, normalize="imagenet"))
    assert not any(e["event"] == "reused" for e in again["final"]["cache_events"])
    assert again["epochs"][0]["cached_batches"] == 0  # its prefix computed anew


def test_a_bad_normalize_value_is_one_line():
    with pytest.raises(ConfigError, match="--normalize 'cifar' is not valid: choose one of data"):
        TrainConfig(normalize="cifar")
