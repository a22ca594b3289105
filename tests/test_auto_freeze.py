"""--freeze auto: AutoFreeze's gradient rule, freeze points decided during the run, and the
boundaries the prefast feed plans as they come (docs/freezing.md)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from helpers import DIGITS, cli, cli_in_process
from torch import nn
from torch.utils.data import Dataset

from prefast.caching.costmodel import StageCost, boundary_value
from prefast.config import TrainConfig
from prefast.errors import ConfigError
from prefast.freezing.adaptive import AutoFreezeSchedule, change_rate, stages_to_freeze
from prefast.training.trainer import Trainer, train

AUTO = {**DIGITS, "epochs": 4, "t0": 0.8, "freeze": "auto"}  # t0: the default, unused


def events(run: dict, name: str) -> list[dict]:
    return [e for e in run["final"]["cache_events"] if e["event"] == name]


# -- the rule --------------------------------------------------------------------------------
class InjectGrad(torch.autograd.Function):
    """Identity on ``x``; the gradient of ``p`` is whatever the module says, not the loss's."""

    @staticmethod
    def forward(ctx, x, p, grad):  # type: ignore[no-untyped-def]
        ctx.grad = grad
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g, ctx.grad, None


class KnownGradient(nn.Module):
    """A stage whose parameter's gradient norm at its n-th training call is ``norm(n)``."""

    def __init__(self, norm):
        super().__init__()
        self.p, self.norm, self.calls = nn.Parameter(torch.zeros(4)), norm, 0

    def forward(self, x):
        if not (self.training and self.p.requires_grad and torch.is_grad_enabled()):
            return x
        self.calls += 1
        grad = torch.full((4,), self.norm(self.calls) / 2.0)  # ||grad|| = norm(calls)
        return InjectGrad.apply(x, self.p, grad)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Blobs(Dataset):
    """Three classes of 1x4x4 inputs, separable."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 1, 4, 4, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def hand_built() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        KnownGradient(lambda n: 1.0),  # learned: its gradient norm never changes
        KnownGradient(lambda n: 1.5**n),  # keeps learning: its gradient norm keeps growing
        KnownGradient(lambda n: 1.0),  # would pass the rule, but stage 1 before it trains
        Head(),
    )


def test_the_rule_freezes_a_stage_whose_gradients_settled_and_keeps_frozen_stages_a_prefix():
    cfg = TrainConfig(mode="freezeout", freeze="auto", freeze_interval=4, epochs=3,
                      batch_size=16, augment="none", device="cpu", workers=0)  # fmt: skip
    run = train(cfg, model=hand_built(), train_data=Blobs(128, 0), test_data=Blobs(32, 1))
    total = 3 * 8  # 8 batches of 16 per epoch
    # Stage 0's rate is 0 from the second interval on, below the median of (0, 0, the
    # head's, stage 1's 1.5**4 - 1 = 4.06): frozen at iteration 8, the first decision.
    # Stage 2's rate is 0 too, but stage 1 before it keeps changing: never frozen.
    assert run["final"]["freeze_iters"] == [8, total, total, total]
    (decision,) = run["final"]["freeze_decisions"]
    assert decision["iter"] == 8 and decision["stages"] == [0]
    assert decision["rates"][0] == 0.0 and decision["rates"][1] == pytest.approx(1.5**4 - 1)
    assert decision["rates"][2] == 0.0 and decision["rates"][1] > decision["threshold"] > 0
    # decided at the end of epoch 1 (its 8th step), applied from the next step
    assert [e["frozen_stages"] for e in run["epochs"]] == [0, 1, 1]


def test_the_rule_by_itself():
    assert change_rate(2.0, 3.0) == 0.5 and change_rate(2.0, 1.0) == 0.5  # a fall counts too
    assert change_rate(0.0, 0.0) == 0.0  # no parameters: nothing left to learn
    # front first, strictly below the percentile, never the head (the last rate)
    assert stages_to_freeze([0.1, 0.2, 5.0, 0.1, 1.0, 3.0], 50) == (2, pytest.approx(0.6))
    assert stages_to_freeze([0.3, 0.1, 0.2], 50)[0] == 0  # stage 0 above the median
    assert stages_to_freeze([0.0, 0.0, 0.0], 100)[0] == 0  # not below: nothing
    s = AutoFreezeSchedule(4, 100, 10, 50.0, base_lr=0.1, prefix=1)
    assert s.decide(10, [0, 1.0, 1.0, 1.0]) is None  # the first interval: no rate yet
    d = s.decide(20, [0, 1.0, 2.0, 1.5])  # rates of stages 1, 2, head: 0, 1, 0.5
    assert d is not None and d["stages"] == [1] and d["frozen"] == 2
    assert [s.frozen_prefix(it) for it in (0, 19, 20, 99)] == [1, 1, 2, 2]
    assert s.freeze_iter(0) == 0 and s.freeze_iter(1) == 20 and s.freeze_iter(2) == 100
    assert s.lr(1, 20) == 0.0 and s.lr(2, 0) == 0.1  # one cosine for the rest
    assert s.lr(3, 50) == pytest.approx(0.05)


# -- bad flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--t0", "0.8"], "--t0 sets FreezeOut's clock, which --freeze auto does not follow"),
        (["--scale", "linear", "--no-scale-lr"], "--scale and --no-scale-lr set FreezeOut's"),
        (["--mode", "baseline"], "--freeze auto freezes stages as they stop learning, and "
         "baseline mode freezes nothing: use --mode freezeout or prefast with it"),
        (["--freeze-percentile", "0"], "--freeze-percentile 0.0 must be in (0, 100]"),
        (["--freeze-interval", "0"], "--freeze-interval 0 must be >= 1 iteration"),
        (["--plan-from", "x.json"], "--plan-from replays boundaries planned from a fixed"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_exit_2_in_one_line(capsys, caplog, flags, message):
    res = cli_in_process(capsys, caplog, "train", "--dataset", "digits", "--freeze", "auto",
                         *flags)  # fmt: skip
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr


def test_the_rules_flags_without_freeze_auto_exit_2(capsys, caplog):
    res = cli_in_process(capsys, caplog, "train", "--dataset", "digits", "--freeze-interval", "5")
    assert res.returncode == 2 and "add --freeze auto, or drop them" in res.stderr
    # the percentile is refused even at its default value
    res = cli_in_process(capsys, caplog, "train", "--dataset", "digits", "--freeze-percentile",
                         "50")  # fmt: skip
    assert res.returncode == 2 and "add --freeze auto, or drop them" in res.stderr
    with pytest.raises(ConfigError, match="--t0 sets FreezeOut's clock"):
        TrainConfig(freeze="auto", t0=0.5)


def test_plan_says_freeze_points_are_decided_during_the_run(capsys, caplog):
    res = cli_in_process(capsys, caplog, "plan", "--dataset", "digits", "--model",
                         "densenet-bc", "--depth", "16", "--epochs", "6", "--freeze", "auto",
                         "--freeze-prefix", "4")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "freeze points are decided during the run (--freeze auto: AutoFreeze's gradient " \
        "rule every 6 iterations" in out  # fmt: skip
    assert "    3           0         0.00" in out and "    4         run          run" in out
    assert "if the rule freezes stages 0..i-1" in out and "  stage  9: " in out
    assert "  epoch 1: stages 0..3 " in out  # the fixed prefix: planned before the run
    assert "freezeout, prefast: depend on when the rule freezes" in out


def test_plan_says_why_a_fixed_prefix_has_no_boundary(capsys, caplog):
    res = cli_in_process(capsys, caplog, "plan", "--dataset", "digits", "--model",
                         "densenet-bc", "--depth", "16", "--epochs", "6", "--freeze", "auto",
                         "--freeze-prefix", "1", "--cache-tier", "zarr",
                         "--cache-dtype", "float32")  # fmt: skip
    # on disk (priced at the tests' pinned disk speeds): stage 0's 0.1-0.2 ms forward saves
    # less than writing and reading its rows costs; in RAM it would pay
    assert res.returncode == 0, res.stderr
    assert "  stage  1: " in res.stdout and "never pays in this run" in res.stdout
    assert "(none before: the --freeze-prefix 1 stage(s) do not pay for a cache)" in res.stdout


# -- exactness and the online boundaries --------------------------------------------------------
@pytest.mark.parametrize("prefix", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_freezeout_and_prefast_freeze_alike_and_prefast_reads_its_online_boundaries(
    tmp_path, prefix
):
    runs = {
        mode: train(
            TrainConfig(
                mode=mode,
                cache_dir=str(tmp_path),
                cache_boundaries="every",
                freeze_prefix=prefix,
                **AUTO,
            )
        )  # fmt: skip
        for mode in ("freezeout", "prefast")
    }
    fo, pf = runs["freezeout"], runs["prefast"]
    assert fo["final"]["freeze_decisions"], "the rule froze nothing"
    assert pf["final"]["freeze_iters"] == fo["final"]["freeze_iters"]
    assert [d["stages"] for d in pf["final"]["freeze_decisions"]] == [
        d["stages"] for d in fo["final"]["freeze_decisions"]
    ]
    for a, b in zip(fo["epochs"], pf["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_acc"] == b["test_acc"]
    assert sum(e["cached_batches"] for e in pf["epochs"]) > 0
    trail = [e["event"] for e in pf["final"]["cache_events"]]
    first_freeze = trail.index("frozen")
    online = [e for e in events(pf, "boundary") if e["stage"] > prefix]
    assert online and trail.index("boundary", first_freeze) > first_freeze
    assert all({"tier", "dtype", "reason"} <= set(b) for b in online)
    if prefix:  # the fixed prefix is cached from the first epoch, planned beforehand
        assert (events(pf, "boundary")[0]["epoch"], events(pf, "boundary")[0]["stage"]) == (
            0,
            prefix,
        )
        assert pf["epochs"][1]["cache_stage"] is not None


def test_a_freeze_whose_cache_would_not_pay_writes_no_cache_and_says_why(tmp_path):
    # Costs as a probe might measure them: prefix stages that cost next to nothing to run
    # and outputs of 16 MiB a row; no boundary pays, however early.
    tiny = [StageCost(1e-9, 1e-8, 2**24, (4, 1024, 1024)) for _ in range(10)]
    # a disk budget that holds the rows whatever this disk has free: the reason is the speed
    cfg = TrainConfig(mode="prefast", cache_dir=str(tmp_path), max_disk=2**40, **AUTO)
    run = Trainer(cfg, costs=tiny).run()
    assert run["final"]["freeze_decisions"]
    assert not events(run, "boundary") and not any(e["cached_batches"] for e in run["epochs"])
    why = events(run, "not_cached")
    # at the epoch start after the freeze, the stages frozen by then are considered
    assert why and why[0]["stage"] == run["epochs"][why[0]["epoch"] - 1]["frozen_stages"]
    # priced in the tier it would land in (disk: the rows overflow RAM), with both figures
    assert why[0]["reason"].startswith("no tier takes it ("), why[0]["reason"]
    assert "mmap reads an epoch in ~" in why[0]["reason"]
    assert "slower than computing the prefix (" in why[0]["reason"]
    assert not list((tmp_path).rglob("*.zarr*"))


def test_the_same_freeze_pays_early_and_not_late():
    # 0.5 s of prefix compute saved per epoch left, 0.2 s of reading; 0.68 s to write once
    costs = [StageCost(5e-3, 15e-3, 4096, (1024,)) for _ in range(4)]
    value = [boundary_value(costs, 0, 2, e, 10, 50, 50000) for e in range(10)]
    pays = [v.saving_s > v.cost_s for v in value]
    assert pays[0] and not pays[-2], pays  # saving falls with the epochs left; the write stays
    assert pays == sorted(pays, reverse=True)


# -- the device, torchrun, resume ---------------------------------------------------------------
@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_auto_makes_no_host_read_inside_a_step_on_the_strict_device(strict, tmp_path):
    from test_device import StepWatch

    cfg = TrainConfig(mode="prefast", cache_dir=str(tmp_path), cache_boundaries="every",
                      cache_tier="gpu", **AUTO)  # fmt: skip
    tr = Trainer(cfg)
    watch = StepWatch(tr, strict)
    run = tr.run()
    assert run["final"]["freeze_decisions"] and watch.reads_in_steps == 0
    assert sum(e["cached_batches"] for e in run["epochs"]) > 0
    # Between steps: one read per interval end (6 iterations, 23 steps an epoch), and the
    # writes of a gpu-tier cache read nothing back.
    interval = tr.schedule.interval
    for epoch, reads in watch.reads_between.items():
        ends = sum(1 for it in range(epoch * 23 + 1, epoch * 23 + 23) if it % interval == 0)
        assert reads == ends, (epoch, dict(watch.reads_between))


@pytest.mark.slow
def test_two_ranks_under_torchrun_freeze_at_the_same_iterations(tmp_path):
    from test_distributed import DIGITS as DIST_DIGITS
    from test_distributed import TEST_PREFAST, torchrun

    flags = [a for a in DIST_DIGITS]
    i = flags.index("--t0")
    del flags[i : i + 2]
    res = torchrun(
        "train", "--mode", "prefast", *flags, "--freeze", "auto", "--cache-dir",
        str(tmp_path / "cache"), "--cache-boundaries", "every", "--check-replicas",
        "--json-out", str(tmp_path / "run.json"),
        program=[TEST_PREFAST, "--decisions-out", str(tmp_path / "d{rank}.json"), "--"],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"d{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[0] == ranks[1], ranks
    run = json.loads((tmp_path / "run.json").read_text())
    assert all(e["replicas_in_sync"] for e in run["epochs"])
    assert [d["iter"] for d in ranks[0]] == [d["iter"] for d in run["final"]["freeze_decisions"]]


@pytest.mark.slow
def test_a_run_killed_after_its_first_freeze_resumes_with_the_same_freezes_and_losses(tmp_path):
    from test_distributed import TEST_PREFAST

    args = ["train", "--mode", "prefast", "--dataset", "digits", "--model", "densenet-bc",
            "--depth", "16", "--epochs", "4", "--augment", "none", "--cache-dtype", "float32",
            "--device", "cpu", "--freeze", "auto", "--freeze-interval", "9",
            "--cache-boundaries", "every", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    whole = cli(*args, "--json-out", str(tmp_path / "whole.json"))
    assert whole.returncode == 0, whole.stderr
    ref = json.loads((tmp_path / "whole.json").read_text())
    first = ref["final"]["freeze_decisions"][0]["iter"]
    assert first < 2 * 23, "the first freeze must come before the kill (epoch 2)"
    ck = ["--checkpoint", str(tmp_path / "ck.pt"), "--cache-dir", str(tmp_path / "cache2")]
    import subprocess
    import sys

    killed = subprocess.run(
        [sys.executable, TEST_PREFAST, "--kill-at-epoch", "2", "--", *args, *ck],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = cli(*args, *ck, "--resume", "--json-out", str(tmp_path / "resumed.json"))
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((tmp_path / "resumed.json").read_text())
    assert run["final"]["freeze_decisions"] == ref["final"]["freeze_decisions"]
    assert run["final"]["freeze_iters"] == ref["final"]["freeze_iters"]
    for a, b in zip(run["epochs"], ref["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert sum(e["cached_batches"] for e in run["epochs"][2:]) > 0
