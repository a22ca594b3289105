"""The ``gpu`` and ``ram`` tiers: one preallocated tensor, exact order.

Preallocating the full (rows, C, H, W) tensor and filling it in place avoids
the original PreFast code's repeated ``torch.cat``, which copies the whole
cache on every batch (quadratic time, twice the memory at the peak).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TORCH_DTYPES, CacheSpec, Reader, TorchBatch, Writer


class MemoryWriter(Writer):
    def __init__(self, spec: CacheSpec, device: torch.device | str = "cpu", pin: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.tier = "gpu" if self.device.type == "cuda" else "ram"
        self.acts: torch.Tensor | None = torch.empty(
            (spec.rows, *spec.shape),
            dtype=TORCH_DTYPES[spec.dtype],
            device=self.device,
            pin_memory=pin and self.device.type == "cpu",
        )
        self.labels = torch.empty(spec.rows, dtype=torch.int64)
        self.row_ids = torch.empty(spec.rows, dtype=torch.int64)
        self.pos = 0

    def append(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        if self.acts is None:
            raise RuntimeError("append() after finish() or abort()")
        n = len(acts)
        if self.pos + n > self.spec.rows:
            raise ValueError(f"cache {self.spec.key} holds {self.spec.rows} rows; got more")
        self.acts[self.pos : self.pos + n].copy_(acts.detach(), non_blocking=True)
        self.labels[self.pos : self.pos + n] = labels.cpu()
        self.row_ids[self.pos : self.pos + n] = ids.cpu()
        self.pos += n

    def finish(self) -> MemoryReader:
        if self.acts is None or self.pos != self.spec.rows:
            raise ValueError(f"cache {self.spec.key}: wrote {self.pos} of {self.spec.rows} rows")
        reader = MemoryReader(self.spec, self.acts, self.labels, self.row_ids, self.tier)
        self.acts = None
        return reader

    def abort(self) -> None:
        self.acts = None


class MemoryReader(Reader):
    def __init__(
        self,
        spec: CacheSpec,
        acts: torch.Tensor,
        labels: torch.Tensor,
        ids: torch.Tensor,
        tier: str,
    ):
        self.spec, self.acts, self.labels, self.row_ids, self.tier = spec, acts, labels, ids, tier

    def ids(self) -> np.ndarray:
        return self.row_ids.numpy()

    def read_rows(self, rows: np.ndarray) -> TorchBatch:
        idx = torch.from_numpy(rows)
        return self.acts[idx.to(self.acts.device)], self.labels[idx], self.row_ids[idx]

    @property
    def nbytes(self) -> int:
        return self.acts.numel() * self.acts.element_size()

    def close(self) -> None:
        # Dropping the reference frees GPU / pinned memory as soon as the loader lets go.
        self.acts = torch.empty(0)
