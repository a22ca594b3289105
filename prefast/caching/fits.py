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

import math
from dataclasses import dataclass

import torch

from prefast.config import setting
from prefast.store import encoding
from prefast.store.device import to_host

WIDER = "float32"  # holds every value the prefix computes in float32


def can_overflow(dtype: str, computed: torch.dtype) -> bool:
    """Whether rows stored in ``dtype`` can be inf where the computed value is finite: a
    float16 cache (bit rounding too) of values computed in a wider dtype. (bfloat16 and
    the 8-bit scales hold float32's range; float32 holds the values themselves.)"""
    narrow = dtype == "float16" or encoding.keepbits(dtype) is not None
    return narrow and computed != torch.float16


def mend(out: torch.Tensor, x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the step takes: ``x`` (the rows stored in ``dtype``, as read back) with every
    value that overflowed the dtype taken from ``out`` (as computed); and ``(3,)`` signs
    on the device, summed over batches and read once (``Unfit.read``): the values inf as
    stored where the dtype can overflow (a count), then 0 if every computed value is
    finite (else NaN), then 0 if every value the step takes is finite (else NaN).

    A sum is finite exactly when what it adds is (NaN and inf carry through it), and
    ``sum * 0`` is 0 or NaN: one cheap reduction per tensor, never a pass that marks
    each value, except where a dtype can overflow (the mask the mend needs anyway)."""
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # mps has no float64
    # Summed in float32: a float16 sum of finite values may itself overflow.
    computed, taken = (t.sum(dtype=torch.float32) * 0 for t in (out, x))
    if not can_overflow(dtype, out.dtype):
        stored = torch.zeros((), dtype=wide, device=x.device)
        return torch.stack([stored, computed.to(wide), taken.to(wide)]), x
    inf = x.isinf()  # a computed NaN stays NaN in float16: the computed sum tells it
    mended = torch.where(inf, out.to(x.dtype), x)
    taken = mended.sum(dtype=torch.float32) * 0
    signs = [inf.sum().to(wide), computed.to(wide), taken.to(wide)]
    return torch.stack(signs), mended


@dataclass(frozen=True)
class Unfit:
    """What a view's or a test cache's values held (read once from the device)."""

    overflowed: int  # values inf as stored, counted where the dtype can overflow
    computed_finite: bool = True  # every value the prefix computed
    taken_finite: bool = True  # every value the step took (mended)

    @classmethod
    def read(cls, signs: torch.Tensor | None) -> Unfit:
        if signs is None:
            return cls(0)
        stored, computed, taken = to_host(signs).tolist()
        return cls(int(stored), math.isfinite(computed), math.isfinite(taken))

    def __bool__(self) -> bool:
        return self.overflowed > 0 or not (self.computed_finite and self.taken_finite)

    @property
    def only_overflow(self) -> bool:
        """Every bad value is one the dtype could not hold (a wider dtype would)."""
        return bool(self) and self.computed_finite

    @property
    def unmended(self) -> bool:
        """The step took inf where the prefix computed a finite value: under autocast it
        takes a float16 cache's own dtype, which cannot hold it."""
        return self.computed_finite and not self.taken_finite

    def detail(self, stage: int, dtype: str, split: str) -> str:
        """One sentence: what stage ``stage``'s rows held, and why they are not kept."""
        if not self.only_overflow:
            return (
                f"NaN or inf values in stage {stage}'s {split} output: a cache of them is "
                "never kept (the frozen prefix computes them: the model or its input data "
                "hold non-finite values)"
            )
        many = f"{self.overflowed} values" if self.overflowed else "values"
        return (
            f"{many} of stage {stage}'s {split} output overflow {dtype} (largest finite "
            f"{largest_finite(dtype):g}): they are finite as computed and inf as stored"
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
