"""The store's fault contract: missing chunks, failing writers, full disks, live readers.

Each test here is one row of the fault table (docs/faults.md).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, run_with_deadline

from prefast.store import CacheRoot, CacheSpec, open_reader, open_writer
from prefast.store.disk_writer import ABORT_WAIT_S
from prefast.store.errors import (
    CacheCorruptedError,
    CacheExistsError,
    CacheLockedError,
    CacheUnavailableError,
    CacheWriteError,
    DiskBudgetError,
    DiskFullError,
    DiskStalledError,
)
from prefast.store.manage import verify
from prefast.store.mmap_writer import MmapWriter
from prefast.store.zarr_writer import ZarrWriter

SHAPE = (8, 8, 8)


@pytest.fixture(autouse=True)
def four_mib_chunks(monkeypatch):
    """These faults need caches of several chunks: 4 MiB ones, not the 32 MiB default."""
    monkeypatch.setattr("prefast.store.base.CHUNK_BYTES", 4 * 2**20)


def make_cache(root, key="c", tier="zarr", rows=5000):
    w = open_writer(tier, CacheSpec(key, rows, SHAPE, "float32"), root)
    w.append(
        torch.relu(torch.randn(rows, *SHAPE)),
        torch.zeros(rows, dtype=torch.int64),
        torch.arange(rows),
    )
    w.finish().close()


def test_missing_chunk_file_is_corruption_never_zeros(tmp_path):
    root = CacheRoot(tmp_path)
    make_cache(root)  # 5000 rows of 2 KiB in 4 MiB chunks: 3 chunks
    chunk = tmp_path / "c" / "activations" / "c" / "1" / "0" / "0" / "0"
    chunk.unlink()
    with pytest.raises(CacheCorruptedError, match="1 of 3 chunk files are missing"):
        open_reader(root, "c")
    assert verify(root, "c") and "missing" in verify(root, "c")[0]
    res = cli("cache", "verify", "--all", "--cache-dir", str(tmp_path), timeout=120)
    assert res.returncode == 1 and "c  CORRUPTED" in res.stdout, res.stdout


def test_chunk_vanishing_under_an_open_reader_is_detected(tmp_path):
    root = CacheRoot(tmp_path)
    make_cache(root)
    reader = open_reader(root, "c")
    (tmp_path / "c" / "activations" / "c" / "2" / "0" / "0" / "0").unlink()  # zarr would give zeros
    reader.read_chunk(0)
    with pytest.raises(CacheCorruptedError, match="chunk 2 is missing"):
        reader.read_chunk(2)
    reader.close()


def test_a_swapped_chunk_fails_the_markers_checksum(tmp_path):
    """A well-formed chunk file in the wrong place: zarr's own crc32c is happy, the marker's is not."""
    root = CacheRoot(tmp_path)
    make_cache(root, rows=3 * 2048)  # three full chunks of equal size
    chunks = tmp_path / "c" / "activations" / "c"
    (chunks / "1" / "0" / "0" / "0").write_bytes((chunks / "0" / "0" / "0" / "0").read_bytes())
    reader = open_reader(root, "c")
    with pytest.raises(CacheCorruptedError, match="chunk 1 .* does not match its checksum"):
        reader.read_chunk(1)
    reader.close()
    assert any("chunk 1" in p for p in verify(root, "c"))


@pytest.mark.parametrize("tier", ["zarr", "mmap"])
def test_marker_accounts_for_every_chunk(tmp_path, tier):
    root = CacheRoot(tmp_path)
    make_cache(root, tier=tier)
    marker = root.marker("c")
    assert marker["chunks"] == 3 and len(marker["chunk_crc32c"]) == 3


def test_writer_that_blocks_then_fails_never_blocks_the_trainer(
    tmp_path, monkeypatch, no_thread_leak
):
    """The queue is full while the disk hangs; when the write fails, append() raises at once."""
    release = threading.Event()

    def hung_then_failed(self, start, rows):
        release.wait(30)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ZarrWriter, "_write_chunk", hung_then_failed)
    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("hang", 100_000, SHAPE, "float32"), root)
    outcome: dict = {}

    def trainer():
        try:
            for _ in range(10_000):  # far more than the queue holds
                w.append(
                    torch.zeros(64, *SHAPE), torch.zeros(64, dtype=torch.int64), torch.arange(64)
                )
        except CacheWriteError as exc:
            outcome["error"], outcome["at"] = exc, time.perf_counter()

    t = threading.Thread(target=trainer, daemon=True)  # a regression must not hang exit
    t.start()
    deadline = time.monotonic() + 5  # a loaded machine fills the queue later
    while not w.queue.full() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.is_alive() and w.queue.full(), "the trainer should be waiting on a full queue"
    failed_at = time.perf_counter()
    release.set()
    t.join(timeout=10)
    assert not t.is_alive(), "append() still blocked 10 s after the writer failed"
    assert "Input/output error" in str(outcome["error"])
    # One queue poll (POLL_S = 50 ms) after the failure, the partial cache's removal and
    # scheduling on a loaded machine; a trainer that waited for the writer would wait 10 s.
    assert outcome["at"] - failed_at < 1.0, outcome["at"] - failed_at
    assert not root.dir_for("hang").exists(), "partial cache left"
    assert root.lock("hang").try_acquire(shared=False), "lock still held"


class HungDisk:
    """A disk that stops answering where the chunk file is written: on the writer thread
    (``MmapWriter._write_chunk``) or in the zarr tier's encode pool (``os.writev`` on a
    chunk file). ``release()`` lets the hung writes return."""

    def __init__(self, monkeypatch, where: str):
        self.entered, self.released = threading.Event(), threading.Event()
        if where == "writer thread":
            write = MmapWriter._write_chunk

            def hangs(writer, start, rows):
                self._hang()
                write(writer, start, rows)

            monkeypatch.setattr(MmapWriter, "_write_chunk", hangs)
            self.tier = "mmap"
        else:
            writev = os.writev

            def hung_writev(fd, buffers):
                if "activations" in os.readlink(f"/proc/self/fd/{fd}"):
                    self._hang()
                return writev(fd, buffers)

            monkeypatch.setattr(os, "writev", hung_writev)
            self.tier = "zarr"

    def _hang(self) -> None:
        self.entered.set()
        self.released.wait(30)

    def release(self) -> None:
        self.released.set()


HUNG = ["writer thread", "encode pool"]


@pytest.mark.parametrize("where", HUNG)
def test_abort_on_a_disk_that_hangs_returns_and_the_thread_cleans_up_later(
    where, tmp_path, monkeypatch, no_thread_leak
):
    """abort() waits ABORT_WAIT_S, not for the hung write: the thread removes the partial
    cache and releases the key once its write returns; until then nobody can take the key."""
    monkeypatch.setattr("prefast.store.disk_writer.ABORT_WAIT_S", 0.3)
    disk = HungDisk(monkeypatch, where)
    root = CacheRoot(tmp_path)
    w = open_writer(disk.tier, CacheSpec("hung", 20_000, SHAPE, "float32"), root)
    for _ in range(8):  # 4000 rows: more than a chunk: a thread is inside a write
        w.append(torch.zeros(500, *SHAPE), torch.zeros(500, dtype=torch.int64), torch.arange(500))
    assert disk.entered.wait(10)
    t = time.perf_counter()
    w.abort()
    assert time.perf_counter() - t < 5, "abort() waited for the hung write"  # it hangs 30 s
    assert root.dir_for("hung").exists()
    assert not root.lock("hung").try_acquire(shared=True), "a partial cache must stay locked"
    disk.release()
    for _ in range(100):  # the thread that returns last cleans up
        if not root.dir_for("hung").exists():
            break
        time.sleep(0.1)
    assert not root.dir_for("hung").exists(), "the hung thread did not remove the partial cache"
    assert root.lock("hung").try_acquire(shared=False), "lock still held"
    time.sleep(0.2)  # the threads end right after their cleanup (no_thread_leak checks)


@pytest.mark.parametrize("where", HUNG)
@pytest.mark.parametrize("call", ["append", "finish"])
def test_append_and_finish_on_a_disk_that_hangs_give_up_after_the_stall_bound(
    call, where, tmp_path, monkeypatch
):
    """A disk that hangs instead of failing: append() (on a full queue) and finish()
    (waiting for the queued chunks) raise DiskStalledError once no chunk write has
    finished for IO_STALL_S, within ABORT_WAIT_S more. Before, both waited forever."""
    monkeypatch.setattr("prefast.store.iothreads.IO_STALL_S", 1.0)
    monkeypatch.setattr("prefast.store.disk_writer.ABORT_WAIT_S", 0.3)
    monkeypatch.setattr("prefast.store.disk_writer.QUEUE_BYTES", 64 * 1024)  # a short queue
    disk = HungDisk(monkeypatch, where)
    root = CacheRoot(tmp_path)
    w = open_writer(disk.tier, CacheSpec("stalled", 100_000, SHAPE, "float32"), root)

    def write() -> None:
        batch = (torch.zeros(64, *SHAPE), torch.zeros(64, dtype=torch.int64), torch.arange(64))
        for _ in range(100 if call == "finish" else 10_000):
            w.append(*batch)
        if call == "finish":
            w.finish()

    t = time.perf_counter()
    try:
        with pytest.raises(DiskStalledError, match="stopped answering"):
            run_with_deadline(write, 20)
        assert time.perf_counter() - t < 10, "gave up long after the stall bound"
    finally:
        disk.release()
    for _ in range(100):
        if not root.dir_for("stalled").exists():
            break
        time.sleep(0.1)
    assert not root.dir_for("stalled").exists() and root.lock("stalled").try_acquire(shared=False)


def test_real_full_disk_raises_disk_full_and_leaves_nothing(tiny_disk, no_thread_leak):
    root = CacheRoot(tiny_disk)
    w = open_writer("zarr", CacheSpec("big", 20_000, SHAPE, "float32"), root)  # 40 MiB > 8 MiB
    with pytest.raises(DiskFullError, match="disk full.*partial cache was removed"):
        for s in range(0, 20_000, 500):
            noise = torch.randn(500, *SHAPE)  # incompressible: fills the disk
            w.append(noise, torch.zeros(500, dtype=torch.int64), torch.arange(s, s + 500))
        w.finish()
    assert root.cache_keys() == []
    make_cache(root, "small", rows=300)  # the space came back
    assert root.is_complete("small")


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_purge_skips_a_cache_held_open_by_a_reader(tmp_path):
    root = CacheRoot(tmp_path)
    make_cache(root, "held")
    make_cache(root, "free")
    reader = open_reader(root, "held")
    res = cli("cache", "purge", "--all", "--yes", "--cache-dir", str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipped held" in res.stdout and "deleted 1 cache(s)" in res.stdout
    assert root.is_complete("held") and not root.dir_for("free").exists()
    reader.read_chunk(0)  # still readable
    reader.close()
    res = cli("cache", "purge", "--all", "--yes", "--cache-dir", str(tmp_path), timeout=120)
    assert "deleted 1 cache(s)" in res.stdout and root.cache_keys() == []


def test_complete_cache_is_never_rewritten(tmp_path):
    root = CacheRoot(tmp_path)
    make_cache(root, "done")
    before = json.loads((tmp_path / "done" / "COMPLETE.json").read_text())
    with pytest.raises(CacheExistsError, match="already complete"):
        open_writer("zarr", CacheSpec("done", 10, SHAPE, "float32"), root)
    assert root.marker("done") == before
    assert not verify(root, "done")


def test_reader_and_writer_exclude_each_other(tmp_path):
    from prefast.store.errors import CacheLockedError

    root = CacheRoot(tmp_path)
    make_cache(root, "r")
    reader = open_reader(root, "r")
    assert not root.remove("r"), "removed under a live reader"
    reader.close()
    assert root.remove("r") and not root.dir_for("r").exists()
    w = open_writer("zarr", CacheSpec("w", 10, SHAPE, "float32"), root)
    with pytest.raises(CacheLockedError):
        open_reader(root, "w")
    w.abort()


@pytest.mark.parametrize("tier", ["zarr", "mmap"])
def test_a_writer_stops_at_its_disk_allowance(tmp_path, tier, no_thread_leak):
    """max_bytes is checked before each chunk is written: a cache admitted at an estimated
    size raises DiskBudgetError instead of outgrowing its budget, and leaves nothing."""
    root = CacheRoot(tmp_path)
    w = open_writer(tier, CacheSpec("big", 6000, SHAPE, "float32"), root)  # 12 MB, 3 chunks
    w.max_bytes = 6 * 2**20  # one 4 MiB chunk fits, two do not
    with pytest.raises(DiskBudgetError, match="would outgrow its disk budget"):
        for s in range(0, 6000, 500):
            noise = torch.randn(500, *SHAPE)  # incompressible
            w.append(noise, torch.zeros(500, dtype=torch.int64), torch.arange(s, s + 500))
        w.finish()
    assert w.bytes_written <= w.max_bytes
    assert root.cache_keys() == [] and root.lock("big").try_acquire(shared=False)


HUNG_WRITE = str(Path(__file__).parent / "hung_write.py")


@pytest.mark.slow  # a subprocess that waits out the abort bound
def test_abort_with_a_chunk_write_hung_in_the_encode_pool_returns_and_the_process_exits(tmp_path):
    """The zarr tier writes chunk files on its encode pool. With one such write hung (NFS
    stall) and the writer thread drained, abort() used to shut the pool down waiting for
    the hung write: forever, and the process could not exit either (a ThreadPoolExecutor
    is joined at exit). Now both take at most ABORT_WAIT_S (+ 1 s). In a subprocess: a
    regression hangs it, not the suite."""
    cmd = [sys.executable, HUNG_WRITE, str(tmp_path)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "aborting"
        t = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=ABORT_WAIT_S + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"abort() or the exit still blocked {ABORT_WAIT_S + 15:.0f} s later")
        exited = time.monotonic() - t
    assert proc.returncode == 0 and out.startswith("aborted"), out
    assert float(out.split()[1]) <= ABORT_WAIT_S + 1, out
    # The exit adds the interpreter's teardown: seconds on a machine busy with other tests
    # (make check runs two at a time). A regression blocks it for good (the timeout above).
    assert exited <= ABORT_WAIT_S + 3, f"exited {exited:.1f} s after abort() began"


@pytest.mark.parametrize(
    "code,kind",
    [
        (errno.EIO, CacheCorruptedError),  # an unreadable block: the cache is bad
        (errno.ENOENT, CacheCorruptedError),
        (errno.ESTALE, CacheUnavailableError),  # a stale NFS handle: try again later
        (errno.EMFILE, CacheUnavailableError),
        (errno.ETIMEDOUT, CacheUnavailableError),  # a read that stalled (iothreads)
    ],
    ids=errno.errorcode.get,
)
def test_read_errors_are_sorted_into_damage_or_unavailable(code, kind):
    """Damage deletes and rebuilds a cache; anything else keeps it. ESTALE used to count as
    damage, so a sound cache on NFS was deleted after a server restart."""
    from prefast.store.errors import read_error

    assert type(read_error("k", "reading chunk 3", OSError(code, os.strerror(code)))) is kind


def test_completing_a_cache_on_a_disk_that_hangs_gives_up_after_the_stall_bound(
    tmp_path, monkeypatch
):
    """finish() writes the small arrays, fsyncs and writes the marker: if the disk stops
    answering there (the fsync hangs), it raises DiskStalledError after IO_STALL_S instead
    of hanging the trainer; the partial cache is never marked complete."""
    from prefast.store import disk_writer

    monkeypatch.setattr("prefast.store.iothreads.IO_STALL_S", 1.0)  # the completion's bound
    monkeypatch.setattr(disk_writer, "stall_s", lambda: 60.0)  # the chunk writes' (default)
    monkeypatch.setattr("prefast.store.disk_writer.ABORT_WAIT_S", 0.3)
    released = threading.Event()
    monkeypatch.setattr(disk_writer, "fsync_tree", lambda path: released.wait(30))
    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("sync", 64, SHAPE, "float32"), root)
    w.append(torch.zeros(64, *SHAPE), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    t = time.perf_counter()
    try:
        with pytest.raises(DiskStalledError, match="stopped answering"):
            run_with_deadline(w.finish, 20)
        assert time.perf_counter() - t < 5
        assert not root.is_complete("sync")
    finally:
        released.set()


def test_a_chunk_read_on_the_training_thread_that_hangs_is_unavailable(tmp_path, monkeypatch):
    """read_rows (a test cache's evaluation, a spill's copy) reads on the caller's thread:
    a chunk read that never returns is unavailable (the cache kept) after IO_STALL_S."""
    from prefast.store.zarr_reader import ZarrReader

    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("r", 64, SHAPE, "float32"), root)
    w.append(torch.zeros(64, *SHAPE), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    reader = w.finish()  # under the default bound: only the read gets the short one
    monkeypatch.setattr("prefast.store.iothreads.IO_STALL_S", 1.0)
    released = threading.Event()
    monkeypatch.setattr(ZarrReader, "_load_chunk", lambda self, i, buf: released.wait(30))
    try:
        with pytest.raises(CacheUnavailableError, match="chunk 0 did not return in 1 s"):
            run_with_deadline(lambda: reader.read_rows(np.arange(8)), 20)
    finally:
        released.set()
        reader.close()
    assert root.is_complete("r")


@pytest.mark.parametrize("hangs_in", ["fsync_tree", "write_small"])
def test_a_completion_that_times_out_never_marks_the_cache_complete_when_the_disk_answers(
    tmp_path, monkeypatch, hangs_in
):
    """finish() gives up on a completion that hangs; that thread goes on when the disk
    answers. Before: abort() removed the directory and released the key at once, and the
    completion thread, returning later, wrote the small arrays (recreating the directory)
    and the completion record: a cache marked complete with no activations, under a key
    another writer could be writing. Now the completion thread checks, under the writer's
    hand-off lock, that finish() has not given up before it writes the record; the one
    that gave up leaves the cleanup to it, so the key stays locked until it returns."""
    from prefast.store import disk_writer, iothreads

    default_stall_s = iothreads.IO_STALL_S
    monkeypatch.setattr("prefast.store.iothreads.IO_STALL_S", 1.0)  # the completion's bound
    monkeypatch.setattr(disk_writer, "stall_s", lambda: default_stall_s)  # the chunk writes'
    monkeypatch.setattr("prefast.store.disk_writer.ABORT_WAIT_S", 0.3)
    released, returned = threading.Event(), threading.Event()
    if hangs_in == "fsync_tree":
        monkeypatch.setattr(disk_writer, "fsync_tree", lambda path: released.wait(30))
    else:
        real = disk_writer.DiskWriter._write_small

        def slow(self, name, values):
            released.wait(30)
            real(self, name, values)

        monkeypatch.setattr(disk_writer.DiskWriter, "_write_small", slow)
    real_complete = disk_writer.DiskWriter._complete

    def complete(self):
        try:
            real_complete(self)
        finally:
            returned.set()

    monkeypatch.setattr(disk_writer.DiskWriter, "_complete", complete)
    root = CacheRoot(tmp_path)
    w = open_writer("zarr", CacheSpec("late", 64, SHAPE, "float32"), root)
    w.append(torch.zeros(64, *SHAPE), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    with pytest.raises(DiskStalledError, match="stopped answering"):
        run_with_deadline(w.finish, 20)
    w.abort()  # what the boundary does next: a no-op now
    with pytest.raises(CacheLockedError):  # the key stays held while the completion hangs
        open_writer("zarr", CacheSpec("late", 64, SHAPE, "float32"), root)
    released.set()
    assert returned.wait(10)
    # The disk answers again: the new writer below gets the default bound (on a loaded
    # machine its own completion can take over 1 s).
    monkeypatch.setattr("prefast.store.iothreads.IO_STALL_S", default_stall_s)
    deadline = time.monotonic() + 10
    while True:  # the cleanup removes the directory, then releases the key
        try:
            make_cache(root, "late", rows=64)  # the key is free again: a new writer completes
            break
        except CacheLockedError:
            assert time.monotonic() < deadline, "the key was never released"
            assert not root.is_complete("late")  # never complete meanwhile
            time.sleep(0.05)
    assert root.is_complete("late") and verify(root, "late") == []
