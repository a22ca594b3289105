"""Memory governor: which tier holds each boundary cache, and why.

Order of preference, each taken only if the whole boundary (its training
views plus the test set) fits what is left of the tier's budget:
``gpu`` > ``ram`` (pinned on CUDA) > ``zarr`` when the measured zstd ratio pays
(or only the compressed size fits), else ``mmap`` > ``recompute`` (stay
FreezeOut for this boundary, also chosen when reading one epoch's worth of the
cache from disk would take longer than computing the prefix).

Budgets: an explicit ``--max-ram/--max-gpu-mem/--max-disk`` is a *ledger*: the
governor records what each live cache holds per tier and a new cache gets
only what is left. A zarr cache is admitted *and* charged at its compressed
size (estimated from the probe's ratio); once its views and its test cache are
written the feed charges what they take on disk, measured, and a disk writer
stops (``DiskBudgetError``: the boundary is abandoned) before a chunk would
take it past what the budget left it. A forced ``--cache-tier`` obeys the
budgets too: over budget, the boundary is recomputed and the reason says so. Without one, the budget is read from the machine (half of
available host RAM, 80 % of free GPU memory less 1 GiB, 90 % of free disk
less 1 GiB); the caches already held are reflected in those readings.
:meth:`Governor.pressure_on` is checked every epoch; under pressure the
materializer spills caches to a lower tier instead of risking the OOM killer.
An allocation that fails anyway (:meth:`Governor.allocation_failed`) teaches
the governor that the tier cannot hold a cache that size: it is not offered
again for one, and the boundary goes to the next tier down.

Dtype (``--cache-dtype auto``): a boundary is stored in 16 bits unless an 8-bit
encoding whose relative error the probe measured at most ``LOSSY_MAX_REL_ERROR``
(``store/encoding.py``) reaches a better tier: RAM instead of disk, disk instead
of recomputing. The decision's reason names the error and the 16-bit tier.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from prefast.costmodel import StageCost, prefix_seconds
from prefast.store import encoding
from prefast.store.device import is_accelerator, memory_info

log = logging.getLogger("prefast.governor")
GIB = 2**30
MIB = 2**20
DISK_READ_BW = {"mmap": 1.5e9, "zarr": 1.0e9}  # bytes/s, logical; DESIGN.md §5 measurements
ZSTD_PAYS = 1.10  # the store's own codec threshold (store.disk_writer.ZSTD_MIN_RATIO)
FORCEABLE = ("auto", "gpu", "ram", "mmap", "zarr")
LEVEL = {"gpu": 0, "ram": 1, "mmap": 2, "zarr": 2, "recompute": 3}  # preference, best first
# --cache-dtype auto takes an 8-bit encoding (for a better tier) only below this relative
# reconstruction error, measured on 16 rows of the probe's batch at the start of the run:
# int8 measures 0.1-0.7% on the benchmarks' boundaries, float8 1.8-2.7%, so in practice
# auto's 8-bit choice is int8; its accuracy cost: benchmarks/results/cache_dtype.md.
LOSSY_MAX_REL_ERROR = 0.01


@dataclass(frozen=True)
class Budgets:
    """What the caches may use; ``None`` = read the machine's free memory or disk."""

    cache_dir: Path
    max_ram: int | None = None
    max_gpu_mem: int | None = None
    max_disk: int | None = None
    tier: str = "auto"  # a tier forced by --cache-tier
    share: int = 1  # processes on this node splitting host RAM and disk (LOCAL_WORLD_SIZE)

    def __post_init__(self) -> None:
        if self.tier not in FORCEABLE:
            raise ValueError(f"tier {self.tier!r}: choose one of {FORCEABLE}")


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


