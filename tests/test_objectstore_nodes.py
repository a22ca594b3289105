"""Several nodes and jobs on one bucket: two torchrun launchers on loopback (one rank each,
each with a home of its own: another node's local disk) share one ``s3://`` cache dir, and
a second job of the same launch shape reads the first job's per-rank shards from its first
epoch. A cache key holds the rank and the world size, so a job of another world size
computes the prefix and writes shards of its own (docs/object-store.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3_server
from helpers import finish_together, free_port

from prefast.store import ObjectRoot
from prefast.store.manage import list_caches

pytest.importorskip("moto.server", reason="the object-store tests need moto[server]")

PREFAST = str(Path(sys.executable).parent / "prefast")
SWEEP = [
    "train", "--dataset", "digits", "--model", "densenet-bc", "--depth", "10", "--epochs", "2",
    "--batch-size", "64", "--freeze-prefix", "all", "--augment", "none", "--device", "cpu",
    "--cache-tier", "zarr", "--cache-dtype", "float32",
]  # fmt: skip


def job(url: str, lr: str, home: Path, endpoint: str) -> dict:
    """Two launchers (static rendezvous on loopback), one rank each: rank 0's record."""
    port, procs = free_port(), []
    for r in (0, 1):
        node = home / f"node{r}"
        node.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **s3_server.environment(endpoint), "HOME": str(node),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(r), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
               str(port), "--monitor-interval", "0.5", PREFAST, *SWEEP, "--lr", lr,
               "--cache-dir", url, "--json-out", str(home / "rank0.json")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=node, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = finish_together(procs)
    return {"record": json.loads((home / "rank0.json").read_text()), "stdout": outs[0][0]}


@pytest.mark.slow  # four torchrun launchers and a single-process run
def test_two_launchers_share_a_bucket_and_the_next_job_reads_it_from_its_first_epoch(
    server, tmp_path, monkeypatch
):
    bucket = s3_server.new_bucket(server.endpoint)
    for name, value in s3_server.environment(server.endpoint).items():
        monkeypatch.setenv(name, value)
    url = f"s3://{bucket}/nodes"
    first = job(url, "0.1", tmp_path / "job1", server.endpoint)["record"]
    assert first["final"]["world_size"] == 2
    shards = sorted(
        (c["split"], c["rank"], c["world"], c["rows"]) for c in list_caches(ObjectRoot(url))
    )
    assert shards == [("test", 0, 2, 180), ("test", 1, 2, 180), ("train", 0, 2, 719),
                      ("train", 1, 2, 719)], shards  # fmt: skip

    second = job(url, "0.05", tmp_path / "job2", server.endpoint)
    epoch1 = second["record"]["epochs"][0]
    assert epoch1["cached_batches"] == epoch1["steps"]  # every batch from the bucket
    assert "reusing cache" in second["stdout"]
    assert len(list_caches(ObjectRoot(url))) == 4  # nothing new written

    # Another world size: its keys differ, so it computes the prefix and writes its own.
    home = tmp_path / "single"
    home.mkdir()
    res = subprocess.run([PREFAST, *SWEEP, "--lr", "0.02", "--cache-dir", url, "--json-out",
                          str(home / "one.json")], env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((home / "one.json").read_text())
    assert one["epochs"][0]["cached_batches"] == 0 and "reusing cache" not in res.stdout
    worlds = sorted({c["world"] for c in list_caches(ObjectRoot(url))})
    assert worlds == [1, 2]
