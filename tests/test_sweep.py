"""A sweep as a user runs it: separate ``prefast train`` processes over one frozen prefix.

With the defaults (prefast mode, ``--cache-tier auto``) the fixed prefix's cache lives in
RAM for its run and a copy is kept on disk (``prefast/caching/keep.py``): the next process
finds it in any persistent tier, reads its first epoch from it, says so in one line, and
plans with the kept stage costs instead of probing again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_in_process, leftovers

from prefast.store import CacheRoot
from prefast.store.manage import list_caches

SWEEP = ("train", "--dataset", "digits", "--model", "densenet-bc", "--depth", "10",
         "--freeze-prefix", "all", "--epochs", "2", "--batch-size", "64", "--device", "cpu")  # fmt: skip


def run(capsys, caplog, cache: Path, lr: str, out: Path) -> dict:
    res = cli_in_process(capsys, caplog, *SWEEP, "--lr", lr, "--cache-dir", str(cache),
                         "--json-out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    return {"stdout": res.stdout, "record": json.loads(out.read_text())}


def events(record: dict, name: str) -> list[dict]:
    return [e for e in record["final"]["cache_events"] if e["event"] == name]


def test_the_second_process_of_a_sweep_reads_the_kept_cache_from_its_first_epoch(
    tmp_path, capsys, caplog
):
    cache = tmp_path / "cache"
    first = run(capsys, caplog, cache, "0.1", tmp_path / "a.json")
    assert first["record"]["config"]["mode"] == "prefast"  # the default mode caches
    assert first["record"]["config"]["augment"] == "none"  # a probe's default
    assert "a copy is kept on disk" in first["stdout"], first["stdout"]
    kept = events(first["record"], "kept")
    assert {e["split"] for e in kept} == {"train", "test"}, first["record"]["final"]["cache_events"]
    assert first["record"]["epochs"][0]["cache_tier"] is None  # written this epoch, in RAM
    listed = list_caches(CacheRoot(cache))
    assert len(listed) == 2 and all(c["status"] == "complete" for c in listed), listed

    second = run(capsys, caplog, cache, "0.05", tmp_path / "b.json")
    rec = second["record"]
    disk = {c["tier"] for c in listed}
    assert rec["epochs"][0]["cache_tier"] in disk  # every batch of epoch 1 read from the cache
    assert rec["epochs"][0]["cached_batches"] == rec["final"]["batches_per_epoch"]
    assert "reusing cache" in second["stdout"] and "training rows" in second["stdout"]
    assert "test rows" in second["stdout"]
    assert events(rec, "reused"), rec["final"]["cache_events"]
    assert not events(rec, "kept")  # nothing new to keep
    assert leftovers(cache) == []


def test_a_kept_copy_is_listed_and_purged(tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    run(capsys, caplog, cache, "0.1", tmp_path / "a.json")
    res = cli_in_process(capsys, caplog, "cache", "ls", "--cache-dir", str(cache), "--json")
    assert len(json.loads(res.stdout)) == 2
    res = cli_in_process(
        capsys, caplog, "cache", "purge", "--all", "--yes", "--cache-dir", str(cache)
    )
    assert res.returncode == 0, res.stderr
    assert list_caches(CacheRoot(cache)) == []


@pytest.mark.slow
def test_four_sweep_processes_at_once_on_one_key_finish_as_alone(tmp_path):
    """One writes the kept copy, the others compute (or read it), none corrupts it, and every
    run's losses are those of the same run alone."""
    shared = tmp_path / "shared"
    lrs = ["0.1", "0.1", "0.05", "0.05"]

    def start(lr: str, cache: Path, out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefast.cli.main",
                *SWEEP,
                "--lr",
                lr,
                "--cache-dir",
                str(cache),
                "--json-out",
                str(out),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(lr, shared, tmp_path / f"run{i}.json") for i, lr in enumerate(lrs)]
    deadline = time.monotonic() + 300
    for p in procs:
        _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        assert p.returncode == 0, err
    alone = {}
    for lr in sorted(set(lrs)):
        p = start(lr, tmp_path / f"alone-{lr}", tmp_path / f"alone-{lr}.json")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        alone[lr] = json.loads((tmp_path / f"alone-{lr}.json").read_text())
    for i, lr in enumerate(lrs):
        rec = json.loads((tmp_path / f"run{i}.json").read_text())
        got = [e["train_loss"] for e in rec["epochs"]]
        assert got == [e["train_loss"] for e in alone[lr]["epochs"]], (i, lr)
        assert rec["final"]["test_acc"] == alone[lr]["final"]["test_acc"]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefast.cli.main",
            "cache",
            "verify",
            "--all",
            "--cache-dir",
            str(shared),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert leftovers(shared) == []
    # One complete kept copy per split, written by one process each: the others found it
    # locked or complete (not_kept) or never offered it (complete before their offer).
    listed = list_caches(CacheRoot(shared))
    assert sorted(c["split"] for c in listed) == ["test", "train"], listed
    assert all(c["status"] == "complete" for c in listed), listed
    records = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(len(lrs))]
    kept = [e["split"] for r in records for e in r["final"]["cache_events"] if e["event"] == "kept"]
    assert sorted(kept) == ["test", "train"], kept


def test_verbose_is_accepted_after_the_command(tmp_path):
    from prefast.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "-v"]).verbose is True
    assert parser.parse_args(["-v", "train"]).verbose is True
    assert parser.parse_args(["train"]).verbose is False
    assert parser.parse_args(["cache", "ls", "--verbose"]).verbose is True


def test_the_defaults_cache_and_a_probe_is_not_augmented():
    from prefast.cli.main import build_parser
    from prefast.config import TrainConfig
    from prefast.training.build import built_in_augment

    assert TrainConfig().mode == "prefast"
    args = build_parser().parse_args(["train"])
    assert args.mode == "prefast" and args.augment == "auto"
    assert built_in_augment(TrainConfig(freeze_prefix="all")).augment == "none"
    assert built_in_augment(TrainConfig(freeze_prefix=2)).augment == "standard"
    assert built_in_augment(TrainConfig()).augment == "standard"
    assert built_in_augment(TrainConfig(freeze_prefix="all", augment="standard")).augment == (
        "standard"
    )


def test_plan_shows_a_kept_cache_as_reused_and_times_no_backward_of_the_prefix(
    tmp_path, capsys, caplog
):
    cache = tmp_path / "cache"
    plan_args = ("plan", *SWEEP[1:], "--cache-dir", str(cache))
    res = cli_in_process(capsys, caplog, *plan_args, "--json")
    before = json.loads(res.stdout)
    assert not any(b["reused"] for b in before["boundaries"]), before["boundaries"]
    frozen = [s for s in before["stages"][:-1]]
    assert frozen and all(s["fwd_bwd_ms"] is None for s in frozen)  # never runs backward
    assert before["stages"][-1]["fwd_bwd_ms"] is not None  # the head trains
    run(capsys, caplog, cache, "0.1", tmp_path / "a.json")
    res = cli_in_process(capsys, caplog, *plan_args)
    assert res.returncode == 0, res.stderr
    assert "reused from" in res.stdout and "read from epoch 1" in res.stdout, res.stdout
    after = json.loads(cli_in_process(capsys, caplog, *plan_args, "--json").stdout)
    assert [b["reused"] for b in after["boundaries"]] == [True]
    # Read from epoch 1 instead of written in it: prefast's first epoch computes no prefix.
    pf_before, pf_after = (p["predicted_epochs"]["prefast"][0] for p in (before, after))
    assert pf_after["train_s"] < pf_before["train_s"]
