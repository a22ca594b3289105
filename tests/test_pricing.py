"""Each boundary priced at the tier it would land in (prefast/caching/pricing.py), with
GPU-shaped numbers: the planner and the governor, no GPU needed.

The setting is the full-size GPU run's shape (50,000 training and 10,000 test rows, batch
64, a 10-stage network whose stages take 0.3 ms each on a GPU, bfloat16 boundary rows of
64 KiB): a disk at 300 MB/s write and 1 GB/s read cannot pay for any boundary (reading
an epoch takes longer than computing the prefix), pinned host memory at 20 GB/s and the
device's own memory at 1 TB/s can.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefast.caching.bandwidth import DEFAULTS, KEYS, Bandwidths
from prefast.caching.budgets import Budgets
from prefast.caching.costmodel import Boundary, StageCost, plan_boundaries, predict_epochs
from prefast.caching.governor import Governor
from prefast.caching.pricing import Pricer, candidate_rows
from prefast.freezing.schedule import FreezeOutSchedule

GIB = 2**30
ROWS, TEST_ROWS, BATCH, EPOCHS, STAGES = 50_000, 10_000, 64, 10, 10
BPE = -(-ROWS // BATCH)  # 782
EVAL = -(-TEST_ROWS // BATCH)
SHAPE = (128, 16, 16)  # bfloat16: 64 KiB a row, 3.3 GB a view of the training set
COSTS = [
    StageCost(fwd_s=0.3e-3, fwd_bwd_s=0.9e-3, out_row_bytes=4 * 128 * 16 * 16, out_shape=SHAPE)
    for _ in range(STAGES)
]
GPU_MACHINE = Bandwidths(
    write={"gpu": 1e12, "ram": 20e9, "mmap": 300e6, "zarr": 300e6, "zarr+zstd": 300e6},
    read={"gpu": 1e12, "ram": 20e9, "mmap": 1e9, "zarr": 1e9, "zarr+zstd": 1e9},
    source="an H200-shaped machine (the issue's figures)",
)
AT_DISK_SPEED = Bandwidths(dict.fromkeys(KEYS, 300e6), dict.fromkeys(KEYS, 1e9))


def schedule() -> FreezeOutSchedule:
    return FreezeOutSchedule(
        STAGES, BPE * EPOCHS, t0=0.5, scale="cubic", scale_lr=True, base_lr=0.1
    )


def plan(tmp_path: Path, bandwidths: Bandwidths, **budgets) -> tuple[list[Boundary], list]:
    governor = Governor(Budgets(cache_dir=tmp_path, **budgets), torch.device("meta"))
    governor.bandwidths = bandwidths
    pricer = Pricer(governor, COSTS, "bfloat16", (ROWS, TEST_ROWS), 1, BPE + EVAL)
    considered: list[Boundary] = []
    chosen = plan_boundaries(
        schedule(), BPE, EPOCHS, COSTS, ROWS, price=pricer, considered=considered
    )
    return chosen, considered


def predicted(mode: str, boundaries: list[Boundary]) -> float:
    epochs = predict_epochs(mode, schedule(), BPE, EPOCHS, COSTS, boundaries, EVAL)
    io = sum(b.cost_s for b in boundaries) if mode == "prefast" else 0.0
    return sum(e["train_s"] + e["eval_s"] for e in epochs) + io


ROOMY_GPU = dict(max_gpu_mem=64 * GIB, max_ram=64 * GIB, max_disk=1000 * GIB)
RAM_ONLY = dict(max_gpu_mem=1 * GIB, max_ram=64 * GIB, max_disk=1000 * GIB)
DISK_ONLY = dict(max_gpu_mem=1 * GIB, max_ram=1 * GIB, max_disk=1000 * GIB)


@pytest.mark.parametrize(
    "budgets, tier", [(ROOMY_GPU, "gpu"), (RAM_ONLY, "ram")], ids=["gpu-fits", "ram-only"]
)
def test_a_boundary_that_does_not_pay_at_disk_speed_is_planned_in_its_memory_tier(
    tmp_path, budgets, tier
):
    chosen, considered = plan(tmp_path, GPU_MACHINE, **budgets)
    assert chosen, [(c.tier, c.saving_s, c.cost_s, c.why) for c in considered]
    assert {b.tier for b in chosen} == {tier}
    assert all(b.saving_s > b.cost_s for b in chosen)
    # the same boundaries at disk speed would not pay: the tier's own speed is what plans them
    for b in chosen:
        read = ROWS * b.row_bytes / 1e9
        assert b.saving_s / (EPOCHS - b.epoch - 1) < read
    assert predicted("prefast", chosen) < predicted("freezeout", chosen)


def test_a_boundary_that_pays_nowhere_is_not_planned_and_says_why_with_both_figures(tmp_path):
    chosen, considered = plan(tmp_path, GPU_MACHINE, **DISK_ONLY)
    assert chosen == []
    assert considered, "the schedule freezes stages: there are candidates"
    for row in candidate_rows(considered):
        assert row["taken"] is False
        assert row["saving_s"] > 0 and (row["cost_s"] is None or row["cost_s"] > row["saving_s"])
        assert row["tier"] in ("recompute", "zarr", "mmap"), row
        assert row["why"]


def test_priced_at_disk_speed_everywhere_a_gpu_run_plans_nothing(tmp_path):
    """The H200 run's plan (planned_boundaries: {}): what the pricing above replaces."""
    chosen, considered = plan(tmp_path, AT_DISK_SPEED, **ROOMY_GPU)
    assert chosen == [] and considered
    chosen, _ = plan(tmp_path, DEFAULTS, **ROOMY_GPU)
    assert chosen == []


