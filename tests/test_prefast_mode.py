"""Invariants of the prefast mode: exactness, reuse and resume, the governor's choices."""

import dataclasses

import psutil
import pytest
import torch
from helpers import DIGITS, leftovers, rel_diff, train_cache_key

from prefast.config import TrainConfig
from prefast.store.layout import CacheRoot, disk_usage
from prefast.store.manage import list_caches
from prefast.store.readers import open_reader
from prefast.training.trainer import Trainer, train


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


# mmap in make check: make test runs it end to end, in int8, on the strict device
# (test_device.py)
@pytest.mark.parametrize("tier", ["ram", "zarr", pytest.param("mmap", marks=pytest.mark.slow)])
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


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
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


# make check (both tiers); make test resumes in test_trainer.py::test_json_record_shape_and_resume
@pytest.mark.parametrize("tier", ["ram", "zarr"])
@pytest.mark.slow  # make check (make test's bound: docs/development.md)
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
    run = train(cfg_for(tmp_path, model=model, cache_dtype="float16", max_ram=4096, epochs=3))
    boundaries = [e for e in run["final"]["cache_events"] if e["event"] == "boundary"]
    assert boundaries and all(e["tier"] == tier for e in boundaries), boundaries
    pays = [e["compress_ratio"] >= 1.1 for e in boundaries]
    assert all(pays) if tier == "zarr" else not any(pays)
    assert all(f"zstd ratio {e['compress_ratio']:.2f}" in e["reason"] for e in boundaries)
    key = train_cache_key(CacheRoot(tmp_path), boundaries[-1]["stage"])
    assert CacheRoot(tmp_path).marker(key)["tier"] == tier


