"""What the disk caches of the prefast feed really take, and what each writer may take.

The governor admits a boundary at an estimate (the probe's compression ratio); once
views and test caches are written, ``_charge`` sets its ledger entry to the bytes on
disk, measured (a ``charged`` event), so a compressible boundary never holds budget it
does not use. Every writer opens with an allowance (``_allowance``, ``_test_allowance``;
a spill's copy gets one in ``prefast/caching/spill.py``): what the budget leaves once the other
caches and the boundary's other parts are counted; a writer stops before a chunk would
pass it (``DiskBudgetError``). A mixin of ``PrefastFeed``, beside ``BoundaryTransitions``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from prefast.caching.boundary import BoundaryCache
from prefast.caching.cachectx import DISK_TIERS, CacheContext
from prefast.caching.governor import Governor
from prefast.store import Reader

if TYPE_CHECKING:
    from prefast.caching.testcache import TestCache


class DiskCharges:
    ctx: CacheContext
    governor: Governor
    test: TestCache
    current: BoundaryCache | None
    target: BoundaryCache | None
    disk_bytes: weakref.WeakKeyDictionary[Reader, int]  # bytes on disk per reader (``_usage``)

    def _measured(self, b: BoundaryCache) -> tuple[int, int]:
        """Bytes on disk of ``b``'s written views, and of its test cache (0: not written)."""
        views = sum(self._usage(r) for r in b.readers.values())
        test = self.test.reader
        if test is None or self.test.stage != b.stage or test.tier not in DISK_TIERS:
            return views, 0
        return views, self._usage(test)

    def _usage(self, reader: Reader) -> int:
        """Bytes an open complete cache takes on disk, walked once per reader: it cannot
        change while the reader holds it (a rewrite under the same key gets a new reader)."""
        if reader not in self.disk_bytes:
            self.disk_bytes[reader] = self.ctx.root.usage(reader.spec.key)
        return self.disk_bytes[reader]

    def _charge(self, epoch: int | None) -> None:
        """Charge each disk boundary what its caches take on disk (estimates for what is not
        written yet), so a compressible boundary never holds budget it does not use."""
        for b in (self.current, self.target):
            if b is None or b.tier not in DISK_TIERS or b.name not in self.governor.ledger:
                continue
            views, test = self._measured(b)
            missing = b.views - len(b.readers)
            charge = views + missing * b.view_bytes + (test or b.test_bytes)
            before = self.governor.ledger[b.name][1]
            if charge != before:
                self.governor.hold(b.name, b.tier, charge)
                self.ctx.event(epoch, "charged", stage=b.stage, bytes=charge, was=before,
                               on_disk=views + test)  # fmt: skip

    def _allowance(self, b: BoundaryCache, part: str = "view") -> int:
        """What a writer of ``b``'s ``part`` (a training ``view``, or its ``test`` cache) may
        put on disk: what the budget leaves once the other caches and the boundary's other
        parts (its written views; for a view, also its test set's share) are counted."""
        room = self.governor.room("disk")
        if self.governor.budgets.max_disk is None:  # measured free disk: already net of it
            return max(0, room)
        views, test = self._measured(b)
        charged = self.governor.ledger.get(b.name, (b.tier, 0))[1]
        other = (test or b.test_bytes) if part == "view" else 0
        return max(0, room + charged - views - other)

    def _test_allowance(self, tier: str) -> int | None:
        """What the test cache of the current boundary may put on disk in ``tier``: the
        boundary's share, or, for a test cache that fell from memory to disk (its tier
        could not allocate it), what is left of the disk budget."""
        if tier not in DISK_TIERS:
            return None
        c = self.current
        if c is not None and c.tier in DISK_TIERS and c.name in self.governor.ledger:
            return self._allowance(c, "test")
        return max(0, self.governor.room("disk"))
