"""Adaptive freezing (``--freeze auto``): AutoFreeze's gradient rule, decided as the run goes.

AutoFreeze (Liu, Agarwal, Venkataraman, arXiv 2102.01386) freezes a block once it has
stopped learning, judged by how fast its gradient norm still changes. As implemented
here, per stage ``i`` and evaluation interval ``k`` (``interval`` iterations)::

    N_k(i) = sum over the interval's steps of ||gradient of stage i's parameters||_2
    r_k(i) = |N_k(i) - N_{k-1}(i)| / N_{k-1}(i)          (0 when both are 0)
    thr_k  = the P-th percentile (``percentile``, AutoFreeze's median by default) of r_k
             over every stage still training, the head included
    freeze the first trainable stage, and the next, ... while r_k(i) < thr_k; never the head

A rate needs two intervals, so the first decision comes at the end of the second.
Frozen stages stay a prefix: a stage is frozen only with every stage before it, and
the rule never looks at a stage after one that keeps learning. Stages that still
train follow one cosine learning rate over the whole run (``baseline``'s); FreezeOut's
per-stage annealing does not apply.

The decisions (the iteration, the stages, the rates and the threshold) are the
schedule's state: the trainer saves them in its checkpoints, so a resumed run
repeats them instead of deciding again from other statistics. The gradient norms
are summed on the training device (``prefast/training/gradnorms.py``) and read once
per interval. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prefast.errors import ConfigError

FREEZE_RULES = ("freezeout", "auto")
DECISIONS_PER_EPOCH = 4  # the default interval: a quarter of an epoch (see default_interval)


def default_interval(batches_per_epoch: int) -> int:
    """Four decisions per epoch. A quarter epoch sums enough steps that one noisy batch
    does not decide, and a stage frozen mid-epoch is cached only from the next epoch start
    (boundaries are only taken there), so deciding every few steps would seldom cache
    sooner. Decisions fall on multiples of the interval counted over the whole run: they
    meet epoch starts only where the batches per epoch divide by four."""
    return max(1, round(batches_per_epoch / DECISIONS_PER_EPOCH))


def change_rate(previous: float, current: float) -> float:
    """``|current - previous| / previous``: how much a stage's gradient norm still moves.
    A stage with no gradient in either interval (no parameters) has learned all it can."""
    if previous == 0.0:
        return 0.0 if current == 0.0 else math.inf
    return abs(current - previous) / previous


def percentile(values: list[float], p: float) -> float:
    """numpy's default (linear) percentile, ``p`` in [0, 100], for the handful of stages."""
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if math.isinf(xs[lo]) or math.isinf(xs[hi]):
        return xs[hi] if pos > lo else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stages_to_freeze(rates: list[float], p: float) -> tuple[int, float]:
    """How many of the trainable stages to freeze, front first, and the threshold.

    ``rates`` are the trainable stages' change rates in order, the head's last; the
    head is never frozen and a stage is frozen only with all before it."""
    threshold = percentile(rates, p)
    count = 0
    for r in rates[:-1]:
        if not r < threshold:
            break
        count += 1
    return count, threshold


