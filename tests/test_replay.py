"""The same command gives the same numbers: a replayed plan (--plan-from), and compare's
one plan for its prefast run."""

from __future__ import annotations

import json

import pytest
from helpers import DIGITS

from prefast import TrainConfig, compare, train
from prefast.errors import ConfigError


def cfg(tmp_path, **kw) -> TrainConfig:
    base = {**DIGITS, "epochs": 6, "cache_dtype": "float16", "cache_tier": "auto"}
    return TrainConfig(**{**base, "mode": "prefast", "cache_dir": str(tmp_path / "c"), **kw})


def losses(run: dict) -> list[float]:
    return [e["train_loss"] for e in run["epochs"]]


@pytest.mark.slow  # three runs (make check); the refusals below are make test's
def test_a_replayed_plan_gives_the_same_boundaries_and_losses(tmp_path):
    first = train(cfg(tmp_path))
    assert first["final"]["plan"], "the run planned no boundary: nothing to replay"
    record = tmp_path / "first.json"
    record.write_text(json.dumps(first))
    # Planning every boundary instead would cache others (float16: other numbers) ...
    every = train(cfg(tmp_path, cache_boundaries="every", cache_dir=str(tmp_path / "e")))
    assert every["final"]["planned_boundaries"] != first["final"]["planned_boundaries"]
    assert losses(every) != losses(first)
    # ... the replayed plan overrides it: the same boundaries, dtypes and losses.
    again = train(
        cfg(
            tmp_path, cache_boundaries="every", plan_from=str(record), cache_dir=str(tmp_path / "r")
        )
    )
    assert again["final"]["plan"] == first["final"]["plan"]
    assert again["final"]["planned_boundaries"] == first["final"]["planned_boundaries"]
    assert losses(again) == losses(first)
    assert again["final"]["test_acc"] == first["final"]["test_acc"]
    reasons = [e["reason"] for e in again["final"]["cache_events"] if e["event"] == "boundary"]
    assert reasons and all("replayed by --plan-from" in r for r in reasons)


@pytest.mark.slow
def test_compare_runs_prefast_with_the_plan_it_made_once(tmp_path):
    runs = compare(cfg(tmp_path), ["freezeout", "prefast"])
    events = runs["prefast"]["final"]["cache_events"]
    reasons = [e["reason"] for e in events if e["event"] == "boundary"]
    assert reasons and all("replayed by --plan-from" in r for r in reasons)
    # and that plan repeats it: the standalone run with it gives compare's numbers
    record = tmp_path / "cmp.json"
    record.write_text(json.dumps({"runs": runs}))
    alone = train(cfg(tmp_path, plan_from=str(record), cache_dir=str(tmp_path / "a")))
    assert losses(alone) == losses(runs["prefast"])


def test_a_plan_that_does_not_fit_the_run_is_refused(tmp_path):
    record = tmp_path / "plan.json"
    record.write_text(json.dumps({"boundaries": [
        {"epoch": 9, "stage": 1, "tier": "ram", "dtype": "float16"}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="does not fit this run .6 epochs"):
        train(cfg(tmp_path, plan_from=str(record)))
    record.write_text("{}")
    with pytest.raises(ConfigError, match="holds no prefast plan"):
        train(cfg(tmp_path, plan_from=str(record)))
