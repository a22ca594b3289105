"""The zarr tier's writer in an object store: the local one with objects for files (the
layout and why it is safe without locks: ``objectstore.py``; the reader: ``object_reader.py``).

Chunk objects hold what the local tier's chunk files hold (raw or zstd bytes, then zarr's
crc32c), so a copy stays a plain Zarr v3 group that ``zarr.storage.ObjectStore`` reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import PurePosixPath

import zarr

from .disk_reader import chunk_file
from .errors import CacheError, CacheWriteError, first_line
from .layout import MARKER
from .objectstore import WRITING, ObjectRoot, writer_prefix
from .zarr_writer import ZarrWriter

log = logging.getLogger("prefast.store")
# Called between the last chunk and the completion record (tests force two writers to race
# there; nothing else sets it).
BEFORE_COMMIT: Callable[[ObjectZarrWriter], None] | None = None


class ObjectZarrWriter(ZarrWriter):
    """Writes one copy under a prefix of its own; completes it with one conditional write."""

    def _create_group(self) -> zarr.Group:
        root = self.object_root
        self.copy = writer_prefix()
        self.at = f"{self.spec.key}/{self.copy}"
        who = {"host": platform.node(), "pid": os.getpid(), "started": time.time()}
        try:
            group = zarr.open_group(root.zarr_store(self.at, False), mode="w", zarr_format=3)
        except Exception as exc:  # obstore's own errors (a read-only key): one line, no body
            raise CacheWriteError(f"cannot write under {root.path}: {first_line(exc)}") from None
        root.put(f"{self.at}/{WRITING}", json.dumps(who).encode())  # after: mode "w" clears
        return group

    @property
    def object_root(self) -> ObjectRoot:
        assert isinstance(self.root, ObjectRoot)
        return self.root

    def _put_chunk(self, i: int, view: memoryview, trailer: bytes) -> None:
        name = chunk_file(PurePosixPath(self.at), self.array, i)
        self.object_root.put(str(name), bytes(view) + trailer)

    def _sync(self) -> None:
        pass  # an object is durable once its PUT returns

    def _commit(self, marker: dict) -> None:
        if BEFORE_COMMIT is not None:
            BEFORE_COMMIT(self)
        root = self.object_root
        record = json.dumps({**marker, "data": self.copy}, indent=1, sort_keys=True).encode()
        # A record already there may be ours: a retried PUT whose first reply was lost.
        if root.put(f"{self.spec.key}/{MARKER}", record, create=True) or self._ours():
            with contextlib.suppress(CacheError):  # a leftover it is; the record is written
                root.delete_under(f"{self.at}/{WRITING}")
            self.won = True
            return
        # Another writer completed the key first: its copy is the cache, ours goes.
        self.won = False
        log.info("cache %s: another process completed it first; reading its copy",
                 self.spec.key[:8])  # fmt: skip
        root.delete_under(f"{self.at}/")

    def _ours(self) -> bool:
        try:
            return self.object_root.marker(self.spec.key).get("data") == self.copy
        except (CacheError, ValueError):
            return False

    def _remove(self) -> None:
        """An aborted copy: ours only (another writer's copy of the key may be the cache),
        and the record first if it names ours (a commit that landed after ``finish`` gave
        up on it): a record never names a copy that is gone. A store that does not answer
        leaves the copy to ``cache purge --partial``."""
        try:
            self.object_root.remove(self.spec.key, self.copy)
        except CacheError as exc:
            log.warning("cache %s: could not delete the partial copy %s (%s): `prefast cache "
                        "purge --partial` removes it", self.spec.key[:8], self.at, exc)  # fmt: skip
        self.lock.release()
