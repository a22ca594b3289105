"""Chunk-level shuffle plus an in-memory shuffle window, as a pure function.

Random per-row reads from compressed chunks are 10-50x slower than reading
whole chunks, so disk tiers visit chunks in a seeded order and shuffle rows
within a window of ``window`` chunks. Rows left over after a window's last
full batch carry into the next window, so every row is served exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .order import rng_for


def chunk_visit_order(num_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """The order ``windowed_order`` visits chunks in: known before the epoch starts,
    so a reader can load the next chunks while the current ones are served."""
    return rng_for(seed, "chunk-shuffle", epoch).permutation(num_chunks)


def windowed_order(
    num_chunks: int,
    chunk_rows: int,
    total_rows: int,
    window: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(window chunks, row indices)`` per batch.

    ``window chunks`` are the current window's; a batch may also hold rows
    carried over from the window before (at most ``batch_size - 1``, served
    first). Each chunk is decoded once per epoch.
    """
    rng = rng_for(seed, "chunk-shuffle", epoch)
    chunk_order = rng.permutation(num_chunks)
    carry = np.empty(0, dtype=np.int64)
    for w in range(0, num_chunks, window):
        chunks = chunk_order[w : w + window]
        rows = np.concatenate(
            [np.arange(c * chunk_rows, min((c + 1) * chunk_rows, total_rows)) for c in chunks]
        )
        window_chunks = [int(c) for c in chunks]
        pool = np.concatenate([carry, rng.permutation(rows)])
        last = w + window >= num_chunks
        full = len(pool) if last else (len(pool) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            batch = pool[s : min(s + batch_size, full)]
            yield window_chunks, batch
        carry = pool[full:]
