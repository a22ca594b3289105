"""Fault injection: killed writers, flipped bytes, competing writers, purge rules.

The rest of the fault contract: tests/test_store_faults.py, tests/test_training_faults.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from helpers import cli_in_process

from prefast.errors import CacheLockedError
from prefast.store import CacheRoot, CacheSpec, open_writer
from prefast.store.manage import list_caches, verify

SHAPE = (8, 8, 8)


def prefast_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "prefast.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def make_cache(root, key="good", tier="zarr", rows=600):
    w = open_writer(tier, CacheSpec(key, rows, SHAPE, "float16"), root)
    x = torch.relu(torch.randn(rows, *SHAPE))
    w.append(x, torch.zeros(rows, dtype=torch.int64), torch.arange(rows))
    w.finish().close()


@pytest.mark.slow
def test_sigkill_mid_write_leaves_nothing_complete(tmp_path):
    script = textwrap.dedent(f"""
        import time
        import torch
        from prefast.store import CacheRoot, CacheSpec, open_writer
        w = open_writer("zarr", CacheSpec("killed", 10_000_000, (8, 8, 8), "float16"), CacheRoot({str(tmp_path)!r}))
        print("writing", flush=True)
        while True:
            w.append(torch.relu(torch.randn(256, 8, 8, 8)), torch.zeros(256, dtype=torch.int64), torch.arange(256))
            time.sleep(0.002)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    root = CacheRoot(tmp_path)
    rows = list_caches(root)
    assert [r["status"] for r in rows if r["key"] == "killed"] == ["partial"]
    res = prefast_cli("cache", "verify", "--all", "--cache-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    ls = prefast_cli("cache", "ls", "--json", "--cache-dir", str(tmp_path))
    import json

    assert all(r["status"] != "complete" for r in json.loads(ls.stdout))
    # the dead writer's lock is not stale: a new writer takes over the key
    make_cache(root, key="killed", rows=300)
    assert root.is_complete("killed")


RUN_PREFAST = os.path.join(os.path.dirname(__file__), "run_prefast.py")
SMALL_RUN = [
    "train", "--mode", "prefast", "--dataset", "digits", "--model", "densenet-bc",
    "--depth", "10", "--epochs", "4", "--t0", "0.3", "--augment", "none", "--device", "cpu",
    "--cache-tier", "zarr", "--cache-boundaries", "every",
]  # fmt: skip


def wait_for_file(path, proc, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()}"
        assert time.monotonic() < deadline, "the writer never reached finish()"
        time.sleep(0.05)
    time.sleep(0.2)  # the pid is written; the process is now sleeping inside finish()
    return int(path.read_text())


@pytest.mark.slow
def test_sigterm_during_finish_exits_promptly_with_the_signals_status(tmp_path):
    """Before: SIGTERM raised an Exception, finish() turned it into a CacheWriteError, the
    boundary was abandoned and training went on to the end (exit 0)."""
    pause = tmp_path / "paused"
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, RUN_PREFAST, "--pause-in-finish", str(pause), "--",
         *SMALL_RUN, "--cache-dir", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = wait_for_file(pause, proc)
    assert pid == proc.pid
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t
    assert proc.returncode == 143, (proc.returncode, out, err[-2000:])
    assert took < 10, f"took {took:.1f} s to stop"
    assert "prefast: terminated (SIGTERM" in err, err[-2000:]
    assert "CacheWriteError" not in err and "abandon" not in err, err[-2000:]
    root = CacheRoot(cache)
    assert [k for k in root.cache_keys() if not root.is_complete(k)] == [], "partial cache left"


@pytest.mark.slow
def test_sigterm_during_finish_under_torchrun_stops_every_rank(tmp_path):
    """Rank 1 is signalled inside finish(): it exits 143, torchrun stops rank 0, and the job
    ends in bounded time with no rank left running."""
    pause = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--monitor-interval", "0.5", RUN_PREFAST, "--pause-in-finish", str(pause),
         "--pause-rank", "1", "--", *SMALL_RUN, "--cache-dir", str(tmp_path / "cache"),
         "--dist-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    pid = wait_for_file(pause, proc, seconds=240)
    ranks = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert pid in ranks and len(ranks) >= 2, ranks
    t = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - t
    assert proc.returncode != 0, (out, err[-3000:])
    assert took < 45, f"the job took {took:.1f} s to stop"
    assert "prefast[rank 1]: terminated (SIGTERM" in err, err[-3000:]
    assert not [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.parametrize("tier", ["zarr", "mmap"])
def test_flipped_byte_is_detected(tmp_path, tier, capsys, caplog):
    root = CacheRoot(tmp_path)
    make_cache(root, tier=tier)
    d = root.dir_for("good")
    target = (
        d / "activations.bin"
        if tier == "mmap"
        else sorted((d / "activations" / "c").rglob("*"))[-1]
    )
    if target.is_dir():
        target = next(p for p in target.rglob("*") if p.is_file())
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert verify(root, "good")
    res = cli_in_process(capsys, caplog, "cache", "verify", "good", "--cache-dir", str(tmp_path))
    assert res.returncode == 1
    assert "good" in res.stdout and "CORRUPTED" in res.stdout
    # The hint is a command that works as printed: it names the --cache-dir passed.
    hint = f"`prefast cache purge good --cache-dir {tmp_path} --yes`"
    assert hint in res.stdout, res.stdout
    purge = cli_in_process(capsys, caplog, *hint.strip("`").split()[1:])
    assert purge.returncode == 0, purge.stderr
    assert not root.dir_for("good").exists()


def test_second_writer_gets_lock_error(tmp_path):
    root = CacheRoot(tmp_path)
    first = open_writer("zarr", CacheSpec("same", 10, SHAPE, "float16"), root)
    with pytest.raises(CacheLockedError, match="another live process"):
        open_writer("zarr", CacheSpec("same", 10, SHAPE, "float16"), root)
    first.abort()
    first.abort()  # idempotent


@pytest.mark.slow
def test_purge_rules(tmp_path):
    root = CacheRoot(tmp_path)
    make_cache(root, "a")
    make_cache(root, "b")
    (tmp_path / "partial1").mkdir()
    res = prefast_cli("cache", "purge", "--partial", "--dry-run", "--cache-dir", str(tmp_path))
    assert "would delete partial1" in res.stdout and (tmp_path / "partial1").exists()
    res = prefast_cli("cache", "purge", "--partial", "--cache-dir", str(tmp_path))
    assert res.returncode == 2 and "--yes" in res.stderr  # no tty: refuses without --yes
    res = prefast_cli("cache", "purge", "--max-size", "1B", "--yes", "--cache-dir", str(tmp_path))
    assert res.returncode == 0 and not root.cache_keys()
