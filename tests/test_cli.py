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
        # A URL the object-store tier does not speak is refused (before: a folder named gs:).
        (
            ["train", "--mode", "prefast", "--cache-dir", "gs://bucket/prefix"],
            "cache_dir='gs://bucket/prefix' (--cache-dir gs://bucket/prefix): gs:// is not a "
            "store PreFast writes to",
        ),
        (["plan", "--cache-dir", "gs://bucket/prefix"], "s3://BUCKET/PREFIX"),
        (
            ["cache", "ls", "--cache-dir", "gs://bucket/prefix"],
            "--cache-dir gs://bucket/prefix: gs:// is not a store PreFast writes to",
        ),
        (["train", "--cache-dir", "s3://key:hush@bucket/p"], "URL holds credentials: give the"),
        (["cache", "ls", "--cache-dir", "gs://key:hush@bucket/p"], "URL holds credentials"),
        (
            ["train", "--cache-dir", "s3://bucket/p", "--cache-tier", "mmap"],
            "--cache-tier mmap maps a local file",
        ),
        (["bench", "store", "--dir", "gs://bucket/x"], "--dir gs://bucket/x: gs:// is not a store"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, needle, capsys, caplog):
    res = cli_in_process(capsys, caplog, *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "hush" not in res.stderr  # a secret is never repeated
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not any(line.startswith("epoch") for line in res.stdout.splitlines()), res.stdout


def test_the_installed_entry_point_exits_2_with_one_line():
    res = prefast("train", "--t0", "1.5", timeout=120)  # the other cases run in-process
    assert res.returncode == 2, res.stderr
    assert res.stderr == "prefast: error: --t0 1.5 must be in (0, 1]; FreezeOut's default is 0.8\n"


def test_help_explains_every_command(capsys, caplog):
    res = prefast("--help")  # the real entry point, once
    for cmd in ("train", "compare", "plan", "cache", "bench"):
        assert cmd in res.stdout
    assert "--cache-views" in cli_in_process(capsys, caplog, "train", "--help").stdout


@pytest.mark.slow
def test_digits_accuracy_baseline_and_freezeout(tmp_path):
    """Issue acceptance: both modes reach >= 0.90 on digits; freezeout freezes stages
    (8 epochs without augmentation reach 0.99 in both)."""
    for mode in ("baseline", "freezeout"):
        out = tmp_path / f"{mode}.json"
        res = prefast("train", "--mode", mode, *DIGITS, "--epochs", "8", "--augment", "none",
                      "--json-out", str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr
        doc = json.loads(out.read_text())
        assert doc["final"]["test_acc"] >= 0.90
        assert "epoch   8/8" in res.stdout
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


def test_every_training_option_has_help_and_shows_its_default():
    import argparse

    from prefast.cli.main import build_parser
    from prefast.freezing.schedule import FreezeOutSchedule

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "compare", "plan"):
        parser = sub.choices[name]
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            flag = action.option_strings[-1] if action.option_strings else None
            if flag in (None, "--help"):
                continue
            assert action.help, f"prefast {name} {flag} has no help text"
            switch = action.nargs == 0
            if action.default not in (None, False, "") and not switch:
                shown = " ".join(
                    parser._get_formatter()._expand_help(action).split()  # type: ignore[attr-defined]
                )
                assert "default" in shown, f"prefast {name} {flag} hides its default: {shown}"
        assert "(default: 10)" in text and "(default: 64)" in text  # --epochs, --batch-size
        assert "(default: 0.1)" in text and "(default: 0)" in text  # --lr, --seed
        # --t0 says what it is, and its first freeze point under the default scaling is true
        assert "the first stage freezes at t0^3: t0 0.8 at 51% of training, 0.5 at 12.5%" in text
    assert FreezeOutSchedule(4, 1000, t0=0.5).t(0) == 0.125
    assert round(FreezeOutSchedule(4, 1000, t0=0.8).t(0), 2) == 0.51
