"""What the caches may use and what they hold: budgets, the ledger, memory pressure.

The governor (``governor.py``) decides where a boundary goes; this module keeps
the books it decides against. An explicit ``--max-ram/--max-gpu-mem/--max-disk``
is a *ledger*: every live cache's tier and bytes are recorded and a new cache
gets only what is left. Without one, what is left is read from the machine
(half of available host RAM, 80 % of free GPU memory less 1 GiB, 90 % of free
disk less 1 GiB); the caches already held are reflected in those readings.
Processes that share a node (``LOCAL_WORLD_SIZE``) split host RAM and disk.

Apart from the decisions because it changes for other reasons: how memory is
read (cgroup limits, another accelerator, a shared node), not which tier pays.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from prefast.config import TrainConfig, resolved_cache_dir
from prefast.store.device import is_accelerator, memory_info

GIB = 2**30
OBJECT_STORE_ROOM = 2**50  # what an s3:// cache dir may hold without --max-disk: a PiB
FORCEABLE = ("auto", "gpu", "ram", "mmap", "zarr")


@dataclass(frozen=True)
class Budgets:
    """What the caches may use; ``None`` = read the machine's free memory or disk."""

    cache_dir: Path | str  # a local directory, or an s3:// prefix (no disk of ours to fill)
    max_ram: int | None = None
    max_gpu_mem: int | None = None
    max_disk: int | None = None
    tier: str = "auto"  # a tier forced by --cache-tier
    share: int = 1  # processes on this node splitting host RAM and disk (LOCAL_WORLD_SIZE)

    def __post_init__(self) -> None:
        if self.tier not in FORCEABLE:
            raise ValueError(f"tier {self.tier!r}: choose one of {FORCEABLE}")


def budgets_for(cfg: TrainConfig) -> Budgets:
    """What the memory governor may use for this run's caches."""
    return Budgets(
        cache_dir=resolved_cache_dir(cfg.cache_dir),  # a directory, or an s3:// prefix
        max_ram=cfg.max_ram,
        max_gpu_mem=cfg.max_gpu_mem,
        max_disk=cfg.max_disk,
        tier=cfg.cache_tier,
    )


class Ledger:
    """Budgets, what each live cache holds per tier, and the room a new cache has."""

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

    @property
    def remote(self) -> bool:
        """The caches go to an object store: no mmap tier, and no local disk to fill."""
        return isinstance(self.budgets.cache_dir, str)

    def disk_free(self) -> int:
        if self.remote:  # a bucket has no free space to read; --max-disk bounds it
            return OBJECT_STORE_ROOM
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
