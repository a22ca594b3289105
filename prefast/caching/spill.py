"""Moving a complete boundary's cache to a lower tier when its memory runs short.

Checked at every epoch start for the boundary being read, when it lives in
``gpu`` or ``ram``. Every view is copied into the best lower tier with room
(``Governor.lower_tiers``: gpu -> ram -> disk). A tier whose allocator refuses
the copy is remembered by the governor and the next one is tried; any other
failure (a full disk) ends the attempt. The copies replace the originals only
when every view was copied; otherwise the copies this spill wrote are deleted
(a complete cache with the same key that another run wrote stays) and the
cache stays where it was. Nothing here can stop training.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable

import numpy as np

from prefast.caching.boundary import BoundaryCache, discard
from prefast.caching.cachectx import DISK_TIERS, CacheContext
from prefast.errors import CacheAllocationError, CacheError
from prefast.store import Reader, Writer
from prefast.store.order import batch_slices

log = logging.getLogger("prefast.caching.materialize")


def relieve_pressure(
    b: BoundaryCache,
    ctx: CacheContext,
    ratio: float,
    epoch: int,
    free_rebuildable: Callable[[], None] = lambda: None,
) -> bool:
    """Spill ``b`` if its tier is under pressure; True when it moved. ``free_rebuildable``
    drops what the next evaluation rebuilds anyway (the test cache) before copying."""
    governor = ctx.governor
    if b.tier not in ("gpu", "ram") or not governor.pressure_on(b.tier):
        return False
    nbytes = governor.ledger.get(b.name, (b.tier, 0))[1]
    targets = governor.lower_tiers(nbytes, b.tier, ratio)
    if not targets:
        ctx.event(epoch, "spill_failed", stage=b.stage, detail="no room in any lower tier")
        log.warning(
            "%s memory is short, but no lower tier has room for stage %d's cache", b.tier, b.stage
        )
        return False
    free_rebuildable()
    for dest in targets:
        # A disk copy writes within what the disk budget has left (the boundary is charged
        # to its memory tier until it moves): one that compresses worse than the probe
        # said stops at it (DiskBudgetError) instead of passing --max-disk.
        allowance = max(0, governor.room("disk")) if dest in DISK_TIERS else None
        try:
            copies = _copy_views(b, dest, ctx, epoch, allowance)
        except CacheAllocationError as exc:
            ctx.allocation_refused(epoch, dest, exc, stage=b.stage)
            continue
        except (CacheError, OSError) as exc:
            ctx.event(epoch, "spill_failed", stage=b.stage, to=dest, detail=str(exc))
            log.warning(
                "could not spill stage %d's cache to %s (%s); it stays in %s",
                b.stage,
                dest,
                exc,
                b.tier,
            )
            return False
        # One transaction over tier and ledger: the boundary (its views, or for one with
        # none yet, where they will be written) and its ledger entry move together.
        old = b.tier
        b.spill(dest, copies)
        governor.hold(b.name, dest, nbytes)
        ctx.event(epoch, "spilled", stage=b.stage, **{"from": old, "to": dest})
        log.warning("%s pressure: spilled stage %d's cache to %s", old, b.stage, dest)
        return True
    ctx.event(epoch, "spill_failed", stage=b.stage, detail="no lower tier could allocate it")
    return False


def _copy_views(
    b: BoundaryCache, tier: str, ctx: CacheContext, epoch: int, allowance: int | None
) -> dict[int, Reader]:
    """Every view of ``b`` in ``tier``, all within ``allowance`` bytes on disk; on failure
    the copies written here are deleted."""
    copies: dict[int, Reader] = {}
    written: list[Reader] = []
    try:
        for view, reader in b.readers.items():
            copies[view], spent = _copy(reader, tier, ctx, epoch, allowance)
            if spent is not None:
                written.append(copies[view])
                allowance = None if allowance is None else allowance - spent
    except BaseException:
        for r in copies.values():
            if r in written:
                discard(r, ctx.root)
            else:
                r.close()  # reused, not ours: keep it on disk
        raise
    return copies


def _copy(
    reader: Reader, tier: str, ctx: CacheContext, epoch: int, allowance: int | None
) -> tuple[Reader, int | None]:
    """``reader``'s cache in ``tier``, and the bytes this call put on disk for it (None:
    an existing copy was reused; 0: written to memory)."""
    opened = ctx.open_view(tier, copy.copy(reader.spec), epoch, allowance=allowance)
    if isinstance(opened, Reader):  # that copy exists already (same content key)
        return opened, None
    writer = opened
    with writer:  # aborts on error
        copy_rows(reader, writer)
        copied = writer.finish()
    return copied, getattr(writer, "bytes_written", 0)


def copy_rows(reader: Reader, writer: Writer, stop: threading.Event | None = None) -> None:
    """Every row of ``reader`` appended to ``writer``, 1024 at a time; ``stop`` set between
    two blocks raises ``InterruptedError`` (the caller's ``with writer`` aborts it)."""
    for sl in batch_slices(reader.spec.rows, 1024):
        if stop is not None and stop.is_set():
            raise InterruptedError("the run ended early")
        writer.append(*reader.read_rows(np.arange(sl.start, sl.stop)))
