"""Memory governor: which tier holds each boundary cache, and why.

Order of preference, each taken only if the whole boundary (its training
views plus the test set) fits what is left of the tier's budget:
``gpu`` > ``ram`` (pinned on CUDA) > ``zarr`` when the measured zstd ratio pays
(or only the compressed size fits), else ``mmap`` > ``recompute`` (stay
FreezeOut for this boundary, also chosen when reading one epoch's worth of the
cache from the tier picked, at its measured speed (``bandwidth.py``), would take
longer than computing the prefix).

Budgets (``budgets.py``, the :class:`Ledger` this class extends): a new cache
gets only what the budgets leave. A zarr cache is admitted *and* charged at its
compressed size (estimated from the probe's ratio); once its views and its test
cache are written the feed charges what they take on disk, measured, and a disk
writer stops (``DiskBudgetError``: the boundary is abandoned) before a chunk
would take it past what the budget left it. A forced ``--cache-tier`` obeys the
budgets too: over budget, the boundary is recomputed and the reason says so.
:meth:`Ledger.pressure_on` is checked every epoch; under pressure the
materializer spills caches to a lower tier instead of risking the OOM killer.
An allocation that fails anyway (:meth:`Ledger.allocation_failed`) teaches the
governor that the tier cannot hold a cache that size: it is not offered again
for one, and the boundary goes to the next tier down.

Dtype (``--cache-dtype auto``): a boundary is stored in 16 bits unless an 8-bit
encoding whose relative error the probe measured at most ``LOSSY_MAX_REL_ERROR``
(``store/encoding.py``) reaches a better tier: RAM instead of disk, disk instead
of recomputing. The decision's reason names the error and the 16-bit tier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from prefast.caching.bandwidth import DEFAULTS, Bandwidths
from prefast.caching.budgets import Ledger
from prefast.caching.costmodel import StageCost, prefix_seconds
from prefast.config import setting
from prefast.store import encoding
from prefast.store.device import is_accelerator

log = logging.getLogger("prefast.caching.governor")
GIB = 2**30
MIB = 2**20
ZSTD_PAYS = 1.10  # the store's own codec threshold (store.zarr_writer.ZSTD_MIN_RATIO)
LEVEL = {"gpu": 0, "ram": 1, "mmap": 2, "zarr": 2, "recompute": 3}  # preference, best first
# --cache-dtype auto takes an 8-bit encoding (for a better tier) only below this relative
# reconstruction error, measured on 16 rows of the probe's batch at the start of the run:
# int8 measures 0.1-0.7% on the benchmarks' boundaries, float8 1.8-2.7%, so in practice
# auto's 8-bit choice is int8; its accuracy cost: benchmarks/results/cache_dtype.md.
LOSSY_MAX_REL_ERROR = 0.01


@dataclass(frozen=True)
class Decision:
    tier: str  # gpu | ram | mmap | zarr | recompute
    bytes: int  # what the tier will hold (zarr: compressed, estimated from the probe's ratio)
    reason: str
    view_bytes: int = 0  # of that, one training view (the rest is the test set)
    dtype: str = ""  # the cache dtype it is stored in (set by ``choose_boundary``)
    rel_error: float | None = None  # that dtype's measured relative error, when 8-bit


def cache_dtype(requested: str, device: torch.device, autocast: bool) -> str:
    """--cache-dtype auto: bfloat16 under CUDA's bf16 autocast (what the model computes
    in), float16 elsewhere."""
    if requested != "auto":
        return requested
    return "bfloat16" if device.type == "cuda" and autocast else "float16"


def lossy_candidates(requested: str) -> tuple[str, ...]:
    """8-bit dtypes ``choose_boundary`` may take instead of the run's dtype: under auto only."""
    return encoding.EIGHT_BIT if requested == "auto" else ()


def cache_views(views: int, augment: str) -> int:
    """Augmented views per boundary: without augmentation every view is the same."""
    return views if augment == "standard" else 1


