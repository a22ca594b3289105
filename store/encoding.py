"""How activations are stored: the cache dtypes, each an *encoding*.

``encode`` turns activations (any float dtype, on the device that computed
them) into the rows a cache stores; ``decode`` turns stored rows back into
what the model reads, on the device that computes. Tiers, readers, staging
buffers and checksums only ever move stored rows.

- ``float32``, ``float16``, ``bfloat16``: a cast (zarr has no bfloat16: its bits
  are stored as uint16 and the dtype is recorded).
- ``bitround<N>`` (N = 1..9): float16 keeping N of its 10 mantissa bits, rounded
  to nearest as ``numcodecs.BitRound`` does. Decoding is the identity; the zeroed
  bits make zstd's job easier, so it saves bytes only where zstd runs (zarr).
- ``int8``: affine per (row, channel): ``x ~ offset + scale * q`` with ``q`` a
  uint8 in 0..255, ``offset`` the channel's minimum in that row and ``scale`` =
  (max - min) / 255 (so ``-offset / scale`` is the zero point).
- ``float8``: e4m3 per (row, channel): ``x ~ scale * q`` with ``q`` a
  ``float8_e4m3fn`` and ``scale`` = max|x| / 448 (e4m3's largest finite value),
  so the channel's range fills the format.

Non-finite activations in 8-bit rows: the parameters come from a channel's finite
values, and an inf or NaN is stored as ``torch.nan_to_num`` would put it inside
that range (NaN as 0, +inf as the channel's largest finite value, -inf as its
smallest), so it costs its own value and nothing else. (float32, float16 and
bfloat16 rows keep NaN and inf as they are; bit rounding keeps them too.)

An 8-bit row is one byte string: its channel parameters (float32,
little-endian: ``(C, 2)`` ``[offset, scale]`` for int8, ``(C,)`` ``[scale]`` for
float8), then its ``C*H*W`` one-byte values. So every row, and so every chunk,
decodes alone, a chunk's checksum covers its scales, and every tier moves
8-bit rows exactly as it moves float rows, a quarter of float32's bytes.

Why per row and not per chunk: the write-through epoch trains on the decoded
rows the moment they are computed, before the chunk they land in is complete.
Per-row parameters are known then, so a later run that reads the cache sees
the very numbers the writing run trained on. The price is ``8 * C`` (int8) or
``4 * C`` (float8) bytes per row: 0.8% (int8) of a 32x32 map, 3% of a 16x16 one.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EIGHT_BIT = ("int8", "float8")
BITROUND = tuple(f"bitround{n}" for n in range(1, 10))
DTYPES = (*FLOATS, *EIGHT_BIT, *BITROUND)
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_PARAMS = {"int8": 2, "float8": 1}  # float32 parameters per (row, channel)


def keepbits(dtype: str) -> int | None:
    """Mantissa bits a ``bitround<N>`` dtype keeps (None for any other dtype)."""
    m = re.fullmatch(r"bitround([1-9])", dtype)
    return int(m.group(1)) if m else None


def is_eight_bit(dtype: str) -> bool:
    return dtype in EIGHT_BIT


def torch_dtype(dtype: str) -> torch.dtype:
    """The tensor dtype a tier holds for cache dtype ``dtype``."""
    if dtype in EIGHT_BIT:
        return torch.uint8
    return torch.float16 if keepbits(dtype) else FLOATS[dtype]


def numpy_dtype(dtype: str) -> type[np.generic]:
    """What a disk tier stores (bfloat16 as uint16 bits, 8-bit rows as bytes)."""
    if dtype in EIGHT_BIT:
        return np.uint8
    if dtype == "bfloat16":
        return np.uint16
    return np.float32 if dtype == "float32" else np.float16


def channels(shape: tuple[int, ...]) -> int:
    """Groups with their own parameters: the channels of a (C, H, W) row; a flat row is one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def param_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return 4 * _PARAMS[dtype] * channels(shape) if dtype in EIGHT_BIT else 0


def stored_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """One stored row's shape: the activation's own, or one byte string for 8-bit rows."""
    if dtype in EIGHT_BIT:
        return (param_bytes(shape, dtype) + math.prod(shape),)
    return tuple(shape)


