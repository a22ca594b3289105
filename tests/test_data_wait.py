"""``data_s``: the seconds each epoch's steps waited for raw data, measured, per epoch.

A dataset whose ``__getitem__`` sleeps makes the wait known from outside; a
stage that sleeps makes the step's own time known, so the test also fails if
compute were counted as waiting.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from prefast import TrainConfig, train

ITEMS, BATCH, ITEM_SLEEP_S, STEP_SLEEP_S = 64, 16, 0.004, 0.02
BATCHES = ITEMS // BATCH


class Sleepy(Dataset):
    """64 tiny images; every read sleeps ``sleep_s`` (a slow disk or decoder)."""

    def __init__(self, sleep_s: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(ITEMS, 1, 6, 6, generator=g)
        self.y = torch.randint(0, 4, (ITEMS,), generator=g)
        self.sleep_s = sleep_s

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int):
        time.sleep(self.sleep_s)
        return self.x[i], int(self.y[i])


class SlowHead(nn.Module):
    """The last stage: a linear head that takes ``sleep_s`` per training call."""

    def __init__(self, sleep_s: float):
        super().__init__()
        self.fc, self.sleep_s = nn.Linear(8, 4), sleep_s

    def forward(self, x):
        if self.training:
            time.sleep(self.sleep_s)
        return self.fc(x.mean(dim=(2, 3)))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
    return nn.Sequential(conv, nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                         SlowHead(STEP_SLEEP_S))  # fmt: skip


def run(mode: str, workers: int, item_sleep_s: float, tmp_path, **kw) -> dict:
    cfg = TrainConfig(
        mode=mode, epochs=kw.pop("epochs", 2), batch_size=BATCH, t0=0.5, augment="none",
        device="cpu", workers=workers, cache_dir=str(tmp_path), **kw,
    )  # fmt: skip
    return train(cfg, model=net(), train_data=Sleepy(item_sleep_s), test_data=Sleepy(0.0, 1))


def test_the_wait_for_a_slow_dataset_is_counted_and_the_step_is_not(tmp_path):
    doc = run("baseline", 0, ITEM_SLEEP_S, tmp_path)
    for e in doc["epochs"]:
        # every read happens in this process: the wait is at least the reads' sleeps...
        assert e["data_s"] >= ITEMS * ITEM_SLEEP_S, e
        # ...and excludes the steps, which sleep for STEP_SLEEP_S each
        assert e["data_s"] <= e["train_s"] - BATCHES * STEP_SLEEP_S, e
    share = sum(e["data_s"] for e in doc["epochs"]) / sum(e["train_s"] for e in doc["epochs"])
    assert doc["final"]["data_share"] == pytest.approx(share)
    quick = run("baseline", 0, 0.0, tmp_path)  # the same run without slow reads
    assert max(e["data_s"] for e in quick["epochs"]) < min(e["data_s"] for e in doc["epochs"])


def test_worker_processes_hide_part_of_the_wait_and_the_rest_is_counted(tmp_path):
    doc = run("baseline", 2, 2 * ITEM_SLEEP_S, tmp_path)
    # Each epoch's first batch is read while no step runs (the workers get the epoch's
    # order when it begins): at least 16 reads of 8 ms are waited for, whatever the load.
    for e in doc["epochs"]:
        assert BATCH * 2 * ITEM_SLEEP_S <= e["data_s"] <= e["train_s"], e
    share = sum(e["data_s"] for e in doc["epochs"]) / sum(e["train_s"] for e in doc["epochs"])
    assert doc["final"]["data_share"] == pytest.approx(share)


def test_epochs_that_train_from_the_cache_do_not_wait_for_data(tmp_path):
    doc = run("prefast", 0, ITEM_SLEEP_S, tmp_path, epochs=4, cache_tier="ram",
              cache_dtype="float32", cache_boundaries="every")  # fmt: skip
    raw = [e for e in doc["epochs"] if e["cached_batches"] == 0]
    cached = [e for e in doc["epochs"] if e["cached_batches"] == BATCHES]
    assert raw and cached, [(e["epoch"], e["cached_batches"]) for e in doc["epochs"]]
    assert all(e["data_s"] >= ITEMS * ITEM_SLEEP_S for e in raw)
    assert all(e["data_s"] == 0.0 for e in cached)  # the dataset is not read at all
