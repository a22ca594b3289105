"""Storage benchmark: write and cold-read throughput of every tier, with baselines.

Claim under test: a chunked Zarr cache (crc32c, zstd when it pays) reads at
disk speed or better, and far faster than caching one ``torch.save`` file per
sample (as AutoFreeze does). All throughputs are *logical* MB/s (uncompressed
bytes delivered), measured side by side in one run on the same data.

Cold reads: before each read pass the cache's files are dropped from the page
cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``fincore`` (util-linux),
when present, checks that no page stayed resident, and the report says so.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from prefast.store.base import CacheSpec
from prefast.store.disk_writer import ZarrWriter
from prefast.store.layout import CacheRoot
from prefast.store.loader import PrefetchLoader

MB = 1e6
ROW_SHAPE = (64, 16, 16)  # a DenseNet-like boundary: 32 KiB per row at fp16


def activation_like(rows: int, seed: int = 0) -> torch.Tensor:
    """fp16 rows shaped like post-ReLU activations: about half exact zeros."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, *ROW_SHAPE, dtype=torch.float16)
    step = 4096  # in pieces: 8 GB of fp16 would pass through 32 GB of float32 at once
    for s in range(0, rows, step):
        piece = torch.randn(min(step, rows - s), *ROW_SHAPE, generator=g)
        out[s : s + step] = torch.relu_(piece)
    return out


