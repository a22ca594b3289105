"""A zarr writer whose chunk file write hangs in the encode pool, then ``abort()``.

    python tests/hung_write.py CACHE_DIR

Prints ``aborting`` just before ``abort()`` and ``aborted S`` after it (S: seconds
it took), then exits. The hang is injected where the chunk file is really written
(``os.writev`` on a chunk file), on a pool thread, with fewer chunks queued than the
pool takes at once, so the writer thread itself has drained and stopped. The test
(``test_store_faults``) measures how long after ``aborting`` the process has exited.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

from prefast.store import CacheRoot, CacheSpec, open_writer

root = CacheRoot(sys.argv[1])
entered = threading.Event()
real_writev = os.writev


def hung_writev(fd, buffers):
    if "activations" in os.readlink(f"/proc/self/fd/{fd}"):  # a chunk file
        entered.set()
        threading.Event().wait()  # the disk stops answering, for good
    return real_writev(fd, buffers)


os.writev = hung_writev  # type: ignore[assignment]
shape = (16, 8, 8)  # 4 KiB float32 rows; chunk_bytes 64 KiB: 16 rows per chunk
w = open_writer("zarr", CacheSpec("hung", 256, shape, "float32", chunk_bytes=64 * 2**10), root)
w.append(torch.randn(32, *shape), torch.zeros(32, dtype=torch.int64), torch.arange(32))
assert entered.wait(30), "no chunk write started"
time.sleep(0.3)  # the writer thread has handed its two chunks to the pool and waits
print("aborting", flush=True)
t = time.monotonic()
w.abort()
print(f"aborted {time.monotonic() - t:.2f}", flush=True)
