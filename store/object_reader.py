"""The zarr tier's reader in an object store: the local one with objects for files (the
layout: ``objectstore.py``; the writer: ``object_writer.py``).

Chunk objects hold what the local tier's chunk files hold (raw or zstd bytes, then zarr's
crc32c). Chunks are the local tier's 32 MiB (large objects: one GET per chunk would leave
the connection idle between requests, so each chunk is fetched as ``RANGE_BYTES`` ranges
at once), loaded ahead on the prefetcher's threads as the local tier's are.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import PurePosixPath
from typing import Any

import crc32c
import numpy as np
import zarr
from obstore.exceptions import BaseError

from .disk_reader import chunk_file
from .errors import (
    CacheCorruptedError,
    CacheUnavailableError,
    first_line,
)
from .objectstore import ObjectRoot, named_copy, not_found
from .zarr_reader import ZarrReader

# One ranged GET: a 32 MiB chunk is four in flight at once, as AWS's performance guidelines
# advise (8-16 MB byte ranges in parallel). $PREFAST_S3_RANGE_BYTES sets another size (0:
# one GET per chunk, which a server with a high cost per request may prefer).
RANGE_BYTES = 8 * 2**20


def range_bytes() -> int:
    value = os.environ.get("PREFAST_S3_RANGE_BYTES", "").strip()
    return int(value) if value.isdigit() else RANGE_BYTES


def ranges(size: int) -> tuple[list[int], list[int]]:
    """Pieces of ``range_bytes()`` of an object of ``size`` bytes (the 4-byte trailer joins
    the last piece, never a request of its own)."""
    step = range_bytes() or size
    starts = list(range(0, max(1, size - 4), step))
    ends = [*starts[1:], size]
    return starts, ends


def fetch_ranges(store: Any, name: str, starts: list[int], ends: list[int]) -> list[Any]:
    """The ranges of one object as separate GETs in flight together (``obstore.get_ranges``
    would merge adjacent ranges into one request: one connection's speed per chunk)."""
    import obstore

    async def every() -> list[Any]:
        return await asyncio.gather(*(obstore.get_range_async(store, name, start=s, end=e)
                                      for s, e in zip(starts, ends, strict=True)))  # fmt: skip

    return asyncio.run(every())


class ObjectZarrReader(ZarrReader):
    """Reads the copy the completion record names, chunks as parallel ranged GETs."""

    def _zarr_group(self) -> zarr.Group:
        root = self.object_root
        if self.marker.get("tier") != "zarr":  # the record read once (DiskReader._open)
            raise CacheCorruptedError(
                self.key, f"the completion record names tier {self.marker.get('tier')!r}"
            )
        try:
            self.at = f"{self.key}/{named_copy(self.marker)}"  # one copy, whole
        except ValueError as exc:
            raise CacheCorruptedError(self.key, str(exc)) from None
        try:
            return zarr.open_group(root.zarr_store(self.at, True), mode="r")
        except FileNotFoundError as exc:  # zarr's GroupNotFoundError: no copy there
            raise CacheCorruptedError(
                self.key, f"the copy its completion record names ({self.at}) is missing"
            ) from exc

    @property
    def object_root(self) -> ObjectRoot:
        assert isinstance(self.root, ObjectRoot)
        return self.root

    def _chunk_sizes(self) -> dict[str, int]:
        listed = self.object_root.listing(f"{self.at}/activations/c/")  # chunks, no metadata
        self.sizes = {o["path"]: int(o["size"]) for o in listed}
        return self.sizes

    def _missing_chunks(self) -> list[int]:
        sizes = self._chunk_sizes()
        return [i for i in range(self.num_chunks) if self.chunk_name(i) not in sizes]

    def chunk_name(self, i: int) -> str:
        return str(chunk_file(PurePosixPath(self.at), self.array, i))

    def _open(self) -> None:
        try:
            super()._open()
        except BaseError as exc:  # through zarr, which passes obstore's errors on as they are
            raise CacheUnavailableError(self.key, f"opening it: {first_line(exc)}") from None

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        if self.codec is None:  # through zarr, which reads the object
            try:
                return super()._load_chunk(i, buf)
            except BaseError as exc:
                raise CacheUnavailableError(self.key, f"chunk {i}: {first_line(exc)}") from None
        rows = self._rows_of(i)
        full = self._full(buf)
        name = self.chunk_name(i)
        size = self.sizes.get(name, 0)
        full_bytes = self.chunk_rows * self.spec.row_bytes
        if size < 5 or (self.codec == "none" and size != full_bytes + 4):
            raise CacheCorruptedError(
                self.key, f"chunk {i} has {size} bytes, expected {full_bytes + 4}"
            )
        parts = self._fetch(name, size)
        if self.codec == "none":  # each piece straight into the chunk, checked as it lands
            self._checked.crc = self._land(parts, full.reshape(-1).view(np.uint8), size,
                                           rows * self.spec.row_bytes)  # fmt: skip
            self._checked.chunk = i
        else:
            frame = self._frame(size - 4)
            self._land(parts, frame, size, 0)
            try:
                self.zstd.decode(frame, out=full.reshape(-1).view(np.uint8))
            except Exception as exc:  # an undecodable frame
                raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        return full[:rows]

    @staticmethod
    def _land(
        parts: list[tuple[int, np.ndarray]], dest: np.ndarray, size: int, checked: int
    ) -> int:
        """Copy the object's pieces (its payload: all but the 4-byte trailer) into ``dest``;
        the crc32c of the first ``checked`` bytes, computed piece by piece as each lands
        (while it is in the CPU's cache: one pass over the chunk less, as ``read_checking``)."""
        crc, end = 0, size - 4
        for start, piece in parts:
            stop = min(start + len(piece), end)
            if stop > start:
                dest[start:stop] = piece[: stop - start]
            if start < checked:
                crc = crc32c.crc32c(dest[start : min(stop, checked)].data, crc)
        return crc

    def _fetch(self, name: str, size: int) -> list[tuple[int, np.ndarray]]:
        """The object's bytes as (offset, piece): from the local copy (``--local-cache``)
        when it holds them, else fetched (and copied there)."""
        root = self.object_root
        if root.local is None:
            return self._get_ranges(name, size)
        where = f"{root.prefix}/{name}".strip("/")
        data = root.local.get(root.bucket, where, size)
        if data is None:
            data = np.concatenate([piece for _, piece in self._get_ranges(name, size)])
            root.local.put(root.bucket, where, data)
        return [(0, data)]

    def _get_ranges(self, name: str, size: int) -> list[tuple[int, np.ndarray]]:
        """The object's bytes as (offset, piece), ``RANGE_BYTES`` ranges fetched at once."""
        starts, ends = ranges(size)
        try:
            parts = fetch_ranges(self.object_root.store, name, starts, ends)
        except (BaseError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or not_found(exc):
                raise CacheCorruptedError(self.key, f"chunk object {name} is missing") from None
            raise CacheUnavailableError(self.key, f"reading {name}: {first_line(exc)}") from None
        pieces = []
        for start, end, part in zip(starts, ends, parts, strict=True):
            got = np.frombuffer(memoryview(part), dtype=np.uint8)
            if len(got) != end - start:
                raise CacheCorruptedError(self.key, f"chunk object {name} changed while read")
            pieces.append((start, got))
        return pieces
