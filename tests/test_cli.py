"""The `prefast` command through its real entry point."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import cli_in_process

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def prefast(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "prefast.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


DIGITS = [
    "--dataset",
    "digits",
    "--model",
    "densenet-bc",
    "--depth",
    "16",
    "--growth-rate",
    "12",
    "--batch-size",
    "64",
    "--device",
    "cpu",
]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--model", "resnet9000"], "--model 'resnet9000' is not valid"),
        (["train", "--t0", "1.5"], "--t0 1.5 must be in (0, 1]"),
        (
            ["train", "--depth", "17", "--synthetic-size", "64,64"],
            "--depth 17 cannot build a DenseNet-BC",
        ),
        (
            ["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/prefast-data"],
            "Put cifar-10-batches-py",
        ),
        (["train", "--max-ram", "lots"], "--max-ram='lots' is not a size"),
        (["train", "--synthetic-size", "100,0"], "--synthetic-size 100,0: the training and"),
        # Options that need a GPU fail before the first epoch, not at the first boundary.
        pytest.param(
            ["train", "--mode", "prefast", "--cache-tier", "gpu", "--epochs", "1"],
            "--cache-tier gpu keeps caches in the training GPU's memory, but no CUDA GPU",
            marks=NO_CUDA,
        ),
        (
            ["train", "--mode", "prefast", "--cache-tier", "gpu", "--device", "cpu"],
            "--cache-tier gpu keeps caches in the training GPU's memory, but",
        ),
        (
            ["train", "--mode", "prefast", "--max-gpu-mem", "1GB", "--device", "cpu"],
            "--max-gpu-mem",
        ),
        pytest.param(["train", "--device", "cuda"], "no CUDA GPU is visible", marks=NO_CUDA),
    ],
)
def test_bad_arguments_one_line_exit_2(args, needle, capsys, caplog):
    res = cli_in_process(capsys, caplog, *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not any(line.startswith("epoch") for line in res.stdout.splitlines()), res.stdout


def test_the_installed_entry_point_exits_2_with_one_line():
    res = prefast("train", "--t0", "1.5", timeout=120)  # the other cases run in-process
    assert res.returncode == 2, res.stderr
    assert res.stderr == "prefast: error: --t0 1.5 must be in (0, 1]; FreezeOut's default is 0.8\n"


def test_help_explains_every_command():
    res = prefast("--help")
    for cmd in ("train", "compare", "plan", "cache", "bench"):
        assert cmd in res.stdout
    assert "--cache-views" in prefast("train", "--help").stdout


@pytest.mark.slow
def test_digits_accuracy_baseline_and_freezeout(tmp_path):
    """Issue acceptance: both modes reach >= 0.90 on digits; freezeout freezes stages."""
    for mode in ("baseline", "freezeout"):
        out = tmp_path / f"{mode}.json"
        res = prefast("train", "--mode", mode, *DIGITS, "--epochs", "15", "--json-out", str(out))
        assert res.returncode == 0, res.stderr
        doc = json.loads(out.read_text())
        assert doc["final"]["test_acc"] >= 0.90
        assert "epoch  15/15" in res.stdout
        if mode == "freezeout":
            assert doc["epochs"][-1]["frozen_stages"] > 0


@pytest.mark.slow
def test_compare_and_plan_and_cache_ls(tmp_path):
    out = tmp_path / "cmp.json"
    cache = tmp_path / "cache"
    res = prefast(
        "compare",
        *DIGITS,
        "--epochs",
        "6",
        "--t0",
        "0.5",
        "--augment",
        "none",
        "--cache-tier",
        "zarr",
        "--cache-dir",
        str(cache),
        "--json-out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"baseline", "freezeout", "prefast"}
    assert "vs_freezeout" in res.stdout
    gap = runs["prefast"]["final"]["test_acc"] - runs["freezeout"]["final"]["test_acc"]
    assert f"prefast - freezeout test accuracy: {gap:+.4f}" in res.stdout
    assert "FreezeOut's schedule, not the cache: at --t0 0.5" in res.stdout
    ls = json.loads(prefast("cache", "ls", "--json", "--cache-dir", str(cache)).stdout)
    assert ls and all(r["status"] == "complete" for r in ls)
    for key in (
        "key",
        "status",
        "rows",
        "shape",
        "dtype",
        "codec",
        "bytes",
        "logical_bytes",
        "created",
        "last_used",
    ):
        assert key in ls[0]
    assert prefast("cache", "inspect", ls[0]["key"][:8], "--cache-dir", str(cache)).returncode == 0
    plan = json.loads(prefast("plan", *DIGITS, "--epochs", "6", "--t0", "0.5", "--json").stdout)
    assert plan["predicted_s"]["prefast"] < plan["predicted_s"]["baseline"]
    assert plan["boundaries"]


def test_bench_store_dir_is_created_or_a_one_line_error(tmp_path):
    from prefast.benchmarks.store_bench import make_workdir

    work = make_workdir(tmp_path / "new" / "nested")
    assert work.is_dir() and work.parent == tmp_path / "new" / "nested"
    res = prefast("bench", "store", "--quick", "--dir", "/proc/prefast-cannot-create", timeout=120)
    assert (
        res.returncode == 2 and "--dir /proc/prefast-cannot-create cannot be created" in res.stderr
    )
    assert len(res.stderr.strip().splitlines()) == 1