def test_the_ram_candidate_is_priced_next_to_what_the_planned_boundary_holds(tmp_path):
    """Room for one boundary in the GPU budget: the first is planned there, the next one
    is priced in RAM (the first still holds the GPU's room until it is superseded)."""
    view = ROWS * 64 * 1024 + TEST_ROWS * 64 * 1024
    chosen, _ = plan(
        tmp_path, GPU_MACHINE, max_gpu_mem=int(view * 1.5), max_ram=64 * GIB, max_disk=0
    )
    assert [b.tier for b in chosen][:2] == ["gpu", "ram"], chosen


def test_the_governor_prices_an_epochs_read_at_the_tiers_own_speed(tmp_path):
    """One pricing: the governor's own check (reading an epoch must beat computing the
    prefix) uses the tier it picked, not a disk figure."""
    governor = Governor(Budgets(cache_dir=tmp_path, **RAM_ONLY), torch.device("meta"))
    governor.bandwidths = GPU_MACHINE
    d = governor.choose_boundary(COSTS, 2, "bfloat16", (ROWS, TEST_ROWS), 1, BPE + EVAL)
    assert d.tier == "ram", d.reason
    assert "20,000 MB/s" in d.reason
    governor.bandwidths = AT_DISK_SPEED
    d = governor.choose_boundary(COSTS, 2, "bfloat16", (ROWS, TEST_ROWS), 1, BPE + EVAL)
    assert d.tier == "recompute" and "slower than computing the prefix" in d.reason


def test_a_boundary_of_k_views_is_written_k_times_and_read_after_them():
    from prefast.caching.costmodel import TierPrice, boundary_value

    price = TierPrice("ram", "float16", 1000, write_bw=1e6, read_bw=1e7)
    one = boundary_value(COSTS, 0, 2, 0, 10, 10, 1000, price=price)
    two = boundary_value(COSTS, 0, 2, 0, 10, 10, 1000, price=price, views=2)
    assert one.cost_s == pytest.approx(1.0 + 9 * 0.1)
    assert two.cost_s == pytest.approx(2 * 1.0 + 8 * 0.1)  # two writes, eight reads
    assert two.saving_s == pytest.approx(one.saving_s * 8 / 9)  # read from epoch 2 on


