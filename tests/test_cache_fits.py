"""Rows that do not fit their cache dtype (prefast/caching/fits.py): the non-finite check runs
on what is stored; an overflow is never trained on, never kept, and never blamed on --lr.

The model makes the numbers exact: its frozen stage multiplies digits pixels (k/16) by
powers of two, so every value is exact in float16 up to its largest finite value (65504)
and ``inf`` above it; the head divides by the same power of two. A cache that stores what
fits and never trains on what does not gives freezeout's numbers exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prefast import StagedModel, TrainConfig, train
from prefast.store import CacheRoot
from prefast.store.manage import list_caches, verify

LIFT = 2.0**17  # pixel 8/16 and above: 65536 and more, inf in float16


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def lifting_model() -> StagedModel:
    """[1x1 conv: x * 2^17 and x * 2^10, exactly] -> [x / 2^17, linear head]."""
    torch.manual_seed(0)
    lift = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        lift.weight.copy_(torch.tensor([LIFT, 2.0**10]).view(2, 1, 1, 1))
    head = nn.Sequential(Scale(1 / LIFT), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))
    return StagedModel([lift, head])


def digits_pixels(overflow_train: bool, overflow_test_share: float):
    """sklearn digits as k/16 (exact in float16). Rows that must not overflow have their
    pixels capped at 7/16 (7 * 2^13 = 57344 < 65504)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    capped = x.clamp(max=7 / 16)
    train_x = x[:1400] if overflow_train else capped[:1400]
    test_x = capped[1400:].clone()
    n = int(len(test_x) * overflow_test_share)
    test_x[:n] = x[1400 : 1400 + n]
    return TensorDataset(train_x, y[:1400]), TensorDataset(test_x, y[1400:])


def run(tmp_path, mode: str, data, **kw) -> dict:
    cfg = TrainConfig(mode=mode, epochs=3, batch_size=100, lr=0.05, augment="none",
                      device="cpu", freeze_prefix=1, cache_boundaries="every",
                      cache_dir=str(tmp_path), **kw)  # fmt: skip
    return train(cfg, model=lifting_model(), train_data=data[0], test_data=data[1])


def events(record: dict, name: str) -> list[dict]:
    return [e for e in record["final"]["cache_events"] if e["event"] == name]


def losses(record: dict) -> list[float]:
    return [e["train_loss"] for e in record["epochs"]]


def test_training_rows_that_overflow_float16_are_cached_as_float32_under_auto(tmp_path):
    """Before: the write epoch trained on inf, and the run stopped with 'training diverged
    ... lower --lr'. Now the epoch trains on the computed values, the boundary is written
    again in float32 the next epoch and read after: freezeout's numbers exactly."""
    data = digits_pixels(overflow_train=True, overflow_test_share=0.0)
    ref = run(tmp_path / "f", "freezeout", data)
    got = run(tmp_path / "p", "prefast", data, cache_dtype="auto", cache_tier="zarr")
    assert np.allclose(losses(got), losses(ref), rtol=1e-6), (losses(got), losses(ref))
    assert [e["test_acc"] for e in got["epochs"]] == [e["test_acc"] for e in ref["epochs"]]
    (changed,) = events(got, "dtype_changed")
    assert (changed["split"], changed["dtype"], changed["to"]) == ("train", "float16", "float32")
    assert changed["values"] > 0 and "overflow float16 (largest finite 65504)" in changed["detail"]
    assert [(b["epoch"], b["dtype"]) for b in events(got, "boundary")] == [
        (0, "float16"),
        (1, "float32"),
    ]
    assert got["epochs"][2]["cache_tier"] == "zarr"  # the float32 cache is read
    assert not events(got, "abandoned")
    root = CacheRoot(tmp_path / "p")
    kept = [r for r in list_caches(root) if r["status"] == "complete"]
    assert kept and all(r["dtype"] == "float32" for r in kept)
    assert all(verify(root, r["key"]) == [] for r in kept)


