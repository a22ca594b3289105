"""The GPU path, on a device that refuses host reads the way CUDA does.

Each test body runs with an accelerator as the training device: the strict test
device here (``tests/strict_device.py``), and real CUDA where there is one
(``pytest -m cuda``; ``benchmarks/gpu_check.sh``). Tests that drive the strict
device's own knobs (free memory, allocator failures) run on it alone.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from helpers import (
    DIGITS,
    assert_every_sample_once_per_epoch,
    corrupt_chunk_read_mid_epoch,
    leftovers,
    rel_diff,
    train_cache_key,
)
from strict_device import HostReadError

from prefast.config import TrainConfig
from prefast.store import CacheRoot, encoding
from prefast.store.device import synchronize
from prefast.training.trainer import Trainer, train

N_DIGITS = 1437
MIB = 2**20
_REFERENCE: dict[str, dict] = {}


def config(device: torch.device, **kw) -> TrainConfig:
    # On CUDA: float32 and deterministic kernels, so FreezeOut and PreFast run the same
    # kernels and sum in the same order (without --deterministic, prefast and freezeout
    # differed by 9-24% in loss after 6 epochs on an H200: benchmarks/results/gpu/).
    gpu = dict(device="cuda", amp=False, deterministic=True) if device.type == "cuda" else {}
    return TrainConfig(**{**DIGITS, "epochs": 6, "cache_boundaries": "every", **gpu, **kw})


_RAM_RUN: dict[tuple[str, str], dict] = {}  # (device type, dtype) -> a RAM-tier run's record


def reference(device: torch.device) -> dict:
    """FreezeOut on the same device (on the strict device: a CPU run's numbers)."""
    if device.type not in _REFERENCE:
        _REFERENCE[device.type] = train(config(device, mode="freezeout"))
    return _REFERENCE[device.type]


def tolerance(device: torch.device) -> float:
    return 1e-6 if device.type != "cuda" else 1e-4  # CUDA's backward sums in any order


def sync_debug_mode(mode: str) -> None:
    """``torch.cuda.set_sync_debug_mode`` without its "prototype feature" UserWarning: the
    suite turns warnings into errors, and that one is raised *after* the mode is set, so
    the mode leaked into every later test (benchmarks/results/gpu/h200-run1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


class StepWatch:
    """Records each step's sample ids and the device reads and synchronizations of the
    training thread made inside steps and between them (while the feed produced the next
    batch). On the strict device both are counted; on CUDA, CUDA's own sync-debug mode
    refuses a synchronizing call inside a step. That mode is the whole process's, not the
    training thread's: a disk writer's copy to the host, on its own thread while a step
    runs, is refused too (benchmarks/results/gpu/h200-run2), so it is used with the
    memory tiers only (``cuda_sync_check``); the strict device checks every tier."""

    def __init__(self, tr: Trainer, memory, cuda_sync_check: bool = True):
        self.ids: dict[int, list[np.ndarray]] = defaultdict(list)
        self.reads_in_steps = 0
        self.reads_between: dict[int, int] = defaultdict(int)
        last: list = [None]
        step, bpe = tr._step, tr.raw.batches_per_epoch

        def reads() -> int:
            if memory is None:
                return 0
            return memory.host_reads["MainThread"] + memory.syncs["MainThread"]

        def watched(batch, it):
            epoch, before = it // bpe, reads()
            if last[0] is not None and last[0][0] == epoch:
                self.reads_between[epoch] += before - last[0][1]
            self.ids[epoch].append(batch.ids.numpy().copy())  # host ids: no device read
            check = batch.x.is_cuda and cuda_sync_check
            try:
                if check:  # on a real GPU, CUDA itself refuses a synchronizing call
                    sync_debug_mode("error")
                loss = step(batch, it)
            finally:
                if check:
                    sync_debug_mode("default")
            self.reads_in_steps += reads() - before
            last[0] = (epoch, reads())
            return loss

        tr._step = watched  # type: ignore[method-assign]


def cached_epochs(run: dict) -> list[int]:
    bpe = run["final"]["batches_per_epoch"]
    return [e["epoch"] for e in run["epochs"] if e["cached_batches"] == bpe]


def events(run: dict, name: str) -> list[dict]:
    return [e for e in run["final"]["cache_events"] if e["event"] == name]


# -- the test device itself ----------------------------------------------------------------
def test_the_strict_device_refuses_what_cuda_refuses(strict):
    strict.capacity = 64 * 2**10
    x = torch.arange(6.0).to(strict.device)
    for read in (x.numpy, x.tolist, x.sum().item, lambda: float(x.sum())):
        with pytest.raises(HostReadError):
            read()
    with pytest.raises(HostReadError, match="__array__"):
        np.zeros(10)[x.long()]  # indexing a numpy array with a device tensor
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(6)  # mixing a device and a host tensor in one op
    assert (x + torch.tensor(1.0)).device == strict.device  # a host scalar passes, as on CUDA
    assert x.cpu().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert strict.host_reads["MainThread"] == 1
    synchronize(strict.device)  # what the library calls to wait for the device: counted
    assert strict.syncs["MainThread"] == 1
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2**20, device=strict.device)  # 4 MiB on a 64 KiB device
    free, total = torch.strict.mem_get_info()  # type: ignore[attr-defined]
    assert total == 64 * 2**10 and free == total - 6 * 4
    with pytest.raises(RuntimeError):
        torch.empty(4, pin_memory=True)  # no pinned memory on this backend


# -- prefast mode end to end -----------------------------------------------------------------
@pytest.mark.parametrize(
    "tier",
    [
        "gpu",
        pytest.param("ram", marks=pytest.mark.slow),
        # make check; make test runs mmap on the strict device in int8
        pytest.param("mmap", marks=pytest.mark.slow),
        pytest.param("zarr", marks=pytest.mark.slow),
    ],
)
def test_prefast_on_an_accelerator_matches_freezeout_and_never_reads_the_device_per_step(
    tier, accelerator, tmp_path
):
    device, memory = accelerator
    tr = Trainer(config(device, mode="prefast", cache_tier=tier, cache_dir=str(tmp_path)))
    watch = StepWatch(tr, memory, cuda_sync_check=tier in ("gpu", "ram"))
    run = tr.run()
    assert rel_diff(run, reference(device)) <= tolerance(device)
    read = cached_epochs(run)
    assert read == [2, 3, 4, 5]  # boundaries complete at the end of epochs 1..4
    assert all(e["cache_tier"] == tier for e in run["epochs"] if e["cached_batches"])
    assert [e["tier"] for e in events(run, "boundary")] == [tier] * 4
    result_steps = {e: batches for e, batches in watch.ids.items()}
    assert_every_sample_once_per_epoch(run, result_steps, N_DIGITS)
    assert watch.reads_in_steps == 0, "a training step read the device back"
    # Reading a cache never reads the device back. Writing a ram cache copies rows to the
    # host: asynchronous on CUDA (store.device.HostCopies), a counted read on this
    # synchronous device; so for ram only the epochs that write nothing are checked.
    writing = {e["epoch"] for e in events(run, "boundary")}
    quiet = [e for e in read if tier != "ram" or e not in writing]
    assert quiet and all(watch.reads_between[e] == 0 for e in quiet), dict(watch.reads_between)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(
    "tier, dtype",
    [
        # make check: 8-bit decoding on the host is make test's (test_cache_dtype.py)
        pytest.param("mmap", "int8", marks=pytest.mark.slow),
        pytest.param("gpu", "int8", marks=pytest.mark.slow),
        pytest.param("gpu", "float8", marks=pytest.mark.slow),
    ],
)
def test_eight_bit_caches_decode_on_the_device_and_match_a_cpu_run(
    tier, dtype, accelerator, tmp_path
):
    """8-bit rows cross (or stay on the GPU) at one byte per value and are decoded on the
    training device, inside the batch path, with no read of the device in a step."""
    device, memory = accelerator
    kw = dict(mode="prefast", cache_dtype=dtype, cache_dir=str(tmp_path / "dev"))
    tr = Trainer(config(device, cache_tier=tier, **kw))
    watch = StepWatch(tr, memory, cuda_sync_check=tier in ("gpu", "ram"))
    run = tr.run()
    # The same dtype read from RAM on the CPU (the strict device's numbers are the CPU's);
    # on CUDA, whose kernels are not the CPU's, from RAM on the same GPU.
    where = device if device.type == "cuda" else torch.device("cpu")
    key = (where.type, dtype)  # one RAM run per device and dtype: gpu-int8 and mmap-int8 share it
    if key not in _RAM_RUN:
        _RAM_RUN[key] = train(
            config(where, **{**kw, "cache_tier": "ram", "cache_dir": str(tmp_path)})
        )
    assert rel_diff(run, _RAM_RUN[key]) <= tolerance(device)
    assert cached_epochs(run) == [2, 3, 4, 5] and run["final"]["cache_dtype"] == dtype
    assert watch.reads_in_steps == 0, "a training step read the device back"
    assert all(watch.reads_between[e] == 0 for e in cached_epochs(run)), dict(watch.reads_between)


@pytest.mark.slow
def test_resume_on_an_accelerator_reads_the_cache_from_its_first_epoch(accelerator, tmp_path):
    device, _ = accelerator
    cfg = config(
        device,
        mode="prefast",
        cache_tier="zarr",
        cache_dir=str(tmp_path),
        checkpoint=str(tmp_path / "ck.pt"),
    )

    def crash(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt  # the checkpoint holds epochs 0..2

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=crash)
    resumed = train(cfg.replace(resume=True))
    first = resumed["epochs"][3]
    assert first["cache_tier"] == "zarr" and first["cached_batches"] == 23
    assert events(resumed, "reused")
    assert rel_diff(resumed, reference(device)) <= tolerance(device)


@pytest.mark.slow
def test_corruption_mid_epoch_on_an_accelerator_serves_the_unseen_samples(
    accelerator, tmp_path, monkeypatch
):
    device, _ = accelerator
    monkeypatch.setattr("prefast.store.base.CHUNK_BYTES", 64 * 1024)  # many chunks
    root = CacheRoot(tmp_path)
    cfg = config(device, mode="prefast", cache_tier="mmap", cache_dir=str(tmp_path))
    hit = {}

    def on_epoch(rec):
        if rec["epoch"] == 3:  # boundary 4 completed now; epoch 4 reads it
            stage = max(e["stage"] for e in root_events(tr))
            hit["chunk"] = corrupt_chunk_read_mid_epoch(
                root, train_cache_key(root, stage), cfg.seed, 4, cfg.batch_size, False
            )

    def root_events(trainer):
        return [e for e in trainer.feed.report()["cache_events"] if e["event"] == "complete"]

    tr = Trainer(cfg, on_epoch=on_epoch)
    watch = StepWatch(tr, None, cuda_sync_check=False)  # mmap: its writer copies to the host
    run = tr.run()
    faulted = run["epochs"][4]
    assert "chunk" in hit and 0 < faulted["cached_batches"] < 23
    assert [e["epoch"] for e in events(run, "corrupted")] == [4]
    assert_every_sample_once_per_epoch(run, dict(watch.ids), N_DIGITS)
    assert rel_diff(run, reference(device)) <= tolerance(device)


@pytest.mark.slow
def test_gpu_memory_pressure_spills_the_cache_to_ram(strict, tmp_path):
    """Real pressure: the device's free memory (what the governor reads) drops mid-run."""

    def squeeze(rec):
        if rec["epoch"] == 2:  # another process takes all but 256 MiB of the device
            strict.occupied = strict.capacity - strict.used - 256 * MIB

    run = train(config(strict.device, mode="prefast", cache_dir=str(tmp_path)), on_epoch=squeeze)
    assert events(run, "boundary")[0]["tier"] == "gpu"
    spilled = events(run, "spilled")
    assert spilled and (spilled[0]["epoch"], spilled[0]["from"], spilled[0]["to"]) == (
        3,
        "gpu",
        "ram",
    )
    assert run["epochs"][3]["cache_tier"] == "ram"
    assert rel_diff(run, reference(strict.device)) <= 1e-6


# -- allocation failures are tier decisions ------------------------------------------------
def refuse_large_host_allocations(monkeypatch, limit: int = 4 * MIB) -> list[int]:
    """Host RAM refuses any tensor over ``limit`` bytes, with PyTorch's own error."""
    real, refused = torch.empty, []

    def empty(*size, **kw):
        t = real(*size, **{**kw, "device": "meta", "pin_memory": False})  # size only
        nbytes = t.numel() * t.element_size()
        if torch.device(kw.get("device") or "cpu").type == "cpu" and nbytes > limit:
            refused.append(nbytes)
            raise RuntimeError(
                f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                f"memory: you tried to allocate {nbytes} bytes. Error code 12"
            )
        return real(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    return refused


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_gpu_view_that_cannot_allocate_goes_to_ram(strict, tmp_path):
    strict.refuse = lambda nbytes: nbytes > 4 * MIB  # the device has no 4 MiB left in one piece
    run = train(config(strict.device, mode="prefast", cache_tier="gpu", cache_dir=str(tmp_path)))
    failed = events(run, "allocation_failed")
    assert failed and failed[0]["tier"] == "gpu" and failed[0]["bytes"] > 4 * MIB
    first = [e for e in run["final"]["cache_events"] if e["epoch"] == failed[0]["epoch"]]
    assert [(e["event"], e.get("tier")) for e in first][:3] == [
        ("boundary", "gpu"),
        ("allocation_failed", "gpu"),
        ("boundary", "ram"),
    ]
    assert run["epochs"][failed[0]["epoch"] + 1]["cache_tier"] == "ram"
    assert rel_diff(run, reference(strict.device)) <= 1e-6


@pytest.mark.slow
def test_a_ram_view_that_cannot_allocate_goes_to_disk(strict, tmp_path, monkeypatch):
    refused = refuse_large_host_allocations(monkeypatch)
    run = train(config(strict.device, mode="prefast", cache_tier="ram", cache_dir=str(tmp_path)))
    failed = events(run, "allocation_failed")
    assert refused and failed and all(e["tier"] == "ram" for e in failed)
    for f in failed:  # planned again at once, below RAM: disk, or recompute where reading
        # the disk would be slower than computing the prefix
        again = [e for e in events(run, "boundary") if e["epoch"] == f["epoch"]]
        assert [e["tier"] for e in again][0] == "ram"
        assert again[-1]["tier"] in ("mmap", "zarr", "recompute")
    on_disk = [e for e in events(run, "complete") if e["tier"] in ("mmap", "zarr")]
    assert on_disk, "no boundary went to disk"
    assert run["epochs"][on_disk[0]["epoch"] + 1]["cache_tier"] == on_disk[0]["tier"]
    assert rel_diff(run, reference(strict.device)) <= 1e-6
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_pinned_staging_that_cannot_allocate_falls_back_to_pageable(strict, tmp_path, monkeypatch):
    # Ask for pinned staging as on CUDA; the strict backend has no pinned memory.
    monkeypatch.setattr("prefast.store.device.pins_host_memory", lambda device: True)
    run = train(config(strict.device, mode="prefast", cache_tier="ram", cache_dir=str(tmp_path)))
    notes = events(run, "staging_unpinned")
    assert notes and "pinned staging unavailable" in notes[0]["detail"]
    assert cached_epochs(run) == [2, 3, 4, 5]
    assert rel_diff(run, reference(strict.device)) <= 1e-6


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_test_cache_that_cannot_allocate_goes_to_the_next_tier(dtype, strict, tmp_path):
    """The strict device refuses exactly the test set's cache (its size in the cache's own
    dtype: the refusal once matched float32 sizes only, and passed because the test forced
    float32): it is written in RAM instead, evaluation unchanged (float32: FreezeOut's
    accuracy; int8: the same dtype's run on the CPU)."""
    cfg = config(strict.device, mode="prefast", cache_tier="gpu", cache_dir=str(tmp_path))
    tr = Trainer(cfg.replace(cache_dtype=dtype))
    test_rows = tr.raw.num_test
    test_views = {test_rows * encoding.row_bytes(c.out_shape, dtype) for c in tr.feed.costs}
    train_views = {tr.raw.num_train * encoding.row_bytes(c.out_shape, dtype) for c in tr.feed.costs}
    assert not test_views & train_views
    strict.refuse = lambda nbytes: nbytes in test_views
    tiers = []
    tr.on_epoch = lambda rec: tiers.append(tr.feed.test.reader and tr.feed.test.reader.tier)
    run = tr.run()
    failed = [e for e in events(run, "allocation_failed") if e.get("split") == "test"]
    assert failed and all(e["tier"] == "gpu" for e in failed)
    assert not events(run, "test_cache_failed")
    assert tiers[-1] == "ram"  # evaluation read the test set's cache from RAM
    if dtype == "float32":
        ref = reference(strict.device)
    else:  # the same numbers as the same dtype in RAM on the CPU
        cpu = config(torch.device("cpu"), mode="prefast", cache_tier="ram", cache_dtype=dtype)
        ref = train(cpu.replace(cache_dir=str(tmp_path / "r")))
    assert [e["test_acc"] for e in run["epochs"]] == [e["test_acc"] for e in ref["epochs"]]


@pytest.mark.slow
def test_a_spill_whose_target_cannot_allocate_goes_one_tier_further(strict, tmp_path, monkeypatch):
    def squeeze(rec):
        if rec["epoch"] == 2:
            strict.occupied = strict.capacity - strict.used - 256 * MIB
            refuse_large_host_allocations(monkeypatch, MIB)  # and host RAM refuses the copy

    run = train(config(strict.device, mode="prefast", cache_dir=str(tmp_path)), on_epoch=squeeze)
    failed, spilled = events(run, "allocation_failed"), events(run, "spilled")
    assert failed and failed[0]["tier"] == "ram" and failed[0]["epoch"] == 3
    assert spilled and spilled[0]["from"] == "gpu" and spilled[0]["to"] in ("mmap", "zarr")
    assert run["epochs"][3]["cache_tier"] in ("mmap", "zarr")
    assert rel_diff(run, reference(strict.device)) <= 1e-6
