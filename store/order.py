"""Sample order as a pure function of (seed, epoch).

Every mode and every cache tier draws its epoch order from here, so runs are
comparable across modes and a resumed run continues with the same order.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator determined by ``seed`` and any labels (epoch, purpose)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation of ``0..n-1`` used to visit the training set in ``epoch``."""
    return rng_for(seed, "order", epoch).permutation(n)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches covering all ``n`` samples (the last may be short)."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def unseen(order: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
    """``order`` without the samples marked in the boolean mask ``seen``.

    After a fault mid-epoch the rest of the epoch is served from raw data in
    this order: when everything seen so far was a prefix of ``order`` (exact
    tiers), the rest continues batch for batch as if nothing had happened.
    """
    return order if seen is None else order[~seen[order]]