# -- the run record and `prefast plan --costs-from` ------------------------------------------
def digits_run(tmp_path: Path) -> dict:
    from helpers import DIGITS

    from prefast import TrainConfig, train

    return train(TrainConfig(**{**DIGITS, "epochs": 4, "mode": "prefast",
                                "cache_dir": str(tmp_path / "c")}))  # fmt: skip


def test_the_run_record_carries_what_the_plan_was_priced_with_as_json(tmp_path):
    import json

    run = digits_run(tmp_path)
    pricing = run["final"]["pricing"]
    json.dumps(run, allow_nan=False)  # no NaN or inf: any JSON reader takes it
    assert pricing["device"] == "cpu" and set(pricing["rooms"]) == {"ram", "gpu", "disk"}
    assert pricing["bandwidths"]["source"].startswith("pinned from")  # conftest's file
    assert len(pricing["stage_costs"]) == 10
    assert all(s["fwd_bwd_s"] is None for s in pricing["stage_costs"])  # forwards only
    assert pricing["candidates"] and all(
        {"epoch", "stage", "tier", "dtype", "bytes", "saving_s", "cost_s", "taken", "why"}
        <= set(c) for c in pricing["candidates"]
    )  # fmt: skip
    planned = {c["epoch"]: c["stage"] for c in pricing["candidates"] if c["taken"]}
    assert planned == run["final"]["planned_boundaries"]


def test_costs_from_a_gpu_record_plans_its_gpu_tier_on_a_cpu(tmp_path):
    """A record from a GPU machine (its device, the room its tiers had, its bandwidths):
    planned here, on a CPU, its boundaries go to the GPU tier it had, at its speeds."""
    import json

    from helpers import DIGITS

    from prefast import TrainConfig
    from prefast.training.plan import measure_and_plan

    run = digits_run(tmp_path)
    cpu_record = tmp_path / "cpu_run.json"  # as it is: a CPU's (no GPU room)
    cpu_record.write_text(json.dumps(run))
    cfg = TrainConfig(**{**DIGITS, "epochs": 4, "cache_dir": str(tmp_path / "p")})
    assert measure_and_plan(cfg, costs_from=str(cpu_record))["pricing"]["device"] == "cpu"
    pricing = run["final"]["pricing"]
    pricing.update(device="cuda", rooms={"gpu": 40 * GIB, "ram": 64 * GIB, "disk": 100 * GIB})
    pricing["bandwidths"] = {"write": GPU_MACHINE.write, "read": GPU_MACHINE.read,
                             "source": "an H200"}  # fmt: skip
    record = tmp_path / "gpu_run.json"
    record.write_text(json.dumps(run))
    plan = measure_and_plan(cfg, costs_from=str(record))
    assert plan["boundaries"] and {b["tier"] for b in plan["boundaries"]} == {"gpu"}
    assert plan["pricing"]["bandwidths"]["source"].startswith(f"--costs-from {record}")
    assert "20,000 MB/s" not in json.dumps(plan["boundaries"])  # priced at the GPU's 1 TB/s
    assert "1,000,000 MB/s" in plan["boundaries"][0]["reason"]


@pytest.mark.parametrize(
    "doc, says",
    [
        ({"final": None}, "no measured costs in it"),
        ({"final": {"pricing": {"stage_costs": [{"fwd_s": 1}]}}}, "a stage's costs are malformed"),
        ({"pricing": {"stage_costs": [{"fwd_s": 1.0, "fwd_bwd_s": None, "out_row_bytes": 4,
                                       "out_shape": [1]}]}}, "its model has 1 stages"),
    ],
)  # fmt: skip
def test_a_bad_costs_from_file_is_refused_in_one_line(tmp_path, doc, says):
    import json

    from helpers import DIGITS

    from prefast import TrainConfig
    from prefast.errors import ConfigError
    from prefast.training.plan import measure_and_plan

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=says):
        measure_and_plan(TrainConfig(**{**DIGITS, "epochs": 2}), costs_from=str(path))
