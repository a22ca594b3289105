"""Invariants of the prefast mode: exactness, reuse, and training through faults."""

import pytest
from prefast.store.disk_writer import DiskWriter
from prefast.store.layout import CacheRoot
from prefast.store.manage import list_caches

from prefast.config import TrainConfig
from prefast.errors import DiskFullError
from prefast.governor import Governor
from prefast.trainer import train

DIGITS = dict(
    model="densenet-bc",
    dataset="digits",
    depth=16,
    growth_rate=12,
    epochs=10,
    batch_size=64,
    t0=0.5,
    augment="none",
    cache_dtype="float32",
    device="cpu",
)


def rel_diff(a, b):
    return max(
        abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"])
        for x, y in zip(a["epochs"], b["epochs"], strict=True)
    )


@pytest.fixture(scope="module")
def freezeout_ref():
    return train(TrainConfig(mode="freezeout", **DIGITS))


@pytest.mark.parametrize("tier", ["ram", "zarr", "mmap"])
def test_prefast_matches_freezeout(tier, freezeout_ref, tmp_path):
    run = train(TrainConfig(mode="prefast", cache_tier=tier, cache_dir=str(tmp_path), **DIGITS))
    assert rel_diff(run, freezeout_ref) <= 1e-3
    assert any(e["cache_tier"] == tier for e in run["epochs"])
    assert run["final"]["test_acc"] == pytest.approx(freezeout_ref["final"]["test_acc"], abs=0.01)
    if tier != "ram":  # superseded boundaries' caches were deleted: one train, one test left
        last = max(e["stage"] for e in run["final"]["cache_events"] if e["event"] == "boundary")
        left = sorted((c["split"], c["boundary"]) for c in list_caches(CacheRoot(tmp_path)))
        assert left == [("test", last), ("train", last)]


def test_rerun_reuses_complete_cache(tmp_path):
    cfg = TrainConfig(
        mode="prefast", cache_tier="zarr", cache_dir=str(tmp_path), **{**DIGITS, "epochs": 5}
    )
    train(cfg)
    again = train(cfg)
    assert any(e["event"] == "reused" for e in again["final"]["cache_events"])


def test_disk_full_during_materialization_falls_back(tmp_path, monkeypatch):
    def full(self, start, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("prefast.store.disk_writer.ZarrWriter._write_chunk", full)
    ref = train(TrainConfig(mode="freezeout", **{**DIGITS, "epochs": 5}))
    run = train(
        TrainConfig(
            mode="prefast", cache_tier="zarr", cache_dir=str(tmp_path), **{**DIGITS, "epochs": 5}
        )
    )
    assert any(e["event"] == "abandoned" for e in run["final"]["cache_events"])
    assert rel_diff(run, ref) <= 1e-3  # training went on as FreezeOut
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")], "partial cache left"
    assert issubclass(DiskFullError, OSError) and DiskWriter


def test_ram_pressure_spills_to_disk_and_training_goes_on(tmp_path, monkeypatch, freezeout_ref):
    calls = {"n": 0}

    def pressure(self):
        calls["n"] += 1
        return calls["n"] > 6  # pressure arrives mid-run

    monkeypatch.setattr(Governor, "ram_pressure", pressure)
    run = train(TrainConfig(mode="prefast", cache_tier="ram", cache_dir=str(tmp_path), **DIGITS))
    assert any(e["event"] == "spilled" for e in run["final"]["cache_events"])
    assert rel_diff(run, freezeout_ref) <= 1e-3


@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupted_chunk_mid_training_is_recomputed(tmp_path, monkeypatch, freezeout_ref, split):
    """A corrupted chunk in the train or the test cache: never trained/evaluated on, recomputed."""
    from prefast.store.disk_reader import ZarrReader

    from prefast.errors import CacheCorruptedError

    original = ZarrReader.read_chunk
    calls = {"train": 0, "test": 0}

    def flaky(self, i):
        calls[self.spec.attrs["split"]] += 1
        if self.spec.attrs["split"] == split and calls[split] == 2:
            raise CacheCorruptedError(self.key, f"chunk {i} of activations: checksum mismatch")
        return original(self, i)

    monkeypatch.setattr(ZarrReader, "read_chunk", flaky)
    run = train(TrainConfig(mode="prefast", cache_tier="zarr", cache_dir=str(tmp_path), **DIGITS))
    assert calls[split] > 2  # the cache was rebuilt and read again after the fault
    assert any(e["event"] == "corrupted" for e in run["final"]["cache_events"])
    assert rel_diff(run, freezeout_ref) <= 1e-3
    accs = [e["test_acc"] for e in run["epochs"]]
    assert accs == pytest.approx([e["test_acc"] for e in freezeout_ref["epochs"]], abs=1e-9)


@pytest.mark.parametrize("tier", ["ram", "zarr"])
def test_resume_after_a_crash_goes_on_from_the_cache(tmp_path, freezeout_ref, tier):
    """A run killed after its first boundary resumes from the cache, not from the prefix."""
    cfg = TrainConfig(
        mode="prefast",
        cache_tier=tier,
        cache_dir=str(tmp_path),
        checkpoint=str(tmp_path / "ck.pt"),
        **DIGITS,
    )
    crash_at = 7

    def crash(record):
        if record["epoch"] == crash_at:
            raise KeyboardInterrupt  # like Ctrl-C: the checkpoint holds epochs 0..crash_at-1

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=crash)
    resumed = train(cfg.replace(resume=True))
    assert resumed["epochs"][crash_at]["cache_tier"] == tier  # read from a cache at once
    events = {e["event"] for e in resumed["final"]["cache_events"]}
    assert ("reused" in events) == (tier == "zarr")  # a complete disk cache is reused by key
    assert rel_diff(resumed, freezeout_ref) <= 1e-3


def test_ram_budget_sends_cache_to_disk_by_itself(tmp_path, freezeout_ref):
    """Same logic as the full-size run: a cache larger than --max-ram goes to disk."""
    from prefast.store import CacheRoot
    from prefast.store.manage import list_caches

    run = train(TrainConfig(mode="prefast", max_ram=4096, cache_dir=str(tmp_path), **DIGITS))
    tiers = {e["tier"] for e in run["final"]["cache_events"] if e["event"] == "boundary"}
    assert tiers and tiers <= {"zarr", "mmap"}, tiers
    listed = list_caches(CacheRoot(tmp_path))
    assert any(r["status"] == "complete" and r["split"] == "train" for r in listed)
    assert rel_diff(run, freezeout_ref) <= 1e-3


def test_governor_order_of_preference(tmp_path):
    import torch

    cfg = TrainConfig(cache_dir=str(tmp_path), max_ram=100 * 2**20, max_disk=10 * 2**30)
    g = Governor(cfg, torch.device("cpu"))
    assert g.choose(50 * 2**20, prefix_epoch_s=10).tier == "ram"
    assert g.choose(500 * 2**20, prefix_epoch_s=10, compress_ratio=1.7).tier == "zarr"
    assert g.choose(500 * 2**20, prefix_epoch_s=10, compress_ratio=1.0).tier == "mmap"
    slow = g.choose(500 * 2**20, prefix_epoch_s=0.01)
    assert slow.tier == "recompute" and "slower than computing" in slow.reason
    assert g.choose(20 * 2**30, prefix_epoch_s=100).tier == "recompute"