class HostMemory:
    """The host-memory probe the governor reads (``psutil.virtual_memory``): the machine's
    own reading with ``available`` set: half the RAM, or 256 MiB once ``short`` is set.
    The governor's own logic (``pressure_on``, ``host_available``) decides what that
    means. (256 MiB still leaves a 32 MiB shuffle buffer: every cache here fits it, so
    disk tiers read in the exact order.)"""

    def __init__(self, monkeypatch, short: bool = False):
        self.real, self.short = psutil.virtual_memory, short
        monkeypatch.setattr("prefast.caching.budgets.psutil.virtual_memory", self)

    def __call__(self):
        vm = self.real()  # the real total
        return vm._replace(available=256 * 2**20 if self.short else vm.total // 2)

    def short_after(self, epoch: int):
        """An ``on_epoch`` callback: memory runs short once ``epoch`` has ended."""

        def on_epoch(record: dict) -> None:
            self.short = self.short or record["epoch"] >= epoch

        return on_epoch


def spills(run: dict, event: str = "spilled") -> list[dict]:
    return [e for e in run["final"]["cache_events"] if e["event"] == event]


def test_ram_pressure_spills_to_disk_and_training_goes_on(tmp_path, monkeypatch, freezeout_ref):
    memory = HostMemory(monkeypatch)
    run = train(cfg_for(tmp_path, cache_tier="ram"), on_epoch=memory.short_after(4))
    spilled = spills(run)
    assert spilled and spilled[0]["epoch"] == 5, run["final"]["cache_events"]  # mid-run
    assert all(e["from"] == "ram" and e["to"] in ("zarr", "mmap") for e in spilled)
    assert [e["cache_tier"] for e in run["epochs"][3:5]] == ["ram", "ram"]  # before: RAM
    assert {e["cache_tier"] for e in run["epochs"][5:]} <= {"zarr", "mmap"}
    assert rel_diff(run, freezeout_ref) <= 1e-6


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_resumed_ram_boundary_spilled_before_its_view_is_written_goes_where_the_ledger_says(
    tmp_path, monkeypatch, freezeout_ref
):
    """Resumed after a crash, a RAM boundary comes back with no view (RAM died with the
    process) and memory is short: the spill moves the boundary itself, so its view is
    written and read in the tier the ledger holds it in. (Before, a spill of a boundary
    without views moved only the ledger entry: the view was then written to RAM while the
    ledger said disk, and later boundaries were admitted past the RAM budget.)"""
    cfg = cfg_for(tmp_path, cache_tier="ram", checkpoint=str(tmp_path / "ck.pt"))

    def crash(record):
        if record["epoch"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=crash)
    HostMemory(monkeypatch, short=True)
    resumed = train(cfg.replace(resume=True))
    # one spill of stage 7, at the first resumed epoch (before: a second one at epoch 8,
    # the first having moved the ledger only)
    stage7 = [e for e in spills(resumed) if e["stage"] == 7]
    assert len(stage7) == 1, resumed["final"]["cache_events"]
    spilled = stage7[0]
    assert (spilled["epoch"], spilled["from"]) == (7, "ram"), resumed["final"]["cache_events"]
    epoch8 = resumed["epochs"][8]
    assert (epoch8["cache_stage"], epoch8["cache_tier"]) == (7, spilled["to"]), epoch8
    assert rel_diff(resumed, freezeout_ref) <= 1e-6


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_forced_ram_tier_over_max_ram_is_recomputed_and_says_why(tmp_path, freezeout_ref):
    """--cache-tier ram with --max-ram 512 KiB (the boundaries hold 0.7 to 16 MiB): the
    forced tier obeys the budget, so nothing is cached and the run is FreezeOut's. (Before,
    a forced tier skipped every budget check and the cache went over --max-ram.)"""
    run = train(cfg_for(tmp_path, cache_tier="ram", max_ram=2**19))
    boundaries = [e for e in run["final"]["cache_events"] if e["event"] == "boundary"]
    assert boundaries and all(e["tier"] == "recompute" for e in boundaries), boundaries
    assert all("forced cache_tier='ram' (--cache-tier ram)" in e["reason"] for e in boundaries)
    assert not any(e["cached_batches"] for e in run["epochs"])
    assert rel_diff(run, freezeout_ref) <= 1e-6


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_spill_respects_max_disk_and_keeps_the_ram_cache(tmp_path, monkeypatch, freezeout_ref):
    HostMemory(monkeypatch, short=True)
    run = train(cfg_for(tmp_path, cache_tier="ram", max_disk=4096))
    failed = spills(run, "spill_failed")
    assert failed and not spills(run)
    assert all(e["detail"] == "no room in any lower tier" for e in failed)
    assert [e["epoch"] for e in failed] == [3, 4, 5, 6, 7, 8, 9]  # every epoch read from RAM
    assert {e["cache_tier"] for e in run["epochs"] if e["cached_batches"]} == {"ram"}
    assert list_caches(CacheRoot(tmp_path)) == []
    assert rel_diff(run, freezeout_ref) <= 1e-6


def test_spill_that_fails_on_a_real_full_disk_keeps_the_ram_cache(
    tiny_disk, monkeypatch, freezeout_ref
):
    HostMemory(monkeypatch, short=True)
    # the budget says 1 GB, the tmpfs holds 8 MiB: the spill itself hits ENOSPC
    run = train(cfg_for(tiny_disk / "c", cache_tier="ram", max_disk=2**30))
    failed = spills(run, "spill_failed")
    assert failed and "disk full" in failed[0]["detail"]
    assert run["epochs"][failed[0]["epoch"]]["cache_tier"] == "ram"  # read where it was
    assert rel_diff(run, freezeout_ref) <= 1e-6
    assert not leftovers(tiny_disk / "c")  # (later, smaller boundaries may fit and spill)


def lying_costs(cfg: TrainConfig) -> list:
    """The probe's stage costs for ``cfg`` with every zstd ratio claimed 8x: each disk
    cache is then admitted at an eighth of what it will really take on disk."""
    probe = Trainer(cfg)
    probe.feed.close()
    return [
        dataclasses.replace(
            c, compress_ratio=8.0, trials=tuple((d, e, 8.0) for d, e, _ in c.trials)
        )
        for c in probe.feed.costs
    ]


def disk_watch(root: CacheRoot, seen: list[int]):
    """An ``on_epoch`` callback recording what the caches under ``root`` take on disk."""

    def on_epoch(record: dict) -> None:
        seen.append(sum(disk_usage(root.dir_for(k)) for k in root.cache_keys()))

    return on_epoch


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_test_cache_that_compresses_worse_than_estimated_stops_at_its_allowance(tmp_path):
    """--max-disk 2.5 MiB, compression overestimated 8x: stage 4's training view (2.2 MiB on
    disk) fits what the budget leaves it; its test cache (0.6 MiB) would not. The test
    cache's writer stops at its allowance (``test_cache_failed``) and the caches never take
    more than --max-disk. (Before, only the boundary writer had an allowance: the test
    cache was written uncapped and the caches took 2.8 MiB.)"""
    cfg = cfg_for(tmp_path, cache_tier="zarr", max_disk=int(2.5 * 2**20))
    seen: list[int] = []
    run = Trainer(cfg, costs=lying_costs(cfg), on_epoch=disk_watch(CacheRoot(tmp_path), seen))
    result = run.run()
    assert max(seen) <= cfg.max_disk, [round(b / 2**20, 2) for b in seen]
    failed = [e for e in result["final"]["cache_events"] if e["event"] == "test_cache_failed"]
    assert failed and "disk budget" in failed[0]["detail"], result["final"]["cache_events"]
    assert not leftovers(tmp_path)


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_spill_that_compresses_worse_than_estimated_stops_at_its_allowance(tmp_path, monkeypatch):
    """RAM runs short after epoch 3 with --max-disk 1 MiB and compression overestimated
    8x: stage 4's 2.8 MiB RAM cache looks like 0.35 MiB in zarr, so a spill is tried, but
    the copy stops at the disk allowance (``spill_failed``); the cache stays in RAM and the
    caches never take more than --max-disk. (Before, spill copies were written uncapped.)"""
    cfg = cfg_for(tmp_path, cache_tier="ram", max_disk=2**20)
    costs = lying_costs(cfg)
    memory = HostMemory(monkeypatch)
    seen: list[int] = []
    watch = disk_watch(CacheRoot(tmp_path), seen)

    def on_epoch(record: dict) -> None:
        memory.short_after(3)(record)
        watch(record)

    result = Trainer(cfg, costs=costs, on_epoch=on_epoch).run()
    assert max(seen) <= cfg.max_disk, [round(b / 2**20, 2) for b in seen]
    failed = spills(result, "spill_failed")
    assert failed and "disk budget" in failed[0]["detail"], result["final"]["cache_events"]
    assert result["epochs"][failed[0]["epoch"]]["cache_tier"] == "ram"
    assert not leftovers(tmp_path)


def test_max_disk_charges_what_a_compressible_boundary_takes_on_disk(tmp_path, capsys):
    """A 7.4 MB boundary that zstd shrinks to 4.3 MB, under --max-disk 6 MB: admitted at its
    compressed size, charged what the writer put on disk (measured), so the later, smaller
    boundaries fit beside it. Charging the raw size (as before) refused every later one."""
    from torch import nn

    def block(cin, cout, pool=False):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            *([nn.MaxPool2d(2)] if pool else []),
        )  # fmt: skip

    torch.manual_seed(0)
    model = nn.Sequential(  # post-ReLU maps: compressible
        block(1, 32), block(32, 32), block(32, 32, pool=True), block(32, 32),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
    )  # fmt: skip
    cfg = TrainConfig(
        mode="prefast", dataset="digits", epochs=8, t0=0.3, augment="none", device="cpu",
        cache_dir=str(tmp_path), cache_tier="zarr", cache_boundaries="every",
        max_disk=6_000_000,
    )  # fmt: skip
    run = train(cfg, model=model)
    events = run["final"]["cache_events"]
    boundaries = [(e["stage"], e["tier"]) for e in events if e["event"] == "boundary"]
    assert boundaries == [(2, "zarr"), (3, "zarr"), (4, "zarr")], events
    first = next(e for e in events if e["event"] == "boundary")
    assert first["compress_ratio"] > 1.5
    charged = [e for e in events if e["event"] == "charged"]
    assert [e["stage"] for e in charged] == [2, 3, 4]
    assert all(e["bytes"] == e["on_disk"] for e in charged), charged
    root = CacheRoot(tmp_path)
    on_disk = sum(disk_usage(root.dir_for(k)) for k in root.cache_keys())  # stage 4's only
    with capsys.disabled():
        print(f"\nledger {charged[-1]['bytes']} B, on disk {on_disk} B")
    assert charged[-1]["bytes"] == on_disk
    assert run["epochs"][-1]["cache_stage"] == 4