def evict(path: Path) -> bool | None:
    """Drop ``path``'s files from the page cache; True if verified empty after."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return all(v.strip() == "0" for v in out) if out else None


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_tier(tier: str, codec: str, data: torch.Tensor, workdir: Path, batch: int = 256) -> dict:
    from prefast.store import open_writer

    root = CacheRoot(workdir / f"{tier}-{codec}")
    spec = CacheSpec(f"bench-{tier}-{codec}", len(data), ROW_SHAPE, "float16")
    labels = torch.zeros(len(data), dtype=torch.int64)
    ids = torch.arange(len(data))

    def write():  # type: ignore[no-untyped-def]
        w = ZarrWriter(root, spec, codec=codec) if tier == "zarr" else open_writer(tier, spec, root)
        for s in range(0, len(data), batch):
            w.append(data[s : s + batch], labels[s : s + batch], ids[s : s + batch])
        return w.finish()

    t0 = time.perf_counter()
    reader = write()
    write_s = time.perf_counter() - t0
    evicted = evict(root.dir_for(spec.key)) if tier in ("mmap", "zarr") else None

    def read():  # type: ignore[no-untyped-def]
        for _ in PrefetchLoader(lambda: reader.epoch_batches(0, 0, batch, buffer_bytes=64 * 2**20)):
            pass

    read_s = _timed(read)
    ratio = reader.attrs.get("compression_ratio", 1.0) if hasattr(reader, "attrs") else 1.0
    reader.close()
    shutil.rmtree(root.path, ignore_errors=True)
    nbytes = data.numel() * 2
    return {
        "tier": tier,
        "codec": codec,
        "write_mb_s": nbytes / write_s / MB,
        "read_mb_s": nbytes / read_s / MB,
        "ratio": ratio,
        "cold_evicted": evicted,
    }


def baselines(data: torch.Tensor, workdir: Path, per_sample_max: int = 2000) -> dict:
    arr = data.numpy()
    raw = workdir / "raw.bin"
    arr.tofile(raw)
    evicted = evict(raw)

    def read_raw():  # type: ignore[no-untyped-def]
        with open(raw, "rb", buffering=0) as f:
            while f.read(8 * 2**20):
                pass

    raw_s = _timed(read_raw)
    evict(raw)
    mapped = np.memmap(raw, dtype=np.float16, mode="r", shape=arr.shape)

    def read_memmap() -> None:
        for s in range(0, len(arr), 256):
            np.array(mapped[s : s + 256])

    mm_s = _timed(read_memmap)
    n = min(per_sample_max, len(data))  # one file per sample: capped, throughput scales
    per = workdir / "per_sample"
    per.mkdir()
    for i in range(n):
        torch.save(data[i].clone(), per / f"{i}.pt")
    evict(per)
    order = np.random.default_rng(0).permutation(n)
    ps_s = _timed(lambda: [torch.load(per / f"{i}.pt") for i in order])
    row_bytes = arr[0].nbytes
    return {
        "raw_file_read_mb_s": arr.nbytes / raw_s / MB,
        "memmap_read_mb_s": arr.nbytes / mm_s / MB,
        "torch_load_per_sample_mb_s": n * row_bytes / ps_s / MB,
        "per_sample_files": n,
        "raw_cold_evicted": evicted,
    }


def machine() -> dict:
    import numcodecs
    import zarr

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_store_bench(
    size_bytes: int, directory: Path | None = None, trials: int = 1, log=print
) -> dict:  # type: ignore[no-untyped-def]
    rows = max(256, size_bytes // (int(np.prod(ROW_SHAPE)) * 2))
    data = activation_like(rows)
    workdir = Path(tempfile.mkdtemp(prefix="prefast-bench-", dir=directory))
    tiers = [("ram", "none"), ("mmap", "none"), ("zarr", "none"), ("zarr", "zstd")]
    if torch.cuda.is_available():
        tiers.insert(0, ("gpu", "none"))
    results = []
    try:
        for tier, codec in tiers:
            runs = [bench_tier(tier, codec, data, workdir) for _ in range(trials)]
            row = {k: runs[0][k] for k in ("tier", "codec", "ratio", "cold_evicted")}
            for m in ("write_mb_s", "read_mb_s"):
                vals = [r[m] for r in runs]
                row[m], row[m.replace("_mb_s", "_std")] = float(np.mean(vals)), float(np.std(vals))
                # every trial kept: the spread's source stays visible (e.g. a slow first trial)
                row[m.replace("_mb_s", "_trials_mb_s")] = [round(v, 1) for v in vals]
            results.append(row)
            log(
                f"{tier:>5}/{codec:<5} write {row['write_mb_s']:8.0f} MB/s  read {row['read_mb_s']:8.0f} MB/s  ratio {row['ratio']:.2f}"
            )
        base = baselines(data, workdir)
        log(
            f"raw file {base['raw_file_read_mb_s']:.0f} MB/s, memmap {base['memmap_read_mb_s']:.0f} MB/s, "
            f"torch.load per sample {base['torch_load_per_sample_mb_s']:.0f} MB/s"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(),
        "logical_bytes": data.numel() * 2,
        "rows": rows,
        "row_shape": list(ROW_SHAPE),
        "dtype": "float16",
        "trials": trials,
        "results": results,
        "baselines": base,
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Storage benchmark: {doc['logical_bytes'] / 1e9:.2f} GB logical fp16, rows "
        f"{doc['row_shape']}, {doc['trials']} trial(s); {m['cores']} cores, {m['ram_gb']} GB RAM, "
        f"GPU {m['gpu']}; torch {m['torch']}, zarr {m['zarr']}, numcodecs {m['numcodecs']}.",
        "",
        "| tier | codec | write MB/s | cold read MB/s | ratio | page cache evicted | write, read per trial |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in doc["results"]:
        writes, reads = (
            ", ".join(f"{v:.0f}" for v in r.get(f"{m}_trials_mb_s", [])) for m in ("write", "read")
        )
        lines.append(
            f"| {r['tier']} | {r['codec']} | {r['write_mb_s']:.0f} ± {r['write_std']:.0f} | "
            f"{r['read_mb_s']:.0f} ± {r['read_std']:.0f} | {r['ratio']:.2f} | {r['cold_evicted']} | {writes}; {reads} |"
        )
    lines += ["", "RAM and GPU tiers have no page cache to drop: their reads are from memory."]
    b = doc["baselines"]
    lines += [
        "",
        "| baseline | read MB/s |",
        "|---|---:|",
        f"| raw sequential file read (cold) | {b['raw_file_read_mb_s']:.0f} |",
        f"| np.memmap read | {b['memmap_read_mb_s']:.0f} |",
        f"| torch.load, one file per sample ({b['per_sample_files']} files, cold) | {b['torch_load_per_sample_mb_s']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Bar chart of cold-read (and write) MB/s per tier, with the baselines beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['tier']}/{r['codec']}" for r in doc["results"]]
    reads = [r["read_mb_s"] for r in doc["results"]]
    errs = [r["read_std"] for r in doc["results"]]
    writes = [r["write_mb_s"] for r in doc["results"]]
    write_errs = [r["write_std"] for r in doc["results"]]
    b = doc["baselines"]
    base_names = ["raw file", "np.memmap", "torch.load\nper sample"]
    base_reads = [
        b["raw_file_read_mb_s"],
        b["memmap_read_mb_s"],
        b["torch_load_per_sample_mb_s"],
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, reads, 0.4, yerr=errs, capsize=3, label="read (cold where on disk)")
    ax.bar(x + 0.2, writes, 0.4, yerr=write_errs, capsize=3, label="write")
    xb = np.arange(len(names), len(names) + len(base_names))
    ax.bar(xb, base_reads, 0.4, color="grey", label="baseline read")
    ax.set_xticks(np.concatenate([x, xb]), names + base_names, fontsize=7)
    ax.set_ylabel("logical MB/s")
    ax.set_yscale("log")
    ax.set_title(
        f"{doc['logical_bytes'] / 1e9:.1f} GB fp16 activations, {doc['trials']} trial(s)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
