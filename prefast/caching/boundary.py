"""One cache boundary as a small state machine.

::

    planned ──begin_view──► writing ──finish_view──► planned (views left, or the view
       │                                          complete but unreadable now) | complete
       │  └──reuse_view──► planned | complete                    │
       │                                                          ├──supersede──► superseded
       ├──abandon (also from writing)──► abandoned                ├──corrupt────► corrupted
       ├──corrupt (a reused view failed its checks)──► corrupted  └──spill───────► complete
       └──spill (the views written so far, maybe none)──► planned

A boundary holds the input of stage ``stage`` for every training sample, one
*view* per augmented copy (epoch ``e`` reads view ``e mod views``). Each
transition is one method; any other call raises :class:`BoundaryStateError`.
The terminal states release everything the boundary held: readers are
closed, disk caches deleted (unless another process still reads them), the
governor's ledger entry dropped. I/O errors are not handled here: the caller
catches them and calls the transition that says what happened.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

import torch

from prefast.errors import BoundaryStateError, CacheError, CacheUnavailableError
from prefast.store import Reader, Writer
from prefast.store.manage import Root

log = logging.getLogger("prefast.caching.boundary")


def discard(reader: Reader, root: Root | None) -> None:
    """Close ``reader`` and delete its disk cache, unless another process still reads it."""
    reader.close()
    on_disk = reader.tier in ("mmap", "zarr")
    copy = getattr(reader, "at", "/").rsplit("/", 1)[-1] or None  # an object store's copy
    try:
        if on_disk and root is not None and not root.remove(reader.spec.key, copy):
            log.info("kept cache %s: another process is reading it", reader.spec.key)
    except CacheError as exc:  # an object store that does not answer: purge removes it later
        log.warning("could not delete cache %s: %s", reader.spec.key, exc)


class State(enum.Enum):
    PLANNED = "planned"
    WRITING = "writing"
    COMPLETE = "complete"
    SUPERSEDED = "superseded"
    ABANDONED = "abandoned"
    CORRUPTED = "corrupted"


TERMINAL = (State.SUPERSEDED, State.ABANDONED, State.CORRUPTED)


class BoundaryCache:
    """The cache of the frozen prefix's output at one stage boundary.

    Parameters
    ----------
    name
        Ledger name (e.g. ``"train@3"``).
    stage, tier, views
        The boundary, the tier the governor chose and the number of views.
    dtype
        The cache dtype its views and its test cache are stored in.
    root
        Cache root of the disk tiers (None when only memory tiers are used).
    on_release
        Called with ``name`` when the boundary reaches a terminal state (the
        governor's ``release``).
    """

    def __init__(
        self,
        name: str,
        stage: int,
        tier: str,
        views: int,
        root: Root | None,
        on_release: Callable[[str], None] = lambda name: None,
        dtype: str = "float16",
    ):
        self.name, self.stage, self.tier, self.views = name, stage, tier, views
        self.dtype = dtype
        self.root = root
        self.kept = False  # the fixed prefix's (keep.py): superseded, its disk caches stay
        self.on_release = on_release
        self.state = State.PLANNED
        self.readers: dict[int, Reader] = {}
        # view -> the augmentation stream of its content (None: not augmented); known for
        # every view written or reused, and, on resume, for views still to be rebuilt.
        self.streams: dict[int, int | None] = {}
        self.writer: Writer | None = None
        self.writing_view: int | None = None
        # The governor's estimate of what one view and the test set take in ``tier``: what
        # the ledger charges until the feed measures the caches on disk.
        self.view_bytes, self.test_bytes = 0, 0
        # Whether the view being written holds values its dtype overflowed or that are not
        # finite (``prefast/caching/fits.py``): summed on the device (no host sync per batch)
        # and read once before the view would be marked complete.
        self.signs: torch.Tensor | None = None
        self.unavailable = 0  # opens or reads in a row that failed with CacheUnavailableError
        self.why: str | None = None  # reason of a terminal state

    def __repr__(self) -> str:
        return f"BoundaryCache({self.name}, stage {self.stage}, {self.tier}, {self.state.value})"

    # -- queries --------------------------------------------------------------------------
    def reader_for(self, epoch: int) -> Reader | None:
        """The view epoch ``epoch`` reads, if it exists (complete or reused)."""
        if self.state not in (State.PLANNED, State.COMPLETE):
            return None
        return self.readers.get(epoch % self.views)

    def missing_view(self, epoch: int) -> int | None:
        """The view epoch ``epoch`` must write, or None when it exists."""
        view = epoch % self.views
        return None if view in self.readers else view

    def stream_for(self, epoch: int) -> int | None:
        """The augmentation stream of the view epoch ``epoch`` reads."""
        return self.streams.get(epoch % self.views)

    def record(self) -> dict:
        """What a checkpoint records to find this boundary's caches again (keys are
        recomputed from it, per rank): its stage, tier, dtype, views and their streams."""
        return {
            "stage": self.stage,
            "tier": self.tier,
            "views": self.views,
            "dtype": self.dtype,
            "streams": {v: self.streams.get(v) for v in sorted(self.readers)},
        }

    # -- transitions ----------------------------------------------------------------------
    def begin_view(self, view: int, writer: Writer, stream: int | None = None) -> None:
        self._require(State.PLANNED)
        if view in self.readers:
            raise BoundaryStateError(f"{self!r}: view {view} already exists")
        self.writer, self.writing_view, self.state = writer, view, State.WRITING
        self.streams[view] = stream
        self.signs = None

    def write(self, acts: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Append rows of the view being written (raises the writer's errors)."""
        self._require(State.WRITING)
        assert self.writer is not None
        self.writer.append(acts, labels, ids)

    def add_signs(self, signs: torch.Tensor) -> None:
        """Add a batch's ``fits.mend`` signs (on the device: no host sync per batch); read
        once, with ``fits.Unfit.read(self.signs)``, before the view would be complete."""
        self.signs = signs if self.signs is None else self.signs + signs

    def finish_view(self) -> None:
        """Make the view being written readable; raises the writer's errors (then abandon).

        ``CacheUnavailableError``: the view is complete on disk but cannot be opened now
        (too many open files, ...): the boundary goes back to planned without it, and the
        view's next epoch reopens it by its key instead of writing it again.
        """
        self._require(State.WRITING)
        assert self.writer is not None and self.writing_view is not None
        try:
            reader = self.writer.finish()
        except CacheUnavailableError:
            self.writer, self.writing_view, self.state = None, None, State.PLANNED
            raise
        self.readers[self.writing_view] = reader
        self.writer, self.writing_view = None, None
        self.state = State.COMPLETE if len(self.readers) == self.views else State.PLANNED

    def reuse_view(self, view: int, reader: Reader, stream: int | None = None) -> None:
        """A complete cache of this view already exists (same content key): adopt it."""
        self._require(State.PLANNED)
        self.readers[view] = reader
        self.streams[view] = stream
        if len(self.readers) == self.views:
            self.state = State.COMPLETE

    def spill(self, tier: str, copies: dict[int, Reader]) -> None:
        """Move the boundary to a lower tier: ``copies`` replaces every view written so far
        (none, for a boundary whose views are all still to be written) and the old readers
        are closed; views still to be written go to the new tier."""
        self._require(State.PLANNED, State.COMPLETE)
        if set(copies) != set(self.readers):
            raise BoundaryStateError(
                f"{self!r}: a spill copies views {sorted(self.readers)}, got {sorted(copies)}"
            )
        old, self.readers = self.readers, dict(copies)
        for reader in old.values():
            reader.close()
        self.tier = tier

    def supersede(self) -> None:
        """A later boundary is complete: this one is no longer read."""
        self._require(State.COMPLETE)
        self._end(State.SUPERSEDED, "a later boundary replaced it")

    def abandon(self, why: str) -> None:
        """Writing failed (full disk, open failure, ...): give up; training goes on as FreezeOut."""
        self._require(State.PLANNED, State.WRITING)
        self._end(State.ABANDONED, why)

    def corrupt(self, why: str) -> None:
        """A view failed its checks while being read: never read it again."""
        self._require(State.PLANNED, State.COMPLETE)
        self._end(State.CORRUPTED, why)

    def close(self) -> None:
        """End of run: abort a writer and close readers, keeping complete disk caches."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for reader in self.readers.values():
            reader.close()
        self.readers = {}
        self.on_release(self.name)

    # -- helpers --------------------------------------------------------------------------
    def _require(self, *allowed: State) -> None:
        if self.state not in allowed:
            raise BoundaryStateError(
                f"{self!r}: this transition needs state " + " or ".join(s.value for s in allowed)
            )

    def _end(self, state: State, why: str) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer, self.writing_view = None, None
        kept = self.kept and state is State.SUPERSEDED
        for reader in self.readers.values():
            discard(reader, None if kept else self.root)
        self.readers = {}
        self.state, self.why = state, why
        self.on_release(self.name)