@pytest.mark.slow
def test_a_smaller_max_ram_rewrites_caches_whose_chunks_outgrow_its_shuffle_buffer(tmp_path):
    """A cache written under a large RAM budget has one 4.4 MB chunk; a rerun with --max-ram
    4 MiB has a 1 MiB shuffle buffer: reading it would hold two such chunks. It is rewritten
    in 1 MiB chunks instead (event rechunked), and read from the next epoch."""
    # One boundary, at epoch 1, in one chunk (a 32 MiB chunk target).
    cfg = cfg_for(tmp_path, cache_tier="zarr", cache_dtype="float32", epochs=3, t0=0.2)
    first = train(cfg)
    assert len([e for e in first["final"]["cache_events"] if e["event"] == "boundary"]) == 1
    root = CacheRoot(tmp_path)
    big = {c["key"] for c in list_caches(root)}  # the boundary's training and test caches
    again = train(cfg.replace(max_ram=4 * 2**20))
    events = again["final"]["cache_events"]
    rechunked = [e for e in events if e["event"] == "rechunked"]
    assert {e["key"] for e in rechunked} == big, events
    for key in {e["key"] for e in rechunked} & set(root.cache_keys()):  # rewritten, kept
        reader = open_reader(root, key)
        assert reader.chunk_rows * reader.spec.row_bytes <= 2**20, reader.chunk_rows
        reader.close()
    assert again["epochs"][-1]["cached_batches"] == again["final"]["batches_per_epoch"]
