"""Whether a boundary's rows fit the dtype they are stored in.

The non-finite check runs on what is stored (encoded, then decoded as a read gives it
back), not only on the computed activations: a float32 value above 65504 is finite,
and ``inf`` once stored as float16. Such a value *overflowed* its dtype; a value that
was NaN or inf as computed means the prefix itself produced it (counted too: an 8-bit
encoding stores it as a finite value). Both are counted on the device (no host sync
per batch) and read once, when a view or a test cache would be marked complete.

The step never trains on an overflowed value: where the stored value is not finite
and the computed one is, the batch keeps the computed one (``mend``), so the epoch that
writes trains as the computed prefix would (but under autocast with a 16-bit float
cache the step takes that dtype, which cannot hold it: counted apart, and named if the
loss diverges). The rows are never kept: under
``--cache-dtype auto`` the boundary is materialized again in a dtype that holds them
(``wider_dtype``, event ``dtype_changed``); with a dtype the user named, it is not
cached (event ``not_cached``) and the run goes on computing the prefix
(``prefast/caching/overflow.py``, ``TestCache._unfit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefast.config import setting
from prefast.store import encoding
from prefast.store.device import to_host

WIDER = "float32"  # holds every value the prefix computes in float32


def mend(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (the stored rows as read back) with every value that overflowed its dtype
    taken from ``out`` (as computed), and ``(3,)`` int64 counts on the device: values
    not finite as computed or as stored (an 8-bit encoding stores a NaN as a finite
    value: it counts all the same); of them, finite as computed but not as stored (the
    dtype overflowed); of those, not finite in what the step takes either (under
    autocast the step takes a 16-bit cache's own dtype, which cannot hold them)."""
    finite_out = torch.isfinite(out)
    stored_bad = ~torch.isfinite(x)
    overflowed = stored_bad & finite_out
    mended = torch.where(overflowed, out.to(x.dtype), x)
    unmended = overflowed & ~torch.isfinite(mended)
    counts = torch.stack([(stored_bad | ~finite_out).sum(), overflowed.sum(), unmended.sum()])
    return counts, mended


@dataclass(frozen=True)
class Unfit:
    """What a view's or a test cache's values held (read once from the device)."""

    nonfinite: int  # values NaN or inf, as computed or as stored
    overflowed: int  # of them, finite as computed: the dtype could not hold them
    unmended: int = 0  # of those, inf in what the step took too (16-bit under autocast)

    @classmethod
    def read(cls, counts: torch.Tensor | None) -> Unfit:
        if counts is None:
            return cls(0, 0)
        nonfinite, overflowed, unmended = to_host(counts).tolist()
        return cls(int(nonfinite), int(overflowed), int(unmended))

    def __bool__(self) -> bool:
        return self.nonfinite > 0

    @property
    def only_overflow(self) -> bool:
        """Every bad value is one the dtype could not hold (a wider dtype would)."""
        return 0 < self.overflowed == self.nonfinite

    def detail(self, stage: int, dtype: str, split: str) -> str:
        """One sentence: how many values, of what, and why they are not kept."""
        if not self.only_overflow:
            return (
                f"{self.nonfinite} NaN or inf values in stage {stage}'s {split} output: a "
                "cache of them is never kept (the frozen prefix computes them: the model "
                "or its input data hold non-finite values)"
            )
        return (
            f"{self.overflowed} values of stage {stage}'s {split} output overflow "
            f"{dtype} (largest finite {largest_finite(dtype):g}): they are finite as "
            "computed and inf as stored"
        )


def largest_finite(dtype: str) -> float:
    """The largest value ``dtype`` stores as finite: a float's maximum; bit rounding
    rounds values above its largest ``N``-bit mantissa up to inf; 8-bit rows keep float32
    scales."""
    bits = encoding.keepbits(dtype)
    if bits is not None:  # float16's exponent, N mantissa bits
        return 2.0**15 * (2 - 2.0**-bits)
    held = encoding.torch_dtype(dtype)
    return float(torch.finfo(held if held.is_floating_point else torch.float32).max)


def not_cached_fix() -> str:
    """What a user who named a dtype too narrow passes instead."""
    return f"{setting('cache_dtype', 'float32')} (or auto) stores them"


def wider_dtype(dtype: str, requested: str) -> str | None:
    """The dtype a boundary whose rows overflowed ``dtype`` is stored in instead: float32
    under ``--cache-dtype auto``, None (not cached) with a dtype the user named or when
    ``dtype`` is float32 already."""
    if requested != "auto" or dtype == WIDER:
        return None
    return WIDER
