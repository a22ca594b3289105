"""Chunk size against shuffled-epoch read speed: why the store writes chunks of up to 32 MiB.

Each trial measures the raw-file floors, then writes and cold-reads the same
activations through every disk tier once per chunk size, with the trainer's
256 MiB shuffle buffer; a tier's speed-up is taken against the smallest chunk
size *in the same trial* (this VM's disk drifts too much for anything else).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from prefast.benchmarks.store_bench import (
    ROW_SHAPE,
    activation_like,
    bench_tier,
    machine,
    make_workdir,
    paired_ratios,
    summarize,
)
from prefast.benchmarks.store_floors import raw_file_floors
from prefast.store.base import SHUFFLE_BUFFER_BYTES

TIERS = [("mmap", "none"), ("zarr", "none"), ("zarr", "zstd")]


def run_chunk_bench(
    size_bytes: int,
    chunk_mib: list[int],
    trials: int,
    buffer_bytes: int = SHUFFLE_BUFFER_BYTES,
    directory: Path | None = None,
    log=print,  # type: ignore[no-untyped-def]
) -> dict:
    rows = max(256, size_bytes // (int(np.prod(ROW_SHAPE)) * 2))
    data = activation_like(rows)
    workdir = make_workdir(directory)
    runs = []
    try:
        for trial in range(trials):
            floors = raw_file_floors(data.numpy(), workdir)
            for mib in chunk_mib:
                for tier, codec in TIERS:
                    r = bench_tier(
                        tier, codec, data, workdir, buffer_bytes, chunk_bytes=mib * 2**20
                    )
                    if "zstd_chunk_read_mb_s" in r:  # measured on this tier's own files
                        floors["zstd_chunk_read_mb_s"] = r["zstd_chunk_read_mb_s"]
                    paired_ratios(r, floors)
                    runs.append({**r, "trial": trial, "chunk_mib": mib})
                    log(
                        f"trial {trial + 1} {mib:>3} MiB {tier}/{codec}: read {r['read_mb_s']:.0f} MB/s"
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows_out = []
    for tier, codec in TIERS:
        for mib in chunk_mib:
            mine = [
                r for r in runs if (r["tier"], r["codec"], r["chunk_mib"]) == (tier, codec, mib)
            ]
            base = [
                r
                for r in runs
                if (r["tier"], r["codec"], r["chunk_mib"]) == (tier, codec, chunk_mib[0])
            ]
            speedup = [a["read_mb_s"] / b["read_mb_s"] for a, b in zip(mine, base, strict=True)]
            row = summarize(mine)
            row["chunk_mib"], row["speedup_trials"] = mib, [round(v, 3) for v in speedup]
            rows_out.append(row)
    return {
        "machine": machine(),
        "logical_bytes": data.numel() * 2,
        "shuffle_buffer_bytes": buffer_bytes,
        "trials": trials,
        "results": rows_out,
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Chunk size: {doc['logical_bytes'] / 1e9:.2f} GB fp16 activations, one shuffled epoch per "
        f"tier and chunk size, cold, {doc['shuffle_buffer_bytes'] / 2**20:.0f} MiB shuffle buffer, "
        f"{doc['trials']} trial(s); {m['cores']} cores. Speed-up is against the smallest chunk "
        "size in the same trial.",
        "",
        "| tier | codec | chunk MiB | cold read MB/s (per trial) | read / floor | speed-up (per trial) | write MB/s |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['tier']} | {r['codec']} | {r['chunk_mib']} | {r['read_mb_s']:.0f} "
            f"({', '.join(f'{v:.0f}' for v in r['read_trials_mb_s'])}) | {r['read_vs_floor']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in r['speedup_trials'])} | {r['write_mb_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
