"""What the hardware allows: the floors each store tier is measured against.

All on the same logical bytes, in the same run, cold (page cache dropped):

- ``raw_file_write_mb_s``: one sequential file written and fsynced;
- ``raw_file_read_mb_s``: that file read sequentially in 8 MiB reads;
- ``memmap_read_mb_s``: that file read through ``np.memmap`` in 256-row copies;
- ``zstd_chunk_read_mb_s``: a minimal reader of the zarr/zstd tier's own chunk
  files: ``os.readv`` + numcodecs zstd decode + crc32c check, into reused
  buffers, on a pool of ``os.cpu_count()`` threads, in a shuffled chunk order;
- ``torch_load_per_sample_mb_s``: one ``torch.save`` file per sample (AutoFreeze's layout).

And the GIL question: how much a training loop slows down while a disk-tier
epoch is read on the same cores (``trainer_slowdown``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numcodecs
import numpy as np
import torch

from prefast.store.layout import drop_page_cache

MB = 1e6


def evict(path: Path) -> bool | None:
    """Drop ``path``'s files from the page cache; True if verified empty after."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    drop_page_cache(path)
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return all(v.strip() == "0" for v in out) if out else None


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_file_floors(arr: np.ndarray, workdir: Path) -> dict:
    """Sequential write (+fsync), cold sequential read, cold np.memmap read.

    The two reads get a file each, both written before either is read, so each
    floor is a first read of a fresh file, as every tier's read is (the memmap
    floor used to re-read the raw read's file, and at 8.6 GB measured above the
    raw read; from a fresh file it measured 1,442 MB/s against the raw read's
    1,859. At 1 GB it still reads faster than the raw read here: 2,706 vs 1,604).
    """
    raw, mapped_file = workdir / "raw.bin", workdir / "memmap.bin"

    def write(path: Path) -> None:
        with open(path, "wb", buffering=0) as f:
            view = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
            for s in range(0, len(view), 8 * 2**20):
                f.write(view[s : s + 8 * 2**20])
            os.fsync(f.fileno())

    write_s = timed(lambda: write(raw))
    write(mapped_file)
    evicted = evict(raw)
    evict(mapped_file)

    def read() -> None:
        buf = bytearray(8 * 2**20)
        with open(raw, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    read_s = timed(read)
    mapped = np.memmap(mapped_file, dtype=arr.dtype, mode="r", shape=arr.shape)

    def read_memmap() -> None:
        for s in range(0, len(arr), 256):
            np.array(mapped[s : s + 256])

    mm_s = timed(read_memmap)
    raw.unlink()
    mapped_file.unlink()
    return {
        "raw_file_write_mb_s": arr.nbytes / write_s / MB,
        "raw_file_read_mb_s": arr.nbytes / read_s / MB,
        "memmap_read_mb_s": arr.nbytes / mm_s / MB,
        "raw_cold_evicted": evicted,
    }


def zstd_chunk_floor(chunk_files: list[Path], chunk_bytes: int, logical_bytes: int) -> float:
    """The minimal reader of zarr/zstd chunk files (zstd payload + 4-byte crc32c), cold:
    each thread reads a file into its own reused buffer and decodes ``chunk_bytes``
    into another, as the store's reader does. It reads the files after the tier
    did (a second read: if anything, that favours the floor)."""
    zstd = numcodecs.Zstd()
    order = np.random.default_rng(0).permutation(len(chunk_files))
    buffers = threading.local()

    def load(i: int) -> None:
        if not hasattr(buffers, "out"):
            buffers.raw, buffers.out = bytearray(0), bytearray(chunk_bytes)
        fd = os.open(chunk_files[i], os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if len(buffers.raw) < size:
                buffers.raw = bytearray(size)
            raw = memoryview(buffers.raw)[:size]
            os.readv(fd, [raw])
        finally:
            os.close(fd)
        payload, trailer = raw[:-4], raw[-4:]
        if crc32c.crc32c(payload) != int.from_bytes(trailer, "little"):
            raise ValueError(f"chunk {chunk_files[i]} fails its crc32c")
        zstd.decode(payload, out=buffers.out)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        t = time.perf_counter()
        list(pool.map(load, order.tolist()))
        seconds = time.perf_counter() - t
    return logical_bytes / seconds / MB


def per_sample_floor(data: torch.Tensor, workdir: Path, n_max: int = 2000) -> float:
    n = min(n_max, len(data))  # one file per sample: capped, throughput scales
    per = workdir / "per_sample"
    per.mkdir()
    for i in range(n):
        torch.save(data[i].clone(), per / f"{i}.pt")
    evict(per)
    order = np.random.default_rng(0).permutation(n)
    seconds = timed(lambda: [torch.load(per / f"{i}.pt") for i in order])
    shutil.rmtree(per)
    return n * data[0].numel() * data.element_size() / seconds / MB


def trainer_slowdown(read_epoch: Callable[[], None], steps: int = 60) -> dict:
    """Step time of a small CNN training loop alone, then while a disk-tier epoch is
    read on the same cores (a loader thread + its decode pool, as in training)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 64, 16, 16), torch.randint(0, 10, (64,))

    def step_times(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(time.perf_counter() - t)
        return out

    step_times(5)  # warm up
    alone = float(np.median(step_times(steps)))
    reader = threading.Thread(target=read_epoch, name="prefast-bench-read")
    reader.start()
    during: list[float] = []
    while reader.is_alive() and len(during) < 10 * steps:
        during += step_times(1)
    reader.join()
    with_read = float(np.median(during)) if during else alone
    return {
        "step_ms_alone": alone * 1e3,
        "step_ms_while_reading": with_read * 1e3,
        "steps_while_reading": len(during),
        "slowdown": with_read / alone - 1.0,
    }
