"""obstore or s3fs for the object-store tier: what each reads and writes on one S3 API
server, and whether it can make the conditional write the completion record needs.

    python benchmarks/objectstore_clients.py      # needs obstore, s3fs and moto[server]

Both clients talk to moto's S3 server on 127.0.0.1 (this process starts it): the server and
the clients share this machine's cores, so the figures compare the clients' overhead on one
machine, not what a real S3 endpoint gives (docs/object-store.md has those anchors).
Writes ``benchmarks/results/objectstore_clients.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

OBJECTS, OBJECT_BYTES, RANGE_BYTES, THREADS, TRIALS = 8, 32 * 2**20, 8 * 2**20, 4, 3
OUT = Path(__file__).parent / "results" / "objectstore_clients"


def server() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)  # fmt: skip
    return srv, endpoint


def obstore_client(bucket: str):  # type: ignore[no-untyped-def]
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, client_options={"allow_http": True})

    def put(name: str, data: bytes) -> None:
        obstore.put(store, name, data, use_multipart=False)  # as the tier puts chunks

    def get(name: str) -> int:
        # separate GETs in flight together, as the tier reads (get_ranges would merge them)
        starts = list(range(0, OBJECT_BYTES, RANGE_BYTES))

        async def every() -> list:
            return await asyncio.gather(
                *(
                    obstore.get_range_async(store, name, start=s, end=s + RANGE_BYTES)
                    for s in starts
                )
            )

        return sum(len(memoryview(p)) for p in asyncio.run(every()))

    def create(name: str) -> bool:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(store, name, b"{}", mode="create")
            obstore.put(store, name, b"{}", mode="create")
        except (AlreadyExistsError, PreconditionError):
            return True  # the second was refused: the condition holds
        return False

    return put, get, create


def s3fs_client(bucket: str, endpoint: str):  # type: ignore[no-untyped-def]
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")

    def put(name: str, data: bytes) -> None:
        fs.pipe_file(f"{bucket}/{name}", data)

    def get(name: str) -> int:
        starts = list(range(0, OBJECT_BYTES, RANGE_BYTES))
        paths = [f"{bucket}/{name}"] * len(starts)
        ends = [s + RANGE_BYTES for s in starts]
        return sum(len(p) for p in fs.cat_ranges(paths, starts, ends))

    def create(name: str) -> bool:
        path = f"{bucket}/{name}"
        try:
            fs.pipe_file(path, b"{}", mode="create")
            fs.pipe_file(path, b"{}", mode="create")
        except (FileExistsError, TypeError, ValueError, OSError):
            return fs.exists(path) and True
        return False

    return put, get, create


def timed(fn, names: list[str], *args) -> float:  # type: ignore[no-untyped-def]
    """MB/s of ``fn`` over every object, ``THREADS`` at once (as the prefetcher loads)."""
    t = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda n: fn(n, *args), names))
    return OBJECTS * OBJECT_BYTES / (time.perf_counter() - t) / 1e6


def main() -> int:
    import boto3

    srv, endpoint = server()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    data = np.random.default_rng(0).integers(0, 255, OBJECT_BYTES, dtype=np.uint8).tobytes()
    rows = {}
    for label, make in (("obstore", lambda b: obstore_client(b)),
                        ("s3fs", lambda b: s3fs_client(b, endpoint))):  # fmt: skip
        bucket = f"bench-{label}"
        s3.create_bucket(Bucket=bucket)
        put, get, create = make(bucket)
        names = [f"chunk-{i}" for i in range(OBJECTS)]
        writes = [timed(put, names, data) for _ in range(TRIALS)]
        reads = [timed(get, names) for _ in range(TRIALS)]
        try:
            conditional = create("COMPLETE.json")
        except Exception as exc:  # noqa: BLE001 - what the client could not do is the result
            conditional = f"no ({type(exc).__name__})"
        rows[label] = {"write_MBps": statistics.median(writes), "read_MBps": statistics.median(reads),
                       "conditional_put": conditional}  # fmt: skip
    srv.stop()  # type: ignore[attr-defined]
    import obstore
    import s3fs

    doc: dict[str, Any] = {
        "what": f"{OBJECTS} objects of {OBJECT_BYTES >> 20} MiB, {THREADS} at once, each read "
        f"as {RANGE_BYTES >> 20} MiB ranges; median of {TRIALS}; moto's S3 server on "
        "127.0.0.1 sharing this machine's cores",
        "cores": os.cpu_count(),
        "versions": {"obstore": obstore.__version__, "s3fs": s3fs.__version__},
        "clients": rows,
    }
    OUT.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# obstore or s3fs for the object-store tier",
        "",
        f"{doc['what']} ({doc['cores']} cores; obstore {doc['versions']['obstore']}, s3fs "
        f"{doc['versions']['s3fs']}). Regenerate: `python benchmarks/objectstore_clients.py` "
        "(with s3fs installed beside the dev packages).",
        "",
        "| client | write MB/s | read MB/s | `If-None-Match: *` put refused the second time |",
        "|---|---:|---:|---|",
    ]
    for label, r in rows.items():
        refused = {True: "yes", False: "no"}.get(r["conditional_put"], r["conditional_put"])
        lines.append(f"| {label} | {r['write_MBps']:.0f} | {r['read_MBps']:.0f} | {refused} |")
    ob, fs = rows["obstore"], rows["s3fs"]
    lines += ["", f"Reading (every epoch) obstore ran at {ob['read_MBps'] / fs['read_MBps']:.2f}x "
              f"s3fs's speed, writing (once per boundary) at {ob['write_MBps'] / fs['write_MBps']:.2f}x; "
              "the tier reads far more than it writes, so it uses obstore (docs/object-store.md)."]  # fmt: skip
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