@dataclass
class AutoFreezeSchedule:
    """The freeze schedule of ``--freeze auto``: what the trainer and the planner ask of
    :class:`~prefast.freezing.schedule.FreezeOutSchedule`, with freeze points that are
    known only once :meth:`decide` has taken them.

    Parameters
    ----------
    num_stages
        Freeze units including the head (the last index).
    total_iters
        Epochs times the batches per epoch: the length of the one cosine.
    interval
        Iterations per evaluation interval (:func:`default_interval`).
    percentile
        ``P`` of the rule, in (0, 100]; 50 is AutoFreeze's median.
    base_lr
        The cosine's initial learning rate.
    prefix
        Stages frozen from the first iteration (``--freeze-prefix K``); the rule decides
        the rest.
    """

    num_stages: int
    total_iters: int
    interval: int
    percentile: float = 50.0
    base_lr: float = 0.1
    prefix: int = 0
    # One entry per decision that froze stages: {"iter", "frozen", "stages", "rates" (of the
    # stages trainable then, in order), "threshold"}.
    decisions: list[dict] = field(default_factory=list)
    previous: list[float] | None = None  # the last interval's N(i), every stage (None: none yet)

    online = True  # freeze points are decided during the run (the planner asks)

    def __post_init__(self) -> None:
        if self.num_stages < 2:
            raise ConfigError(
                f"--freeze auto needs a model of at least 2 stages (a stage and the head); "
                f"this one has {self.num_stages}"
            )
        if self.interval < 1:
            raise ConfigError(f"--freeze-interval {self.interval} must be >= 1 iteration")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"--freeze-percentile {self.percentile} must be in (0, 100]; AutoFreeze's "
                "median is 50"
            )
        if not 0 <= self.prefix < self.num_stages:
            raise ConfigError(
                f"--freeze-prefix {self.prefix}: the model has {self.num_stages} stages, the "
                f"last being the head: freeze at most {self.num_stages - 1}"
            )

    # -- what the trainer and the planner ask ------------------------------------------------
    def frozen_prefix(self, it: int) -> int:
        """Stages frozen at iteration ``it``, as decided so far (later ones: not yet known)."""
        return max([self.prefix, *(d["frozen"] for d in self.decisions if d["iter"] <= it)])

    def is_frozen(self, i: int, it: int) -> bool:
        return i < self.frozen_prefix(it)

    def freeze_iter(self, i: int) -> int:
        """Iteration from which stage ``i`` is frozen; ``total_iters`` when it never was."""
        if i < self.prefix:
            return 0
        return next((d["iter"] for d in self.decisions if d["frozen"] > i), self.total_iters)

    def lr(self, i: int, it: int) -> float:
        if self.is_frozen(i, it):
            return 0.0
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * it / self.total_iters))

    def scaling_warning(self) -> str | None:
        return None  # one rate for every stage: nothing is scaled

    def divergence_cause(self) -> str:
        return f"the learning rate (--lr {self.base_lr}); lower --lr"

    def resumed(self, frozen: int, at: int) -> AutoFreezeSchedule:
        """A resumed run keeps the checkpoint's decisions (restored with :meth:`load_state`)
        and goes on deciding from the checkpoint's last interval."""
        return self

    def describe(self) -> str:
        return (
            f"--freeze auto: AutoFreeze's gradient rule every {self.interval} iterations, "
            f"freezing leading stages whose gradient-norm change is below the "
            f"{self.percentile:g}th percentile"
        )

    # -- the rule ----------------------------------------------------------------------------
    def due(self, it: int) -> bool:
        """Whether an interval ends after ``it`` iterations (none at the run's end)."""
        return it % self.interval == 0 and 0 < it < self.total_iters

    def decide(self, it: int, norms: list[float]) -> dict | None:
        """End of an interval after ``it`` iterations, with each stage's summed gradient
        norm over it (the same on every rank): freeze what the rule says from iteration
        ``it`` on. Returns the decision when it froze stages, else None."""
        frozen = self.frozen_prefix(it)
        previous, self.previous = self.previous, list(norms)
        if previous is None:
            return None
        rates = [change_rate(previous[i], norms[i]) for i in range(frozen, self.num_stages)]
        count, threshold = stages_to_freeze(rates, self.percentile)
        if count == 0:
            return None
        decision = {
            "iter": it,
            "frozen": frozen + count,
            "stages": list(range(frozen, frozen + count)),
            "rates": [round(r, 6) for r in rates],  # of stages frozen.., the head last
            "threshold": round(threshold, 6),
        }
        self.decisions.append(decision)
        return decision

    def state(self) -> dict:
        return {"decisions": self.decisions, "previous": self.previous}

    def load_state(self, state: dict) -> None:
        self.decisions = [dict(d) for d in state.get("decisions", [])]
        self.previous = state.get("previous")
