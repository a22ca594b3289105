"""FreezeOut's layer-wise schedule as a pure function of (stage, iteration).

FreezeOut (Brock et al., arXiv 1706.04983) gives stage ``i`` of ``n`` its own
cosine-annealed learning rate that reaches zero at a fraction ``t_i`` of
training, after which the stage is frozen. ``t_i`` is spaced from ``t0`` (first
stage) to 1 (the head, last index) and optionally bent by a power::

    t_i          = scale(t0 + (1 - t0) * i / (n - 1))     scale: x, x**2, x**3
    freeze_iter  = round(t_i * total_iters)
    lr(i, it)    = lr0_i * 0.5 * (1 + cos(pi * it / freeze_iter(i)))  for it < freeze_iter
    lr0_i        = base_lr / t_i  if scale_lr  else base_lr

With a fixed frozen prefix of ``K`` stages (``--freeze-prefix K``: fine-tuning with a
frozen backbone), stages ``0..K-1`` are frozen from iteration 0 and ``t_i`` is spaced
over stages ``K..n-1`` (``i - K`` over ``n - 1 - K``): stage ``K`` takes ``t0``.

No torch here: this module is tested against the closed form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from prefast.errors import ConfigError

SCALES = {"linear": 1, "squared": 2, "cubic": 3}
SCALING_WARN = 20.0  # a stage rate scaled past this many times the base rate: say so


@dataclass(frozen=True)
class FreezeOutSchedule:
    """Per-stage learning rates and freeze points.

    Parameters
    ----------
    num_stages
        Number of freeze units including the head (the last index).
    total_iters
        Epochs times the real number of batches per epoch.
    t0
        Fraction of training after which the first stage freezes, in (0, 1].
        ``t0 = 1`` freezes nothing before the end: plain cosine annealing.
    scale
        ``"linear"``, ``"squared"`` or ``"cubic"``.
    scale_lr
        Scale each stage's initial rate by ``1 / t_i`` so every stage travels
        about as far in weight space as if it trained the whole run.
    base_lr
        Initial learning rate before scaling.
    prefix
        Stages frozen from the first iteration (a fixed frozen prefix); 0: none.
    """

    num_stages: int
    total_iters: int
    t0: float = 0.8
    scale: str = "cubic"
    scale_lr: bool = True
    base_lr: float = 0.1
    prefix: int = 0

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ConfigError(f"num_stages={self.num_stages} must be at least 1")
        if self.total_iters < 1:
            raise ConfigError(f"total_iters={self.total_iters} must be at least 1")
        if not (0.0 < self.t0 <= 1.0):
            raise ConfigError(f"t0={self.t0} must be in (0, 1]; FreezeOut's default is 0.8")
        if self.scale not in SCALES:
            raise ConfigError(f"scale={self.scale!r} must be one of {sorted(SCALES)}")
        if self.base_lr <= 0:
            raise ConfigError(f"base_lr={self.base_lr} must be positive")
        if not 0 <= self.prefix < self.num_stages:
            raise ConfigError(
                f"--freeze-prefix {self.prefix}: the model has {self.num_stages} stages, the "
                f"last being the head: freeze at most {self.num_stages - 1} (or pass all)"
            )

    def t(self, i: int) -> float:
        """Fraction of training at which stage ``i`` freezes."""
        self._check_stage(i)
        if i < self.prefix:
            return 0.0
        trainable = self.num_stages - 1 - self.prefix
        frac = 1.0 if trainable == 0 else (i - self.prefix) / trainable
        return float((self.t0 + (1.0 - self.t0) * frac) ** SCALES[self.scale])

    def freeze_iter(self, i: int) -> int:
        """Iteration from which stage ``i`` is frozen (at least 1; 0 in a fixed prefix)."""
        if i < self.prefix:
            return 0
        return max(1, round(self.t(i) * self.total_iters))

    def initial_lr(self, i: int) -> float:
        if i < self.prefix:
            return 0.0
        return self.base_lr / self.t(i) if self.scale_lr else self.base_lr

    def rate_multiplier(self) -> float:
        """The most ``1/t_i`` scaling multiplies a trainable stage's rate by (1: no scaling)."""
        if not self.scale_lr or self.num_stages - 1 <= self.prefix:
            return 1.0
        return max(1.0 / self.t(i) for i in range(self.prefix, self.num_stages - 1))

    def scaling_warning(self) -> str | None:
        """A line for the run header and ``prefast plan`` when 1/t_i scaling multiplies a
        stage's rate by more than ``SCALING_WARN``: such rates often diverge."""
        m = self.rate_multiplier()
        if m <= SCALING_WARN:
            return None
        return (
            f"FreezeOut's 1/t_i scaling multiplies stage {self.prefix}'s learning rate by "
            f"{m:,.0f}x (--t0 {self.t0}, {self.scale} scaling: stage {self.prefix} trains for "
            f"{self.freeze_iter(self.prefix)} of {self.total_iters} iterations, at up to "
            f"{self.base_lr * m:.4g}); if the loss "
            "diverges, raise --t0, lower --lr or pass --no-scale-lr"
        )

    def divergence_cause(self) -> str:
        """What the one line of a diverged run names: the rate, and what scaling made of it."""
        m = self.rate_multiplier()
        if m <= 1.0:
            return f"the learning rate (--lr {self.base_lr}); lower --lr"
        return (
            f"the learning rate (--lr {self.base_lr}, which FreezeOut's 1/t_i scaling "
            f"multiplies by up to {m:,.0f}x at --t0 {self.t0} ({self.scale} scaling)); lower "
            "--lr, raise --t0 or pass --no-scale-lr"
        )

    def lr(self, i: int, it: int) -> float:
        """Learning rate of stage ``i`` at iteration ``it`` (0 once frozen)."""
        end = self.freeze_iter(i)
        if it >= end:
            return 0.0
        return self.initial_lr(i) * 0.5 * (1.0 + math.cos(math.pi * it / end))

    def is_frozen(self, i: int, it: int) -> bool:
        """True when stage ``i`` no longer trains at iteration ``it``."""
        return it >= self.freeze_iter(i)

    def frozen_prefix(self, it: int) -> int:
        """Number of leading stages frozen at iteration ``it``.

        ``t_i`` grows with ``i`` (a fixed prefix has 0), so frozen stages form a prefix.
        """
        return sum(1 for i in range(self.num_stages) if self.is_frozen(i, it))

    def _check_stage(self, i: int) -> None:
        if not 0 <= i < self.num_stages:
            raise ConfigError(f"stage index {i} is outside 0..{self.num_stages - 1}")

    def resumed(self, frozen: int, at: int) -> ResumedSchedule:
        """This schedule, continued from a checkpoint whose first ``frozen`` stages were
        frozen at iteration ``at`` (see :class:`ResumedSchedule`)."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(FreezeOutSchedule)}
        return ResumedSchedule(**base, frozen=frozen, at=at)


@dataclass(frozen=True)
class ResumedSchedule(FreezeOutSchedule):
    """The schedule a resumed run follows: the checkpoint's ``frozen`` stages stay frozen
    from iteration ``at`` on (their weights are the checkpoint's and their optimizer
    state is gone: they cannot train again), every other stage follows this schedule's
    own ``t_i`` and cosine. Resumed with more epochs than the checkpoint was made with,
    the trainable stages' rates therefore rise to the longer cosine's and the stages
    after the frozen prefix freeze later; with fewer, they fall and stages the shorter
    schedule has frozen by ``at`` freeze at once. Frozen stages still form a prefix: the
    base freeze points grow with ``i``.
    """

    frozen: int = 0
    at: int = 0

    def freeze_iter(self, i: int) -> int:
        own = super().freeze_iter(i)
        return min(own, max(1, self.at)) if i < self.frozen else own
