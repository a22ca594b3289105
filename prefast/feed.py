"""Where training batches come from: the raw dataset (baseline, freezeout).

A feed yields :class:`Batch` objects whose ``x`` is the input of stage
``start``: for the raw feed that is the normalized (and augmented) image and
``start = 0``; the prefast feed (``prefast/materialize.py``) yields cached
activations with ``start`` at a stage boundary. The trainer does not care which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from prefast.data import Dataset, Normalizer, augment
from prefast.store.order import batch_slices, epoch_order, rng_for

# Optional hook the trainer calls with each batch's activations at a boundary.
Sink = Callable[[torch.Tensor, "Batch"], None]


@dataclass
class Batch:
    x: torch.Tensor  # input of stage `start`, on the training device
    y: torch.Tensor  # (B,) int64 labels
    ids: torch.Tensor  # (B,) int64 sample ids (rows of the dataset split)
    start: int = 0


class RawFeed:
    """Batches from the in-memory dataset, augmented on the training device."""

    sink: Sink | None = None  # the raw feed never writes a cache
    sink_boundary = 0

    def __init__(self, ds: Dataset, batch_size: int, seed: int, augment: str, device: torch.device):
        self.ds = ds.to(device)
        self.norm = Normalizer(ds.train_x)
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.device = device

    @property
    def num_train(self) -> int:
        return len(self.ds.train_x)

    @property
    def batches_per_epoch(self) -> int:
        return len(batch_slices(self.num_train, self.batch_size))

    def train_batches(
        self, epoch: int, view: int | None = None, skip: np.ndarray | None = None
    ) -> Iterator[Batch]:
        """One epoch in the shared (seed, epoch) order.

        ``view`` fixes the augmentation stream independently of the epoch, so a
        cached augmented view can be reproduced; by default it is the epoch.
        """
        order = torch.from_numpy(epoch_order(self.seed, epoch, self.num_train))
        stream = epoch if view is None else view
        gen = torch.Generator().manual_seed(
            int(rng_for(self.seed, "augment", stream).integers(2**62))
        )
        for sl in batch_slices(len(order), self.batch_size):
            ids = order[sl]
            dev_ids = ids.to(self.device)
            x = self.norm(self.ds.train_x[dev_ids])
            if self.augment == "standard":
                x = augment(x, gen, self.ds.flip)
            yield Batch(x, self.ds.train_y[dev_ids], ids, 0)

    def test_batches(self) -> Iterator[Batch]:
        # Evaluate at the training batch size: the cost model times that size, and on
        # CPU a DenseNet at batch 512 costs ~3.7x more per sample than at 64.
        n = len(self.ds.test_x)
        for sl in batch_slices(n, self.batch_size):
            ids = torch.arange(sl.start, sl.stop)
            yield Batch(self.norm(self.ds.test_x[sl]), self.ds.test_y[sl], ids, 0)

    # The trainer's feed protocol; the raw feed has no per-epoch state.
    def begin_epoch(self, epoch: int, frozen_prefix: int) -> str | None:
        return None

    def end_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass

    def take_io_seconds(self) -> dict[str, float]:
        """Seconds spent on cache I/O since the last call (none for raw data)."""
        return {}
