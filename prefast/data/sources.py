"""Where training batches come from: the feed protocol and the raw-data feed.

A feed yields :class:`Batch` objects whose ``x`` is the input of stage
``start``. The trainer runs ``model(x, start=batch.start)`` and nothing else:
for the raw feed ``start = 0``; the prefast feed (``prefast/caching/materialize.py``)
computes or reads the frozen prefix itself and sets ``start`` at a boundary.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from prefast.data.augment import AugmentParams, augment
from prefast.data.datasets import TensorImageDataset
from prefast.store.device import to_device
from prefast.store.order import (
    batch_slices,
    epoch_order,
    order_seed,
    shard_rows,
    test_rows,
    unseen,
)


@dataclass
class Batch:
    """One training or test batch. Bookkeeping (``ids``, ``labels``) is on the host,
    always; what the model and the loss read (``x``, ``y``) is on the training device."""

    x: torch.Tensor  # input of stage `start`, on the training device
    y: torch.Tensor  # (B,) int64 labels, on the training device (for the loss)
    ids: torch.Tensor  # (B,) int64 sample ids (rows of the dataset split), on the host
    labels: torch.Tensor  # (B,) int64 labels on the host: what a cache writer stores
    start: int = 0
    cached: bool = False  # read from an activation cache (for the epoch record)
    # The augmentation stream the samples were drawn with (``RawSource.train_batches``'s
    # ``view``; for a cached batch, that of the view it came from). None: not augmented.
    stream: int | None = None
    # Manifold Mixup (``--feature-augment mix``): each sample's partner label and its own
    # weight lam, on the device; the loss is lam * CE(y) + (1 - lam) * CE(partner label).
    mix: tuple[torch.Tensor, torch.Tensor] | None = None


def batch_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy against the batch's labels, or against both labels of a mixed
    batch, each sample weighted by its own lam."""
    if batch.mix is None:
        return F.cross_entropy(logits, batch.y)
    partner, lam = batch.mix
    own = F.cross_entropy(logits, batch.y, reduction="none")
    other = F.cross_entropy(logits, partner, reduction="none")
    return (lam * own + (1 - lam) * other).mean()


# A generator, not just an iterator: the trainer closes it, so a feed's `finally`
# (aborting a writer, stopping a loader thread) runs even when a step raises.
BatchStream = Generator[Batch, None, None]


class Feed(Protocol):
    """What the trainer needs from a source of batches, for one run."""

    @property
    def batches_per_epoch(self) -> int: ...

    def begin_epoch(self, epoch: int, frozen_prefix: int) -> None:
        """Called after the schedule froze this epoch's first stages."""

    def train_batches(self, epoch: int) -> BatchStream:
        """Exactly ``batches_per_epoch`` batches, every sample once."""

    def end_epoch(self, epoch: int) -> None:
        """The epoch's batches are consumed (before evaluation)."""

    def input_fault(self) -> str | None:
        """Why this epoch's batches held NaN or inf, where the feed knows (the training loss
        diverged: the trainer names this instead of the learning rate); None otherwise."""

    def test_batches(self) -> BatchStream:
        """The test set, in order, every sample once."""

    def take_epoch_stats(self) -> dict[str, Any]:
        """Fields of the epoch record since the last call (after evaluation)."""

    def close(self) -> None:
        """Release threads, locks and caches; idempotent."""

    def report(self) -> dict[str, Any]:
        """Fields of the run record's ``final`` section."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps for a resumed run (picklable; {} when nothing)."""


