"""The Zarr tier's reader: chunk files read directly, zstd decoded off the GIL.

The chunk files our writer produces (raw little-endian bytes or a zstd frame,
then a crc32c trailer) are read and decoded here without zarr's async
machinery; a cache with any other codec pipeline is read through zarr. Chunk
files are *read* (``chunkio.read_into``), never mapped: a bad block or a file
truncated under an open reader is then an ``OSError`` or a short read that the
store sorts (``errors.read_error``: the boundary is corrupted, the epoch goes
on from raw data), where a mapped page would raise SIGBUS and kill the run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePath
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs.bytes import Endian

from .chunkio import read_checking, read_into
from .disk_reader import DiskReader, chunk_file
from .errors import CacheCorruptedError, read_error


class ZarrReader(DiskReader):
    tier = "zarr"

    def _open(self) -> None:
        super()._open()
        try:
            array = self.group["activations"]
        except OSError as exc:
            raise read_error(self.key, "opening the activations array", exc) from exc
        except (KeyError, ValueError) as exc:
            raise CacheCorruptedError(self.key, f"no activations array ({exc})") from exc
        if not isinstance(array, zarr.Array):
            raise CacheCorruptedError(self.key, "'activations' is not an array")
        self.array = array
        missing = self._missing_chunks()
        if missing:
            raise CacheCorruptedError(
                self.key,
                f"{len(missing)} of {self.num_chunks} chunk files are missing "
                f"(first: {chunk_file(PurePath(), self.array, missing[0])})",
            )

        # The codec pipeline our writer uses: raw little-endian bytes, zstd or not, then a
        # crc32c trailer. Such chunk files are read directly; anything else through zarr.
        codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
        names = [type(c).__name__ for c in codecs]
        little = bool(codecs) and getattr(codecs[0], "endian", None) in (None, Endian.little)
        self.codec: str | None = (
            {
                ("BytesCodec", "Crc32cCodec"): "none",
                ("BytesCodec", "ZstdCodec", "Crc32cCodec"): "zstd",
            }.get(tuple(names))
            if little
            else None
        )
        self.zstd = numcodecs.Zstd()
        self._frames = threading.local()  # each loader thread's buffer for zstd frames
        self._checked = threading.local()  # the crc32c of the chunk this thread just read

    def _missing_chunks(self) -> list[int]:
        return [i for i in range(self.num_chunks) if not self.chunk_path(i).is_file()]

    def chunk_path(self, i: int) -> Path:
        return Path(chunk_file(self.dir, self.array, i))

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        """One read of the chunk file: raw bytes (+ 4-byte crc32c) or a zstd frame (+ crc)."""
        if self.codec is None:  # a codec pipeline we did not write: let zarr decode it
            lo = i * self.chunk_rows
            try:
                return np.asarray(self.array[lo : lo + self.chunk_rows])
            except (ValueError, RuntimeError) as exc:
                raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        # zarr stores the last chunk padded to a whole chunk; the marker's crc covers real rows.
        rows = self._rows_of(i)
        full_bytes = self.chunk_rows * self.spec.row_bytes
        full = self._full(buf)
        try:
            fd = os.open(self.chunk_path(i), os.O_RDONLY)
        except FileNotFoundError:
            raise CacheCorruptedError(self.key, f"chunk file of chunk {i} is missing") from None
        # Any other OSError (EIO: an unreadable block) is sorted by DiskReader._load.
        try:
            size = os.fstat(fd).st_size
            if size < 5 or (self.codec == "none" and size != full_bytes + 4):
                raise CacheCorruptedError(
                    self.key, f"chunk {i} has {size} bytes, expected {full_bytes + 4}"
                )
            crc = bytearray(4)  # zarr's own trailer; the marker's crc32c is what we check
            if self.codec == "none":  # straight into the chunk's buffer, checked as it lands
                rows_bytes = rows * self.spec.row_bytes
                dest = full.reshape(-1).view(np.uint8)
                got, self._checked.crc = read_checking(fd, dest, rows_bytes, crc)
                self._checked.chunk = i
            else:
                frame = self._frame(size - 4)
                got = read_into(fd, [frame.data, memoryview(crc)])
        finally:
            os.close(fd)
        if got != size:
            raise CacheCorruptedError(
                self.key, f"chunk {i}: read {got} of its {size} bytes (truncated while read)"
            )
        if self.codec == "zstd":
            try:
                self.zstd.decode(frame, out=full.reshape(-1).view(np.uint8))
            except Exception as exc:  # an undecodable frame
                raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        return full[:rows]

    def _crc_of(self, i: int, chunk: np.ndarray) -> int:
        """Uncompressed chunks are checked while read (``read_checking``), on this thread."""
        if getattr(self._checked, "chunk", None) == i:
            self._checked.chunk = None
            return int(self._checked.crc)
        return super()._crc_of(i, chunk)

    def _frame(self, nbytes: int) -> np.ndarray:
        """This thread's buffer for one zstd frame, grown when a frame is larger."""
        frame = getattr(self._frames, "buf", None)
        if frame is None or len(frame) < nbytes:
            frame = self._frames.buf = np.empty(nbytes, dtype=np.uint8)
        return frame[:nbytes]
