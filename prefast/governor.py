"""Memory governor: which tier holds each boundary cache, and why.

Order of preference, each taken only if the cache fits its budget:
``gpu`` (under a watermark of free GPU memory) > ``ram`` (pinned on CUDA) >
``mmap`` / ``zarr`` on disk > ``recompute`` (stay FreezeOut for this boundary,
when reading the cache would take longer than computing the prefix).
Between the disk tiers: ``zarr`` when its trial compression pays, else ``mmap``.

Budgets default to safe headroom: half of available host RAM, 80 % of free GPU
memory less 1 GiB, 90 % of free disk less 1 GiB. ``--max-*`` override them.
While training, :meth:`Governor.ram_pressure` is checked every epoch; under
pressure RAM caches are spilled to disk instead of risking the OOM killer.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from prefast.config import TrainConfig, default_cache_dir

log = logging.getLogger("prefast.governor")
GIB = 2**30
DISK_READ_BW = {"mmap": 1.5e9, "zarr": 1.0e9}  # bytes/s, logical; DESIGN.md §5 measurements


@dataclass(frozen=True)
class Decision:
    tier: str  # gpu | ram | mmap | zarr | recompute
    bytes: int
    reason: str


def cache_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """--cache-dtype auto: bfloat16 on CUDA (matches autocast), float16 on CPU."""
    if cfg.cache_dtype != "auto":
        return cfg.cache_dtype
    return "bfloat16" if device.type == "cuda" else "float16"


def cache_views(cfg: TrainConfig) -> int:
    """Augmented views per boundary: without augmentation every view is the same."""
    return cfg.cache_views if cfg.augment == "standard" else 1


def boundary_cache_bytes(
    row_bytes_fp32: int, dtype: str, train_rows: int, views: int, test_rows: int
) -> int:
    """Logical bytes of one boundary: ``views`` training copies plus the test set."""
    per_row = row_bytes_fp32 // 4 * (4 if dtype == "float32" else 2)
    return (train_rows * views + test_rows) * per_row


class Governor:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.used_ram = 0  # bytes of RAM-tier caches we hold
        self.used_gpu = 0

    # -- what the machine has -------------------------------------------------------------
    def ram_budget(self) -> int:
        if self.cfg.max_ram is not None:
            return self.cfg.max_ram
        return psutil.virtual_memory().available // 2

    def gpu_budget(self) -> int:
        if self.device.type != "cuda":
            return 0
        if self.cfg.max_gpu_mem is not None:
            return self.cfg.max_gpu_mem
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(0, int(free * 0.8) - GIB)

    def disk_budget(self) -> int:
        if self.cfg.max_disk is not None:
            return self.cfg.max_disk
        probe = self.cache_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return max(0, int(shutil.disk_usage(probe).free * 0.9) - GIB)

    def budgets(self) -> dict[str, int]:
        return {"ram": self.ram_budget(), "gpu": self.gpu_budget(), "disk": self.disk_budget()}

    # -- decisions ----------------------------------------------------------------------
    def choose(self, nbytes: int, prefix_epoch_s: float, compress_ratio: float = 1.0) -> Decision:
        """Tier for a cache of ``nbytes`` logical bytes.

        ``prefix_epoch_s`` is the measured time to compute the frozen prefix for
        one epoch: if a disk tier cannot read the cache faster, caching loses.
        """
        forced = self.cfg.cache_tier
        if forced != "auto":
            return self._log(Decision(forced, nbytes, f"forced by --cache-tier {forced}"))
        gpu, ram, disk = (
            self.gpu_budget() - self.used_gpu,
            self.ram_budget() - self.used_ram,
            self.disk_budget(),
        )
        mib = nbytes / 2**20
        if nbytes <= gpu:
            return self._log(
                Decision(
                    "gpu", nbytes, f"{mib:.0f} MiB fits the GPU budget ({gpu / 2**20:.0f} MiB free)"
                )
            )
        if nbytes <= ram:
            why = "no GPU" if self.device.type != "cuda" else "over the GPU budget"
            return self._log(
                Decision(
                    "ram",
                    nbytes,
                    f"{mib:.0f} MiB {why}; fits the RAM budget ({ram / 2**20:.0f} MiB)",
                )
            )
        tier = "zarr" if compress_ratio >= 1.1 or nbytes > disk else "mmap"
        on_disk = nbytes / (compress_ratio if tier == "zarr" else 1.0)
        if on_disk > disk:
            return self._log(
                Decision(
                    "recompute",
                    nbytes,
                    f"{mib:.0f} MiB exceeds RAM ({ram / 2**20:.0f} MiB) and disk ({disk / 2**20:.0f} MiB) budgets",
                )
            )
        read_s = nbytes / DISK_READ_BW[tier]
        if read_s >= prefix_epoch_s > 0:
            return self._log(
                Decision(
                    "recompute",
                    nbytes,
                    f"reading {mib:.0f} MiB ({read_s:.1f}s/epoch) is slower than computing the prefix ({prefix_epoch_s:.1f}s/epoch)",
                )
            )
        return self._log(
            Decision(
                tier,
                nbytes,
                f"{mib:.0f} MiB exceeds the RAM budget ({ram / 2**20:.0f} MiB); {tier} on disk reads it in ~{read_s:.1f}s/epoch vs {prefix_epoch_s:.1f}s to compute",
            )
        )

    def ram_pressure(self) -> bool:
        """True when host RAM is nearly exhausted: time to spill RAM caches."""
        vm = psutil.virtual_memory()
        return vm.available < max(GIB // 2, int(0.05 * vm.total))

    def _log(self, d: Decision) -> Decision:
        log.info("governor: %s (%s)", d.tier, d.reason)
        return d
