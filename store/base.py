"""The one small interface every tier implements, and dtype conversions.

A cache holds ``rows`` activations of one shape in write order, plus each
row's label and sample id. Writers take torch batches in visit order; readers
serve batches either in an exact seeded order (RAM-speed tiers) or in a
chunk-shuffled order (compressed disk, where random row reads are slow).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch

from .encoding import DTYPES, describe, encode, numpy_dtype, stored_shape
from .encoding import row_bytes as encoded_row_bytes
from .errors import ConfigError
from .order import batch_slices, epoch_order

TIERS = ("gpu", "ram", "mmap", "zarr")
# The largest chunk: one chunk is one disk read. A cold shuffled epoch of 32 MiB
# chunks read 1.1-1.8x faster than of 4 MiB ones (the mmap tier with 2 MiB page
# faults, and Zarr's uncompressed chunk files read with os.preadv), and alike for
# zstd (benchmarks/results/chunk_size.md); 32 MiB also means 8x fewer files.
# A run with a small RAM budget writes smaller chunks (``chunk_bytes_for``) so its
# shuffle window still holds several. Module-level so a test can shrink it.
CHUNK_BYTES = 32 * 2**20
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # a disk reader's default shuffle buffer

# (activations, labels, ids); activations as stored (``encoding.py``), in the tier's torch dtype.
TorchBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def checksum(a: np.ndarray) -> int:
    """crc32c of an array's bytes (C order), without copying a contiguous array."""
    return int(crc32c.crc32c(np.ascontiguousarray(a).data))


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations, or rows already stored, -> numpy stored rows (bf16 as uint16 bits)."""
    t = encode(t, dtype)
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    out = t.cpu().contiguous().numpy()
    return out.view(np.uint16) if dtype == "bfloat16" else out


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@dataclass
class CacheSpec:
    """What a writer needs to know before the first row arrives."""

    key: str
    rows: int
    shape: tuple[int, ...]  # per row, e.g. (C, H, W)
    dtype: str = "float16"  # an encoding (``DTYPES``)
    attrs: dict[str, Any] = field(default_factory=dict)  # recorded metadata
    chunk_bytes: int = field(default_factory=lambda: CHUNK_BYTES)  # a disk chunk's target size

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"cache dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.rows < 1:
            raise ConfigError(f"a cache needs at least one row, got rows={self.rows}")
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """One stored row: the activation's shape, or one byte string (8-bit rows)."""
        return stored_shape(self.shape, self.dtype)

    @property
    def storage(self) -> type[np.generic]:
        """The numpy dtype of stored rows."""
        return numpy_dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return encoded_row_bytes(self.shape, self.dtype)

    @property
    def logical_bytes(self) -> int:
        return self.rows * self.row_bytes

    def chunk_rows(self) -> int:
        """Rows per chunk so a chunk is about ``chunk_bytes``."""
        return max(1, min(self.rows, self.chunk_bytes // max(1, self.row_bytes)))


def cache_attrs(spec: CacheSpec, tier: str, codec: str, ratio: float | None) -> dict:
    """What a disk cache records about itself (its Zarr group's attributes): the spec, the
    encoding's recipe (so zarr-python users can decode it), codec and library versions."""
    import numcodecs
    import zarr

    return {
        **spec.attrs,
        "key": spec.key,
        "tier": tier,
        "rows": spec.rows,
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "row_bytes": spec.row_bytes,
        **describe(spec.shape, spec.dtype),
        "codec": codec,
        "compression_ratio": ratio,
        "chunk_rows": spec.chunk_rows(),
        "logical_bytes": spec.logical_bytes,
        "created": time.time(),
        "versions": {
            "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__,
            "torch": torch.__version__,
        },
    }


def shuffle_buffer_bytes(ram_budget: int) -> int:
    """A disk reader's shuffle buffer under a RAM budget: a quarter of it, at most 256 MiB."""
    return min(SHUFFLE_BUFFER_BYTES, ram_budget // 4)


def chunk_bytes_for(buffer_bytes: int) -> int:
    """Chunks that let a ``buffer_bytes`` shuffle buffer hold two windows of 4 chunks
    (the one served and the one being read): at least 1 MiB, at most CHUNK_BYTES."""
    return min(CHUNK_BYTES, max(2**20, buffer_bytes // 8))


class Writer(abc.ABC):
    """Append rows in visit order; ``finish()`` makes the cache readable."""

    spec: CacheSpec

    @abc.abstractmethod
    def append(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def finish(self) -> Reader: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written; idempotent."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


class Reader(abc.ABC):
    """Random-access reads plus the per-epoch batch order of its tier."""

    spec: CacheSpec
    tier: str

    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """Sample id of every row (write order)."""

    @abc.abstractmethod
    def read_rows(self, rows: np.ndarray) -> TorchBatch: ...

    def close(self) -> None:  # noqa: B027 - most readers hold nothing
        pass

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, buffer_bytes: int = 0
    ) -> Iterator[TorchBatch]:
        """Every row exactly once, in the shared exact order of (seed, epoch).

        Rows are visited so that sample ids follow ``epoch_order``: the same
        sequence the raw dataset would give, which makes cached training match
        uncached training batch for batch.
        """
        yield from self.exact_batches(seed, epoch, batch_size, self.read_rows)

    def exact_batches(
        self, seed: int, epoch: int, batch_size: int, read: Callable[[np.ndarray], TorchBatch]
    ) -> Iterator[TorchBatch]:
        """Batches of rows in the exact (seed, epoch) order, fetched by ``read``."""
        order = self.rows_in_epoch_order(seed, epoch)
        for sl in batch_slices(len(order), batch_size):
            yield read(order[sl])

    def rows_in_epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        ids = self.ids()
        row_of_id = np.empty(len(ids), dtype=np.int64)
        row_of_id[ids] = np.arange(len(ids))
        return row_of_id[epoch_order(seed, epoch, len(ids))]
