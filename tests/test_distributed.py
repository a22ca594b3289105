"""Data parallelism through the real launcher: torchrun, 2 ranks, gloo on the CPU."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import finish_together, free_port

from prefast.store import CacheRoot
from prefast.store.manage import list_caches, verify

PREFAST = str(Path(sys.executable).parent / "prefast")
TEST_PREFAST = str(Path(__file__).parent / "run_prefast.py")  # test-only options, then `--`
DIGITS = [
    "--dataset", "digits", "--model", "densenet-bc", "--depth", "10", "--epochs", "4",
    "--t0", "0.3", "--batch-size", "64", "--augment", "none", "--device", "cpu",
]  # fmt: skip


ONE_NODE = ("--standalone", "--nproc_per_node", "2")


def torchrun(
    *args: str,
    timeout: float = 300,
    popen: bool = False,
    program=(PREFAST,),
    launcher: tuple[str, ...] = ONE_NODE,
):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", *launcher, "--monitor-interval", "0.5",
        *program, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_ranks_stay_identical_cache_their_shards_and_match_freezeout(tmp_path):
    runs = {}
    for mode in ("freezeout", "prefast"):
        out = tmp_path / f"{mode}.json"
        res = torchrun(
            "train", "--mode", mode, *DIGITS, "--cache-tier", "zarr", "--cache-dtype", "float32",
            "--cache-boundaries", "every", "--cache-dir", str(tmp_path / "cache"),
            "--check-replicas", "--json-out", str(out),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("training densenet-bc") == 1, "rank 0 alone prints"
        runs[mode] = json.loads(out.read_text())
    fo, pf = runs["freezeout"], runs["prefast"]
    for run in (fo, pf):
        assert run["final"]["world_size"] == 2
        assert all(e["replicas_in_sync"] for e in run["epochs"]), "ranks' weights diverged"
        assert all(e["steps"] == 12 for e in run["epochs"])  # ceil(1437 / 2) = 719 rows, batch 64
        # each epoch's data wait is the slowest rank's, and every rank's is in the record
        assert all(e["data_s"] == max(e["rank_data_s"]) for e in run["epochs"])
        assert all(len(e["rank_data_s"]) == 2 for e in run["epochs"])
    for a, b in zip(fo["epochs"], pf["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * abs(a["train_loss"])
        assert a["test_acc"] == b["test_acc"]
    assert pf["epochs"][-1]["cached_batches"] == 12
    caches = [c for c in list_caches(CacheRoot(tmp_path / "cache")) if c["split"] == "train"]
    last = max(c["boundary"] for c in caches)
    final = sorted((c["rank"], c["world"], c["rows"]) for c in caches if c["boundary"] == last)
    assert final == [(0, 2, 719), (1, 2, 719)]  # 1,437 rows + 1 padded, half per rank
    assert all(c["status"] == "complete" for c in caches)
    bytes_per_rank = pf["final"]["rank_cache_bytes"]
    assert len(bytes_per_rank) == 2 and all(b > 0 for b in bytes_per_rank)


@pytest.mark.slow
def test_two_nodes_of_one_rank_each_train_like_one_node_and_keep_their_own_shards(tmp_path):
    """Several nodes: two launchers on loopback (static rendezvous), one rank each, each
    with its own cache directory (a node's local disk). They train the same numbers as
    one launcher running both ranks, and a node's directory holds only its rank's shard."""
    train = [
        "train", "--mode", "prefast", *DIGITS, "--cache-tier", "zarr", "--cache-dtype",
        "float32", "--cache-boundaries", "every", "--check-replicas",
    ]  # fmt: skip
    res = torchrun(
        *train, "--cache-dir", str(tmp_path / "one"), "--json-out", str(tmp_path / "one.json")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())

    port = free_port()
    nodes = []
    for r in (0, 1):  # both launchers at once: the rendezvous waits for every node
        node = (
            "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
        )  # fmt: skip
        own = ["--cache-dir", str(tmp_path / f"node{r}"), "--json-out", str(tmp_path / f"{r}.json")]
        nodes.append(torchrun(*train, *own, popen=True, launcher=node))
    outs = finish_together(nodes)
    assert outs[0][0].count("training densenet-bc") == 1 and "training" not in outs[1][0]
    assert not (tmp_path / "1.json").exists(), "rank 0 alone writes --json-out"
    two = json.loads((tmp_path / "0.json").read_text())

    assert two["final"]["world_size"] == 2
    assert all(e["replicas_in_sync"] for e in two["epochs"]), "ranks' weights diverged"
    assert [e["steps"] for e in two["epochs"]] == [e["steps"] for e in one["epochs"]]
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-9 * abs(a["train_loss"]), (a, b)
        assert a["test_acc"] == b["test_acc"]
    assert two["epochs"][-1]["cached_batches"] == 12

    def caches(name: str) -> list[dict]:
        return list_caches(CacheRoot(tmp_path / name))

    both = caches("one")  # one node: both ranks' shards side by side
    assert {c["rank"] for c in both} == {0, 1}
    for r in (0, 1):
        mine = caches(f"node{r}")
        assert mine and all(c["status"] == "complete" for c in mine)
        assert {(c["rank"], c["world"]) for c in mine} == {(r, 2)}, (r, mine)
        # the same caches (same keys: same shard, boundaries and splits) as rank r's on one node
        assert sorted(c["key"] for c in mine) == sorted(c["key"] for c in both if c["rank"] == r)
        last = max(c["boundary"] for c in mine if c["split"] == "train")
        assert [c["rows"] for c in mine if c["split"] == "train" and c["boundary"] == last] == [719]


@pytest.mark.slow
def test_two_ranks_on_the_strict_device_match_two_ranks_on_the_cpu(tmp_path):
    """DDP over gloo accepts the strict test device: the whole data-parallel prefast path
    (gpu-tier caches, all-reduced evaluation, checkpoints) runs with device tensors that
    refuse host reads, and gives the CPU's numbers. Every rank lets go of its DDP wrapper
    before the process group is destroyed: kept alive by a reference cycle, it was freed
    during the interpreter's teardown, and gloo aborted the process now and then
    (``terminate called without an active exception``, SIGABRT, once in a full run)."""
    runs = {}
    for name, program, tier in (
        ("cpu", (TEST_PREFAST, "--assert-ddp-freed", "--"), "ram"),
        ("strict", (TEST_PREFAST, "--strict", "--assert-ddp-freed", "--"), "gpu"),
    ):
        out = tmp_path / f"{name}.json"
        res = torchrun(
            "train", "--mode", "prefast", *DIGITS, "--cache-tier", tier, "--cache-dtype",
            "float32", "--cache-boundaries", "every", "--cache-dir", str(tmp_path / name),
            "--check-replicas", "--checkpoint", str(tmp_path / f"{name}.pt"),
            "--json-out", str(out), program=program,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads(out.read_text())
    cpu, strict = runs["cpu"], runs["strict"]
    assert all(e["replicas_in_sync"] for e in strict["epochs"])
    assert [e["train_loss"] for e in strict["epochs"]] == [e["train_loss"] for e in cpu["epochs"]]
    assert [e["test_acc"] for e in strict["epochs"]] == [e["test_acc"] for e in cpu["epochs"]]
    assert strict["epochs"][-1]["cache_tier"] == "gpu" and strict["epochs"][-1]["cached_batches"]


@pytest.mark.slow
def test_a_local_error_under_torchrun_keeps_its_message_and_rank(tmp_path):
    """Only a collective that fails says "lost the process group"; a rank's own error
    (here a CUDA out-of-memory message raised on rank 1) is reported as itself."""
    res = torchrun(
        "train", *DIGITS, "--dist-timeout", "30",
        program=(TEST_PREFAST, "--fail-rank", "1", "--fail-step", "3", "--"),
    )  # fmt: skip
    assert res.returncode != 0
    own = "prefast[rank 1]: error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert own in res.stderr, res.stderr[-3000:]
    assert "rank 1 of 2 lost the process group" not in res.stderr
    # rank 0 waited in a collective for rank 1: it lost the group, or torchrun stopped it
    assert (
        "prefast[rank 0]: error: rank 0 of 2 lost the process group" in res.stderr
        or "prefast[rank 0]: terminated" in res.stderr
    ), res.stderr[-3000:]


def test_only_collective_failures_count_as_a_lost_process_group():
    from torch.distributed import DistBackendError

    from prefast.distributed import is_collective_failure

    assert is_collective_failure(DistBackendError("NCCL communicator was aborted"))
    assert is_collective_failure(
        RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]")
    )
    assert not is_collective_failure(torch.OutOfMemoryError("CUDA out of memory."))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_bounded_time_and_a_rerun_completes(tmp_path):
    args = [
        "train", "--mode", "prefast", "--dataset", "synthetic", "--synthetic-size", "4096,512",
        "--model", "densenet-bc", "--depth", "10", "--epochs", "30", "--t0", "0.2",
        "--batch-size", "128", "--augment", "none", "--device", "cpu", "--cache-tier", "zarr",
        "--cache-boundaries", "every", "--cache-dir", str(tmp_path / "cache"),
        "--dist-timeout", "30",
    ]  # fmt: skip
    proc = torchrun(*args, popen=True)
    try:
        survivor, victim = ranks_once_training(proc)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        rc = proc.wait(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = drain(proc)
    assert rc != 0 and elapsed < 60, (rc, elapsed)
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    # The survivor says it lost the group (gloo's reset connection, as a rule) or, when
    # torchrun's SIGTERM came first, that it was stopped; the victim had no time to say a word.
    said = [line for line in stderr.splitlines() if line.startswith("prefast[rank 0]")]
    assert said, stderr[-2000:]
    assert LOST_GROUP.fullmatch(said[0]) or said[0] == TERMINATED, said[0]
    assert "prefast[rank 1]" not in stderr, stderr[-2000:]
    root = CacheRoot(tmp_path / "cache")
    for c in list_caches(root):  # whatever is complete is sound; the rest stays partial
        if c["status"] == "complete":
            assert not verify(root, c["key"]), c
    rerun = torchrun(*[a if a != "30" else "3" for a in args])  # a shorter run, same caches
    assert rerun.returncode == 0, rerun.stderr[-3000:]


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_process_group_timeout(tmp_path):
    """SIGSTOP keeps the peer's connections open: only the timeout can end the wait."""
    args = [
        "train", "--mode", "freezeout", "--dataset", "synthetic", "--synthetic-size", "4096,512",
        "--model", "densenet-bc", "--depth", "10", "--epochs", "30", "--batch-size", "128",
        "--augment", "none", "--device", "cpu", "--dist-timeout", "6",
    ]  # fmt: skip
    proc = torchrun(*args, popen=True)
    stopped = None
    try:
        survivor, stopped = ranks_once_training(proc)
        stopped_at = time.monotonic()
        stopped.suspend()
        survivor.wait(timeout=90)  # the timeout (6 s) ends its collective; it exits
        elapsed = time.monotonic() - stopped_at
        stopped.kill()  # torchrun would only SIGTERM it after a grace period
        rc = proc.wait(timeout=60)
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        if proc.poll() is None:
            proc.kill()
    stderr = drain(proc)
    assert rc != 0 and elapsed < 60, (rc, elapsed)  # 6 s timeout + unwinding
    assert "prefast[rank 0]: error: rank 0 of 2 lost the process group" in stderr, stderr[-2000:]


LOST_GROUP = re.compile(
    r"prefast\[rank 0\]: error: rank 0 of 2 lost the process group \(.+\): another rank "
    r"probably failed or was killed; see its log\. Completed caches stay valid: rerun "
    r"\(with --resume and --checkpoint to continue\)"
)
TERMINATED = "prefast[rank 0]: terminated (SIGTERM; under torchrun: another rank failed)"


def drain(proc: subprocess.Popen) -> str:
    """The ended job's stderr; both pipes closed (an open one is a ResourceWarning)."""
    stderr = proc.stderr.read() if proc.stderr else ""
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return stderr


def ranks_once_training(proc: subprocess.Popen) -> tuple[psutil.Process, psutil.Process]:
    """Ranks 0 and 1 of a torchrun job, once rank 0 printed an epoch line (both are training)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch"):
            break
    workers = {
        _env(p)["RANK"]: p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "RANK" in _env(p)
    }
    return workers["0"], workers["1"]


def _env(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return {}


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_the_training_set_with_at_most_one_pad_per_rank(world):
    import numpy as np

    from prefast.store.order import shard_rows, test_rows

    n = 1437
    shards = [shard_rows(n, 0, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank runs the same number of steps"
    every = np.concatenate(shards)
    assert set(every.tolist()) == set(range(n)) and len(every) - n < world
    tests = np.concatenate([test_rows(360, r, world) for r in range(world)])
    assert sorted(tests.tolist()) == list(range(360))


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_resumed_with_another_world_size_reshards_and_sees_every_sample_once(
    before, after, tmp_path
):
    """A checkpoint from ``before`` ranks resumed with ``after``: the shards (functions of
    seed, rank and world) are dealt again, the old shards' caches are not read, the new
    ones are built at the first resumed epoch and read from the next; every epoch has the
    new world's steps and every training sample once (over all ranks)."""
    ck, cache = tmp_path / "ck.pt", tmp_path / "cache"
    args = ["train", "--mode", "prefast", *DIGITS, "--cache-tier", "zarr",
            "--cache-boundaries", "every", "--cache-dir", str(cache), "--checkpoint", str(ck)]  # fmt: skip

    def launch(world: int, *extra: str, kill: bool = False):
        # An option before `--`: torchrun's parser drops a `--` right after the script.
        pre = [
            TEST_PREFAST,
            "--kill-at-step",
            "5",
            *(["--kill-at-epoch", "2"] if kill else []),
            "--",
        ]
        if world == 1:
            cmd = [sys.executable, *pre, *args, *extra]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        launcher = ("--standalone", "--nproc_per_node", str(world))
        return torchrun(*args, *extra, program=pre, launcher=launcher)

    first = launch(before, kill=True)  # SIGKILLed in epoch 2: the checkpoint holds 0..1
    assert first.returncode != 0, first.stderr[-2000:]
    out = tmp_path / "resumed.json"
    res = launch(after, "--resume", "--json-out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"written by {before} process(es), resuming with {after}: resharding" in res.stderr
    run = json.loads(out.read_text())
    bpe = run["final"]["batches_per_epoch"]
    assert bpe == math.ceil(math.ceil(1437 / after) / 64)
    resumed = run["epochs"][2:]
    assert [e["epoch"] for e in resumed] == [2, 3]
    assert all(e["steps"] == bpe for e in resumed)
    assert all(e["samples"] * after >= 1437 > (e["samples"] - 1) * after for e in resumed)
    events = run["final"]["cache_events"]
    assert ("resharded", 2) in [(e["event"], e["epoch"]) for e in events], events
    assert not any(e["event"] == "reused" for e in events), "read a cache of the old shards"
    assert resumed[0]["cached_batches"] == 0 and resumed[0]["write_s"] > 0  # built at once
    assert resumed[1]["cached_batches"] == bpe  # and read from the next epoch
    worlds = {
        (c["rank"], c["world"]) for c in list_caches(CacheRoot(cache)) if c["split"] == "train"
    }
    assert {(r, after) for r in range(after)} <= worlds, worlds


@pytest.mark.slow
def test_each_rank_resumes_its_own_caches_in_its_own_tier_and_dtype(tmp_path):
    """Tiers, auto dtypes and fault re-plans are decided per rank. Here rank 1's node has
    less free disk: with --cache-dtype auto its first boundary is stored in int8 where
    rank 0's is float16. SIGKILLed in epoch 2 and resumed, each rank reopens its own
    caches: rank 1 reads its int8 cache at once. (Before, the checkpoint held rank 0's
    feed state alone: rank 1 looked up rank 0's float16 key, missed, and left its own
    complete cache unused.)"""
    ck, cache = tmp_path / "ck.pt", tmp_path / "cache"
    # 0.9 MB of room for this rank's share of the disk: 518 KB of float16 (stage 3) would
    # not fit beside the test set's cache, 388 KB of int8 does
    free = str(int((2**30 + 0.9e6) / 0.9))
    args = ["train", "--mode", "prefast", *DIGITS, "--epochs", "6",
            "--cache-dtype", "auto", "--max-ram", "64KB", "--cache-boundaries", "every",
            "--cache-dir", str(cache), "--checkpoint", str(ck)]  # fmt: skip
    pre = [TEST_PREFAST, "--disk-free-rank", "1", free, "--kill-at-step", "5"]
    first = torchrun(*args, program=[*pre, "--kill-at-epoch", "2", "--"])
    assert first.returncode != 0, first.stderr[-2000:]
    caches = [c for c in list_caches(CacheRoot(cache)) if c["split"] == "train"]
    [int8] = [c for c in caches if c["rank"] == 1 and c["boundary"] == 3]
    assert int8["dtype"] == "int8", caches
    assert {c["dtype"] for c in caches if c["rank"] == 0} == {"float16"}, caches
    out = tmp_path / "resumed.json"
    res = torchrun(*args, "--resume", "--json-out", str(out), program=[*pre, "--"])
    assert res.returncode == 0, res.stderr[-3000:]
    rank1 = json.loads(out.read_text())["final"]["rank_cache_events"][1]
    reused = [e for e in rank1 if e["event"] == "reused"]
    assert [(e["epoch"], e["key"]) for e in reused] == [(2, int8["key"])], rank1
    [resumed] = [e for e in rank1 if e["event"] == "resumed"]
    assert resumed["kept"] == [3], resumed
