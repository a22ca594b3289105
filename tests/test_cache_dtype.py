"""Lossy cache dtypes (store/encoding.py): 8-bit rows, bit rounding, and auto's choice."""

import json

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from helpers import DIGITS, cli_in_process, flip_byte, relu_batch

from prefast.config import TrainConfig
from prefast.store import CacheRoot, CacheSpec, encoding, open_reader, open_writer
from prefast.store.manage import inspect, list_caches, verify
from prefast.store.zarr_writer import ZarrWriter
from prefast.training.trainer import train


def cfg_for(tmp_path, **kw):
    return TrainConfig(
        mode="prefast", cache_dir=str(tmp_path), **{**DIGITS, "cache_boundaries": "every", **kw}
    )


def losses(run: dict) -> list[tuple[float, float]]:
    return [(e["train_loss"], e["test_acc"]) for e in run["epochs"]]


# -- the encodings -----------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True], ids=["post-relu", "signed"])
@pytest.mark.parametrize("bits", range(1, 10))
def test_bit_rounding_is_numcodecs_bitround_bit_for_bit(bits, signed):
    x = relu_batch(16, (8, 6, 6)) * 50
    if signed:  # negative values, and values whose rounding carries into the exponent
        x = torch.cat([torch.randn(16, 8, 6, 6) * 50, -x, torch.full((1, 8, 6, 6), -65504.0)])
    ours = encoding.encode(x, f"bitround{bits}").numpy()
    ref = numcodecs.BitRound(bits).encode(x.half().numpy())
    assert np.array_equal(ours.view(np.int16), ref.view(np.int16))


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_a_non_finite_activation_costs_its_own_value_not_its_channel(dtype):
    """One NaN or inf in a (row, channel) used to ruin the whole channel: int8's scale
    became non-finite (every value decoded to NaN), float8 fell back to scale 1 (the other
    values stored unscaled, clamped to +-448). Now the channel's parameters come from its
    finite values and the non-finite ones are stored as torch.nan_to_num would put them in
    that range: the row encodes exactly as that replacement does."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4) * 1000  # beyond e4m3's +-448 unscaled
    nan, inf = float("nan"), float("inf")
    x[0, 1, 0, 0], x[0, 1, 1, 1], x[1, 2, 2, 2], x[1, 0] = nan, inf, -inf, nan
    replaced = x.clone()
    ch = x[0, 1][torch.isfinite(x[0, 1])]
    replaced[0, 1, 0, 0] = torch.clamp(torch.tensor(0.0), ch.min(), ch.max())
    replaced[0, 1, 1, 1] = ch.max()
    replaced[1, 2, 2, 2] = x[1, 2][torch.isfinite(x[1, 2])].min()
    replaced[1, 0] = 0.0  # a channel with no finite value at all
    stored = encoding.encode(x, dtype)
    assert torch.equal(stored, encoding.encode(replaced, dtype))
    back = encoding.decode(stored, dtype, (3, 4, 4))
    assert torch.isfinite(back).all()
    span = (ch.max() - ch.min()).item()
    assert (back[0, 1] - replaced[0, 1]).abs().max() <= span / 16, "the channel lost precision"


@pytest.mark.parametrize("dtype, bound", [("int8", 0.5 / 255), ("float8", 2.0**-4)])
def test_an_eight_bit_row_decodes_alone_within_its_format_error(dtype, bound):
    x = relu_batch(8, (4, 5, 5)) * torch.arange(1, 5).view(1, 4, 1, 1) ** 3  # ranges differ
    stored = encoding.encode(x, dtype)
    assert stored.dtype == torch.uint8 and stored.shape == (8, 4 * 4 * (dtype == "int8") + 16 + 100)
    back = encoding.decode(stored, dtype, (4, 5, 5))
    one = encoding.decode(stored[3:4].clone(), dtype, (4, 5, 5))  # a row without its batch
    assert torch.equal(one[0], back[3])
    # rows whose byte strings are not a multiple of 4 long, sliced out of their batch
    for shape in ((6, 5, 5), (10,)):
        y = relu_batch(5, shape)
        rows = encoding.encode(y, dtype)
        assert rows.shape[1] % 4 != 0 or shape == (10,)
        whole = encoding.decode(rows, dtype, shape)
        for i in range(5):
            assert torch.equal(encoding.decode(rows[i : i + 1], dtype, shape)[0], whole[i])
        assert torch.equal(encoding.decode(rows[1:4], dtype, shape), whole[1:4])
    # per (row, channel): int8's error is half a step of that channel's range; float8's is
    # relative (3 mantissa bits) down to e4m3's smallest normal times the channel's scale
    span = x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True)
    err = (back - x).abs()
    if dtype == "int8":
        assert (err <= bound * span * 1.0001 + 1e-6).all()
    else:
        scale = x.abs().amax((2, 3), keepdim=True) / 448
        assert (err <= bound * x.abs() + scale * 2.0**-6).all()
    assert torch.equal(encoding.encode(stored, dtype), stored)  # stored rows pass through


def test_a_constant_channel_decodes_exactly():
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = 7.25
    for dtype in encoding.EIGHT_BIT:
        assert torch.equal(encoding.decode(encoding.encode(x, dtype), dtype, (3, 4, 4)), x)


# -- write-through equals reuse ----------------------------------------------------------
@pytest.mark.slow  # 5 runs per dtype (make check); make test keeps the strict-device 8-bit run
@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_reuse_equals_write_through_on_every_tier(tmp_path, dtype):
    """The epoch that writes a cache trains on what the cache decodes to: a run that reads
    the cache back (a disk tier's rerun reuses the last boundary in the epoch that wrote it
    the first time) and a run that wrote it (ram) give identical numbers, whatever the tier."""
    kw = {"cache_dtype": dtype, "epochs": 6}  # boundaries written in epochs 1..4
    runs = {}
    for tier in ("zarr", "mmap"):
        cfg = cfg_for(tmp_path / tier, cache_tier=tier, **kw)
        runs[tier] = first = train(cfg)
        runs[f"{tier} reused"] = again = train(cfg)
        last = max(e["epoch"] for e in first["final"]["cache_events"] if e["event"] == "boundary")
        reused = {e["epoch"] for e in again["final"]["cache_events"] if e["event"] == "reused"}
        assert reused == {last} and first["epochs"][last]["write_s"] > 0
        assert again["epochs"][last]["write_s"] == 0 and again["epochs"][last]["cached_batches"]
    runs["ram"] = train(cfg_for(tmp_path / "ram", cache_tier="ram", **kw))
    expected = losses(runs["ram"])
    for name, run in runs.items():
        assert losses(run) == expected, name
        assert run["final"]["cache_dtype"] == dtype
    fp32 = train(cfg_for(tmp_path / "fp32", cache_tier="ram", epochs=6))
    assert losses(fp32) != expected  # 8 bits changed the numbers: the test can tell


# -- what auto chooses -------------------------------------------------------------------
@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_auto_stores_a_boundary_in_int8_where_only_int8_fits_ram(tmp_path):
    """Stage 2's cache (36x8x8 per digit, training and test set) takes 8.3 MB in float16 and
    4.7 MB in int8: under --max-ram 6MiB auto keeps it in RAM as int8 instead of writing
    float16 to disk, and says why in the run record."""
    kw = {"cache_dtype": "auto", "max_ram": 6 * 2**20}
    run = train(cfg_for(tmp_path, **kw))
    first = next(e for e in run["final"]["cache_events"] if e["event"] == "boundary")
    assert (first["stage"], first["tier"], first["dtype"]) == (2, "ram", "int8")
    assert 0 < first["rel_error"] <= 0.01
    assert "in float16: mmap" in first["reason"] or "in float16: zarr" in first["reason"]
    assert run["epochs"][3]["cache_tier"] == "ram"
    roomy = train(cfg_for(tmp_path / "roomy", **{**kw, "max_ram": 2**30}))
    first = next(e for e in roomy["final"]["cache_events"] if e["event"] == "boundary")
    assert (first["tier"], first["dtype"]) == ("ram", "float16")  # float16 fits: no loss


# -- cache ls / inspect / verify, and zarr-python ------------------------------------------
def write(root: CacheRoot, tier: str, dtype: str, x: torch.Tensor, codec: str = "auto") -> None:
    spec = CacheSpec("k", len(x), tuple(x.shape[1:]), dtype, chunk_bytes=4096)
    w = ZarrWriter(root, spec, codec=codec) if tier == "zarr" else open_writer(tier, spec, root)
    w.append(x, torch.arange(len(x)) % 10, torch.arange(len(x)))
    w.finish().close()


@pytest.mark.parametrize("dtype", encoding.EIGHT_BIT)
def test_zarr_python_reads_the_raw_rows_and_the_readme_recipe_decodes_them(tmp_path, dtype):
    acts = relu_batch(40, (6, 5, 5))
    write(CacheRoot(tmp_path), "zarr", dtype, acts)
    group = zarr.open_group(tmp_path / "k", mode="r")  # plain zarr-python
    # The recipe of docs/reading-a-cache.md, word for word:
    rows = group["activations"][:]  # uint8, (rows, bytes per row)
    shape = group.attrs["encoding"]["values_shape"]  # (C, H, W)
    c, n_params = shape[0], rows.shape[1] - int(np.prod(shape))
    params = rows[:, :n_params].copy().view("<f4").reshape(len(rows), c, -1)
    q = rows[:, n_params:].reshape(len(rows), c, -1)
    if group.attrs["dtype"] == "int8":  # x = offset + scale * q
        x = params[..., :1] + q * params[..., 1:2]
    else:  # float8 e4m3: x = scale * q
        x = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).float().numpy() * params[..., :1]
    decoded = x.reshape(len(rows), *shape)
    ours = encoding.decode(torch.from_numpy(rows), dtype, (6, 5, 5)).numpy()
    np.testing.assert_allclose(decoded, ours, rtol=1e-6, atol=1e-6)
    # within the format's step: half of 1/255 of the range (int8), 1/16 relative (float8)
    assert np.abs(decoded - acts.numpy()).max() <= 0.07 * np.abs(acts.numpy()).max()


@pytest.mark.parametrize("tier", ["zarr", "mmap"])
def test_ls_inspect_and_verify_know_eight_bit_caches(tmp_path, tier, capsys, caplog):
    root = CacheRoot(tmp_path)
    x = relu_batch(64, (6, 5, 5))
    write(root, tier, "int8", x, codec="none")  # raw rows: a flipped byte stays in place
    row = list_caches(root)[0]
    assert (row["dtype"], row["row_bytes"]) == ("int8", 6 * 8 + 150)
    info = inspect(root, "k")
    assert info["arrays"]["activations"]["dtype"] == "int8"
    assert abs(info["arrays"]["activations"]["first_chunk_mean"] - x[:20].mean().item()) < 0.01
    out = cli_in_process(
        capsys, caplog, "cache", "ls", "--long", "--cache-dir", str(tmp_path)
    ).stdout
    assert "int8" in out and "198 B" in out
    assert verify(root, "k") == []
    # A byte of a row's scales, not of its values: the chunk's checksum still catches it.
    reader = open_reader(root, "k")
    where = reader.dir / ("activations.bin" if tier == "mmap" else "activations/c/0/0")
    reader.close()
    flip_byte(where, 5)  # row 0's float32 offset of channel 0, not one of its values
    assert "chunk 0 of activations does not match its checksum" in " ".join(verify(root, "k"))
    assert json.loads(json.dumps(info, default=str))  # inspect stays JSON-able


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "bitround4", "int8", "float8"])
def test_stored_rows_never_share_memory_with_what_the_step_trains_on(dtype, autocast, tmp_path):
    """``as_stored`` returns the rows a writer stores and the tensor the step takes: a step
    that writes into its input (an in-place first op) must not change what is stored,
    whatever the dtype (float32's encoding, and 16-bit under autocast, are no-ops)."""
    from prefast.caching.budgets import Budgets
    from prefast.caching.cachectx import CacheContext
    from prefast.caching.governor import Governor
    from prefast.models import build_model

    model = build_model("densenet-bc", in_channels=1, num_classes=10, image_size=8, depth=10)
    cpu = torch.device("cpu")
    ctx = CacheContext(CacheRoot(tmp_path), Governor(Budgets(tmp_path), cpu), model, cpu,
                       dtype, {}, autocast=autocast)  # fmt: skip
    acts = relu_batch(4, (3, 4, 4))
    acts = acts.to(torch.bfloat16) if autocast and dtype == "bfloat16" else acts
    stored, x, _ = ctx.as_stored(acts, dtype)
    before = stored.clone()
    x.mul_(0)  # what nn.Dropout(inplace=True) may do to its input
    assert torch.equal(stored, before)
