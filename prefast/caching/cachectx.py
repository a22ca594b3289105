"""What the materializer's parts share: where caches live, how they are keyed,
opened and timed, and the run's log of cache events."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prefast.caching.fits import mend
from prefast.caching.governor import Governor
from prefast.errors import (
    CacheAllocationError,
    CacheCorruptedError,
    CacheError,
    CacheExistsError,
    CacheUnavailableError,
)
from prefast.models import StagedModel
from prefast.store import (
    CacheSpec,
    Reader,
    Writer,
    cache_key,
    encoding,
    open_reader,
    open_writer,
)
from prefast.store.base import chunk_bytes_for, shuffle_buffer_bytes
from prefast.store.device import to_device
from prefast.store.disk_writer import DiskWriter
from prefast.store.errors import read_error
from prefast.store.manage import Root

if TYPE_CHECKING:
    from prefast.config import TrainConfig
    from prefast.data.sources import RawSource

log = logging.getLogger("prefast.caching.materialize")
DISK_TIERS = ("mmap", "zarr")


def cache_identity(cfg: TrainConfig, raw: RawSource, rank: int, world: int) -> dict[str, Any]:
    """What determines a cache's values besides the model: its part of every cache key (the
    feed's, and ``prefast plan``'s, which looks for the caches a run would find)."""
    return {
        "data": raw.identity,
        "data_name": raw.name,
        "augment": cfg.augment,
        "seed": cfg.seed,
        "rank": rank,
        "world": world,
    }


@dataclass
class CacheContext:
    root: Root  # a local directory or an s3:// prefix
    governor: Governor
    model: StagedModel
    device: torch.device
    dtype: str  # the run's cache dtype; a boundary may store another (``--cache-dtype auto``)
    identity: dict[str, Any]  # what else determines the values: data, augmentation, seed
    autocast: bool = False  # the model runs under autocast: feed it the cache dtype as is
    events: list[dict] = field(default_factory=list)
    io_s: dict[str, float] = field(default_factory=lambda: {"write_s": 0.0, "read_s": 0.0})

    def key(
        self,
        split: str,
        stage: int,
        aug_epoch: int | None,
        dtype: str | None = None,
        prefix: str | None = None,
    ) -> str:
        """Content address of a cache: the prefix's weights and everything else that matters.
        ``prefix``: ``model.prefix_digest(stage)`` when the caller has it (hashing ResNet-50's
        weights takes 80 ms; never kept across calls: weights change in ways no counter
        sees, e.g. ``p.data.mul_``)."""
        return cache_key(
            {
                **self.identity,
                "augment": self.identity["augment"] if split == "train" else "none",
                "prefix": prefix or self.model.prefix_digest(stage),
                "split": split,
                "aug_epoch": aug_epoch,
                "boundary": stage,
                "dtype": dtype or self.dtype,
                "model": self.model.name,
            }
        )

    def spec(
        self,
        key: str,
        split: str,
        stage: int,
        rows: int,
        shape: tuple[int, ...],
        dtype: str | None = None,
    ) -> CacheSpec:
        attrs = {
            "model": self.model.name,
            "boundary": stage,
            "split": split,
            "dataset": self.identity["data_name"],
            "augment": self.identity["augment"],
            "seed": self.identity["seed"],
            "rank": self.identity["rank"],
            "world": self.identity["world"],
        }
        # Chunk size follows the RAM budget, so reading the cache back fits it.
        chunk = chunk_bytes_for(shuffle_buffer_bytes(self.governor.ram_budget()))
        return CacheSpec(key, rows, shape, dtype or self.dtype, attrs, chunk_bytes=chunk)

    def writer(self, tier: str, spec: CacheSpec, *, allowance: int | None) -> Writer:
        """A writer, or CacheError/OSError (the caller abandons what it was writing).

        ``allowance``: the bytes a disk writer may put on disk, given by the governor's
        budget (``DiskBudgetError`` before a chunk would pass it); every caller names one,
        so no writer is left uncapped. Memory tiers allocate exactly: None.
        """
        writer = open_writer(tier, spec, self.root, self.device)
        if isinstance(writer, DiskWriter):
            writer.max_bytes = allowance
        return writer

    def reuse(self, tier: str, key: str, epoch: int | None) -> Reader | None:
        """A complete disk cache with this key, or None. A corrupted one is deleted; one that
        cannot be read now (``CacheUnavailableError``: too many open files, ...) is kept and
        the error raised, so the caller tries again later instead of rewriting it."""
        if tier not in DISK_TIERS:
            return None
        try:
            try:
                return self._reuse(key, epoch)
            except OSError as exc:  # anything the store did not sort where it happened
                raise read_error(key, "opening it", exc) from exc
        except CacheUnavailableError as exc:
            self.event(epoch, "unavailable", key=key, detail=str(exc))
            log.warning("cache %s cannot be read now (%s): kept", exc.cache, exc.detail)
            raise
        except CacheCorruptedError as exc:
            exc.root = self.root.path  # the purge hint names this run's --cache-dir
            self.event(epoch, "corrupted", key=key, detail=str(exc))
            log.warning("cache %s is corrupted (%s): rebuilding it", exc.cache, exc.detail)
            with contextlib.suppress(OSError, CacheError):
                self.root.remove(key)
            return None
        except CacheError as exc:  # locked, or gone since we looked
            log.warning("not reusing cache %s: %s", key, exc)
            return None

    def _reuse(self, key: str, epoch: int | None) -> Reader | None:
        if not self.root.is_complete(key):
            return None
        reader = open_reader(self.root, key)
        if self._outgrows_buffer(reader):
            # Written under a larger RAM budget: its chunks do not fit this run's shuffle
            # buffer, so reading it would hold more than --max-ram allows. Rewrite it with
            # this run's chunks (unless another process is reading it: then read it as is).
            reader.close()
            if self.root.remove(key):
                self.event(epoch, "rechunked", key=key, detail="chunks too large for --max-ram")
                log.warning("cache %s: chunks too large for this RAM budget; rewriting it", key)
                return None
            reader = open_reader(self.root, key)
        self.event(epoch, "reused", key=key)
        return reader

    def _outgrows_buffer(self, reader: Reader) -> bool:
        buffer = shuffle_buffer_bytes(self.governor.ram_budget())
        chunk = getattr(reader, "chunk_rows", 0) * reader.spec.row_bytes
        windowed = reader.spec.logical_bytes > buffer  # else the whole cache is read at once
        return windowed and 2 * chunk > buffer and chunk > chunk_bytes_for(buffer)

    def open_view(
        self, tier: str, spec: CacheSpec, epoch: int | None, *, allowance: int | None
    ) -> Reader | Writer:
        """Reuse a complete cache of ``spec.key`` or open a writer for it (``writer``)."""
        reader = self.reuse(tier, spec.key, epoch)
        if reader is not None:
            return reader
        try:
            return self.writer(tier, spec, allowance=allowance)
        except CacheExistsError:  # completed by another process since we looked
            reader = self.reuse(tier, spec.key, epoch)
            if reader is None:
                raise
            return reader

    def event(self, epoch: int | None, name: str, **fields: Any) -> None:
        self.events.append({"epoch": epoch, "event": name, **fields})

    def allocation_refused(
        self, epoch: int | None, tier: str, exc: CacheAllocationError, **fields: Any
    ) -> None:
        """``tier``'s allocator refused a cache: the governor stops offering it caches that
        large, and the run record says so."""
        self.governor.allocation_failed(tier, exc.nbytes)
        self.event(
            epoch, "allocation_failed", **fields, tier=tier, bytes=exc.nbytes, detail=str(exc)
        )

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Count the seconds the trainer waits on cache I/O (``write_s``/``read_s``)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.io_s[kind] += time.perf_counter() - t

    def as_stored(
        self, acts: torch.Tensor, dtype: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``acts`` encoded in ``dtype`` (what the writer stores); decoded again, exactly as
        later epochs will read them back (what the model takes); and ``(2,)`` counts on the
        device that say whether any value overflowed ``dtype`` or is not finite
        (``prefast/caching/fits.py``): the model takes an overflowed value as computed, and a
        cache holding one is never kept.

        Write-through epochs train and evaluate on the decoded rows, so a run gives the
        same numbers whether its caches were written in this run or reused from another.

        The two never share memory: where encoding is a no-op (float32; a 16-bit cache
        under autocast) the stored rows are a copy, queued on the device before the step.
        A disk writer reads them later, on its own thread (on CUDA its copy to the host is
        queued after the step), and a trainable stage that begins with an in-place op
        (``nn.Dropout(inplace=True)``, ``nn.ReLU(inplace=True)``) writes into what it takes.
        """
        stored = encoding.encode(acts, dtype)
        x = self.to_compute(stored, dtype, tuple(acts.shape[1:]))
        signs, x = mend(acts, x, dtype)
        if x is stored:  # every no-op on the way (cast, move, decode, mend) returned its input
            stored = stored.clone()
        return stored, x, signs

    def to_compute(self, stored: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Stored rows -> the device (a no-op when they came through a reader's staging),
        decoded there (8-bit rows), in the dtype the model runs in: float32, or a 16-bit
        cache's own dtype under autocast."""
        acts = encoding.decode(to_device(stored, self.device), dtype, shape)
        return acts if self.autocast else acts.float()