def row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one stored row (uncompressed)."""
    itemsize = np.dtype(numpy_dtype(dtype)).itemsize
    return math.prod(stored_shape(shape, dtype)) * itemsize


def describe(shape: tuple[int, ...], dtype: str) -> dict:
    """What a zarr user needs to decode the stored rows (recorded in the cache's attributes)."""
    if dtype in EIGHT_BIT:
        c, n = channels(shape), param_bytes(shape, dtype)
        params = "[offset, scale]" if dtype == "int8" else "[scale]"
        return {
            "encoding": {
                "row": f"{n} bytes of float32 parameters, then {math.prod(shape)} values",
                "params": f"float32 little-endian, shape ({c}, {_PARAMS[dtype]}): {params} "
                "per channel of the row",
                "values": "uint8" if dtype == "int8" else "float8_e4m3fn",
                "values_shape": list(shape),
                "decode": "offset + scale * q" if dtype == "int8" else "scale * q",
            }
        }
    bits = keepbits(dtype)
    if bits is not None:
        return {"encoding": {"keepbits": bits, "rounding": "numcodecs.BitRound", "decode": "x"}}
    return {}


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Activations ``(B, *shape)`` -> stored rows, on ``x``'s device. Stored rows given
    again come back unchanged (8-bit rows as they are, bit rounding is idempotent)."""
    x = x.detach()
    if dtype in FLOATS:
        return x.to(FLOATS[dtype])
    bits = keepbits(dtype)
    if bits is not None:
        return bit_round(x.to(torch.float16), bits)
    if dtype not in EIGHT_BIT:
        raise ValueError(f"cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if x.dtype == torch.uint8:
        return x
    b = len(x)
    flat = x.float().reshape(b, channels(tuple(x.shape[1:])), -1)
    lo, hi, flat = _finite_range(flat)
    if dtype == "int8":
        scale = (hi - lo) / 255
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant: q = 0
        q = ((flat - lo[..., None]) / scale[..., None]).round_().clamp_(0, 255).to(torch.uint8)
        params = torch.stack([lo, scale], -1)
    else:
        scale = torch.maximum(hi.abs(), lo.abs()) / E4M3_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scaled = (flat / scale[..., None]).clamp_(-E4M3_MAX, E4M3_MAX)
        q = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
        params = scale[..., None]
    return torch.cat([params.contiguous().view(torch.uint8).reshape(b, -1), q.reshape(b, -1)], 1)


def _finite_range(
    flat: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (row, channel)'s smallest and largest *finite* value, and ``flat`` with its
    non-finite values put inside that range as ``torch.nan_to_num`` would: NaN as 0
    (clamped into the range), +inf as the largest, -inf as the smallest. One inf or NaN
    then costs its own value only, not its whole channel's scale; all on the device,
    with no host sync. (A channel with no finite value stores zeros.)"""
    finite = torch.isfinite(flat)
    lo = torch.where(finite, flat, torch.inf).amin(-1)
    hi = torch.where(finite, flat, -torch.inf).amax(-1)
    empty = lo > hi  # no finite value at all
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    flat = torch.where(torch.isnan(flat), 0.0, flat)
    return lo, hi, torch.minimum(torch.maximum(flat, lo[..., None]), hi[..., None])


def decode(stored: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored 8-bit rows -> float32 activations ``(B, *shape)`` on their device; any other
    dtype's rows are returned as they are (the caller casts them)."""
    if dtype not in EIGHT_BIT:
        return stored
    b, groups = len(stored), channels(shape)
    n = param_bytes(shape, dtype)
    # Copied into fresh memory: a row sliced out of a batch may start at any byte, and a
    # float32 view needs 4-byte alignment (a plain .contiguous() keeps a one-row slice as is).
    raw = torch.empty((b, n), dtype=torch.uint8, device=stored.device).copy_(stored[:, :n])
    params = raw.view(torch.float32).reshape(b, groups, _PARAMS[dtype])
    q = stored[:, n:].reshape(b, groups, -1)
    if dtype == "int8":
        x = params[..., 0:1] + q.float() * params[..., 1:2]
    else:
        x = q.view(torch.float8_e4m3fn).float() * params[..., 0:1]
    return x.reshape(b, *shape)


def nonfinite_rows(rows: np.ndarray, dtype: str, shape: tuple[int, ...]) -> int:
    """How many of the stored ``rows`` (as a disk tier holds them) hold a NaN or an inf.
    8-bit rows cannot (their values are put inside each channel's finite range); their
    parameters can."""
    t = torch.from_numpy(np.require(rows, requirements=["C", "W"]))  # a mapped chunk: copied
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    x = decode(t, dtype, shape).float().reshape(len(t), -1)
    return int((~torch.isfinite(x)).any(1).sum())


def bit_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float16 ``x`` keeping ``bits`` mantissa bits, bit for bit what ``numcodecs.BitRound``
    writes (round half to even). Done here, in torch, because the write-through epoch
    trains on the rounded values on the compute device, where numcodecs (host numpy)
    would cost a copy to the host and a device sync per batch."""
    drop = 10 - bits
    i = x.contiguous().view(torch.int16).clone()
    mask = (-1 >> drop) << drop
    half_quantum1 = (1 << (drop - 1)) - 1
    i += ((i >> drop) & 1) + half_quantum1
    i &= mask
    return i.view(torch.float16)


def relative_error(x: torch.Tensor, dtype: str) -> float:
    """||x - decode(encode(x))|| / ||x||: what storing ``x`` in ``dtype`` loses."""
    x = x.detach().float()
    back = decode(encode(x, dtype), dtype, tuple(x.shape[1:])).float()
    norms = torch.stack([torch.linalg.vector_norm(x), torch.linalg.vector_norm(x - back)])
    norm, lost = norms.cpu().tolist()  # one explicit copy to the host (the probe's, once)
    return lost / norm if norm > 0 else 0.0
