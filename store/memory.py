"""The ``gpu`` and ``ram`` tiers: one preallocated tensor, exact order.

``gpu`` holds the activations in the training device's memory; ``ram`` in
(pageable) host memory, whose batches cross to the device through a reader's
pinned staging ring (``store/device.py``). Labels and ids stay on the host in
both. Preallocating the full (rows, C, H, W) tensor and filling it in place
avoids the original PreFast code's repeated ``torch.cat``, which copies the
whole cache on every batch (quadratic time, twice the memory at the peak). An
allocator that refuses the tensor raises :class:`CacheAllocationError`: the
caller takes the next tier.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .base import CacheSpec, Reader, TorchBatch, Writer
from .device import HostCopies, allocate, is_accelerator, to_device
from .encoding import encode, torch_dtype
from .order import batch_slices


def require_host(t: torch.Tensor, what: str) -> torch.Tensor:
    """Labels and ids are host bookkeeping: a device tensor here would cost a sync."""
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a host tensor (got one on {t.device})")
    return t


class MemoryWriter(Writer):
    def __init__(self, spec: CacheSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.tier = "gpu" if is_accelerator(self.device) else "ram"
        self.acts: torch.Tensor | None = allocate(
            (spec.rows, *spec.stored_shape),
            torch_dtype(spec.dtype),
            self.device,
            f"the {self.tier} cache {spec.key[:16]}",
        )
        self.labels = torch.empty(spec.rows, dtype=torch.int64)
        self.row_ids = torch.empty(spec.rows, dtype=torch.int64)
        self.copies = HostCopies()  # device -> host rows of a ram cache written from a GPU
        self.pos = 0

    def append(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        if self.acts is None:
            raise RuntimeError("append() after finish() or abort()")
        n = len(acts)
        if self.pos + n > self.spec.rows:
            raise ValueError(f"cache {self.spec.key} holds {self.spec.rows} rows; got more")
        rows = slice(self.pos, self.pos + n)
        self.labels[rows] = require_host(labels, "labels")
        self.row_ids[rows] = require_host(ids, "ids")
        # Stored rows are copied as they are; activations are encoded first, on their device.
        self.copies.copy(self.acts[rows], encode(acts, self.spec.dtype))
        self.pos += n

    def finish(self) -> MemoryReader:
        if self.acts is None or self.pos != self.spec.rows:
            raise ValueError(f"cache {self.spec.key}: wrote {self.pos} of {self.spec.rows} rows")
        self.copies.wait()  # every row has landed before anyone reads them
        reader = MemoryReader(self.spec, self.acts, self.labels, self.row_ids, self.tier)
        self.acts = None
        return reader

    def abort(self) -> None:
        self.acts = None
        self.copies = HostCopies()


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
        """Rows in the order asked: activations where the cache lives, labels and ids on the host."""
        idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        acts = self.acts.index_select(0, to_device(idx, self.acts.device))
        return acts, self.labels[idx], self.row_ids[idx]

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = 0
    ) -> Iterator[TorchBatch]:
        """The exact (seed, epoch) order; the row indices cross to the device once per epoch."""
        order = torch.from_numpy(self.rows_in_epoch_order(seed, epoch))
        where = to_device(order, self.acts.device)
        for sl in batch_slices(len(order), batch_size):
            rows = order[sl]
            yield self.acts.index_select(0, where[sl]), self.labels[rows], self.row_ids[rows]

    @property
    def nbytes(self) -> int:
        return self.acts.numel() * self.acts.element_size()

    def close(self) -> None:
        # Dropping the reference frees GPU / host memory as soon as the loader lets go.
        self.acts = torch.empty(0)