class RawSource:
    """Batches of raw data, every sample once per epoch in the (seed, epoch) order.

    Also the whole feed of the baseline and freezeout modes (no per-epoch
    state); the prefast feed reads it for anything its caches do not hold.
    Subclasses: :class:`TensorSource` (in-memory built-in sets) and
    ``LoaderSource`` (any map-style Dataset, through a DataLoader).
    """

    name: str
    identity: str  # changes whenever the data (or its transform) changes: part of cache keys
    batch_size: int
    seed: int
    device: torch.device
    rank: int = 0
    world: int = 1

    def set_shards(self, n_train: int, n_test: int, rank: int, world: int) -> None:
        """This rank's rows for the whole run (all of them in a single process).

        A batch's ``ids`` are *positions* in the rank's shard (with one process:
        dataset rows); caches store those, so each rank's cache holds its shard only.
        """
        self.rank, self.world = rank, world
        self.shard = shard_rows(n_train, self.seed, rank, world)
        self.test_shard = test_rows(n_test, rank, world)
        self.order_seed = order_seed(self.seed, rank, world)

    @property
    def num_train(self) -> int:
        return len(self.shard)

    @property
    def num_test(self) -> int:
        return len(self.test_shard)

    @property
    def batches_per_epoch(self) -> int:
        return len(batch_slices(self.num_train, self.batch_size))

    def order(self, epoch: int, seen: np.ndarray | None) -> tuple[np.ndarray, int]:
        """The epoch's order (shard positions) without the ``seen`` ones, and how many
        batches were served."""
        order = unseen(epoch_order(self.order_seed, epoch, self.num_train), seen)
        return order, (self.num_train - len(order)) // self.batch_size

    def train_batches(
        self, epoch: int, view: int | None = None, seen: np.ndarray | None = None
    ) -> BatchStream:
        """One epoch in the shared (seed, epoch) order, without the ``seen`` samples.

        After a fault mid-epoch the prefast feed asks for the rest this way: when
        everything served so far was a prefix of the order, the rest continues
        batch for batch as if nothing had happened. The seconds spent waiting for
        each batch add up in :attr:`data_s`.
        """
        return self._timed(self._train_batches(epoch, view, seen))

    def _train_batches(self, epoch: int, view: int | None, seen: np.ndarray | None) -> BatchStream:
        raise NotImplementedError

    # Seconds the trainer waited for raw training batches since the epoch began: file
    # reads, decode and transform (or a DataLoader's workers falling behind), the copy to
    # the device. Measured around each ``next()``, so it is the wait the step saw, not
    # the work the workers did in parallel with it.
    data_s: float = 0.0

    def _timed(self, batches: BatchStream) -> BatchStream:
        try:
            while True:
                t = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    self.data_s += time.perf_counter() - t
                yield batch
        finally:
            batches.close()  # a closed epoch stops its loader too

    def test_batches(self, first_row: int = 0) -> BatchStream:
        """The test set in row order from ``first_row`` (a multiple of the batch size)."""
        raise NotImplementedError

    # -- the rest of the feed protocol: raw data has no per-epoch state ------------------
    def begin_epoch(self, epoch: int, frozen_prefix: int) -> None:
        self.data_s = 0.0

    def end_epoch(self, epoch: int) -> None:
        pass

    def input_fault(self) -> str | None:
        return None  # raw data: what the model makes of it is the trainer's question

    def take_epoch_stats(self) -> dict[str, Any]:
        return {
            "cache_tier": None,
            "cache_stage": None,
            "cached_batches": 0,
            "write_s": 0.0,
            "read_s": 0.0,
            "data_s": self.data_s,
        }

    def close(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}


class TensorSource(RawSource):
    """Batches from in-memory splits, normalized and augmented on the training device."""

    def __init__(
        self,
        train: TensorImageDataset,
        test: TensorImageDataset,
        batch_size: int,
        seed: int,
        augment: str,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ):
        self.train_labels, self.test_labels = train.y, test.y  # host copies: cache bookkeeping
        self.train, self.test = train.to(device), test.to(device)
        self.norm = train.norm
        self.name = train.name
        digest = hashlib.sha256(f"{train.identity}/{test.identity}".encode())
        self.identity = digest.hexdigest()[:16]
        self.batch_size, self.seed, self.augment, self.device = batch_size, seed, augment, device
        self.set_shards(len(train), len(test), rank, world)

    def _train_batches(self, epoch: int, view: int | None, seen: np.ndarray | None) -> BatchStream:
        """``view`` is the augmentation stream (by default the epoch): each sample's crop
        and flip are a function of (seed, stream, sample) only (``AugmentParams``), so a
        cached view written with stream ``s`` is reproduced exactly from raw data, in any
        order, by passing ``view=s``."""
        order, _ = self.order(epoch, seen)
        stream = epoch if view is None else view
        rows_np = self.shard[order]  # dataset rows, in visit order
        rows_host = torch.from_numpy(rows_np)
        rows_dev = to_device(rows_host, self.device)  # the epoch's order crosses once
        params = None
        if self.augment == "standard":
            params = AugmentParams.draw(
                self.seed, stream, len(self.train), self.train.x.shape[-1], self.train.flip
            )
        for sl in batch_slices(len(order), self.batch_size):
            rows = rows_dev[sl]
            x = self.norm(self.train.x[rows])
            if params is not None:
                x = augment(x, rows_np[sl], params)
            ids = torch.from_numpy(order[sl])  # shard positions
            yield Batch(
                x,
                self.train.y[rows],
                ids,
                self.train_labels[rows_host[sl]],
                0,
                stream=stream if params is not None else None,
            )

    def test_batches(self, first_row: int = 0) -> BatchStream:
        # Evaluate at the training batch size: the cost model times that size, and on
        # CPU a DenseNet at batch 512 costs ~3.7x more per sample than at 64.
        base = int(self.test_shard[0]) if self.num_test else 0  # a contiguous block of rows
        for sl in batch_slices(self.num_test, self.batch_size):
            if sl.start < first_row:
                continue
            rows = slice(base + sl.start, base + sl.stop)
            ids = torch.arange(sl.start, sl.stop)
            x, y = self.norm(self.test.x[rows]), self.test.y[rows]
            yield Batch(x, y, ids, self.test_labels[rows], 0)


def data_share(epochs: list[dict]) -> float:
    """The share of training time the step spent waiting for raw data (``data_s`` over
    ``train_s``, summed over the epochs)."""
    train_s = sum(e["train_s"] for e in epochs)
    return sum(e.get("data_s", 0.0) for e in epochs) / train_s if train_s > 0 else 0.0
