"""A process that writes one cache to an object store (the object-store tests start it):

    python tests/s3_writer.py race URL KEY FILL BARRIER_DIR   # commit when both are ready
    python tests/s3_writer.py slow URL KEY                    # writes for ever (to be killed)

``race`` writes rows that all hold FILL, waits at the completion record until the other
writer is there too (a file barrier), commits, and prints what it then reads back.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from prefast.store import CacheSpec, ObjectRoot, object_writer, open_writer

ROWS, SHAPE = 512, (4, 8, 8)  # 512 rows of 1 KiB: 8 chunks of 64 KiB


def spec(key: str) -> CacheSpec:
    return CacheSpec(key, ROWS, SHAPE, "float32", chunk_bytes=64 * 2**10)


def race(url: str, key: str, fill: float, barrier: Path) -> None:
    def wait_for_the_other(_writer: object) -> None:
        (barrier / f"ready-{fill}").touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)

    object_writer.BEFORE_COMMIT = wait_for_the_other
    writer = open_writer("zarr", spec(key), ObjectRoot(url))
    x = torch.full((ROWS, *SHAPE), fill)
    for s in range(0, ROWS, 64):
        writer.append(x[s : s + 64], torch.zeros(64, dtype=torch.int64), torch.arange(s, s + 64))
    reader = writer.finish()
    acts = reader.read_rows(torch.arange(ROWS).numpy())[0]
    print(json.dumps({"won": writer.won, "values": sorted(set(acts.flatten().tolist()))}))


def slow(url: str, key: str) -> None:
    writer = open_writer("zarr", spec(key), ObjectRoot(url))
    x = torch.ones(64, *SHAPE)
    for s in range(0, ROWS, 64):
        writer.append(x, torch.zeros(64, dtype=torch.int64), torch.arange(s, s + 64))
        time.sleep(0.5)
    time.sleep(600)  # never completes: the test kills it first


if __name__ == "__main__":
    if sys.argv[1] == "race":
        race(sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5]))
    else:
        slow(sys.argv[2], sys.argv[3])
