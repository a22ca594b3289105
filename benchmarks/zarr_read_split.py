"""Where a cold uncompressed zarr epoch's time goes, against the raw sequential read.

The store benchmark's zarr/none read reaches about 0.5-0.6 of the raw file read (its
floor: one thread, 8 MiB reads, no checking, no shuffle). This splits the epoch, on one
1 GiB cache of 32 KiB float16 rows in 32 MiB chunks, each part timed cold (page cache
dropped) and paired with a floor measured in the same trial:

- ``loads``: every chunk read and crc32c-checked on the reader's threads, nothing gathered;
- ``loads, no crc``: the same reads with the checksum skipped (what checking costs);
- ``epoch``: a shuffled epoch as the trainer reads it (chunk order + window, batches of 256
  rows gathered from the window's chunks), with the time the consumer spent waiting for
  chunks and gathering rows;
- ``gather``: the gathers alone, from chunks already in memory (the copy a shuffled
  batch needs, which the floor does not do).

    python benchmarks/zarr_read_split.py [--trials 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from prefast.benchmarks.store_bench import (
    ROW_SHAPE,
    activations_of_size,
    machine,
    make_workdir,
    stored_as,
)
from prefast.benchmarks.store_floors import evict, raw_file_floors
from prefast.store import chunkio
from prefast.store.base import SHUFFLE_BUFFER_BYTES, CacheSpec, chunk_bytes_for
from prefast.store.disk_reader import ChunkPrefetcher
from prefast.store.layout import CacheRoot
from prefast.store.shuffle import chunk_visit_order
from prefast.store.zarr_reader import ZarrReader
from prefast.store.zarr_writer import ZarrWriter

BATCH = 256


def write_cache(data: torch.Tensor, workdir: Path) -> tuple[ZarrReader, Path]:
    root = CacheRoot(workdir / "zarr")
    spec = CacheSpec(
        "split", len(data), ROW_SHAPE, "float16", chunk_bytes=chunk_bytes_for(SHUFFLE_BUFFER_BYTES)
    )
    writer = ZarrWriter(root, spec, codec="none")
    labels, ids = torch.zeros(len(data), dtype=torch.int64), torch.arange(len(data))
    for s in range(0, len(data), BATCH):
        writer.append(data[s : s + BATCH], labels[s : s + BATCH], ids[s : s + BATCH])
    reader = writer.finish()
    assert isinstance(reader, ZarrReader)
    return reader, root.dir_for(spec.key)


EVICTED: list[bool | None] = []  # each cold read's eviction, as fincore saw it (None: no fincore)


def cold(where: Path) -> None:
    """Drop the cache's files from the page cache, recording whether that was verified."""
    EVICTED.append(evict(where))


def loads(reader: ZarrReader, where: Path, check: bool) -> float:
    """Seconds to read (and check) every chunk cold on the reader's prefetch threads."""
    cold(where)
    window = SHUFFLE_BUFFER_BYTES // (2 * reader.chunk_rows * reader.spec.row_bytes)
    order = chunk_visit_order(reader.num_chunks, 0, 1)
    crc = chunkio.crc32c.crc32c

    def no_crc(data: object, value: int = 0) -> int:
        return 0

    def recorded_crc(i: int, chunk: object) -> int:
        return int(reader.chunk_crcs[i])

    if not check:  # the same reads, the checksum skipped
        chunkio.crc32c.crc32c = no_crc  # type: ignore[assignment]
        reader._crc_of = recorded_crc  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        with ChunkPrefetcher(reader._load, order, window, reader._release, workers=window) as pf:
            for c in order:
                pf.done(int(c), pf.get(int(c)))
        return time.perf_counter() - t
    finally:
        chunkio.crc32c.crc32c = crc  # type: ignore[assignment]
        if not check:
            del reader._crc_of


