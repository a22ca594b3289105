"""Any map-style torch Dataset as a raw source, through a DataLoader.

Batches come from a ``torch.utils.data.DataLoader`` whose batch sampler draws
the same (seed, epoch) order as every other source, so the modes stay
comparable; ``workers`` processes decode and transform in parallel
(persistent across epochs), with pinned memory on CUDA. The dataset's own
transform is its augmentation: nothing is added here, but each training item's
torch randomness is seeded from (seed, stream, row) (:class:`SeededItems`), so a
sample's augmentation in a stream does not depend on the order, the batch size,
the worker count or the rank, and a cached augmented view can be reproduced
from raw data (after a fault, on resume). Once a prefast
boundary is cached, this loader is not iterated for the cached part at all:
no decode, no transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from prefast.data.sources import Batch, BatchStream, RawSource
from prefast.errors import ConfigError
from prefast.store.device import pins_host_memory, to_device
from prefast.store.order import batch_slices

log = logging.getLogger("prefast.data.datasets")


def default_workers() -> int:
    """DataLoader worker processes when --workers is not given: a core is left for training."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class BatchOrder(torch.utils.data.Sampler[list]):
    """The batches of one pass, set before each pass (the DataLoader keeps this object)."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def set(self, rows: np.ndarray, batch_size: int, stream: int | None = None) -> None:
        """``stream``: the items are ``(row, stream)`` keys of :class:`SeededItems`."""
        keys = rows.tolist() if stream is None else [(r, stream) for r in rows.tolist()]
        self.batches = [keys[sl] for sl in batch_slices(len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)


def sample_seed(seed: int, stream: int, row: int) -> int:
    digest = hashlib.blake2b(repr((seed, stream, row)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeededItems(Dataset):
    """``ds``, where item ``(row, stream)`` is ``ds[row]`` drawn with torch's default
    generator (what torchvision's random transforms draw from) seeded from (seed,
    stream, row), and restored afterwards (with ``--workers 0`` this runs in the
    training process). A plain ``row`` is read as is (the test set: no augmentation).
    Transforms that draw from Python's or numpy's global RNG are not covered: their
    views are not reproducible sample by sample. (~10 us per item: seeding all three
    RNGs and restoring them measured ~0.9 ms.)"""

    def __init__(self, ds: Dataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> object:
        if not isinstance(key, tuple):
            return self.ds[key]
        row, stream = key
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(sample_seed(self.seed, stream, row))
        try:
            return self.ds[row]
        finally:
            gen.set_state(saved)


class LoaderSource(RawSource):
    def __init__(
        self,
        train: Dataset,
        test: Dataset,
        batch_size: int,
        seed: int,
        device: torch.device,
        workers: int | None = None,
        data_id: str | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        for split, ds in (("train_data", train), ("test_data", test)):
            if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
                raise ConfigError(
                    f"{split} must be a map-style torch Dataset (with __len__ and __getitem__ "
                    f"returning (tensor, int)); got {type(ds).__name__}"
                )
        self.train_ds, self.test_ds = train, test
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.workers = default_workers() if workers is None else workers
        root = getattr(train, "root", None)  # an image folder's path says which data it is
        self.name = data_id or " ".join(str(s) for s in (type(train).__name__, root) if s)
        self.identity = (
            hashlib.sha256(f"user:{data_id}".encode()).hexdigest()[:16]
            if data_id
            else hashlib.sha256(
                f"{data_identity(train)}/{data_identity(test)}".encode()
            ).hexdigest()[:16]
        )
        self.set_shards(len(train), len(test), rank, world)  # type: ignore[arg-type]
        self.train_order, self.test_order = BatchOrder(), BatchOrder()
        self.train_loader = self._loader(SeededItems(train, seed), self.train_order)
        self.test_loader = self._loader(test, self.test_order)

    def close(self) -> None:
        """Stop the persistent worker processes now. Left to the garbage collector, a
        loader in a reference cycle can lose its queues' feeder threads before it tells
        its workers to stop, and then waits 5 s per worker before killing them (20 s
        with two workers and two loaders)."""
        for loader in (self.train_loader, self.test_loader):
            workers = loader._iterator  # PyTorch keeps a persistent iterator here
            loader._iterator = None
            if workers is not None:
                workers._shutdown_workers()  # type: ignore[attr-defined]

    def _loader(self, ds: Dataset, order: BatchOrder) -> DataLoader:
        return DataLoader(
            ds,
            batch_sampler=order,
            num_workers=self.workers,
            pin_memory=pins_host_memory(self.device),  # PyTorch's pin thread: async copies
            persistent_workers=self.workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _train_batches(self, epoch: int, view: int | None, seen: np.ndarray | None) -> BatchStream:
        order, _ = self.order(epoch, seen)
        stream = epoch if view is None else view
        self.train_order.set(self.shard[order], self.batch_size, stream)
        yield from self._batches(self.train_loader, order, stream)

    def test_batches(self, first_row: int = 0) -> BatchStream:
        positions = np.arange(first_row, self.num_test)
        self.test_order.set(self.test_shard[positions], self.batch_size)
        yield from self._batches(self.test_loader, positions)

    def _batches(
        self, loader: DataLoader, positions: np.ndarray, stream: int | None = None
    ) -> BatchStream:
        # The loader keeps the sampler's order: batch i holds the rows of positions' slice i.
        slices = batch_slices(len(positions), self.batch_size)
        for sl, item in zip(slices, loader, strict=True):
            ids = positions[sl]
            x, y = _split_item(item)
            labels = torch.as_tensor(y, dtype=torch.int64)
            yield Batch(
                to_device(x, self.device),
                to_device(labels, self.device),
                torch.from_numpy(ids.astype(np.int64)),
                labels,
                0,
                stream=stream,
            )


def _split_item(item: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        return item[0], item[1]
    raise ConfigError(
        "a dataset item must be (tensor, int) (the image and its class); got a batch of "
        f"{type(item).__name__}: wrap the dataset so __getitem__ returns (x, label)"
    )


def data_identity(ds: Dataset) -> str:
    """A digest that changes when the data changes: size, classes, files or sampled items.

    ImageFolder-like datasets digest their file list (path, size, mtime) and
    transform; a ``Subset`` its indices and its dataset; anything else the
    bytes of 16 evenly spaced items, drawn with torch's RNG fixed so random
    transforms give the same items. Pass ``data_id=`` to name the data yourself.
    """
    h = hashlib.sha256(f"{type(ds).__name__}:{len(ds)}".encode())  # type: ignore[arg-type]
    classes = getattr(ds, "classes", None)
    if classes is not None:
        h.update(json.dumps([str(c) for c in classes]).encode())
    if isinstance(ds, Subset):
        h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        h.update(data_identity(ds.dataset).encode())
        return h.hexdigest()[:16]
    samples = getattr(ds, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        for path, target in samples:
            st = os.stat(path)
            h.update(f"{path}|{target}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(repr(getattr(ds, "transform", None)).encode())
        return h.hexdigest()[:16]
    if isinstance(ds, TensorDataset):
        for t in ds.tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t[:: max(1, len(t) // 512)].cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    n = len(ds)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in np.linspace(0, n - 1, num=min(16, n)).astype(int):
            x, y = _split_item(ds[int(i)])
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
    return h.hexdigest()[:16]
