"""Invariants of the prefast mode: exactness, reuse and resume, the governor's choices."""

import pytest
from helpers import DIGITS, leftovers, rel_diff, train_cache_key
from prefast.store.layout import CacheRoot
from prefast.store.manage import list_caches

from prefast.config import TrainConfig
from prefast.governor import Governor
from prefast.trainer import train


@pytest.fixture(scope="module")
def freezeout_ref():
    return train(TrainConfig(mode="freezeout", **DIGITS))


def cfg_for(tmp_path, **kw):
    return TrainConfig(
        mode="prefast", cache_dir=str(tmp_path), **{**DIGITS, "cache_boundaries": "every", **kw}
    )


def read_epochs(run: dict) -> list[int]:
    bpe = run["final"]["batches_per_epoch"]
    return [e["epoch"] for e in run["epochs"] if e["cached_batches"] == bpe]


@pytest.mark.parametrize("tier", ["ram", "zarr", "mmap"])
def test_prefast_matches_freezeout_and_reads_its_cache(tier, freezeout_ref, tmp_path):
    run = train(cfg_for(tmp_path, cache_tier=tier))
    assert rel_diff(run, freezeout_ref) <= 1e-6
    assert [e["test_acc"] for e in run["epochs"]] == [
        e["test_acc"] for e in freezeout_ref["epochs"]
    ]
    # boundaries complete at the end of epochs 2..6 and 8: epochs 3..9 train from a cache
    assert read_epochs(run) == [3, 4, 5, 6, 7, 8, 9]
    assert all(e["cache_tier"] == (tier if e["cached_batches"] else None) for e in run["epochs"])
    if tier != "ram":  # superseded boundaries' caches were deleted: one train, one test left
        last = max(e["stage"] for e in run["final"]["cache_events"] if e["event"] == "complete")
        left = sorted((c["split"], c["boundary"]) for c in list_caches(CacheRoot(tmp_path)))
        assert left == [("test", last), ("train", last)]
    assert not leftovers(tmp_path)


def test_rerun_reads_the_reused_cache_in_its_first_epoch(tmp_path, freezeout_ref):
    cfg = cfg_for(tmp_path, cache_tier="zarr")
    first = train(cfg)
    root = CacheRoot(tmp_path)
    test_key = next(c["key"] for c in list_caches(root) if c["split"] == "test")
    marker = root.marker(test_key)
    again = train(cfg)
    events = again["final"]["cache_events"]
    reused_epochs = sorted({e["epoch"] for e in events if e["event"] == "reused"})
    assert reused_epochs == [8]  # the last boundary's cache survived the first run
    # ... and epoch 8 trains from it at once; the first run read stage 7 and wrote stage 8
    assert (first["epochs"][8]["cache_stage"], again["epochs"][8]["cache_stage"]) == (7, 8)
    assert first["epochs"][8]["write_s"] > 0 and again["epochs"][8]["write_s"] == 0
    assert 8 in read_epochs(again)
    assert root.marker(test_key) == marker, "the test cache was rewritten instead of reused"
    assert rel_diff(again, freezeout_ref) <= 1e-6


@pytest.mark.parametrize("tier", ["ram", "zarr"])
def test_resume_after_a_crash_reads_a_cache_from_the_next_epoch(tmp_path, freezeout_ref, tier):
    """A run killed after a boundary resumes from the cache, not from the prefix."""
    cfg = cfg_for(tmp_path, cache_tier=tier, checkpoint=str(tmp_path / "ck.pt"))
    crash_at = 7

    def crash(record):
        if record["epoch"] == crash_at:
            raise KeyboardInterrupt  # like Ctrl-C: the checkpoint holds epochs 0..crash_at-1

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=crash)
    resumed = train(cfg.replace(resume=True))
    bpe = resumed["final"]["batches_per_epoch"]
    first = resumed["epochs"][crash_at]
    if tier == "zarr":  # a complete disk cache with the same key is read at once
        assert first["cache_tier"] == "zarr" and first["cached_batches"] == bpe
        assert any(e["event"] == "reused" for e in resumed["final"]["cache_events"])
    else:  # RAM died with the process: materialized at once, read from the next epoch
        assert first["cache_tier"] is None and first["write_s"] > 0
        assert resumed["epochs"][crash_at + 1]["cached_batches"] == bpe
    assert rel_diff(resumed, freezeout_ref) <= 1e-6


