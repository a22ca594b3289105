"""Storage benchmark: write and cold-read throughput of every tier, against floors.

Claim under test: each disk tier reads a shuffled epoch (the trainer's own
path: chunk-order shuffle + shuffle window, through the loader thread) at
>= 0.8x of what the hardware allows for the same bytes, measured in the same
run (``benchmarks/store_floors.py``): Zarr uncompressed vs a raw sequential
file read, Zarr zstd vs a minimal parallel reader of the same chunk files,
mmap vs ``np.memmap``; writes against a raw sequential write with fsync. All
throughputs are *logical* MB/s (uncompressed bytes delivered).

Cold reads: before each read pass the cache's files are dropped from the page
cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``fincore`` (util-linux),
when present, checks that no page stayed resident, and the report says so.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.store_floors import (
    evict,
    per_sample_floor,
    raw_file_floors,
    timed,
    trainer_slowdown,
    zstd_chunk_floor,
)
from prefast.store.base import SHUFFLE_BUFFER_BYTES, CacheSpec, Writer, chunk_bytes_for
from prefast.store.encoding import encode
from prefast.store.layout import CacheRoot
from prefast.store.loader import PrefetchLoader
from prefast.store.zarr_writer import ZarrWriter

MB = 1e6
ROW_SHAPE = (64, 16, 16)  # a DenseNet-like boundary: 32 KiB per row at fp16


def stored_as(data: torch.Tensor, dtype: str) -> torch.Tensor:
    """fp16 activations as a cache stores them in ``dtype`` (encoded before the writer, as
    training encodes them on the compute device: the writer's time is the store's alone)."""
    if dtype == "float16":
        return data
    step = 4096
    first = encode(data[:step], dtype)
    out = torch.empty(len(data), *first.shape[1:], dtype=first.dtype)
    for s in range(0, len(data), step):
        out[s : s + step] = encode(data[s : s + step], dtype)
    return out


def activations_of_size(size_bytes: int) -> torch.Tensor:
    """``activation_like`` rows adding up to ``size_bytes`` of fp16 (at least 256 rows)."""
    return activation_like(max(256, size_bytes // (int(np.prod(ROW_SHAPE)) * 2)))


def activation_like(rows: int, seed: int = 0) -> torch.Tensor:
    """fp16 rows shaped like post-ReLU activations: about half exact zeros."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, *ROW_SHAPE, dtype=torch.float16)
    step = 4096  # in pieces: 8 GB of fp16 would pass through 32 GB of float32 at once
    for s in range(0, rows, step):
        piece = torch.randn(min(step, rows - s), *ROW_SHAPE, generator=g)
        out[s : s + step] = torch.relu_(piece)
    return out


FLOOR = {  # what each tier's reads are measured against
    "mmap": "memmap_read_mb_s",
    "zarr/none": "raw_file_read_mb_s",
    "zarr/zstd": "zstd_chunk_read_mb_s",
}


def bench_tier(
    tier: str,
    codec: str,
    data: torch.Tensor,
    workdir: Path,
    buffer_bytes: int,
    batch: int = 256,
    chunk_bytes: int | None = None,
    dtype: str = "float16",
) -> dict:
    """Write ``data`` (rows stored in ``dtype``) through the tier's writer, then read one
    shuffled epoch cold, the way the trainer does (chunk-order shuffle + window, through
    the loader thread)."""
    from prefast.store import open_writer

    root = CacheRoot(workdir / f"{tier}-{codec}-{dtype}")
    # Chunks as a run with this shuffle buffer writes them (cachectx.spec), unless given.
    chunk = chunk_bytes or chunk_bytes_for(buffer_bytes)
    key = f"bench-{tier}-{codec}-{dtype}"
    spec = CacheSpec(key, len(data), ROW_SHAPE, dtype, chunk_bytes=chunk)
    labels = torch.zeros(len(data), dtype=torch.int64)
    ids = torch.arange(len(data))

    def write():  # type: ignore[no-untyped-def]
        if tier == "zarr":
            w: Writer = ZarrWriter(root, spec, codec=codec)
        else:  # the gpu tier lives on the GPU that trains
            w = open_writer(tier, spec, root, "cuda" if tier == "gpu" else None)
        for s in range(0, len(data), batch):
            w.append(data[s : s + batch], labels[s : s + batch], ids[s : s + batch])
        return w.finish()

    t0 = time.perf_counter()
    reader = write()
    write_s = time.perf_counter() - t0
    evicted = evict(root.dir_for(spec.key)) if tier in ("mmap", "zarr") else None

    def read():  # type: ignore[no-untyped-def]
        for _ in PrefetchLoader(lambda: reader.epoch_batches(0, 1, batch, buffer_bytes)):
            pass

    read_s = timed(read)
    nbytes = data.numel() * data.element_size()  # stored bytes, before compression
    out = {
        "tier": tier,
        "codec": codec,
        "dtype": dtype,
        "row_bytes": spec.row_bytes,
        "read_rows_s": len(data) / read_s,
        "write_mb_s": nbytes / write_s / MB,
        "read_mb_s": nbytes / read_s / MB,
        "ratio": reader.attrs.get("compression_ratio", 1.0) if hasattr(reader, "attrs") else 1.0,
        "cold_evicted": evicted,
    }
    if tier == "zarr" and codec == "zstd":  # the minimal reader of these same chunk files
        evict(root.dir_for(spec.key))
        files = [reader.chunk_path(i) for i in range(reader.num_chunks)]
        full_chunk = reader.chunk_rows * spec.row_bytes
        out["zstd_chunk_read_mb_s"] = zstd_chunk_floor(files, full_chunk, nbytes)
    reader.close()
    shutil.rmtree(root.path, ignore_errors=True)
    return out


