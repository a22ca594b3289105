"""The mmap tier's writer: raw rows in one file, written on the writer thread."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .disk_writer import DiskWriter


class MmapWriter(DiskWriter):
    """Raw rows in one file; per-chunk crc32c in the marker (checked on read)."""

    tier = "mmap"

    def _open_files(self) -> None:
        self.file = open(self.dir / "activations.bin", "wb")  # noqa: SIM115 - closed in _finalize
        self._set_attrs("none", 1.0)

    def _write_chunk(self, start: int, rows: np.ndarray) -> None:
        self._charge(rows.nbytes)
        self.file.write(np.ascontiguousarray(rows).data)

    def _finalize(self) -> None:
        self.file.close()

    def _stop_io(self, deadline: float | None, then: Callable[[], None]) -> bool:
        if hasattr(self, "file"):  # written on the writer thread, which has ended
            self.file.close()
        return True
