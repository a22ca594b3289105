"""The activation-cache flags of `prefast train`, `compare` and `plan` (``common.py``
adds them to each)."""

from __future__ import annotations

import argparse

from prefast.config import BOUNDARY_POLICIES, CACHE_DTYPES, TIERS


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("activation cache (prefast mode)")
    c.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where caches live: a writable directory, or s3://BUCKET/PREFIX for an "
        "S3-compatible object store (endpoint and keys from the usual AWS_* settings; "
        "docs/object-store.md) (default: $PREFAST_CACHE_DIR, else $XDG_CACHE_HOME/prefast, "
        "else ~/.cache/prefast)",
    )
    c.add_argument(
        "--cache-tier",
        default="auto",
        choices=TIERS,
        help="force a tier (gpu, ram, mmap, zarr: chunked, compressed, checksummed on disk); "
        "auto lets the memory governor choose",
    )
    c.add_argument(
        "--cache-dtype",
        default="auto",
        choices=CACHE_DTYPES,
        metavar="DTYPE",
        help="how cached activations are stored: float32, float16, bfloat16, int8 (1 byte: "
        "per-channel affine), float8 (1 byte: e4m3, per-channel scale) or bitroundN "
        "(float16 keeping N=1..9 of 10 mantissa bits; saves bytes in zarr only). auto: "
        "bfloat16 under CUDA autocast, else float16, and int8 for a boundary where 1 byte "
        "reaches a faster tier with a measured error <= 1%% (default: auto)",
    )
    c.add_argument(
        "--plan-from",
        metavar="JSON",
        help="replay the boundaries, tiers and dtypes of an earlier run (its --json-out or "
        "compare record, or `prefast plan --json`): the same command, the same numbers",
    )
    c.add_argument(
        "--bandwidths",
        metavar="PATH|measure",
        help="each tier's write/read speed, which prices a boundary in the tier it lands in: "
        "PATH pins them (a --json-out record, or the cache dir's bandwidths.json); measure: "
        "now (default: kept in --cache-dir per host, device and dtype for 30 days; "
        "$PREFAST_BANDWIDTHS pins them too)",
    )
    c.add_argument(
        "--cache-views",
        type=int,
        default=1,
        help="augmented views materialized per boundary; epoch e reads view e mod K",
    )
    c.add_argument(
        "--feature-augment",
        default="",
        metavar="OPS",
        help="augment cached activations on the training device, per sample and epoch, no "
        "extra bytes: shift (translate the feature map by up to 1/8 of its side, as the "
        "input crop), flip (mirror it), mix (Manifold Mixup of two samples and their "
        "labels); comma-separated, e.g. shift,flip (default: none)",
    )
    c.add_argument(
        "--cache-boundaries",
        default="auto",
        choices=BOUNDARY_POLICIES,
        help="auto: materialize a boundary only when the cost model says it pays; "
        "every: at every epoch start where the frozen prefix grew (default: %(default)s)",
    )
    budget = "(default: read from the machine as the run goes)"
    c.add_argument("--max-ram", metavar="SIZE", help=f"host RAM for caches, e.g. 4GB {budget}")
    c.add_argument(
        "--max-gpu-mem", metavar="SIZE", help=f"GPU memory for caches, e.g. 10GB {budget}"
    )
    c.add_argument("--max-disk", metavar="SIZE", help=f"disk for caches, e.g. 50GB {budget}")
    c.add_argument(
        "--local-cache",
        metavar="DIR",
        help="with an s3:// --cache-dir: keep a local copy of the chunks read here, so later "
        "epochs and runs read them at disk speed (docs/object-store.md)",
    )
    c.add_argument(
        "--local-cache-size",
        metavar="SIZE",
        help="the most --local-cache may hold; least recently used chunks go first (default: 20GB)",
    )
