"""Resuming with another epoch count: the checkpoint's frozen stages stay frozen, the rest
follow the new schedule, and the plan is the one of the schedule that runs (docs/how-it-works.md
"Resume")."""

from __future__ import annotations

import pytest
from helpers import DIGITS, assert_every_sample_once_per_epoch, train_recording

from prefast.config import TrainConfig
from prefast.errors import ConfigError
from prefast.training.trainer import train

N_DIGITS = 1437


class Stop(Exception):
    """Ends the first part of a run after epoch 4's checkpoint (next epoch: 5)."""


def first_part(tmp_path, **kw) -> TrainConfig:
    """10 epochs with a checkpoint, stopped once epoch 5 has run: the checkpoint holds
    epochs 0..4, its model 6 frozen stages (t0 0.5, DenseNet-BC 16: 10 stages)."""
    cfg = TrainConfig(
        mode="prefast",
        cache_dir=str(tmp_path / "cache"),
        cache_boundaries="every",
        checkpoint=str(tmp_path / "ck.pt"),
        **{**DIGITS, "cache_tier": "zarr", **kw},
    )

    def stop(record: dict) -> None:
        if record["epoch"] == 5:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch=stop)
    return cfg


def events(run: dict, name: str) -> list[dict]:
    return [e for e in run["final"]["cache_events"] if e["event"] == name]


def read_stages(run: dict, first: int) -> list:
    bpe = run["final"]["batches_per_epoch"]
    return [e["cache_stage"] if e["cached_batches"] == bpe else None for e in run["epochs"][first:]]


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_resumed_with_more_epochs_the_later_boundaries_are_planned_written_and_read(tmp_path):
    """10 epochs plan {2:2, 3:4, 4:5, 5:6, 6:7, 8:8}; 20 epochs freeze stages 7, 8, 9 at
    epochs 12, 15 and 17. Resumed at epoch 5 with --epochs 20, the plan is the running
    schedule's: those boundaries are materialized and read. (Before, the checkpoint's
    10-epoch plan overwrote it and epochs 10-19 all read stage 6.)"""
    cfg = first_part(tmp_path)
    resumed, steps = train_recording(cfg.replace(epochs=20, resume=True))
    written = [(e["epoch"], e["stage"]) for e in events(resumed, "complete")]
    assert written == [(5, 6), (12, 7), (15, 8), (17, 9)], resumed["final"]["cache_events"]
    assert read_stages(resumed, 5) == [6] * 8 + [7] * 3 + [8] * 2 + [9] * 2
    [ev] = events(resumed, "resumed")  # what was kept, dropped and re-planned
    assert ev["epoch"] == 5 and ev["plan"] == {5: 6, 12: 7, 15: 8, 17: 9}, ev
    assert ev["replanned"] == {"epochs": [10, 20], "was": {5: 6, 6: 7, 8: 8}}, ev
    # the checkpoint's 6 frozen stages stay frozen; stage 6 freezes on the new clock
    frozen = [e["frozen_stages"] for e in resumed["epochs"][5:]]
    assert frozen[:6] == [6] * 6 and frozen[-1] == 9, frozen
    assert_every_sample_once_per_epoch(resumed, steps, N_DIGITS)


@pytest.mark.slow
def test_resumed_with_fewer_epochs_deeper_stages_freeze_at_once_and_are_cached(tmp_path):
    """--epochs 8: by epoch 5 the shorter schedule has frozen 7 stages. The plan at resume
    is {5:7, 6:8}: stage 7 is written at once (not stage 6, which the checkpoint's plan
    had next) and read from epoch 6, stage 8 from epoch 7."""
    cfg = first_part(tmp_path)
    resumed, steps = train_recording(cfg.replace(epochs=8, resume=True))
    written = [(e["epoch"], e["stage"]) for e in events(resumed, "complete")]
    assert written == [(5, 7), (6, 8)], resumed["final"]["cache_events"]
    assert read_stages(resumed, 5) == [None, 7, 8]
    [ev] = events(resumed, "resumed")
    assert ev["plan"] == {5: 7, 6: 8} and ev["replanned"]["epochs"] == [10, 8], ev
    assert len(resumed["epochs"]) == 8
    assert_every_sample_once_per_epoch(resumed, steps, N_DIGITS)


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_resuming_with_fewer_epochs_than_trained_is_refused_in_one_line(tmp_path):
    cfg = first_part(tmp_path)
    with pytest.raises(ConfigError, match="has trained 5 epochs, more than --epochs 4"):
        train(cfg.replace(epochs=4, resume=True))


@pytest.mark.slow
def test_a_resumed_run_reopens_an_auto_chosen_int8_boundary(tmp_path):
    """--cache-dtype auto under --max-disk 6 MiB: stage 2's cache fits the disk in int8 only
    (8.3 MB in float16, 4.7 MB in int8). Crashed after epoch 2 and resumed, the run reopens
    that int8 cache by its key at epoch 3 (the checkpoint records each boundary's dtype)
    and trains exactly as the uninterrupted run."""
    from prefast.store import CacheRoot
    from prefast.store.manage import list_caches

    kw = dict(cache_dtype="auto", max_ram=64 * 2**10, max_disk=6 * 2**20)
    whole = train(TrainConfig(mode="prefast", cache_dir=str(tmp_path / "whole"),
                              cache_boundaries="every", **{**DIGITS, **kw}))  # fmt: skip
    first = next(e for e in whole["final"]["cache_events"] if e["event"] == "boundary")
    assert (first["epoch"], first["stage"], first["dtype"]) == (2, 2, "int8"), first
    assert first["tier"] in ("mmap", "zarr")
    cfg = TrainConfig(mode="prefast", cache_dir=str(tmp_path / "c"), cache_boundaries="every",
                      checkpoint=str(tmp_path / "ck.pt"), **{**DIGITS, **kw})  # fmt: skip

    from prefast.training.trainer import Trainer

    tr = Trainer(cfg)
    step = tr._step

    def crash(batch, it):  # in epoch 3, before it completes stage 4 (which supersedes 2)
        if it == 3 * tr.raw.batches_per_epoch + 5:
            raise Stop  # the checkpoint holds epochs 0..2: stage 2 complete, in int8
        return step(batch, it)

    tr._step = crash  # type: ignore[method-assign]
    with pytest.raises(Stop):
        tr.run()
    [int8] = [c for c in list_caches(CacheRoot(tmp_path / "c"))
              if c["split"] == "train" and c["boundary"] == 2]  # fmt: skip
    assert int8["dtype"] == "int8"
    resumed = train(cfg.replace(resume=True))
    reused = [(e["epoch"], e["key"]) for e in events(resumed, "reused")]
    assert (3, int8["key"]) in reused, resumed["final"]["cache_events"]
    assert resumed["epochs"][3]["cache_stage"] == 2
    assert [e["train_loss"] for e in resumed["epochs"]] == [
        e["train_loss"] for e in whole["epochs"]
    ]
