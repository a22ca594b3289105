"""Data parallelism: what a rank's cache holds with 1 and with 2 processes.

Claim under test: under ``torchrun`` each rank caches only its own shard, so
the cache bytes a rank holds at its peak fall to about 1/N of the single-process
run, while the losses stay those of the single-process schedule's modes
(freezeout == prefast, exactly, with a float32 cache and no augmentation).
Runs the real launcher (``python -m torch.distributed.run``, gloo on the CPU).
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
    "train", "--dataset", "digits", "--model", "densenet-bc", "--depth", "16", "--epochs", "10",
    "--augment", "none", "--device", "cpu", "--cache-dtype", "float32", "--cache-tier", "zarr",
    "--check-replicas",
]  # fmt: skip


def launch(nproc: int, mode: str, workdir: Path) -> dict:
    out = workdir / f"{mode}_{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), str(Path(sys.executable).parent / "prefast"), *ARGS, "--mode", mode,
        "--cache-dir", str(workdir / f"cache{nproc}"), "--json-out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(out.read_text())


def run_ddp_bench() -> dict:
    work = Path(tempfile.mkdtemp(prefix="prefast-ddp-"))
    try:
        runs = {n: {m: launch(n, m, work) for m in ("freezeout", "prefast")} for n in (1, 2)}
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
                "rank_cache_bytes": pf["final"]["rank_cache_bytes"],
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
    single = rows[0]["rank_cache_bytes"][0]
    for row in rows:
        row["peak_cache_vs_single_process"] = [b / single for b in row["rank_cache_bytes"]]
    from prefast.benchmarks.store_bench import machine

    return {"machine": machine(), "args": ARGS, "rows": rows}


def markdown(doc: dict) -> str:
    lines = [
        "Data parallel (torchrun, gloo on the CPU): `prefast " + " ".join(doc["args"]) + "`, "
        "freezeout then prefast, with 1 and with 2 processes.",
        "",
        "| ranks | train rows per rank | steps per epoch | peak cache bytes per rank | vs 1 process | "
        "prefast vs freezeout max rel. loss diff | replicas in sync | test acc freezeout / prefast |",
        "|---:|---:|---:|---|---|---:|---|---|",
    ]
    for r in doc["rows"]:
        ratio = ", ".join(f"{v:.3f}" for v in r["peak_cache_vs_single_process"])
        sizes = ", ".join(f"{b / 2**20:.2f} MiB" for b in r["rank_cache_bytes"])
        acc = r["test_acc"]
        lines.append(
            f"| {r['world_size']} | {r['train_rows_per_rank']} | {r['steps_per_epoch']} | {sizes} | "
            f"{ratio} | {r['max_rel_loss_diff_prefast_vs_freezeout']:.1e} | {r['replicas_in_sync']} | "
            f"{acc['freezeout']:.4f} / {acc['prefast']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    doc = run_ddp_bench()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    (out / "ddp_digits.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "ddp_digits.md").write_text(markdown(doc))
    print(markdown(doc))
