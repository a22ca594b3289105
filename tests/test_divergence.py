"""A run that diverges stops at once with one line, and no cache of NaN or inf is kept."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from helpers import DIGITS, cli_in_process
from torch import nn

from prefast import StagedModel, TrainConfig, train
from prefast.errors import TrainingDivergedError
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.store import CacheRoot, CacheSpec, open_writer
from prefast.store.manage import list_caches, verify


def resnet_two_stages() -> StagedModel:
    """The issue's model: torchvision's ResNet-18 as [stem + layer1, the rest + head]."""
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    rest = [m.layer2, m.layer3, m.layer4, m.avgpool, nn.Flatten(), m.fc]
    return StagedModel([nn.Sequential(m.conv1, m.bn1, m.relu, m.layer1), nn.Sequential(*rest)])


def cfg(tmp_path, **kw) -> TrainConfig:
    base = {**DIGITS, "epochs": 4, "cache_dtype": "float16", "cache_tier": "zarr"}
    return TrainConfig(**{**base, "mode": "prefast", "cache_dir": str(tmp_path), **kw})


def complete_caches(tmp_path) -> list[dict]:
    return [r for r in list_caches(CacheRoot(tmp_path)) if r["status"] == "complete"]


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_diverging_run_stops_in_its_first_diverged_epoch_with_one_line(tmp_path):
    """FreezeOut's 1/t_i scaling at t0 0.01 multiplies stage 0's rate by 10^6: NaN loss
    from the first epoch on (before the fix: rc 0, NaN caches marked complete)."""
    seen: list[int] = []
    with pytest.raises(TrainingDivergedError) as err:
        train(
            cfg(tmp_path, t0=0.01, epochs=3, cache_boundaries="every"),
            on_epoch=lambda r: seen.append(r["epoch"]),
            model=resnet_two_stages(),
        )
    msg = str(err.value)
    assert seen == [] and msg.startswith("training diverged in epoch 1: the mean training loss")
    assert "--lr 0.1" in msg and "1/t_i scaling multiplies by up to 1,000,000x" in msg
    assert "\n" not in msg
    assert complete_caches(tmp_path) == []


@pytest.mark.slow
def test_the_cli_exits_non_zero_with_one_line_when_the_loss_is_not_finite(tmp_path):
    args = ["--dataset", "digits", "--model", "densenet-bc", "--depth", "16", "--epochs", "3"]
    res = subprocess.run(
        [sys.executable, "-m", "prefast.cli.main", "train", "--mode", "prefast", *args,
         "--lr", "1e6", "--device", "cpu", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == [
        next(line for line in errors if line.startswith("prefast: error: training diverged"))
    ], res.stderr
    assert "epoch   2/3" not in res.stdout  # stopped in epoch 1
    assert complete_caches(tmp_path) == []


class NanRows(nn.Module):
    """Puts NaN into every 5th sample's output (of batches of ``only`` rows, if given); the
    next stage's nan_to_num keeps the loss finite, so only the cache checks can catch it."""

    def __init__(self, only: int | None = None):
        super().__init__()
        self.only = only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None and len(x) != self.only:
            return x
        bad = (x.flatten(1).sum(1) * 1000).long() % 5 == 0
        return torch.where(bad[:, None, None, None], torch.full_like(x, float("nan")), x)


class NanToNum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x)


def nan_model(only: int | None) -> StagedModel:
    return StagedModel(
        [
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), NanRows(only)),
            nn.Sequential(NanToNum(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
        ]
    )


def test_a_prefix_output_holding_nan_is_never_cached_complete(tmp_path):
    run = train(cfg(tmp_path, cache_boundaries="every"), model=nan_model(None))
    assert all(np.isfinite(e["train_loss"]) for e in run["epochs"])
    events = run["final"]["cache_events"]
    (bad,) = [e for e in events if e["event"] == "abandoned"]
    assert bad["epoch"] == 1 and "NaN or inf values in stage 1's training output" in bad["detail"]
    assert not any(e["event"] == "complete" and e["stage"] == 1 for e in events)
    for row in complete_caches(tmp_path):  # the boundary after the NaN stage is sound
        assert verify(CacheRoot(tmp_path), row["key"]) == []


def test_a_test_set_cache_holding_nan_is_never_complete(tmp_path):
    """Only the test set's last batch (40 of 360 rows; training batches hold 64 or 29)."""
    run = train(cfg(tmp_path, cache_boundaries="every"), model=nan_model(40))
    events = run["final"]["cache_events"]
    assert any(e["event"] == "complete" and e["stage"] == 1 for e in events)  # training rows
    failed = [e for e in events if e["event"] == "test_cache_failed"]
    assert failed and all(
        "NaN or inf values in stage 1's test output" in e["detail"] for e in failed
    )
    for row in complete_caches(tmp_path):
        assert verify(CacheRoot(tmp_path), row["key"]) == []


@pytest.mark.parametrize(
    "dtype", ["float16", pytest.param("bfloat16", marks=pytest.mark.slow), "float32"]
)
def test_verify_reports_a_cache_with_a_nan_row(tmp_path, dtype, capsys, caplog):
    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("nanrows", 20, (2, 3, 3), dtype), root)
    acts = torch.randn(20, 2, 3, 3)
    acts[7, 1, 2, 0] = float("nan")
    acts[11, 0, 0, 0] = float("inf")
    w.append(acts, torch.zeros(20, dtype=torch.int64), torch.arange(20))
    w.finish().close()
    problems = verify(root, "nanrows")
    assert problems == [
        "cache nanrows: 2 of 20 rows hold NaN or inf (the run that wrote it diverged). Delete "
        f"it with `prefast cache purge nanrows --cache-dir {tmp_path} --yes`"
    ]
    res = cli_in_process(capsys, caplog, "cache", "verify", "nanrows", "--cache-dir", str(tmp_path))
    assert res.returncode == 1 and "2 of 20 rows hold NaN or inf" in res.stdout + res.stderr


def test_the_run_header_and_plan_warn_when_scaling_multiplies_a_rate_past_20x(caplog):
    assert FreezeOutSchedule(4, 100, t0=0.5).scaling_warning() is None  # 8x
    warning = FreezeOutSchedule(4, 100, t0=0.2).scaling_warning()
    assert warning is not None and "by 125x (--t0 0.2, cubic scaling" in warning
    assert FreezeOutSchedule(4, 100, t0=0.2, scale_lr=False).scaling_warning() is None
    from prefast.training.trainer import Trainer

    with caplog.at_level("WARNING", logger="prefast"):
        Trainer(TrainConfig(**{**DIGITS, "mode": "freezeout", "t0": 0.2})).feed.close()
    assert any("1/t_i scaling multiplies stage 0's learning rate by 125x" in r.message
               for r in caplog.records)  # fmt: skip
