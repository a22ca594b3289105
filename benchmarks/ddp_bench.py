"""Data parallelism: what a rank's cache holds with 1 and with 2 processes.

Claim under test: under ``torchrun`` each rank caches only its own shard, so
the cache bytes a rank holds fall to about 1/N of the single-process run, while
the losses stay those of the single-process schedule's modes (freezeout ==
prefast, exactly, with a float32 cache and no augmentation). Runs the real
launcher (``python -m torch.distributed.run``, gloo on the CPU).

Two numbers per rank: ``rank_cache_bytes`` is the governor's *planned* peak
(its ledger, ``final.rank_cache_bytes``: logical bytes of the caches live at
once), not a measurement; ``rank_disk_bytes`` is *measured*: the blocks the
run's cache directories take on disk when it ends (``disk_usage`` per cache,
counted for the rank its attributes name), i.e. the last boundary's training
and test caches as the zarr tier stored them.

    python benchmarks/ddp_bench.py [OUT_DIR]   # default benchmarks/results, 10 epochs (about 1 min)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = [
    "train", "--dataset", "digits", "--model", "densenet-bc", "--depth", "16", "--augment",
    "none", "--device", "cpu", "--cache-dtype", "float32", "--cache-tier", "zarr",
    "--cache-boundaries", "every", "--check-replicas",
]  # fmt: skip
# ``--cache-boundaries every``: 1 and 2 processes end on the same boundary, so their
# caches differ only by the shard. The default policy plans from measured costs
# and rows per rank: one run may keep a later, wider boundary than the other.


def launch(nproc: int, mode: str, workdir: Path, epochs: int, t0: float) -> dict:
    """The run's record, plus ``disk_bytes``: what its cache directory holds per rank."""
    out = workdir / f"{mode}_{nproc}.json"
    cache_dir = workdir / f"cache{nproc}_{mode}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), str(Path(sys.executable).parent / "prefast"), *ARGS, "--epochs", str(epochs), "--t0", str(t0),
        "--mode", mode,
        "--cache-dir", str(cache_dir), "--json-out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun failed ({res.returncode}): {res.stderr[-2000:]}")
    run = json.loads(out.read_text())
    run["disk_bytes"], run["disk_boundaries"] = disk_bytes_per_rank(cache_dir, nproc)
    return run


def disk_bytes_per_rank(cache_dir: Path, world: int) -> tuple[list[int], list[int]]:
    """Bytes on disk per rank: ``disk_usage`` (allocated blocks) of every cache directory
    under ``cache_dir``, counted for the rank in the cache's attributes; and the
    boundaries (stages) those caches hold."""
    from prefast.store import CacheRoot
    from prefast.store.manage import describe

    root = CacheRoot(cache_dir)
    per_rank, boundaries = [0] * world, set()
    for key in root.cache_keys():
        info = describe(root, key)
        if info["status"] != "complete" or info["world"] != world:
            raise RuntimeError(f"cache {key} after a clean run: {info}")  # rank unknown
        per_rank[info["rank"]] += info["bytes"]  # store.layout.disk_usage of its directory
        boundaries.add(info["boundary"])
    return per_rank, sorted(boundaries)


def run_ddp_bench(epochs: int = 10, t0: float = 0.8) -> dict:
    work = Path(tempfile.mkdtemp(prefix="prefast-ddp-"))
    try:
        runs = {
            n: {m: launch(n, m, work, epochs, t0) for m in ("freezeout", "prefast")} for n in (1, 2)
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for n, by_mode in runs.items():
        fo, pf = by_mode["freezeout"], by_mode["prefast"]
        rel = max(
            abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"])
            for a, b in zip(fo["epochs"], pf["epochs"], strict=True)
        )
        rows.append(
            {
                "world_size": n,
                "rank_cache_bytes": pf["final"]["rank_cache_bytes"],  # planned (ledger peak)
                "rank_disk_bytes": pf["disk_bytes"],  # measured, on disk at the end
                "disk_boundaries": pf["disk_boundaries"],  # the stages those caches hold
                "train_rows_per_rank": pf["data"]["train"],
                "steps_per_epoch": pf["final"]["batches_per_epoch"],
                "max_rel_loss_diff_prefast_vs_freezeout": rel,
                "replicas_in_sync": all(e.get("replicas_in_sync", True) for e in pf["epochs"]),
                "test_acc": {
                    "freezeout": fo["final"]["test_acc"],
                    "prefast": pf["final"]["test_acc"],
                },
                "wall_s": {"freezeout": fo["final"]["wall_s"], "prefast": pf["final"]["wall_s"]},
            }
        )
    single, single_disk = rows[0]["rank_cache_bytes"][0], rows[0]["rank_disk_bytes"][0]
    for row in rows:
        row["peak_cache_vs_single_process"] = [b / single for b in row["rank_cache_bytes"]]
        row["disk_vs_single_process"] = [b / single_disk for b in row["rank_disk_bytes"]]
    from prefast.benchmarks.store_bench import machine

    return {
        "machine": machine(),
        "args": [*ARGS, "--epochs", str(epochs), "--t0", str(t0)],
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    lines = [
        "Data parallel (torchrun, gloo on the CPU): `prefast " + " ".join(doc["args"]) + "`, "
        "freezeout then prefast, with 1 and with 2 processes.",
        "",
        "| ranks | train rows per rank | steps per epoch | cache bytes on disk per rank at the end "
        "(measured) | boundary | vs 1 process | planned peak cache bytes per rank (governor "
        "ledger) | vs 1 process | prefast vs freezeout max rel. loss diff | replicas in sync | "
        "test acc freezeout / prefast |",
        "|---:|---:|---:|---|---|---|---|---|---:|---|---|",
    ]
    for r in doc["rows"]:
        acc = r["test_acc"]
        lines.append(
            f"| {r['world_size']} | {r['train_rows_per_rank']} | {r['steps_per_epoch']} | "
            f"{_mib(r['rank_disk_bytes'])} | {', '.join(map(str, r['disk_boundaries']))} | "
            f"{_ratios(r['disk_vs_single_process'])} | "
            f"{_mib(r['rank_cache_bytes'])} | {_ratios(r['peak_cache_vs_single_process'])} | "
            f"{r['max_rel_loss_diff_prefast_vs_freezeout']:.1e} | {r['replicas_in_sync']} | "
            f"{acc['freezeout']:.4f} / {acc['prefast']:.4f} |"
        )
    lines += [
        "",
        "On disk: the blocks each rank's caches take when the run ends (the last boundary's "
        "training and test caches as the zarr tier stored them), summed per cache directory "
        "by the rank its attributes name. Planned: the governor's ledger, the most logical "
        "bytes of the caches live at once (`final.rank_cache_bytes`); a plan, not a "
        "measurement.",
    ]
    return "\n".join(lines) + "\n"


def _mib(sizes: list[int]) -> str:
    return ", ".join(f"{b / 2**20:.2f} MiB" for b in sizes)


def _ratios(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    doc = run_ddp_bench()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    (out / "ddp_digits.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "ddp_digits.md").write_text(markdown(doc))
    print(markdown(doc))
