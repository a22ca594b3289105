"""Feature-space augmentation of cached activations (``--feature-augment shift,flip,mix``).

Once a stage's output is cached, its input augmentation is fixed: one cached
view trains every later epoch on the same crops and flips. These operations
vary the cached features instead, per sample, on the compute device, after the
batch is decoded; they add no byte to any cache:

- **shift**: translate the feature map by up to ``h // 8`` pixels each way, zero
  filled. The input crop pads 1/8 of the image side, so at a map ``h`` pixels
  high that is the crop's offset (pad / stride) at that resolution: convolution
  is translation-equivariant, so this approximates a new crop. Maps under 8
  pixels are not shifted.
- **flip**: mirror the feature map horizontally. Not the same as flipping the
  input (the filters are not symmetric): that is what the benchmark measures.
- **mix**: Manifold Mixup. Each sample is mixed with a partner from its batch,
  ``x = lam * x + (1 - lam) * x_partner`` with ``lam ~ Beta(2, 2)``, and the loss
  is taken against both labels with the same weights (``feed.batch_loss``).

Every draw is a pure function of (seed, epoch, sample id): the same run gives the
same features, and after a damaged chunk the unseen samples, recomputed from raw
data, get exactly the augmentation the cache would have served them with (the
mix partner is the sample's neighbour in an order drawn per sample, within the
batch, so it too is the same when the batches are).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from prefast.data.augment import flipped_where, padded_crop
from prefast.errors import ConfigError
from prefast.store.device import to_device
from prefast.store.order import rng_for

MIX_ALPHA = 2.0  # Manifold Mixup's Beta(alpha, alpha) for hidden-layer mixing


def check_feature_ops(ops: tuple[str, ...], costs: list, channels_last: bool) -> None:
    """Refuse, in one line, spatial ops on rows that are not (C, H, W) maps: ``costs`` are
    the probe's per-stage costs (their ``out_shape`` is each boundary's row)."""
    rows = [
        (i, c.out_shape) for i, c in enumerate(costs[:-1]) if len(c.out_shape) != 3 or channels_last
    ]
    spatial = [op for op in ops if op in ("shift", "flip")]
    if spatial and rows:  # shift and flip move pixels of (C, H, W) maps; mix takes any row
        stage, shape = rows[0]
        what = (
            "(H, W, C) map (channels last, as Swin keeps them)"
            if len(shape) == 3
            else "row (a transformer's tokens x dim)"
        )
        raise ConfigError(
            f"--feature-augment {','.join(spatial)} moves pixels of (C, H, W) feature maps, "
            f"but stage {stage}'s output is a {'x'.join(map(str, shape))} {what}: use "
            "--feature-augment mix, or none, for this model"
        )


def max_shift(height: int) -> int:
    """The input crop's padding (1/8 of the side) seen at a map ``height`` pixels high."""
    return height // 8


class FeatureAugment:
    """Applies ``ops`` to batches of cached activations; draws per (seed, epoch, sample)."""

    def __init__(self, ops: tuple[str, ...], seed: int, rows: int):
        self.ops, self.seed, self.rows = ops, seed, rows
        self.epoch: int | None = None
        self.seconds = 0.0  # host time spent issuing the ops this epoch (the whole cost on CPU)
        self.batches = 0

    def _draw(self, epoch: int) -> None:
        if self.epoch == epoch:
            return
        rng = rng_for(self.seed, "feature-augment", epoch)
        n = self.rows
        self.shift_u = rng.random((2, n))  # scaled to each map's own max shift when applied
        self.flip = rng.random(n) < 0.5
        self.lam = rng.beta(MIX_ALPHA, MIX_ALPHA, n).astype(np.float32)
        self.key = rng.random(n)  # the order that pairs mix partners within a batch
        self.epoch = epoch

    def apply(
        self, x: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``x`` (B, C, H, W) on the device, ``ids`` on the host, ``y`` on the device ->
        the augmented ``x`` and, with mix, (partner labels, lam) on the device."""
        t = time.perf_counter()
        self._draw(epoch)
        rows = ids.numpy()
        mix = None
        if x.dim() == 4:
            if "shift" in self.ops and max_shift(x.shape[2]) > 0:
                x = self._shift(x, rows)
            if "flip" in self.ops:
                x = flipped_where(x, self.flip[rows])
        if "mix" in self.ops and len(rows) > 1:
            order = np.argsort(self.key[rows], kind="stable")
            partner = np.empty_like(order)
            partner[order] = np.roll(order, -1)  # each sample's next one in the drawn order
            where = to_device(torch.from_numpy(partner), x.device)
            lam = to_device(torch.from_numpy(self.lam[rows]), x.device)
            w = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            x = w * x + (1 - w) * x.index_select(0, where)
            mix = (y.index_select(0, where), lam)
        self.seconds += time.perf_counter() - t
        self.batches += 1
        return x, mix

    def _shift(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Each sample translated by its own (dy, dx) in [-s, s], zero filled: the input
        crop's gather (``data.augment.padded_crop``) at this map's padding."""
        s = max_shift(x.shape[2])
        oy, ox = np.floor(self.shift_u[:, rows] * (2 * s + 1)).astype(np.int64)  # 0..2s
        return padded_crop(x, s, oy, ox)

    def take_seconds(self) -> tuple[float, int]:
        """(seconds, batches) since the last call."""
        out = (self.seconds, self.batches)
        self.seconds, self.batches = 0.0, 0
        return out
