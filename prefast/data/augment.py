"""Input augmentation as batched tensor ops: a padded random crop and a horizontal flip.

Each sample's offsets and flip are drawn once per augmentation *stream* from
(seed, stream, row) (:class:`AugmentParams`), so any view of any sample can be
rebuilt from raw data; the ops are gathers, so they run on the training device.
Feature-space augmentation of cached activations
(``prefast/caching/feature_augment.py``) reuses the same crop and flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prefast.store.device import to_device
from prefast.store.order import rng_for


@dataclass(frozen=True)
class AugmentParams:
    """Every training sample's crop offsets and flip in one augmentation *stream*.

    A pure function of (seed, stream, sample row): not of the epoch's order, the
    batch size or the number of ranks. So a cached augmented view (written with
    stream ``s``) can be reproduced sample by sample from raw data: after a fault,
    on resume, or when a lost memory-tier view is rebuilt.
    """

    oy: np.ndarray  # (N,) int64 row offset of each sample's crop in the padded image
    ox: np.ndarray  # (N,) int64 column offset
    flip: np.ndarray | None  # (N,) bool, or None when the data is not flipped

    @classmethod
    def draw(cls, seed: int, stream: int, n: int, side: int, flip: bool) -> AugmentParams:
        pad = crop_pad(side)
        rng = rng_for(seed, "augment", stream)
        oy, ox = rng.integers(0, 2 * pad + 1, size=(2, n))
        return cls(oy, ox, rng.random(n) < 0.5 if flip else None)


def crop_pad(side: int) -> int:
    return max(1, side // 8)


def padded_crop(x: torch.Tensor, pad: int, oy: np.ndarray, ox: np.ndarray) -> torch.Tensor:
    """Each sample of ``x`` (B, C, H, W) cropped back to H x W from its zero-padded copy at
    its own offsets ``oy``, ``ox`` (host arrays, each in 0..2*pad): a batched gather, so it
    runs on whichever device ``x`` lives on."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # Drawn on the host (one seeded stream for every device), then moved.
    oy_d = to_device(torch.from_numpy(oy), x.device)
    ox_d = to_device(torch.from_numpy(ox), x.device)
    rows_i = (oy_d[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
    cols = (ox_d[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B,1,1,W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows_i, cols]


def flipped_where(x: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """Each sample of ``x`` (B, C, H, W) mirrored horizontally where ``flip`` (a host bool
    array, one per sample) is set."""
    mask = to_device(torch.from_numpy(flip), x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, rows: np.ndarray, params: AugmentParams) -> torch.Tensor:
    """Random crop with zero padding (1/8 of the side) and optional horizontal flip, with
    the offsets ``params`` holds for dataset rows ``rows``.

    Batched gather, so it runs on whichever device ``x`` lives on.
    ``x``: (B, C, H, W) float, already normalized.
    """
    out = padded_crop(x, crop_pad(x.shape[2]), params.oy[rows], params.ox[rows])
    if params.flip is not None:
        out = flipped_where(out, params.flip[rows])
    return out
