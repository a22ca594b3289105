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
    # The first run caches two of the four boundaries that "every" plans ({1: 1, 2: 4, 3: 6,
    # 4: 7}, epoch: stage). It is given them as a plan: a planner's own choice depends on
    # timings (a CI machine once found all four worth it even at disk speed).
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"boundaries": [
        {"epoch": 2, "stage": 4, "tier": "ram", "dtype": "float16"},
        {"epoch": 4, "stage": 7, "tier": "ram", "dtype": "float16"}]}))  # fmt: skip
    first = train(cfg(tmp_path, plan_from=str(subset)))
    assert first["final"]["planned_boundaries"] == {2: 4, 4: 7}
    record = tmp_path / "first.json"
    record.write_text(json.dumps(first))
    # Planning every boundary instead caches others (float16: other numbers) ...
    every = train(cfg(tmp_path, cache_boundaries="every", cache_dir=str(tmp_path / "e")))
    assert every["final"]["planned_boundaries"] == {1: 1, 2: 4, 3: 6, 4: 7}
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
    assert reasons and all("as the replayed plan has it" in r for r in reasons)


@pytest.mark.slow
def test_compare_runs_prefast_with_the_plan_it_made_once(tmp_path):
    runs = compare(cfg(tmp_path), ["freezeout", "prefast"])
    events = runs["prefast"]["final"]["cache_events"]
    reasons = [e["reason"] for e in events if e["event"] == "boundary"]
    assert reasons and all("as the replayed plan has it" in r for r in reasons)
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


def test_a_plan_made_with_another_t0_is_refused_in_one_line(tmp_path, capsys, caplog):
    """A plan replayed with another --t0 names a boundary below the prefix frozen at its
    epoch. Before, it was accepted and not replayed: the feed caches the whole frozen
    prefix and looked the entry up by its stage, missed, let the governor choose (lossy
    dtypes included), and `final.plan` came out empty."""
    from helpers import cli_in_process

    args = ["--dataset", "digits", "--model", "densenet-bc", "--depth", "16", "--epochs", "6",
            "--batch-size", "64", "--device", "cpu", "--cache-boundaries", "every"]  # fmt: skip
    planned = cli_in_process(capsys, caplog, "plan", *args, "--t0", "0.5", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["boundaries"], "nothing planned: nothing to replay"
    (tmp_path / "plan.json").write_text(planned.stdout)
    res = cli_in_process(capsys, caplog, "train", "--mode", "prefast", *args, "--t0", "0.3",
                         "--plan-from", str(tmp_path / "plan.json"),
                         "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert res.returncode == 2, res.stderr
    # the one line (beside the warning a t0 of 0.3 gets about FreezeOut's rate scaling)
    (line,) = [x for x in res.stderr.splitlines() if "plan-from" in x]
    assert "Traceback" not in res.stderr
    assert "--plan-from: the boundary after stage" in line and "does not fit this run" in line
    assert "replay a plan with the --epochs, --t0, --scale and --model it was made with" in line


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"final": []}, "holds no prefast plan"),
        ({"runs": []}, "holds no prefast plan"),
        ({"runs": {"prefast": 3}}, "holds no prefast plan"),
        ([1, 2], "holds no prefast plan"),
        ({"boundaries": [7]}, "a boundary lacks epoch, stage, tier or dtype"),
        (
            {"boundaries": [{"epoch": 1.5, "stage": 1, "tier": "ram", "dtype": "float16"}]},
            "a boundary's epoch is 1.5, not a whole number",
        ),
        (
            {"boundaries": [{"epoch": 1, "stage": "2", "tier": "ram", "dtype": "float16"}]},
            "a boundary's stage is '2', not a whole number",
        ),
    ],
)
def test_a_malformed_plan_file_is_refused_in_one_line(tmp_path, doc, says):
    """Before: {"final": []} and {"runs": []} raised AttributeError (a traceback), and a
    fractional epoch was truncated in silence."""
    from prefast.caching.replay import load_plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_plan(str(path))
    assert says in str(err.value) and "\n" not in str(err.value)
