"""The governor: order of preference, the ledger, one view per epoch, spill targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefast.governor import Budgets, Governor

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
    assert g.spill_target(30 * MIB, "ram", 1.0) is None
    assert g.spill_target(15 * MIB, "ram", 1.0) == "mmap"
    assert g.spill_target(30 * MIB, "ram", 2.0) == "zarr"  # 15 MiB compressed fits


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pressure_is_checked(tmp_path):
    g = Governor(Budgets(cache_dir=tmp_path), torch.device("cuda"))
    free_before = g.gpu_free()
    assert g.pressure_on("gpu") == (free_before < max(2**29, 0.05 * torch.cuda.mem_get_info()[1]))
