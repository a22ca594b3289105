"""Shared pieces of the training tests: configs, per-step recording, real corruption."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from prefast.config import TrainConfig
from prefast.store import CacheRoot, open_reader
from prefast.store.manage import list_caches
from prefast.store.order import rng_for
from prefast.training.trainer import Trainer

# 1,437 training images, 23 batches of 64; stages freeze from epoch 2 on, and with
# cache_boundaries="every" boundaries are materialized at epochs 2, 3, 4, 5, 6 and 8.
DIGITS = dict(
    model="densenet-bc",
    dataset="digits",
    depth=16,
    growth_rate=12,
    epochs=10,
    batch_size=64,
    t0=0.5,
    augment="none",
    cache_dtype="float32",
    device="cpu",
)


def rel_diff(a: dict, b: dict) -> float:
    return max(
        abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"])
        for x, y in zip(a["epochs"], b["epochs"], strict=True)
    )


def train_recording(cfg: TrainConfig, on_epoch=None) -> tuple[dict, dict[int, list[np.ndarray]]]:
    """Train and record the sample ids of every optimizer step, per epoch."""
    tr = Trainer(cfg, on_epoch=on_epoch)
    bpe = tr.raw.batches_per_epoch
    steps: dict[int, list[np.ndarray]] = defaultdict(list)
    original = tr._step

    def step(batch, it):
        steps[it // bpe].append(batch.ids.numpy().copy())
        return original(batch, it)

    tr._step = step  # type: ignore[method-assign]
    return tr.run(), steps


def assert_every_sample_once_per_epoch(result: dict, steps: dict, n: int) -> None:
    bpe = result["final"]["batches_per_epoch"]
    for epoch, batches in steps.items():
        ids = np.concatenate(batches)
        assert len(batches) == bpe, f"epoch {epoch}: {len(batches)} steps, expected {bpe}"
        assert sorted(ids.tolist()) == list(range(n)), f"epoch {epoch}: samples not seen once"
    assert all(e["steps"] == bpe for e in result["epochs"])


def train_cache_key(root: CacheRoot, boundary: int) -> str:
    rows = [
        r
        for r in list_caches(root)
        if r["split"] == "train" and r["boundary"] == boundary and r["status"] == "complete"
    ]
    assert len(rows) == 1, rows
    return rows[0]["key"]


def corrupt_chunk_read_mid_epoch(
    root: CacheRoot, key: str, seed: int, epoch: int, batch_size: int, windowed: bool
) -> int:
    """Flip one byte of the chunk that the next epoch needs first, latest in the epoch.
    Returns the chunk."""
    chunk, path, offset = chunk_read_mid_epoch(root, key, seed, epoch, batch_size, windowed)
    flip_byte(path, offset)
    return chunk


def chunk_read_mid_epoch(
    root: CacheRoot, key: str, seed: int, epoch: int, batch_size: int, windowed: bool
) -> tuple[int, Path, int | None]:
    """The chunk that ``epoch`` needs first, latest in the epoch: (index, file, offset of
    one of its bytes in the file, None for a whole zarr chunk file).

    Exact-order readers touch chunks as the (seed, epoch) order dictates; the
    windowed zarr reader visits chunks in a seeded chunk order.
    """
    reader = open_reader(root, key)
    try:
        chunk_rows, num_chunks = reader.chunk_rows, reader.num_chunks
        if windowed:
            order = rng_for(seed, "chunk-shuffle", epoch).permutation(num_chunks)
            chunk = int(order[num_chunks // 2])
        else:
            rows = reader.rows_in_epoch_order(seed, epoch)
            first_batch = np.full(num_chunks, -1)
            for b in range(len(rows) // batch_size - 1, -1, -1):  # last write wins: earliest batch
                first_batch[rows[b * batch_size : (b + 1) * batch_size] // chunk_rows] = b
            chunk = int(np.argmax(first_batch))
            assert first_batch[chunk] >= 2, "no chunk is first needed mid-epoch"
        tier, row_bytes = reader.tier, reader.spec.row_bytes
        shape_tail = (0,) * len(reader.spec.stored_shape)
        name = (
            reader.array.metadata.encode_chunk_key((chunk, *shape_tail)) if tier == "zarr" else None
        )
    finally:
        reader.close()
    d = root.dir_for(key)
    if tier == "zarr":
        path, offset = d / "activations" / str(name), None
    else:
        path, offset = d / "activations.bin", chunk * chunk_rows * row_bytes + 7
    return chunk, path, offset


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_with_deadline(fn, seconds: float):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes longer."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds:.0f} s: the trainer is blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def prefast_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("prefast")]


def leftovers(root: Path) -> list[str]:
    """Partial cache directories and held locks under a cache root."""
    cr = CacheRoot(root)
    partial = [k for k in cr.cache_keys() if not cr.is_complete(k)]
    held = []
    for lock_file in (root / ".locks").glob("*.lock") if (root / ".locks").is_dir() else []:
        lock = cr.lock(lock_file.stem)
        if lock.try_acquire(shared=False):
            lock.release()
        else:
            held.append(lock_file.stem)
    return [f"partial {k}" for k in partial] + [f"locked {k}" for k in held]


def cli_in_process(capsys, caplog, *args: str) -> subprocess.CompletedProcess:
    """``prefast.cli.main.main(args)`` in this process: the CLI's whole path but the
    interpreter start (2-5 s per call), for checks of what it prints. pytest takes the
    log records, so warnings (which reach stderr in a real run) are added to stderr."""
    import logging
    import signal

    from prefast.cli.main import main

    saved = signal.getsignal(signal.SIGTERM)  # main installs its own handler
    caplog.set_level(logging.WARNING)
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, saved)
    out = capsys.readouterr()
    warned = "".join(f"{r.levelname} {r.name}: {r.getMessage()}\n" for r in caplog.records)
    return subprocess.CompletedProcess(list(args), code, out.out, out.err + warned)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``prefast`` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "prefast.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def relu_batch(rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.relu(torch.randn(rows, *shape))


def fault_at_chunk_read(monkeypatch, fault) -> dict:
    """Inject ``fault()`` (raise an OSError, or hang) where a chunk file's bytes are read
    (``os.preadv``), for the file ``armed["path"]``, ``armed["left"]`` times. Returns
    ``armed``, to be filled in (usually by an ``on_epoch`` callback) when the fault is due."""
    import os

    armed: dict = {"left": 0}
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        if armed["left"] and armed.get("path") == Path(os.readlink(f"/proc/self/fd/{fd}")):
            armed["left"] -= 1
            fault()
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return armed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def finish_together(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """(stdout, stderr) of launchers that wait for each other (a rendezvous): their pipes
    read at once, so neither blocks on a full pipe; any still running afterwards is
    killed. Each must exit 0 (its index and stderr's tail otherwise)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            outs = list(pool.map(lambda proc: proc.communicate(timeout=timeout), procs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for r, (proc, (_, stderr)) in enumerate(zip(procs, outs, strict=True)):
        assert proc.returncode == 0, (r, stderr[-3000:])
    return outs