def slowdown_while_reading(data: torch.Tensor, workdir: Path, buffer_bytes: int) -> dict:
    """trainer_slowdown with a zarr/zstd epoch read (the tier that decodes most)."""
    root = CacheRoot(workdir / "slowdown")
    chunk = chunk_bytes_for(buffer_bytes)
    spec = CacheSpec("bench-slowdown", len(data), ROW_SHAPE, "float16", chunk_bytes=chunk)
    w = ZarrWriter(root, spec, codec="zstd")
    ids = torch.arange(len(data))
    for s in range(0, len(data), 256):
        w.append(data[s : s + 256], ids[s : s + 256], ids[s : s + 256])
    reader = w.finish()
    evict(root.dir_for(spec.key))

    def read_epoch() -> None:
        for _ in PrefetchLoader(lambda: reader.epoch_batches(0, 1, 256, buffer_bytes)):
            pass

    try:
        return trainer_slowdown(read_epoch)
    finally:
        reader.close()
        shutil.rmtree(root.path, ignore_errors=True)


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


def make_workdir(directory: Path | None) -> Path:
    """A scratch directory under ``directory`` (created if missing), or ConfigError."""
    from prefast.store.errors import ConfigError

    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--dir {directory} cannot be created ({exc.strerror}): pass a directory on "
                "the disk to measure"
            ) from None
    return Path(tempfile.mkdtemp(prefix="prefast-bench-", dir=directory))


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return float(np.mean(vals)), float(np.std(vals))


def paired_ratios(run: dict, floors: dict) -> None:
    """A tier's read and write against the floors measured in the same trial."""
    name = "mmap" if run["tier"] == "mmap" else f"{run['tier']}/{run['codec']}"
    if name in FLOOR:
        run["read_floor"] = FLOOR[name]
        # the minimal zstd reader read the same chunk files: those of this dtype
        own = f"{FLOOR[name]}/{run.get('dtype', 'float16')}"
        run["read_floor_mb_s"] = floors.get(own, floors[FLOOR[name]])
        run["read_vs_floor"] = run["read_mb_s"] / run["read_floor_mb_s"]
    if run["tier"] in ("mmap", "zarr"):
        run["write_vs_floor"] = run["write_mb_s"] / floors["raw_file_write_mb_s"]


def summarize(runs: list[dict]) -> dict:
    """One tier over its trials: mean ± std of MB/s and of the paired ratios, every trial kept."""
    row = {k: runs[0][k] for k in ("tier", "codec", "dtype", "row_bytes", "ratio", "cold_evicted")}
    row["read_rows_s"] = _mean_std([r["read_rows_s"] for r in runs])[0]
    for m in ("write_mb_s", "read_mb_s"):
        vals = [r[m] for r in runs]
        row[m], row[m.replace("_mb_s", "_std")] = _mean_std(vals)
        # every trial kept: the spread's source stays visible (e.g. a slow first trial)
        row[m.replace("_mb_s", "_trials_mb_s")] = [round(v, 1) for v in vals]
    for m in ("read_vs_floor", "write_vs_floor"):
        if m in runs[0]:
            vals = [r[m] for r in runs]
            row[m], row[m + "_std"] = _mean_std(vals)
            row[m + "_trials"] = [round(v, 3) for v in vals]
    if "read_floor" in runs[0]:
        row["read_floor"] = runs[0]["read_floor"]
        row["read_floor_mb_s"] = _mean_std([r["read_floor_mb_s"] for r in runs])[0]
    return row


