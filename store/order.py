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


def order_seed(seed: int, rank: int = 0, world: int = 1) -> int:
    """The seed a rank draws its epoch orders from: ``seed`` itself in a single process,
    so a one-process run is the same run as before; else one stream per (rank, world)."""
    if world == 1:
        return seed
    digest = hashlib.sha256(repr((seed, "rank", rank, world)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard_rows(n: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The training rows rank ``rank`` of ``world`` owns for the whole run.

    A seeded permutation of ``0..n-1`` dealt out round-robin. When ``world`` does
    not divide ``n`` the permutation is *padded* with its own first rows, so
    every rank owns ``ceil(n / world)`` rows and runs the same number of steps;
    at most one row per rank is a repeat.
    """
    if world == 1:
        return np.arange(n)
    perm = rng_for(seed, "shard", world).permutation(n)
    total = -(-n // world) * world
    return np.concatenate([perm, perm[: total - n]])[rank::world]


def test_rows(n: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The test rows rank ``rank`` evaluates: contiguous blocks, every row exactly once."""
    return np.array_split(np.arange(n), world)[rank]
