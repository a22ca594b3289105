"""The Zarr tier's reader: chunk files read directly, zstd decoded off the GIL.

The chunk files our writer produces (raw little-endian bytes or a zstd frame,
then a crc32c trailer) are mapped and decoded here without zarr's async
machinery; a cache with any other codec pipeline is read through zarr.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs.bytes import Endian

from .chunkio import map_for_reading
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
        missing = [i for i in range(self.num_chunks) if not self.chunk_path(i).is_file()]
        if missing:
            raise CacheCorruptedError(
                self.key,
                f"{len(missing)} of {self.num_chunks} chunk files are missing "
                f"(first: {self.chunk_path(missing[0]).relative_to(self.dir)})",
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
        self._maps: dict[int, mmap.mmap] = {}  # chunk -> its mapped file, while it is in use

    def chunk_path(self, i: int) -> Path:
        return chunk_file(self.dir, self.array, i)

    def _load_chunk(self, i: int, buf: np.ndarray | None) -> np.ndarray:
        """One read of the chunk file: raw bytes (+ 4-byte crc32c) or a zstd frame (+ crc)."""
        if self.codec is None:  # a codec pipeline we did not write: let zarr decode it
            lo = i * self.chunk_rows
            try:
                return np.asarray(self.array[lo : lo + self.chunk_rows])
            except (ValueError, RuntimeError) as exc:
                raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        # zarr stores the last chunk padded to a whole chunk; the marker's crc covers real rows.
        # The file is mapped, not read: a read would copy every byte once more.
        rows = self._rows_of(i)
        full_bytes = self.chunk_rows * self.spec.row_bytes
        try:
            with open(self.chunk_path(i), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 5 or (self.codec == "none" and size != full_bytes + 4):
                    raise CacheCorruptedError(
                        self.key, f"chunk {i} has {size} bytes, expected {full_bytes + 4}"
                    )
                mapped = map_for_reading(f.fileno(), size)
        except FileNotFoundError:
            raise CacheCorruptedError(self.key, f"chunk file of chunk {i} is missing") from None
        # Any other OSError is sorted by DiskReader._load (errors.read_error).
        if self.codec == "none":
            self._maps[i] = mapped  # closed by _release when the chunk leaves the window
            flat = np.frombuffer(
                mapped,
                dtype=self.spec.storage,
                count=full_bytes // self.spec.row_bytes * int(np.prod(self.spec.stored_shape)),
            )
            return flat.reshape(self.chunk_rows, *self.spec.stored_shape)[:rows]
        full = self._full(buf)
        try:
            self.zstd.decode(memoryview(mapped)[: size - 4], out=full.reshape(-1).view(np.uint8))
        except Exception as exc:  # an undecodable frame
            raise CacheCorruptedError(self.key, f"chunk {i} of activations: {exc}") from exc
        finally:
            with contextlib.suppress(BufferError):
                mapped.close()
        return full[:rows]

    def _release(self, i: int, arr: np.ndarray) -> np.ndarray | None:
        mapped = self._maps.pop(i, None)
        if mapped is None:
            return super()._release(i, arr)
        del arr
        with contextlib.suppress(BufferError):  # a view still alive: closed when it is freed
            mapped.close()
        return None
