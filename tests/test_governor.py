"""The governor: order of preference, the ledger, one view per epoch, spill targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefast.caching.budgets import Budgets
from prefast.caching.governor import Governor

MIB = 2**20


def gov(tmp_path: Path, **kw) -> Governor:
    return Governor(Budgets(cache_dir=tmp_path, **kw), torch.device("cpu"))


def test_order_of_preference(tmp_path):
    g = gov(tmp_path, max_ram=100 * MIB, max_disk=10 * 2**30)
    assert g.choose(40 * MIB, 1, 10 * MIB, 10, 1.0).tier == "ram"
    assert g.choose(400 * MIB, 1, 100 * MIB, 10, 1.7).tier == "zarr"
    assert g.choose(400 * MIB, 1, 100 * MIB, 10, 1.05).tier == "mmap"
    slow = g.choose(400 * MIB, 1, 100 * MIB, 0.01, 1.0)
    assert slow.tier == "recompute" and "slower than computing" in slow.reason
    assert g.choose(20 * 2**30, 1, 0, 100, 1.0).tier == "recompute"


def test_the_ledger_counts_every_live_cache(tmp_path):
    """Two caches that each fit the RAM budget, but not together."""
    g = gov(tmp_path, max_ram=100 * MIB, max_disk=10 * 2**30)
    first = g.choose(50 * MIB, 1, 10 * MIB, 10, 1.0)
    assert first.tier == "ram"
    g.hold("train@2", first.tier, first.bytes)
    second = g.choose(50 * MIB, 1, 10 * MIB, 10, 1.0)
    assert second.tier == "mmap" and "40 MiB left" in second.reason
    g.release("train@2")
    assert g.choose(50 * MIB, 1, 10 * MIB, 10, 1.0).tier == "ram"


def test_disk_ledger_respects_max_disk(tmp_path):
    g = gov(tmp_path, max_ram=1, max_disk=100 * MIB)
    g.hold("train@2", "zarr", 80 * MIB)
    assert g.choose(30 * MIB, 1, 0, 10, 1.0).tier == "recompute"
    assert g.lower_tiers(30 * MIB, "ram", 1.0) == []
    assert g.lower_tiers(15 * MIB, "ram", 1.0) == ["mmap"]
    assert g.lower_tiers(30 * MIB, "ram", 2.0) == ["zarr"]  # 15 MiB compressed fits


def test_read_vs_compute_charges_one_view_per_epoch(tmp_path):
    """Four views on disk: an epoch reads one of them plus the test set, not all four."""
    g = gov(tmp_path, max_ram=1, max_disk=10 * 2**30)
    view, test = 1000 * MIB, 200 * MIB  # mmap reads 1.5 GB/s: one epoch ~0.84 s
    d = g.choose(view, 4, test, prefix_epoch_s=1.5, compress_ratio=1.0)
    assert d.tier == "mmap" and d.bytes == 4 * view + test
    assert g.choose(view, 4, test, prefix_epoch_s=0.5, compress_ratio=1.0).tier == "recompute"


def test_forced_tier_and_budgets_report(tmp_path):
    g = gov(tmp_path, tier="mmap", max_ram=5 * MIB, max_disk=7 * MIB)
    assert g.choose(1, 1, 0, 1, 1.0).tier == "mmap"
    assert g.report() == {"ram": 5 * MIB, "gpu": 0, "disk": 7 * MIB}
    with pytest.raises(ValueError, match="tier 'tape'"):
        Budgets(cache_dir=tmp_path, tier="tape")


def test_a_forced_tier_obeys_its_budget_and_says_so(tmp_path):
    """--cache-tier zarr with --max-disk: over budget -> recompute, naming the flag."""
    g = gov(tmp_path, tier="zarr", max_disk=10 * MIB)
    fits = g.choose(15 * MIB, 1, 0, 10, compress_ratio=2.0)  # 7.5 MiB compressed
    assert (fits.tier, fits.bytes) == ("zarr", int(15 * MIB / 2.0))
    over = g.choose(15 * MIB, 1, 0, 10, compress_ratio=1.0)  # zstd does not pay: 15 MiB
    assert (
        over.tier == "recompute" and "forced cache_tier='zarr' (--cache-tier zarr)" in over.reason
    ), over
    assert "15 MiB exceeds what is left of its budget (10 MiB)" in over.reason


def test_gpu_pressure_follows_the_devices_free_memory(strict, tmp_path):
    """Read from the device (torch.<backend>.mem_get_info), not from the ledger."""
    g = Governor(Budgets(cache_dir=tmp_path), strict.device)
    assert g.gpu_free() == strict.capacity and not g.pressure_on("gpu")
    assert g.room("gpu") == int(strict.capacity * 0.8) - 2**30
    strict.occupied = strict.capacity - 100 * MIB  # another process took the rest
    assert g.gpu_free() == 100 * MIB and g.pressure_on("gpu")
    assert g.room("gpu") == 0


def test_an_allocation_failure_sends_that_size_to_the_next_tier(tmp_path, strict):
    g = gov(tmp_path, max_ram=100 * MIB, max_disk=10 * 2**30)
    assert g.choose(40 * MIB, 1, 0, 10, 1.0).tier == "ram"
    g.allocation_failed("ram", 40 * MIB)  # the budget said yes, the allocator said no
    assert g.choose(40 * MIB, 1, 0, 10, 1.0).tier == "mmap"
    assert g.choose(20 * MIB, 1, 0, 10, 1.0).tier == "ram"  # smaller caches still fit
    assert g.ram_budget() == 100 * MIB  # the shuffle buffer's budget is not shrunk
    g.hold("train@3", "ram", 20 * MIB)
    g.release("train@3")  # memory came back to RAM: it may hold 40 MiB after all
    assert g.choose(40 * MIB, 1, 0, 10, 1.0).tier == "ram"
    g.allocation_failed("ram", 40 * MIB)
    with_forced = gov(tmp_path, tier="ram", max_ram=100 * MIB, max_disk=10 * 2**30)
    with_forced.allocation_failed("ram", 40 * MIB)  # a forced tier's refusal counts too
    assert with_forced.choose(40 * MIB, 1, 0, 10, 1.0).tier == "mmap"
    forced = Governor(Budgets(tmp_path, tier="gpu", max_disk=10 * 2**30), strict.device)
    assert forced.choose(40 * MIB, 1, 0, 10, 1.0).tier == "gpu"
    assert forced.choose(40 * MIB, 1, 0, 10, 1.0, below="gpu").tier in ("ram", "mmap")
