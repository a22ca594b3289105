"""Whether a boundary's rows fit the dtype they are stored in.

The non-finite check runs on what is stored (encoded, then decoded as a read gives it
back), never on the computed activations: a float32 value above 65504 is finite, and
``inf`` once stored as float16. Such a value *overflowed* its dtype; a value that was
NaN or inf before encoding means the prefix itself produced it. Both are counted on
the device (no host sync per batch) and read once, when a view or a test cache would
be marked complete.

The step never trains on an overflowed value: where the stored value is not finite
and the computed one is, the batch keeps the computed one (``mend``), so the epoch that
writes trains as the computed prefix would. The rows are never kept: under
``--cache-dtype auto`` the boundary is materialized again in a dtype that holds them
(``wider_dtype``, event ``dtype_changed``); with a dtype the user named, it is not
cached (event ``not_cached``) and the run goes on computing the prefix
(``prefast/caching/overflow.py``, ``TestCache._unfit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefast.store import encoding
from prefast.store.device import to_host

WIDER = "float32"  # holds every value the prefix computes in float32


def mend(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (the stored rows as read back) with every value that overflowed its dtype
    taken from ``out`` (as computed), and ``(2,)`` int64 counts on the device:
    ``[values not finite as stored, of them finite as computed]``."""
    stored_bad = ~torch.isfinite(x)
    overflowed = stored_bad & torch.isfinite(out)
    counts = torch.stack([stored_bad.sum(), overflowed.sum()])
    return counts, torch.where(overflowed, out.to(x.dtype), x)


@dataclass(frozen=True)
class Unfit:
    """What a view's or a test cache's stored values held (read once from the device)."""

    nonfinite: int  # values NaN or inf as stored
    overflowed: int  # of them, finite as computed: the dtype could not hold them

    @classmethod
    def read(cls, counts: torch.Tensor | None) -> Unfit:
        if counts is None:
            return cls(0, 0)
        nonfinite, overflowed = to_host(counts).tolist()
        return cls(int(nonfinite), int(overflowed))

    def __bool__(self) -> bool:
        return self.nonfinite > 0

    def detail(self, stage: int, dtype: str, split: str) -> str:
        """One sentence: how many values, of what, and why they are not kept."""
        if not self.overflowed:
            return (
                f"{self.nonfinite} NaN or inf values in stage {stage}'s {split} output: a "
                "cache of them is never kept (the frozen prefix computes them: the model "
                "or its input data hold non-finite values)"
            )
        held = encoding.torch_dtype(dtype)
        limit = f" (largest finite {torch.finfo(held).max:g})" if held.is_floating_point else ""
        return (
            f"{self.overflowed} values of stage {stage}'s {split} output overflow "
            f"{dtype}{limit}: they are finite as computed and inf as stored"
        )


def wider_dtype(dtype: str, requested: str) -> str | None:
    """The dtype a boundary whose rows overflowed ``dtype`` is stored in instead: float32
    under ``--cache-dtype auto``, None (not cached) with a dtype the user named or when
    ``dtype`` is float32 already."""
    if requested != "auto" or dtype == WIDER:
        return None
    return WIDER
