"""How chunks are read against shuffled-epoch read speed, one setting at a time.

Two sections of ``run_all.py`` use it:

- ``chunk_size``: why the store writes chunks of up to 32 MiB (4, 16, 32 MiB);
- ``map_advice``: why the readers map files with ``MADV_HUGEPAGE``
  (``store/chunkio.py: map_for_reading``): 32 MiB chunks read with 4 KiB
  page faults, then with 2 MiB ones.

Each trial measures the raw-file floors, then writes and cold-reads the same
activations through every disk tier once per setting, with the trainer's
256 MiB shuffle buffer; a tier's speed-up is taken against the first setting
*in the same trial* (this VM's disk drifts too much for anything else).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefast.benchmarks.store_bench import (
    activations_of_size,
    bench_tier,
    machine,
    make_workdir,
    paired_ratios,
    summarize,
)
from prefast.benchmarks.store_floors import raw_file_floors
from prefast.store import chunkio
from prefast.store.base import SHUFFLE_BUFFER_BYTES

TIERS = [("mmap", "none"), ("zarr", "none"), ("zarr", "zstd")]


def setting(chunk_mib: int, huge_page_faults: bool = True) -> dict:
    """One way of writing and reading chunks."""
    return {"chunk_mib": chunk_mib, "huge_page_faults": huge_page_faults}


def _read_once(tier: str, codec: str, data, workdir: Path, buffer_bytes: int, s: dict) -> dict:  # type: ignore[no-untyped-def]
    chunkio.HUGE_PAGE_FAULTS = s["huge_page_faults"]
    try:
        return bench_tier(
            tier, codec, data, workdir, buffer_bytes, chunk_bytes=s["chunk_mib"] * 2**20
        )
    finally:
        chunkio.HUGE_PAGE_FAULTS = True


def run_chunk_bench(
    size_bytes: int,
    settings: list[dict],
    trials: int,
    buffer_bytes: int = SHUFFLE_BUFFER_BYTES,
    directory: Path | None = None,
    log=print,  # type: ignore[no-untyped-def]
) -> dict:
    data = activations_of_size(size_bytes)
    workdir = make_workdir(directory)
    runs = []
    try:
        for trial in range(trials):
            floors = raw_file_floors(data.numpy(), workdir)
            for i, s in enumerate(settings):
                for tier, codec in TIERS:
                    r = _read_once(tier, codec, data, workdir, buffer_bytes, s)
                    if "zstd_chunk_read_mb_s" in r:  # measured on this tier's own files
                        floors["zstd_chunk_read_mb_s"] = r["zstd_chunk_read_mb_s"]
                    paired_ratios(r, floors)
                    runs.append({**r, **s, "trial": trial, "setting": i})
                    log(f"trial {trial + 1} {s} {tier}/{codec}: read {r['read_mb_s']:.0f} MB/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows_out = []
    for tier, codec in TIERS:
        mine_of = {
            i: [r for r in runs if (r["tier"], r["codec"], r["setting"]) == (tier, codec, i)]
            for i in range(len(settings))
        }
        for i, s in enumerate(settings):
            speedup = [
                a["read_mb_s"] / b["read_mb_s"] for a, b in zip(mine_of[i], mine_of[0], strict=True)
            ]
            row = summarize(mine_of[i])
            row.update(s, speedup_trials=[round(v, 3) for v in speedup])
            rows_out.append(row)
    return {
        "machine": machine(),
        "logical_bytes": data.numel() * 2,
        "shuffle_buffer_bytes": buffer_bytes,
        "trials": trials,
        "results": rows_out,
    }


def markdown(doc: dict, title: str) -> str:
    m = doc["machine"]
    lines = [
        f"{title}: {doc['logical_bytes'] / 1e9:.2f} GB fp16 activations, one shuffled epoch per "
        f"tier and setting, cold, {doc['shuffle_buffer_bytes'] / 2**20:.0f} MiB shuffle buffer, "
        f"{doc['trials']} trial(s); {m['cores']} cores. Speed-up is against the first setting "
        "in the same trial.",
        "",
        "| tier | codec | chunk MiB | huge-page faults | cold read MB/s (per trial) | "
        "read / floor | speed-up (per trial) | write MB/s |",
        "|---|---|---:|---|---|---:|---|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['tier']} | {r['codec']} | {r['chunk_mib']} | "
            f"{'yes' if r['huge_page_faults'] else 'no'} | {r['read_mb_s']:.0f} "
            f"({', '.join(f'{v:.0f}' for v in r['read_trials_mb_s'])}) | {r['read_vs_floor']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in r['speedup_trials'])} | {r['write_mb_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