def test_with_a_named_dtype_overflowing_rows_are_not_cached_and_the_run_computes(tmp_path):
    data = digits_pixels(overflow_train=True, overflow_test_share=0.0)
    ref = run(tmp_path / "f", "freezeout", data)
    got = run(tmp_path / "p", "prefast", data, cache_dtype="float16", cache_tier="zarr")
    assert np.allclose(losses(got), losses(ref), rtol=1e-6)
    (told,) = [e for e in events(got, "not_cached") if e["split"] == "train"]
    assert told["dtype"] == "float16" and told["stage"] == 1
    assert "not cached: cache_dtype='float32' (--cache-dtype float32)" in told["reason"]
    assert not events(got, "dtype_changed")
    assert all(e["cache_tier"] is None for e in got["epochs"])  # computed to the end
    complete = [r for r in list_caches(CacheRoot(tmp_path / "p")) if r["status"] == "complete"]
    assert not [r for r in complete if r["split"] == "train"]


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_test_rows_that_overflow_are_never_a_complete_cache_and_accuracy_is_freezeouts(
    tmp_path, dtype
):
    """Before: a test cache a quarter full of inf was marked complete, and every later
    evaluation read it (test accuracy below freezeout's, with no word)."""
    data = digits_pixels(overflow_train=False, overflow_test_share=0.25)
    ref = run(tmp_path / "f", "freezeout", data)
    got = run(tmp_path / "p", "prefast", data, cache_dtype=dtype, cache_tier="zarr")
    assert [e["test_acc"] for e in got["epochs"]] == [e["test_acc"] for e in ref["epochs"]]
    assert np.allclose(losses(got), losses(ref), rtol=1e-6)
    root = CacheRoot(tmp_path / "p")
    complete = [r for r in list_caches(root) if r["status"] == "complete"]
    assert all(verify(root, r["key"]) == [] for r in complete)  # no NaN or inf kept
    if dtype == "auto":
        (changed,) = events(got, "dtype_changed")
        assert (changed["split"], changed["to"]) == ("test", "float32")
        assert {r["dtype"] for r in complete if r["split"] == "test"} == {"float32"}
    else:
        (told,) = events(got, "not_cached")
        assert told["split"] == "test" and "cache_dtype='float32'" in told["reason"]
        assert not [r for r in complete if r["split"] == "test"]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_prefix_that_computes_nan_is_named_as_the_cause_not_the_learning_rate(tmp_path, dtype):
    """A frozen prefix whose output is NaN: the loss diverges in freezeout and prefast alike,
    and the one line names the prefix (before: 'lower --lr', though the prefix does not
    train). An 8-bit cache stores a NaN as a finite value: the check counts what was
    computed too, so that cache is never kept either, and the epoch after it, which
    computes the prefix, names the prefix as well."""
    from prefast.errors import TrainingDivergedError

    data = digits_pixels(overflow_train=False, overflow_test_share=0.0)
    poisoned = TensorDataset(data[0].tensors[0].clone(), data[0].tensors[1])
    poisoned.tensors[0][5, 0, 3, 3] = float("nan")
    with pytest.raises(TrainingDivergedError) as err:
        run(tmp_path, "prefast", (poisoned, data[1]), cache_dtype=dtype, cache_tier="zarr")
    complete = [r for r in list_caches(CacheRoot(tmp_path)) if r["status"] == "complete"]
    assert not [r for r in complete if r["split"] == "train"]  # no cache of NaN, 8 bits or not
    msg = str(err.value)
    assert "Likely cause: the frozen prefix, not the learning rate" in msg
    assert "NaN or inf values in stage 1's training output" in msg and "--lr" not in msg


