"""`prefast bench store` and `prefast bench train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_train_flags, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: storage throughput, training modes")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    s = bsub.add_parser(
        "store",
        help="write/cold-read MB/s of every tier vs raw-file, memmap and "
        "per-sample torch.load baselines",
        description="Generates fp16 ReLU-like activations and measures each tier.",
    )
    s.add_argument(
        "--quick",
        action="store_true",
        help="1 GB, one trial (about a minute): the smallest cache that does not fit the "
        "256 MiB shuffle buffer a run uses, so reads take the run's path and chunk size",
    )
    s.add_argument("--size", default="2GB", help="logical bytes to write and read (default 2GB)")
    s.add_argument("--trials", type=int, default=3)
    s.add_argument(
        "--dir",
        help="directory on the disk to measure (default: system temp), or s3://BUCKET/PREFIX: "
        "the zarr tier in an object store against raw parallel range GETs of its objects",
    )
    s.add_argument("--json-out", help="write results as JSON here")
    s.add_argument("--md-out", help="write a markdown table here")
    s.set_defaults(func=run_store)
    t = bsub.add_parser(
        "train",
        help="baseline/freezeout/prefast over seeds and t0 values",
        description="Runs `compare` for each t0 and seed; reports mean ± std.",
    )
    add_train_flags(t, modes=False)
    t.add_argument("--t0-values", default="0.5,0.6,0.7,0.8")
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--modes", default="baseline,freezeout,prefast")
    t.add_argument(
        "--out", default="benchmarks/results/train", help="output prefix (.json/.md/.png)"
    )
    t.set_defaults(func=run_train)


def run_store(args: argparse.Namespace) -> int:
    from prefast.benchmarks import objectstore_bench, store_bench
    from prefast.config import local_dir, parse_size
    from prefast.store.objectstore import is_url, parse_url

    size = parse_size("1GB" if args.quick else args.size, "--size")
    trials = 1 if args.quick else args.trials
    if args.dir and is_url(args.dir):  # an object store: its zarr tier against raw GETs
        parse_url(args.dir, f"--dir {args.dir}")
        doc = objectstore_bench.run_object_store_bench(args.dir, size, trials)
        md = objectstore_bench.markdown(doc)
    else:
        where = local_dir(args.dir, f"--dir {args.dir}") if args.dir else None
        doc = store_bench.run_store_bench(size, where, trials)
        md = store_bench.markdown(doc)
    print(md)
    write_json(args.json_out, doc)
    if args.md_out:
        Path(args.md_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md_out).write_text(md)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from prefast.benchmarks.train_bench import run_sweep

    from .common import config_from_args

    cfg = config_from_args(args, mode="prefast")
    run_sweep(
        cfg,
        [float(v) for v in args.t0_values.split(",")],
        [int(v) for v in args.seeds.split(",")],
        args.modes.split(","),
        args.out,
    )
    return 0
