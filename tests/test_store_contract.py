"""One contract for every tier: round trip, order, once per epoch, clean shutdown."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prefast.store import CacheRoot, CacheSpec, PrefetchLoader, open_writer
from prefast.store.order import epoch_order

TIERS = ["gpu", "ram", "mmap", "zarr"]
N, SHAPE = 700, (6, 5, 5)


def write(tier, dtype, root, rows=N, device="cpu"):
    """A cache written from ``device`` (activations there; labels and ids on the host)."""
    if tier == "gpu" and torch.device(device).type == "cpu":
        pytest.skip("the gpu tier is an accelerator's memory")
    x = torch.relu(torch.randn(rows, *SHAPE)).to(getattr(torch, dtype))
    ids = torch.from_numpy(np.random.default_rng(1).permutation(rows))
    labels = ids % 10
    w = open_writer(tier, CacheSpec(f"c-{tier}-{dtype}", rows, SHAPE, dtype), root, device)
    on_device = x.to(device)
    for s in range(0, rows, 50):
        w.append(on_device[s : s + 50], labels[s : s + 50], ids[s : s + 50])
    return w.finish(), x, ids


def epoch(reader, seed, ep, buffer_bytes=2**30, device="cpu"):
    batches = lambda: reader.epoch_batches(seed, ep, 64, buffer_bytes)  # noqa: E731
    return list(PrefetchLoader(batches, device))


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_bit_exact(tier, dtype, device, tmp_path, no_thread_leak):
    reader, x, ids = write(tier, dtype, CacheRoot(tmp_path), device=device)
    row_of = {int(v): r for r, v in enumerate(ids)}
    for acts, labels, got_ids in epoch(reader, 0, 0, device=device):
        assert acts.device == device and labels.device == device and got_ids.device.type == "cpu"
        rows = torch.tensor([row_of[int(i)] for i in got_ids])
        assert acts.dtype == x.dtype
        assert torch.equal(
            acts.cpu().view(torch.int16 if dtype != "float32" else torch.int32),
            x[rows].view(torch.int16 if dtype != "float32" else torch.int32),
        )
        assert torch.equal(labels.cpu(), got_ids % 10)
    reader.close()


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("buffer_bytes", [2**30, 4096])  # whole cache buffered / chunk shuffle
def test_every_sample_once_and_deterministic(tier, buffer_bytes, device, tmp_path, no_thread_leak):
    reader, _, _ = write(tier, "float16", CacheRoot(tmp_path), device=device)
    a = torch.cat([b[2] for b in epoch(reader, 3, 5, buffer_bytes, device)])
    b = torch.cat([b[2] for b in epoch(reader, 3, 5, buffer_bytes, device)])
    c = torch.cat([b[2] for b in epoch(reader, 3, 6, buffer_bytes, device)])
    assert sorted(a.tolist()) == list(range(N))
    assert torch.equal(a, b), "order must be a pure function of (seed, epoch)"
    assert not torch.equal(a, c)
    if tier in ("gpu", "ram") or buffer_bytes >= reader.spec.logical_bytes:
        assert a.tolist() == epoch_order(3, 5, N).tolist(), "exact tiers follow the shared order"
    reader.close()


@pytest.mark.parametrize("tier", ["ram", "mmap", "zarr"])
def test_loader_close_is_idempotent_and_stops_thread(tier, tmp_path, no_thread_leak):
    reader, _, _ = write(tier, "float16", CacheRoot(tmp_path))
    loader = PrefetchLoader(lambda: reader.epoch_batches(0, 0, 8), depth=2)
    it = iter(loader)
    next(it)  # the thread is now blocked on a full queue
    loader.close()
    loader.close()
    assert not loader.thread.is_alive()
    reader.close()


def test_loader_reraises_reader_errors(no_thread_leak):
    def broken():
        yield torch.zeros(1), torch.zeros(1), torch.zeros(1)
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError, match="decode failed"):
        list(PrefetchLoader(broken))


def test_writer_rejects_wrong_row_count(tmp_path, no_thread_leak):
    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("short", 10, SHAPE, "float16"), root)
    w.append(torch.zeros(4, *SHAPE), torch.zeros(4, dtype=torch.int64), torch.arange(4))
    with pytest.raises(ValueError, match="wrote 4 of 10"):
        w.finish()
    assert not root.dir_for("short").exists()


def test_zarr_codec_choice_and_metadata(tmp_path):
    reader, _, _ = write("zarr", "float16", CacheRoot(tmp_path), rows=2000)
    assert reader.attrs["codec"] == "zstd1" and reader.attrs["compression_ratio"] > 1.1
    assert reader.attrs["dtype"] == "float16" and reader.attrs["rows"] == 2000
    reader.close()
    root = CacheRoot(tmp_path / "noise")
    from prefast.store.zarr_writer import ZarrWriter

    # random bits: zstd cannot pay
    noise = torch.randint(-(2**31), 2**31 - 1, (500, *SHAPE), dtype=torch.int32).view(torch.float32)
    w = ZarrWriter(root, CacheSpec("noise", 500, SHAPE, "float32"))
    w.append(noise, torch.zeros(500, dtype=torch.int64), torch.arange(500))
    r = w.finish()
    assert r.attrs["codec"] == "none"
    r.close()


@pytest.mark.parametrize("tier", ["mmap", "zarr"])
def test_disk_writer_queue_is_bounded_in_bytes(tier, tmp_path, no_thread_leak):
    """Large rows must not let the trainer queue 8 batches ahead of the disk."""
    from prefast.store.disk_writer import QUEUE_BYTES

    rows, shape = 48, (64, 64, 64)  # 1 MiB per row at float32
    w = open_writer(tier, CacheSpec(f"big-{tier}", rows, shape, "float32"), CacheRoot(tmp_path))
    x = torch.zeros(rows, *shape)
    ids = torch.arange(rows)
    for s in range(0, rows, 24):  # 24 MiB batches
        w.append(x[s : s + 24], ids[s : s + 24], ids[s : s + 24])
        assert w.queue.maxsize * 24 * 2**20 <= max(QUEUE_BYTES, 24 * 2**20)
    w.finish().close()


@pytest.mark.parametrize("tier", ["mmap", "zarr"])
def test_a_shuffled_disk_epoch_holds_at_most_its_buffer(tier, tmp_path, no_thread_leak):
    """Chunks being served plus chunks read ahead stay within ``buffer_bytes``, with the
    chunk size a run under that budget writes (``chunk_bytes_for``)."""
    import threading

    from prefast.store.base import chunk_bytes_for

    buffer = 8 * 2**20
    rows, shape = 200, (16, 32, 32)  # 64 KiB per row at float32: 13 chunks of 1 MiB
    spec = CacheSpec(f"w-{tier}", rows, shape, "float32", chunk_bytes=chunk_bytes_for(buffer))
    w = open_writer(tier, spec, CacheRoot(tmp_path))
    ids = torch.arange(rows)
    w.append(torch.relu(torch.randn(rows, *shape)), ids, ids)
    reader = w.finish()
    live, peak, lock = set(), [0], threading.Lock()
    load, release = reader._load, reader._release

    def counted_load(i, buf):
        with lock:
            live.add(i)
            peak[0] = max(peak[0], len(live))
        return load(i, buf)

    def counted_release(i, arr):
        with lock:
            live.discard(i)
        return release(i, arr)

    reader._load, reader._release = counted_load, counted_release
    served = torch.cat([b[2] for b in epoch(reader, 0, 1, buffer)])
    assert sorted(served.tolist()) == list(range(rows))
    chunk = reader.chunk_rows * spec.row_bytes
    assert reader.num_chunks > buffer // chunk, "the cache must not fit the buffer"
    assert peak[0] * chunk <= buffer, (peak[0], chunk)
    assert not live, f"chunks still held after the epoch: {sorted(live)}"
    for buffer_bytes in (buffer, 2**30):  # an epoch stopped early (windowed, then exact)
        batches = reader.epoch_batches(0, 2, 64, buffer_bytes)
        next(batches)
        batches.close()
        assert not live, f"chunks still held after a stopped epoch: {sorted(live)}"
    reader.close()


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_zarr_python_reads_what_the_parallel_writer_wrote(codec, tmp_path, no_thread_leak):
    """Chunk files are written by PreFast's own encoder: they must stay plain Zarr v3."""
    import zarr

    from prefast.store.zarr_writer import ZarrWriter

    rows = 3000  # 2 chunks of 2,048 rows at 2 KiB: the last one padded, as zarr does
    x = torch.relu(torch.randn(rows, 8, 8, 8))
    spec = CacheSpec("z", rows, (8, 8, 8), "float32", chunk_bytes=4 * 2**20)
    w = ZarrWriter(CacheRoot(tmp_path), spec, codec=codec)
    for s in range(0, rows, 256):
        w.append(
            x[s : s + 256],
            torch.zeros(len(x[s : s + 256]), dtype=torch.int64),
            torch.arange(s, min(s + 256, rows)),
        )
    reader = w.finish()
    assert reader.attrs["codec"] == ("zstd1" if codec == "zstd" else "none")
    reader.close()
    array = zarr.open_array(str(tmp_path / "z" / "activations"), mode="r")
    assert np.array_equal(np.asarray(array[:]), x.numpy())
    assert np.array_equal(
        np.asarray(zarr.open_array(str(tmp_path / "z" / "ids"), mode="r")[:]), np.arange(rows)
    )


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_mmap_reader_maps_its_file_for_huge_page_faults(tmp_path, no_thread_leak):
    """The mmap tier's file is mapped with MADV_HUGEPAGE: faults then read and map 2 MiB
    folios, which made 1 GB cold epochs 1.3x faster here (``chunkio.map_for_reading``); a
    forgotten advice would go unnoticed otherwise. (The zarr tier reads its chunk files
    instead of mapping them: a bad block is then an error, not SIGBUS.)"""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off: the advice is a no-op")
    mmap_reader, _, _ = write("mmap", "float32", CacheRoot(tmp_path / "m"))
    address = np.frombuffer(mmap_reader._map, dtype=np.uint8).ctypes.data
    assert "hg" in _vm_flags(address), "mmap: the mapping has no MADV_HUGEPAGE"
    mmap_reader.close()