def epoch(reader: ZarrReader, where: Path) -> dict:
    """A cold shuffled epoch; the consumer's seconds waiting for chunks and gathering."""
    cold(where)
    spent = {"wait_s": 0.0, "gather_s": 0.0}
    get, gather = reader._get, reader._gather_grouped

    def timed_get(pf, c):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return get(pf, c)
        finally:
            spent["wait_s"] += time.perf_counter() - t

    def timed_gather(rows, out, chunk):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        gather(rows, out, chunk)
        spent["gather_s"] += time.perf_counter() - t

    reader._get, reader._gather_grouped = timed_get, timed_gather  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        for _ in reader.epoch_batches(0, 1, BATCH, SHUFFLE_BUFFER_BYTES):
            pass
        total = time.perf_counter() - t
    finally:
        del reader._get, reader._gather_grouped
    # The gather's clock holds the waits it made (a chunk is taken inside a gather).
    return {"s": total, "wait_s": spent["wait_s"], "gather_s": spent["gather_s"] - spent["wait_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    workdir = make_workdir(None)
    trials = []
    try:
        data = stored_as(activations_of_size(2**30), "float16")
        nbytes = data.numel() * 2
        reader, where = write_cache(data, workdir)
        for trial in range(a.trials):  # the reader is closed with its files, below
            floor_s = nbytes / (raw_file_floors(data.numpy(), workdir)["raw_file_read_mb_s"] * 1e6)
            row = {
                "floor_s": floor_s,
                "loads_s": loads(reader, where, check=True),
                "loads_no_crc_s": loads(reader, where, check=False),
                "epoch": epoch(reader, where),
            }
            row["epoch_vs_floor"] = floor_s / row["epoch"]["s"]
            row["loads_vs_floor"] = floor_s / row["loads_s"]
            row["loads_no_crc_vs_floor"] = floor_s / row["loads_no_crc_s"]
            row["gather_vs_floor"] = row["epoch"]["gather_s"] / floor_s
            trials.append(row)
            print(
                f"trial {trial + 1}: floor {floor_s:.3f} s; loads {row['loads_vs_floor']:.2f} of "
                f"the floor's speed (no crc {row['loads_no_crc_vs_floor']:.2f}); epoch "
                f"{row['epoch_vs_floor']:.2f} ({row['epoch']['s']:.3f} s: waiting "
                f"{row['epoch']['wait_s']:.3f} s, gathering {row['epoch']['gather_s']:.3f} s)",
                flush=True,
            )
    finally:
        if "reader" in locals():
            reader.close()
        shutil.rmtree(workdir, ignore_errors=True)
    verified = None if None in EVICTED else all(EVICTED)
    doc = {"machine": machine(), "bytes": nbytes, "batch": BATCH, "trials": trials,
           "cold_verified": verified}  # fmt: skip
    for k in ("epoch_vs_floor", "loads_vs_floor", "loads_no_crc_vs_floor", "gather_vs_floor"):
        doc[f"median_{k}"] = statistics.median(t[k] for t in trials)
    doc["median_loads_s"] = statistics.median(t["loads_s"] for t in trials)
    doc["median_wait_s"] = statistics.median(t["epoch"]["wait_s"] for t in trials)
    out = Path(a.out)
    (out / "zarr_read_split.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "zarr_read_split.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Where a cold zarr/none epoch's time goes",
        "",
        f"1 GiB of 32 KiB float16 rows in 32 MiB chunks, batches of {doc['batch']}, each part "
        f"read cold (page cache dropped; verified by fincore: {doc.get('cold_verified')}) and "
        "paired with the raw sequential read of its trial (the floor). "
        f"{m['cores']} cores ({m['cpu']}). `python benchmarks/zarr_read_split.py`.",
        "",
        "| trial | floor s | loads, speed vs floor | loads without crc | epoch, speed vs floor "
        "| epoch s | waiting for chunks s | gathering rows s | gathering / floor time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, t in enumerate(doc["trials"], 1):
        e = t["epoch"]
        lines.append(
            f"| {i} | {t['floor_s']:.3f} | {t['loads_vs_floor']:.2f} | "
            f"{t['loads_no_crc_vs_floor']:.2f} | {t['epoch_vs_floor']:.2f} | {e['s']:.3f} | "
            f"{e['wait_s']:.3f} | {e['gather_s']:.3f} | {t['gather_vs_floor']:.2f} |"
        )
    lines += [
        "",
        f"Medians: epoch {doc['median_epoch_vs_floor']:.2f} of the floor's speed; loads alone "
        f"{doc['median_loads_vs_floor']:.2f} ({doc['median_loads_no_crc_vs_floor']:.2f} without "
        f"the crc); the gathers alone take {doc['median_gather_vs_floor']:.2f} of the floor's "
        f"time. Within the epoch the consumer waited {doc['median_wait_s']:.3f} s for chunks, "
        f"about what loading them alone takes ({doc['median_loads_s']:.3f} s). An epoch is "
        "bounded by its loads, which read every chunk (4 threads, 1 MiB reads, crc32c as "
        "each lands) at well under the floor's one 8 MiB stream, and with one window read "
        "ahead the gathers of a window and the loads of the next overlap only in part.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
