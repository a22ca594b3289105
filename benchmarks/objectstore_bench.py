"""`prefast bench store --dir s3://BUCKET/PREFIX`: the zarr tier's write and read MB/s in an
object store, against the floor of the same chunk objects fetched with raw parallel range
GETs from the same server.

Claim under test: an epoch read through the tier's reader (the trainer's path: chunk-order
shuffle, shuffle window, ranged GETs on the prefetcher's threads, crc32c checks, zstd
decodes, the loader thread) moves the bytes at a good fraction of what plain parallel
GETs of the same objects move. Figures are *logical* MB/s (uncompressed bytes delivered),
as ``store_bench.py``'s are. Everything is written under a scratch prefix of the given
one, deleted afterwards.

On a server on this machine (moto's, as the tests start it) the server and the reader
share the cores, so the ratio says the reader adds little to what the server gives; it is
no speed claim for a real S3 endpoint (docs/object-store.md has what real S3 gave others).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from prefast.benchmarks.store_bench import activations_of_size
from prefast.store.base import SHUFFLE_BUFFER_BYTES, CacheSpec
from prefast.store.chunkio import io_workers
from prefast.store.loader import PrefetchLoader
from prefast.store.object_reader import RANGE_BYTES, ObjectZarrReader, fetch_ranges, ranges
from prefast.store.object_writer import ObjectZarrWriter
from prefast.store.objectstore import ObjectRoot
from prefast.store.readers import open_reader

MB = 1e6
BATCH = 256


def raw_get_floor(reader: ObjectZarrReader, decode: bool) -> float:
    """Seconds to fetch every chunk object of ``reader`` as ranged GETs, ``io_workers()``
    objects at once, into memory: no check, no batches; ``decode``: and each zstd frame
    decoded (what ``store_bench``'s zstd floor does for chunk files: decoding is the
    reader's work whatever the store)."""
    import numcodecs

    store = reader.object_root.store
    names = [reader.chunk_name(i) for i in range(reader.num_chunks)]
    chunk_bytes = reader.chunk_rows * reader.spec.row_bytes
    mine = threading.local()  # each thread's frame and output, reused (store_floors' way)

    def fetch(name: str) -> int:
        size = reader.sizes[name]
        starts, ends = ranges(size)
        parts = fetch_ranges(store, name, starts, ends)
        if decode:
            if getattr(mine, "frame", None) is None or len(mine.frame) < size:
                mine.frame = np.empty(size, dtype=np.uint8)
                mine.out = np.empty(chunk_bytes, dtype=np.uint8)
            for s, p in zip(starts, parts, strict=True):  # one copy: the frame, contiguous
                piece = np.frombuffer(memoryview(p), dtype=np.uint8)
                mine.frame[s : s + len(piece)] = piece
            numcodecs.Zstd().decode(mine.frame[: size - 4], out=mine.out)
        return sum(len(memoryview(p)) for p in parts)

    t = time.perf_counter()
    with ThreadPoolExecutor(min(io_workers(), len(names))) as pool:
        fetched = sum(pool.map(fetch, names))
    assert fetched == sum(reader.sizes.values())
    return time.perf_counter() - t


def bench_codec(
    root: ObjectRoot,
    data: torch.Tensor,
    codec: str,
    buffer_bytes: int,
    range_sizes: tuple[int, ...],
) -> list[dict]:
    """Write once; read an epoch and the floor once per range size (0: one GET a chunk)."""
    spec = CacheSpec(f"bench-{codec}-{uuid.uuid4().hex[:8]}", len(data), tuple(data.shape[1:]),
                     "float16", chunk_bytes=32 * 2**20)  # fmt: skip
    labels, ids = torch.zeros(len(data), dtype=torch.int64), torch.arange(len(data))
    t = time.perf_counter()
    writer = ObjectZarrWriter(root, spec, codec=codec)  # type: ignore[arg-type]
    for s in range(0, len(data), BATCH):
        writer.append(data[s : s + BATCH], labels[s : s + BATCH], ids[s : s + BATCH])
    writer.finish().close()
    write_s = time.perf_counter() - t
    logical = data.numel() * data.element_size()
    rows = []
    for range_size in range_sizes:
        os.environ["PREFAST_S3_RANGE_BYTES"] = str(range_size)
        reader = open_reader(root, spec.key)
        assert isinstance(reader, ObjectZarrReader)
        try:
            t = time.perf_counter()
            epoch = functools.partial(reader.epoch_batches, 0, 1, BATCH, buffer_bytes)
            for _ in PrefetchLoader(epoch):
                pass
            read_s = time.perf_counter() - t
            floor_s = raw_get_floor(reader, decode=codec == "zstd")
            stored = sum(reader.sizes.values())
        finally:
            reader.close()
        rows.append({
            "codec": codec,
            "range_mib": range_size / 2**20,
            "chunks": reader.num_chunks,
            "stored_bytes": stored,
            "write_mb_s": logical / write_s / MB,
            "read_mb_s": logical / read_s / MB,
            "raw_get_floor_mb_s": logical / floor_s / MB,
            "read_vs_floor": floor_s / read_s,
        })  # fmt: skip
    return rows


RANGE_SIZES = (RANGE_BYTES, 0)  # the default ranges, and one GET per chunk
KEYS = ("write_mb_s", "read_mb_s", "raw_get_floor_mb_s", "read_vs_floor")


def run_object_store_bench(url: str, size: int, trials: int = 1) -> dict:
    """Every trial writes each codec once and reads it with each range size; the scratch
    prefix is deleted."""
    base = ObjectRoot(url)
    base.check()
    scratch = f".bench-{platform.node()}_{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root = base.sub(scratch)
    data = activations_of_size(size)
    saved = os.environ.get("PREFAST_S3_RANGE_BYTES")
    runs: list[dict] = []
    try:
        for _ in range(trials):
            for codec in ("none", "zstd"):
                runs += bench_codec(root, data, codec, SHUFFLE_BUFFER_BYTES, RANGE_SIZES)
    finally:
        if saved is None:
            os.environ.pop("PREFAST_S3_RANGE_BYTES", None)
        else:
            os.environ["PREFAST_S3_RANGE_BYTES"] = saved
        root.delete_under("")
    cells = sorted({(r["codec"], r["range_mib"]) for r in runs}, key=lambda c: (c[0], -c[1]))
    return {
        "url": base.path,
        "endpoint": os.environ.get("AWS_ENDPOINT_URL") or "AWS S3",
        "logical_bytes": data.numel() * data.element_size(),
        "trials": trials,
        "cores": os.cpu_count(),
        "runs": runs,
        "summary": [
            {
                "codec": c,
                "range_mib": m,
                **{
                    k: float(
                        np.median([r[k] for r in runs if (r["codec"], r["range_mib"]) == (c, m)])
                    )
                    for k in KEYS
                },
                "read_vs_floor_trials": [
                    round(r["read_vs_floor"], 3)
                    for r in runs
                    if (r["codec"], r["range_mib"]) == (c, m)
                ],
            }
            for c, m in cells
        ],  # fmt: skip
    }


def markdown(doc: dict) -> str:
    local = "127.0.0.1" in doc["endpoint"] or "localhost" in doc["endpoint"]
    lines = [
        f"# The zarr tier in an object store ({doc['url']})",
        "",
        f"{doc['logical_bytes'] / 2**20:.0f} MiB of fp16 activation-like rows, 32 MiB chunks, "
        f"median of {doc['trials']} trial(s), {doc['cores']} cores. Logical MB/s. The floor: "
        "the same chunk objects fetched with raw parallel range GETs (zstd: and decoded; no "
        "checks, no batches).",
        "",
        "| codec | GET size | write MB/s | read MB/s (an epoch, the trainer's path) "
        "| raw GET floor MB/s | read / floor (median; each trial) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in doc["summary"]:
        size = f"{s['range_mib']:.0f} MiB ranges" if s["range_mib"] else "one GET a chunk"
        trials = ", ".join(f"{v:.2f}" for v in s["read_vs_floor_trials"])
        lines.append(f"| {s['codec']} | {size} | {s['write_mb_s']:.0f} | {s['read_mb_s']:.0f} | "
                     f"{s['raw_get_floor_mb_s']:.0f} | {s['read_vs_floor']:.2f} ({trials}) |")  # fmt: skip
    lines.append("")
    if local:
        lines.append(
            "The server runs on this machine and shares its cores with the reader: the ratio "
            "is functional (the reader's own cost beside the server's), not a speed claim."
        )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (as the tests start it), a fresh bucket on it and the
    AWS settings that reach it, for the length of the block: yields ``s3://bucket/bench``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        yield "s3://bench/bench"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