def test_under_autocast_a_16_bit_cache_that_cannot_hold_a_value_is_named_not_the_lr():
    """Under autocast the step takes a float16 cache's own dtype: a bfloat16 value of 1e5
    cannot be put back there (the mend gives inf again). That is counted apart, so a loss
    that diverges names the cache dtype and the fix (bfloat16 or auto)."""
    from prefast.caching.boundary import BoundaryCache, State
    from prefast.caching.fits import Unfit, mend
    from prefast.caching.overflow import input_fault

    out = torch.tensor([[1e5, 2.0, 3.0]], dtype=torch.bfloat16)
    x = out.to(torch.float16)  # what the step takes under autocast: inf, 2, 3
    signs, mended = mend(out, x, "float16")
    assert torch.isinf(mended[0, 0])  # float16 cannot hold it
    assert Unfit.read(signs) == Unfit(1, True, False) and Unfit.read(signs).unmended
    assert mend(out.float(), x.float(), "float16")[1][0, 0] == out[0, 0].float()  # mended
    ones = torch.ones(1, 70_000, dtype=torch.float16)  # finite, though their sum is not in float16
    assert not Unfit.read(mend(ones, ones, "float16")[0])
    nan = torch.tensor([[float("nan"), 1e5]])
    assert Unfit.read(mend(nan, nan.half().float(), "float16")[0]) == Unfit(1, False, False)
    assert not Unfit.read(mend(nan, nan, "float32")[0]).only_overflow  # the prefix's own

    class Feed:  # what input_fault reads of the feed
        target = BoundaryCache("train@1", 1, "ram", 1, None, dtype="float16")
        prefix_fault = None

    Feed.target.state, Feed.target.signs = State.WRITING, signs
    said = input_fault(Feed())  # type: ignore[arg-type]
    assert said is not None and said.startswith("the cache dtype, not the learning rate")
    assert "pass --cache-dtype bfloat16 or auto" in said


def test_a_resumed_run_rebuilds_an_overflowed_boundary_in_the_wider_dtype(tmp_path):
    """The checkpoint keeps the dtype an overflow widened a boundary to: the resumed run
    reads the float32 cache the crashed epoch wrote (before: it planned float16 again,
    overflowed again, and lost an epoch to it)."""
    data = digits_pixels(overflow_train=True, overflow_test_share=0.0)
    ck = str(tmp_path / "ck.pt")

    def crash(record: dict) -> None:
        if record["epoch"] == 1:  # the float32 view is written: the checkpoint holds epoch 0
            raise KeyboardInterrupt

    cfg = TrainConfig(mode="prefast", epochs=3, batch_size=100, lr=0.05, augment="none",
                      device="cpu", freeze_prefix=1, cache_boundaries="every",
                      cache_dir=str(tmp_path / "c"), cache_dtype="auto", cache_tier="zarr",
                      checkpoint=ck)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=lifting_model(), train_data=data[0], test_data=data[1], on_epoch=crash)
    resumed = train(cfg.replace(resume=True), model=lifting_model(), train_data=data[0],
                    test_data=data[1])  # fmt: skip
    assert not events(resumed, "dtype_changed"), resumed["final"]["cache_events"]
    assert [b["dtype"] for b in events(resumed, "boundary")] == ["float32"]
    assert resumed["epochs"][1]["cache_tier"] == "zarr"
    ref = run(tmp_path / "f", "freezeout", data)
    assert np.allclose(losses(resumed), losses(ref), rtol=1e-6)


@pytest.mark.parametrize(
    ("max_ram", "kept"), [("500KB", False), pytest.param("2MB", True, marks=pytest.mark.slow)]
)
def test_a_widened_test_cache_in_ram_stays_within_max_ram(tmp_path, max_ram, kept):
    """A test cache widened to float32 takes twice the bytes its boundary was admitted
    with: in a memory tier (which allocates what it holds) it is widened only where the
    budget has room for the extra bytes, which the ledger then holds; else not cached.
    The float16 caches take 460,032 bytes; float32 test rows 101,632 more."""
    data = digits_pixels(overflow_train=False, overflow_test_share=0.25)
    got = run(tmp_path, "prefast", data, cache_dtype="auto", cache_tier="ram", max_ram=max_ram)
    if kept:
        (changed,) = events(got, "dtype_changed")
        assert changed["split"] == "test"
    else:
        (told,) = events(got, "not_cached")
        assert told["reason"].endswith("not cached: as float32 it would not fit the ram budget")
    assert got["final"]["cache_peak_bytes"] <= TrainConfig(max_ram=max_ram).max_ram
    ref = run(tmp_path / "f", "freezeout", data)
    assert [e["test_acc"] for e in got["epochs"]] == [e["test_acc"] for e in ref["epochs"]]