class Governor:
    def __init__(self, budgets: Budgets, device: torch.device):
        self.budgets = budgets
        self.device = device
        self.ledger: dict[str, tuple[str, int]] = {}  # cache name -> (tier, bytes)
        self.peak = 0  # most bytes the live caches held at once, all tiers
        self.limits: dict[str, int] = {}  # tier -> largest cache it may still be offered

    # -- the ledger -----------------------------------------------------------------------
    def hold(self, name: str, tier: str, nbytes: int) -> None:
        """Record that cache ``name`` holds ``nbytes`` in ``tier`` (replaces any entry)."""
        self.ledger[name] = (tier, int(nbytes))
        self.peak = max(self.peak, sum(b for _, b in self.ledger.values()))

    def release(self, name: str) -> None:
        tier, _ = self.ledger.pop(name, (None, 0))
        if tier is not None:  # memory came back: the tier may hold what it refused before
            self.limits.pop(tier, None)

    def allocation_failed(self, tier: str, nbytes: int) -> None:
        """``tier``'s allocator refused ``nbytes``: offer it only smaller caches from now on."""
        self.limits[tier] = min(self.limits.get(tier, nbytes), nbytes) - 1

    def used(self, tier: str) -> int:
        disk = tier in ("mmap", "zarr")
        return sum(
            b for t, b in self.ledger.values() if t == tier or (disk and t in ("mmap", "zarr"))
        )

    # -- what is left ---------------------------------------------------------------------
    def host_available(self) -> int:
        return int(psutil.virtual_memory().available)

    def gpu_free(self) -> int:
        """Free memory of the training device (0 when it cannot be read)."""
        info = memory_info(self.device)
        return info[0] if info is not None else 0

    def disk_free(self) -> int:
        probe = Path(self.budgets.cache_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return int(shutil.disk_usage(probe).free)

    def room(self, tier: str) -> int:
        """Bytes a new cache may take in ``tier`` now (this process's share of the node)."""
        room = self._room(tier) if tier == "gpu" else self._room(tier) // self.budgets.share
        return min(room, self.limits.get(tier, room))

    def _room(self, tier: str) -> int:
        b = self.budgets
        if tier == "gpu":
            if not is_accelerator(self.device):
                return 0
            if b.max_gpu_mem is not None:
                return b.max_gpu_mem - self.used("gpu")
            return max(0, int(self.gpu_free() * 0.8) - GIB)
        if tier == "ram":
            if b.max_ram is not None:
                return b.max_ram - self.used("ram") * b.share
            return self.host_available() // 2
        if b.max_disk is not None:
            return b.max_disk - self.used("zarr") * b.share
        return max(0, int(self.disk_free() * 0.9) - GIB)

    def ram_budget(self) -> int:
        """The host RAM budget as a whole (also bounds the disk readers' shuffle buffer)."""
        if self.budgets.max_ram is not None:
            return self.budgets.max_ram // self.budgets.share
        return self._room("ram") // self.budgets.share  # a failed cache allocation aside

    def report(self) -> dict[str, int]:
        return {"ram": self.room("ram"), "gpu": self.room("gpu"), "disk": self.room("disk")}

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
    ) -> Decision:
        """Tier for a boundary of ``views`` training views of ``view_bytes`` plus the test set.

        ``prefix_epoch_s`` is the measured time to compute the frozen prefix for
        one epoch (training and test set); an epoch reads one view plus the
        test set, so that is what a disk tier must read faster than computing.
        ``compress_ratio`` is the measured zstd-1 ratio of the boundary's output.
        ``below``: only tiers after this one (its allocation just failed).
        """
        total = views * view_bytes + test_bytes
        forced = self.budgets.tier

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
                    f"forced --cache-tier {forced}, but {_mib(need)} exceeds what is left "
                    f"of its budget ({_mib(room)})",
                )
            return held(forced, f"forced by --cache-tier {forced}")
        gpu = self.room("gpu") if offered("gpu") else 0
        ram = self.room("ram") if offered("ram") else 0
        disk = self.room("disk") if offered("mmap") else 0
        if total <= gpu:
            return held("gpu", f"{_mib(total)} fits the GPU budget ({_mib(gpu)} left)")
        if total <= ram:
            why = "no GPU" if not is_accelerator(self.device) else "over the GPU budget"
            if below == "gpu":
                why = "the GPU could not allocate it"
            return held("ram", f"{_mib(total)}, {why}; fits the RAM budget ({_mib(ram)} left)")
        pays = compress_ratio >= ZSTD_PAYS
        tier = "zarr" if pays or total > disk else "mmap"
        on_disk = total / compress_ratio if tier == "zarr" and pays else total
        if on_disk > disk:
            return Decision(
                "recompute",
                total,
                f"{_mib(total)} ({_mib(on_disk)} on disk) exceeds the RAM ({_mib(ram)} left) "
                f"and disk ({_mib(disk)} left) budgets",
            )
        read_s = (view_bytes + test_bytes) / DISK_READ_BW[tier]
        if read_s >= prefix_epoch_s > 0:
            return Decision(
                "recompute",
                total,
                f"reading {_mib(view_bytes + test_bytes)} per epoch from {tier} "
                f"({read_s:.1f}s) is slower than computing the prefix ({prefix_epoch_s:.1f}s)",
            )
        codec = f"zstd ratio {compress_ratio:.2f}" + (" pays" if pays else " does not pay")
        return held(
            tier,
            f"{_mib(total)} ({_mib(on_disk)} on disk) exceeds the RAM budget ({_mib(ram)} left); "
            f"{codec}; {tier} on disk reads an epoch in ~{read_s:.1f}s vs {prefix_epoch_s:.1f}s "
            "to compute",
        )

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
    ) -> Decision:
        """:meth:`choose` for the boundary before ``stage``, from the probe's costs.

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
            decision = self._decide(n_train, views, n_test, prefix_s, cost.ratio(d), below)
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
        return self._log(best)

    def lower_tiers(self, nbytes: int, below: str, compress_ratio: float) -> list[str]:
        """Tiers after ``below`` with room for a cache of ``nbytes``, best first: where a
        cache goes under pressure (spill) or when its tier could not allocate it."""
        found = []
        if below == "gpu" and nbytes <= self.room("ram") and not self.pressure_on("ram"):
            found.append("ram")
        disk = "zarr" if compress_ratio >= ZSTD_PAYS else "mmap"
        on_disk = nbytes / compress_ratio if disk == "zarr" else nbytes
        if LEVEL[below] < LEVEL[disk] and on_disk <= self.room("disk"):
            found.append(disk)
        return found

    def pressure_on(self, tier: str) -> bool:
        """True when ``tier`` is nearly exhausted: time to spill its caches."""
        if tier == "ram":
            vm = psutil.virtual_memory()
            over = self.budgets.max_ram is not None and self.used("ram") > self.ram_budget()
            return over or self.host_available() < max(GIB // 2, int(0.05 * vm.total))
        info = memory_info(self.device) if tier == "gpu" else None
        if info is not None:
            free, total = info
            return free < max(GIB // 2, int(0.05 * total))
        return False

    def _log(self, d: Decision) -> Decision:
        log.info("governor: %s%s (%s)", d.tier, f" in {d.dtype}" if d.dtype else "", d.reason)
        return d