@pytest.mark.parametrize(
    "model,tier",
    [
        pytest.param("vgg16", "zarr", marks=pytest.mark.slow),
        ("densenet-bc", "mmap"),
    ],  # post-ReLU maps compress; DenseNet's concat does not
)
def test_auto_tier_measures_compression_before_choosing_a_disk_tier(tmp_path, model, tier):
    run = train(cfg_for(tmp_path, model=model, cache_dtype="float16", max_ram=4096, epochs=5))
    boundaries = [e for e in run["final"]["cache_events"] if e["event"] == "boundary"]
    assert boundaries and all(e["tier"] == tier for e in boundaries), boundaries
    pays = [e["compress_ratio"] >= 1.1 for e in boundaries]
    assert all(pays) if tier == "zarr" else not any(pays)
    assert all(f"zstd ratio {e['compress_ratio']:.2f}" in e["reason"] for e in boundaries)
    key = train_cache_key(CacheRoot(tmp_path), boundaries[-1]["stage"])
    assert CacheRoot(tmp_path).marker(key)["tier"] == tier


def test_ram_pressure_spills_to_disk_and_training_goes_on(tmp_path, monkeypatch, freezeout_ref):
    calls = {"n": 0}

    def pressure(self, tier):
        calls["n"] += 1
        return tier == "ram" and calls["n"] > 3  # pressure arrives mid-run

    monkeypatch.setattr(Governor, "pressure_on", pressure)
    run = train(cfg_for(tmp_path, cache_tier="ram"))
    spilled = [e for e in run["final"]["cache_events"] if e["event"] == "spilled"]
    assert spilled and spilled[0]["to"] in ("zarr", "mmap")
    assert {e["cache_tier"] for e in run["epochs"][spilled[0]["epoch"] :]} <= {"zarr", "mmap"}
    assert rel_diff(run, freezeout_ref) <= 1e-6


def test_spill_respects_max_disk_and_keeps_the_ram_cache(tmp_path, monkeypatch, freezeout_ref):
    monkeypatch.setattr(Governor, "pressure_on", lambda self, tier: tier == "ram")
    run = train(cfg_for(tmp_path, cache_tier="ram", max_disk=4096))
    events = [e["event"] for e in run["final"]["cache_events"]]
    assert "spill_failed" in events and "spilled" not in events
    assert {e["cache_tier"] for e in run["epochs"] if e["cached_batches"]} == {"ram"}
    assert list_caches(CacheRoot(tmp_path)) == []
    assert rel_diff(run, freezeout_ref) <= 1e-6


def test_spill_that_fails_on_a_real_full_disk_keeps_the_ram_cache(
    tiny_disk, monkeypatch, freezeout_ref
):
    monkeypatch.setattr(Governor, "pressure_on", lambda self, tier: tier == "ram")
    # the budget says 1 GB, the tmpfs holds 8 MiB: the spill itself hits ENOSPC
    run = train(cfg_for(tiny_disk / "c", cache_tier="ram", max_disk=2**30))
    failed = [e for e in run["final"]["cache_events"] if e["event"] == "spill_failed"]
    assert failed and "disk full" in failed[0]["detail"]
    assert run["epochs"][failed[0]["epoch"]]["cache_tier"] == "ram"  # read where it was
    assert rel_diff(run, freezeout_ref) <= 1e-6
    assert not leftovers(tiny_disk / "c")  # (later, smaller boundaries may fit and spill)