def run_store_bench(
    size_bytes: int,
    directory: Path | None = None,
    trials: int = 1,
    log=print,  # type: ignore[no-untyped-def]
    dtypes: tuple[str, ...] = ("float16",),
) -> dict:
    """Every tier in every dtype of ``dtypes`` (rows encoded once, up front), against the
    floors of the same trial; MB/s count stored bytes (uncompressed), rows/s compare dtypes."""
    workdir = make_workdir(directory)
    data = activations_of_size(size_bytes)
    stored = {d: stored_as(data, d) for d in dtypes}
    nbytes = data.numel() * 2
    # The trainer's shuffle buffer: min(256 MiB, RAM budget / 4); a quarter of the cache
    # here at most, so every disk tier takes the chunk-shuffle + window path.
    buffer_bytes = min(SHUFFLE_BUFFER_BYTES, nbytes // 4)
    kinds = [("ram", "none"), ("mmap", "none"), ("zarr", "none"), ("zarr", "zstd")]
    if torch.cuda.is_available():
        kinds.insert(0, ("gpu", "none"))
    tiers = [(t, c, d) for d in dtypes for t, c in kinds]
    trial_runs: list[dict[tuple[str, str, str], dict]] = []
    floor_trials: list[dict] = []
    try:
        # Trials are the outer loop, and each tier is compared with the floors of its own
        # trial: this VM's disk drifts by 2x within minutes, so only paired ratios say
        # how far a tier is from the hardware.
        for trial in range(trials):
            floors = raw_file_floors(data.numpy(), workdir)
            log(
                f"trial {trial + 1}: raw file write {floors['raw_file_write_mb_s']:.0f} MB/s, "
                f"read {floors['raw_file_read_mb_s']:.0f} MB/s, "
                f"np.memmap read {floors['memmap_read_mb_s']:.0f} MB/s"
            )
            runs = {}
            for tier, codec, dtype in tiers:
                r = runs[tier, codec, dtype] = bench_tier(
                    tier, codec, stored[dtype], workdir, buffer_bytes, dtype=dtype
                )
                if "zstd_chunk_read_mb_s" in r:  # measured on the zstd tier's own chunk files
                    floors[f"zstd_chunk_read_mb_s/{dtype}"] = r["zstd_chunk_read_mb_s"]
                    if dtype == dtypes[0]:  # the floors table's
                        floors["zstd_chunk_read_mb_s"] = r["zstd_chunk_read_mb_s"]
                log(
                    f"{tier:>5}/{codec:<5} {dtype:<8} write {r['write_mb_s']:8.0f} MB/s  "
                    f"read {r['read_mb_s']:8.0f} MB/s  ratio {r['ratio']:.2f}"
                )
            for r in runs.values():
                paired_ratios(r, floors)
            floor_trials.append(floors)
            trial_runs.append(runs)
        results = [summarize([runs[t] for runs in trial_runs]) for t in tiers]
        base = {
            k: _mean_std([f[k] for f in floor_trials])[0]
            for k in (
                "raw_file_write_mb_s",
                "raw_file_read_mb_s",
                "memmap_read_mb_s",
                "zstd_chunk_read_mb_s",
            )
        }
        base["raw_cold_evicted"] = floor_trials[0]["raw_cold_evicted"]
        base["torch_load_per_sample_mb_s"] = per_sample_floor(data, workdir)
        base["per_sample_files"] = min(2000, len(data))
        log("floors: " + ", ".join(f"{k} {v:.0f}" for k, v in base.items() if k.endswith("_mb_s")))
        slowdown = slowdown_while_reading(data, workdir, buffer_bytes)
        log(
            f"trainer step {slowdown['step_ms_alone']:.1f} ms alone, "
            f"{slowdown['step_ms_while_reading']:.1f} ms while a zarr/zstd epoch is read "
            f"(slowdown {slowdown['slowdown']:+.0%})"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(),
        "logical_bytes": nbytes,
        "rows": len(data),
        "row_shape": list(ROW_SHAPE),
        "dtype": "float16",
        "dtypes": list(dtypes),
        "trials": trials,
        "shuffle_buffer_bytes": buffer_bytes,
        "chunk_bytes": chunk_bytes_for(buffer_bytes),
        "results": results,
        "baselines": base,
        "trainer_slowdown": slowdown,
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Storage benchmark: {doc['logical_bytes'] / 1e9:.2f} GB logical fp16, rows "
        f"{doc['row_shape']}, {doc['trials']} trial(s); {m['cores']} cores, {m['ram_gb']} GB RAM, "
        f"GPU {m['gpu']}; torch {m['torch']}, zarr {m['zarr']}, numcodecs {m['numcodecs']}. "
        f"Reads are one shuffled epoch ({doc['chunk_bytes'] / 2**20:.0f} MiB chunks, chunk shuffle, "
        f"{doc['shuffle_buffer_bytes'] / 2**20:.0f} MiB buffer), cold, through the loader thread. "
        "Each trial measures the floors, then every tier; ratios are per trial (paired), "
        "then averaged. MB/s count stored bytes before compression (an 8-bit row, scales "
        "included, is about half a float16 row); rows/s compares dtypes.",
        "",
        "| tier | codec | dtype | bytes/row | write MB/s | write / raw write | cold read MB/s "
        "| read / floor | floor | read rows/s | ratio | page cache evicted | write, read per trial |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in doc["results"]:
        writes, reads = (
            ", ".join(f"{v:.0f}" for v in r.get(f"{m}_trials_mb_s", [])) for m in ("write", "read")
        )
        wvf, rvf = (
            f"{r[m]:.2f} ± {r[m + '_std']:.2f}" if m in r else "-"
            for m in ("write_vs_floor", "read_vs_floor")
        )
        lines.append(
            f"| {r['tier']} | {r['codec']} | {r.get('dtype', 'float16')} "
            f"| {r.get('row_bytes', '-')} | {r['write_mb_s']:.0f} ± {r['write_std']:.0f} | {wvf} | "
            f"{r['read_mb_s']:.0f} ± {r['read_std']:.0f} | {rvf} | {r.get('read_floor', '-')} | "
            f"{r.get('read_rows_s', 0):.0f} | {r['ratio']:.2f} | {r['cold_evicted']} "
            f"| {writes}; {reads} |"
        )
    lines += ["", "RAM and GPU tiers have no page cache to drop: their reads are from memory."]
    b = doc["baselines"]
    lines += [
        "",
        "| floor (same bytes, same run) | MB/s |",
        "|---|---:|",
        f"| raw sequential file write + fsync | {b['raw_file_write_mb_s']:.0f} |",
        f"| raw sequential file read (cold) | {b['raw_file_read_mb_s']:.0f} |",
        f"| np.memmap read (cold) | {b['memmap_read_mb_s']:.0f} |",
        f"| minimal zstd chunk reader (os.readv + zstd + crc32c, reused buffers, {m['cores']} threads, cold) | {b['zstd_chunk_read_mb_s']:.0f} |",
        f"| torch.load, one file per sample ({b['per_sample_files']} files, cold) | {b['torch_load_per_sample_mb_s']:.0f} |",
    ]
    t = doc["trainer_slowdown"]
    lines += [
        "",
        f"Trainer slowdown: a small CNN's training step takes {t['step_ms_alone']:.1f} ms alone and "
        f"{t['step_ms_while_reading']:.1f} ms (median of {t['steps_while_reading']} steps) while a "
        f"zarr/zstd epoch is read on the same cores: {t['slowdown']:+.0%}.",
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Bar chart of cold-read (and write) MB/s per tier, with the baselines beside them."""
    names = [f"{r['tier']}/{r['codec']}" for r in doc["results"]]
    if len(doc.get("dtypes", [])) > 1:
        names = [f"{n}\n{r['dtype']}" for n, r in zip(names, doc["results"], strict=True)]
    reads = [r["read_mb_s"] for r in doc["results"]]
    errs = [r["read_std"] for r in doc["results"]]
    writes = [r["write_mb_s"] for r in doc["results"]]
    write_errs = [r["write_std"] for r in doc["results"]]
    b = doc["baselines"]
    base_names = ["raw file", "np.memmap", "zstd chunk\nreader", "torch.load\nper sample"]
    base_reads = [
        b["raw_file_read_mb_s"],
        b["memmap_read_mb_s"],
        b["zstd_chunk_read_mb_s"],
        b["torch_load_per_sample_mb_s"],
    ]
    fig, (ax,) = panels(1, 7, 3.6)
    x = np.arange(len(names))
    ax.bar(x - 0.2, reads, 0.4, yerr=errs, capsize=3, label="read (cold where on disk)")
    ax.bar(x + 0.2, writes, 0.4, yerr=write_errs, capsize=3, label="write")
    xb = np.arange(len(names), len(names) + len(base_names))
    ax.bar(xb, base_reads, 0.4, color="grey", label="baseline read")
    ax.set_xticks(np.concatenate([x, xb]), names + base_names, fontsize=7)
    ax.set_ylabel("MB/s (stored bytes, uncompressed)")
    ax.set_yscale("log")
    ax.set_title(
        f"{doc['logical_bytes'] / 1e9:.1f} GB fp16 activations, {doc['trials']} trial(s)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    save(fig, path)