def tier_bytes(tier: str, raw_bytes: int, compress_ratio: float) -> int:
    """Bytes ``raw_bytes`` of activations take in ``tier``: compressed in zarr when zstd
    pays (the writer's own rule), as they are elsewhere."""
    if tier == "zarr" and compress_ratio >= ZSTD_PAYS:
        return int(raw_bytes / compress_ratio)
    return int(raw_bytes)


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


class Governor(Ledger):
    """Chooses each boundary's tier and dtype against what its :class:`Ledger` leaves."""

    # Each tier's measured speed (the feed sets the run's; ``bandwidth.py``).
    bandwidths: Bandwidths = DEFAULTS

    # -- decisions ------------------------------------------------------------------------
    def choose(
        self,
        view_bytes: int,
        views: int,
        test_bytes: int,
        prefix_epoch_s: float,
        compress_ratio: float,
        below: str | None = None,
    ) -> Decision:
        """The tier for a boundary of these sizes (``_decide``), logged."""
        return self._log(
            self._decide(view_bytes, views, test_bytes, prefix_epoch_s, compress_ratio, below)
        )

    def _decide(
        self,
        view_bytes: int,
        views: int,
        test_bytes: int,
        prefix_epoch_s: float,
        compress_ratio: float,
        below: str | None = None,
        replayed: str | None = None,
    ) -> Decision:
        """Tier for a boundary of ``views`` training views of ``view_bytes`` plus the test set.

        ``prefix_epoch_s`` is the measured time to compute the frozen prefix for
        one epoch (training and test set); an epoch reads one view plus the
        test set, so that is what a disk tier must read faster than computing.
        ``compress_ratio`` is the measured zstd-1 ratio of the boundary's output.
        ``below``: only tiers after this one (its allocation just failed).
        ``replayed``: the tier a replayed plan (``--plan-from``) took, forced like
        ``--cache-tier``.
        """
        total = views * view_bytes + test_bytes
        forced = replayed or self.budgets.tier
        if forced == "mmap" and self.remote:  # a replayed plan's mmap: the bucket's zarr tier
            forced = "zarr"
        label = (
            f"{forced}, as the replayed plan has it (compare's own plan, or plan_from)"
            if replayed
            else setting("cache_tier", forced)
        )

        def offered(tier: str) -> bool:  # a tier after the one that just failed, if any
            return below is None or LEVEL[tier] > LEVEL[below]

        def in_tier(tier: str) -> tuple[int, int]:
            """What ``tier`` holds, all views and one view: zarr's bytes are compressed (the
            ledger charges them, and the feed re-charges what the writer put on disk)."""
            v, t = (tier_bytes(tier, n, compress_ratio) for n in (view_bytes, test_bytes))
            return views * v + t, v

        def held(tier: str, reason: str) -> Decision:
            nbytes, v = in_tier(tier)
            return Decision(tier, nbytes, reason, view_bytes=v)

        if forced != "auto" and offered(forced) and total <= self.limits.get(forced, total):
            need, _ = in_tier(forced)
            room = self.room("disk" if forced in ("mmap", "zarr") else forced)
            if need > room:  # a forced tier obeys the budgets too, and says so
                return Decision(
                    "recompute",
                    need,
                    f"forced {label}, but {_mib(need)} exceeds what is left "
                    f"of its budget ({_mib(room)})",
                )
            return held(forced, f"forced by {label}")
        gpu = self.room("gpu") if offered("gpu") else 0
        ram = self.room("ram") if offered("ram") else 0
        disk = self.room("disk") if offered("mmap") else 0
        pays = compress_ratio >= ZSTD_PAYS
        if total <= gpu:
            tier, why = "gpu", f"{_mib(total)} fits the GPU budget ({_mib(gpu)} left)"
        elif total <= ram:
            where = "no GPU" if not is_accelerator(self.device) else "over the GPU budget"
            if below == "gpu":
                where = "the GPU could not allocate it"
            tier, why = "ram", f"{_mib(total)}, {where}; fits the RAM budget ({_mib(ram)} left)"
        else:
            tier = "zarr" if pays or total > disk or self.remote else "mmap"
            on_disk = total / compress_ratio if tier == "zarr" and pays else total
            if on_disk > disk:
                return Decision(
                    "recompute",
                    total,
                    f"{_mib(total)} ({_mib(on_disk)} on disk) exceeds the RAM ({_mib(ram)} "
                    f"left) and disk ({_mib(disk)} left) budgets",
                )
            codec = f"zstd ratio {compress_ratio:.2f}" + (" pays" if pays else " does not pay")
            why = (
                f"{_mib(total)} ({_mib(on_disk)} on disk) exceeds the RAM budget ({_mib(ram)} "
                f"left); {codec}"
            )
        # Every tier at its own measured speed (bandwidth.py): reading an epoch from it must
        # beat computing the prefix, or the boundary is not worth holding anywhere.
        _, read_bw = self.bandwidths.of(tier, tier == "zarr" and pays)
        read_s = (view_bytes + test_bytes) / read_bw
        speed = f"{tier} reads an epoch in ~{read_s:.3g}s at {read_bw / 1e6:,.0f} MB/s"
        if read_s >= prefix_epoch_s > 0:
            return Decision(
                "recompute",
                total,
                f"{why}; but {speed}, slower than computing the prefix ({prefix_epoch_s:.3g}s)",
            )
        return held(tier, f"{why}; {speed} vs {prefix_epoch_s:.3g}s to compute")

    def choose_boundary(
        self,
        costs: list[StageCost],
        stage: int,
        dtype: str,
        rows: tuple[int, int],
        views: int,
        batches_per_epoch: float,
        below: str | None = None,
        lossy: tuple[str, ...] = (),
        replayed: str | None = None,
        quiet: bool = False,
    ) -> Decision:
        """:meth:`choose` for the boundary before ``stage``, from the probe's costs
        (``quiet``: not logged, for a price the planner asks).

        ``rows`` is (training rows, test rows); ``batches_per_epoch`` counts the
        training and the test batches, which the prefix would otherwise compute.
        ``lossy``: 8-bit dtypes to store it in instead of ``dtype`` when one measured
        under ``LOSSY_MAX_REL_ERROR`` reaches a better tier (the most accurate first).
        """
        cost = costs[stage - 1]
        prefix_s = prefix_seconds(costs, stage, batches_per_epoch)

        def decide(d: str) -> Decision:
            row = encoding.row_bytes(cost.out_shape, d)
            n_train, n_test = rows[0] * row, rows[1] * row
            decision = self._decide(
                n_train, views, n_test, prefix_s, cost.ratio(d), below, replayed
            )
            return replace(decision, dtype=d)

        best = decide(dtype)
        measured = ((cost.error(d), d) for d in lossy)
        for err, d in sorted((e, d) for e, d in measured if e is not None):
            alt = decide(d)
            if err <= LOSSY_MAX_REL_ERROR and LEVEL[alt.tier] < LEVEL[best.tier]:
                best = replace(
                    alt,
                    rel_error=err,
                    reason=f"{d}, relative error {err:.2%} <= {LOSSY_MAX_REL_ERROR:.0%}: "
                    f"{alt.reason}; in {dtype}: {best.tier}, {best.reason}",
                )
                break
        return best if quiet else self._log(best)

    def lower_tiers(self, nbytes: int, below: str, compress_ratio: float) -> list[str]:
        """Tiers after ``below`` with room for a cache of ``nbytes``, best first: where a
        cache goes under pressure (spill) or when its tier could not allocate it."""
        found = []
        if below == "gpu" and nbytes <= self.room("ram") and not self.pressure_on("ram"):
            found.append("ram")
        disk = "zarr" if compress_ratio >= ZSTD_PAYS or self.remote else "mmap"
        on_disk = nbytes / compress_ratio if disk == "zarr" else nbytes
        if LEVEL[below] < LEVEL[disk] and on_disk <= self.room("disk"):
            found.append(disk)
        return found

    def _log(self, d: Decision) -> Decision:
        log.info("governor: %s%s (%s)", d.tier, f" in {d.dtype}" if d.dtype else "", d.reason)
        return d
