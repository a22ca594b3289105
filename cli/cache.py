"""`prefast cache ls | inspect | verify | purge`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from .common import human_bytes, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="list, inspect, verify and purge activation caches",
        description="Manage the activation caches under the cache root.",
    )
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        q = csub.add_parser(name, help=help, description=help)
        q.add_argument(
            "--cache-dir", help="cache root (default $PREFAST_CACHE_DIR or ~/.cache/prefast)"
        )
        return q

    q = add("ls", "one row per cache: status, shape, codec, sizes, times")
    q.add_argument("--json", action="store_true", help="print a JSON list (every field)")
    q.add_argument(
        "--long",
        action="store_true",
        help="every column (rank, shape, bytes per row, codec, ratio, logical size, created); "
        "without it the table fits an 80-column terminal",
    )
    q.set_defaults(func=run_ls)
    q = add("inspect", "attributes, completion record and array statistics of one cache")
    q.add_argument("key", help="cache key (a unique prefix is enough)")
    q.set_defaults(func=run_inspect)
    q = add("verify", "read every chunk and check checksums; exit 1 naming each bad cache")
    q.add_argument("key", nargs="?", help="cache key or prefix")
    q.add_argument("--all", action="store_true", help="verify every cache")
    q.set_defaults(func=run_verify)
    q = add("purge", "delete caches")
    q.add_argument("key", nargs="*", help="cache keys or prefixes")
    q.add_argument("--all", action="store_true", help="every cache")
    q.add_argument("--partial", action="store_true", help="caches whose writer died")
    q.add_argument("--older-than", metavar="AGE", help="not used for AGE, e.g. 7d, 12h")
    q.add_argument("--max-size", metavar="SIZE", help="delete least recently used until under SIZE")
    q.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    q.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    q.set_defaults(func=run_purge)


def _root(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The root the command names: a local directory or an s3:// prefix."""
    from prefast.config import cache_location, cache_root
    from prefast.errors import ConfigError

    if args.cache_dir:
        where = cache_location(args.cache_dir, f"--cache-dir {args.cache_dir}")
        if isinstance(where, Path) and where.exists() and not where.is_dir():
            raise ConfigError(
                f"--cache-dir {where} is not a directory: pass the directory a run used"
            )
    return cache_root(args.cache_dir)


# What a user tells caches apart by; --long adds the rest (the JSON has every field).
SHORT_COLUMNS = ("key", "status", "tier", "split", "boundary", "dtype", "on disk", "last used")
LONG_COLUMNS = (
    "key", "status", "tier", "model", "split", "rank", "boundary", "rows", "shape", "dtype",
    "row", "codec", "ratio", "on disk", "logical", "created", "last used",
)  # fmt: skip


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def run_ls(args: argparse.Namespace) -> int:
    from prefast.store.manage import list_caches

    root = _root(args)
    rows = list_caches(root)
    if args.json:
        write_json("-", rows)
        return 0
    if not rows:
        print(
            f"no caches under {root.path}: caches in the gpu and ram tiers live only as long "
            "as their run (the governor puts a boundary there when it fits); --cache-tier "
            + (
                "zarr keeps them in the bucket"
                if root.remote
                else "mmap or zarr keeps them on disk"
            )
            + " for the next run"
        )
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # No vertical rules and one space between columns: the short table's widest rows
    # ("complete", "float16", "612.0 KiB", a date) fit 80 columns without cutting a cell.
    table = Table(
        title=f"caches under {root.path}", box=box.SIMPLE_HEAD, show_edge=False,
        pad_edge=False, padding=0, title_justify="left",
    )  # fmt: skip
    columns = LONG_COLUMNS if args.long else SHORT_COLUMNS
    for col in columns:
        table.add_column(col, no_wrap=True)
    for r in rows:
        cells = {
            "key": r["key"][:12],
            "status": r["status"],
            "tier": str(r["tier"]),
            "model": str(r["model"]),
            "split": str(r["split"]),
            "rank": f"{r['rank']}/{r['world']}",
            "boundary": str(r["boundary"]),
            "rows": str(r["rows"]),
            "shape": "x".join(map(str, r["shape"] or [])),
            "dtype": str(r["dtype"]),
            "row": human_bytes(r["row_bytes"]),
            "codec": str(r["codec"]),
            "ratio": f"{r['compression_ratio'] or 0:.2f}",
            "on disk": human_bytes(r["bytes"]),
            "logical": human_bytes(r["logical_bytes"]),
            "created": _when(r["created"]),
            "last used": _when(r["last_used"]),
        }
        table.add_row(*(cells[c] for c in columns))
    Console(width=200 if args.long else None).print(table)  # None: the terminal's width
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from prefast.store.manage import inspect

    root = _root(args)
    write_json("-", _dates(inspect(root, root.resolve(args.key))))
    return 0


DATES = ("created", "last_used", "completed_at")  # Unix timestamps in the cache's files


def _dates(info: object) -> object:
    """Every timestamp, at any depth (the completion record has its own), as a date a
    person reads."""
    if isinstance(info, dict):
        return {
            k: dt.datetime.fromtimestamp(v).isoformat(timespec="seconds")
            if k in DATES and isinstance(v, int | float) else _dates(v)
            for k, v in info.items()
        }  # fmt: skip
    if isinstance(info, list):
        return [_dates(v) for v in info]
    return info


def run_verify(args: argparse.Namespace) -> int:
    from prefast.store.errors import CacheLockedError, ConfigError
    from prefast.store.manage import verify

    root = _root(args)
    if bool(args.all) == bool(args.key):
        raise ConfigError("cache verify needs a KEY or --all (not both)")
    keys = root.cache_keys() if args.all else [root.resolve(args.key)]
    bad = 0
    for key in keys:
        if not root.is_complete(key):
            where = f" --cache-dir {root.path}" if args.cache_dir else ""
            print(
                f"{key}  partial (never read; remove with `prefast cache purge --partial{where}`)"
            )
            continue
        try:
            problems = verify(root, key)
        except CacheLockedError as exc:
            print(f"{key}  busy ({exc})")
            continue
        print(f"{key}  {'ok' if not problems else 'CORRUPTED'}")
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    if bad:
        print(f"{bad} corrupted cache(s)", file=sys.stderr)
        return 1
    print(f"verified {len(keys)} cache(s) under {root.path}")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    from prefast.config import parse_duration, parse_size
    from prefast.errors import ConfigError
    from prefast.store.manage import PurgeRule, purge_candidates

    root = _root(args)
    rule = PurgeRule(
        all=args.all,
        partial=args.partial,
        older_than_s=parse_duration(args.older_than) if args.older_than else None,
        max_size=parse_size(args.max_size, "--max-size"),
    )
    if not (args.key or rule.all or rule.partial or args.older_than or args.max_size):
        raise ConfigError("cache purge needs KEY..., --all, --partial, --older-than or --max-size")
    keys = [root.resolve(k) for k in args.key]
    doomed = purge_candidates(root, keys, rule)
    total = sum(r["bytes"] for r in doomed if not r["only_orphans"])
    for r in doomed:
        what = (
            f"{len(r['orphans'])} copy(ies) its record does not name"
            if r["only_orphans"]
            else f"{r['status']}  {human_bytes(r['bytes'])}"
        )
        print(f"{'would delete' if args.dry_run else 'delete'} {r['key']}  {what}")
    if not doomed:
        print("nothing to purge")
        return 0
    if args.dry_run:
        print(f"dry run: {len(doomed)} cache(s), {human_bytes(total)}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to delete without confirmation: pass --yes")
        if (
            input(f"delete {len(doomed)} cache(s), {human_bytes(total)}? [y/N] ").strip().lower()
            != "y"
        ):
            print("kept everything")
            return 0
    deleted = freed = 0
    for r in doomed:
        if r["only_orphans"]:
            freed += root.remove_orphans(r["key"])
        elif root.purge(r["key"]):  # locally, only under the key's exclusive lock
            deleted, freed = deleted + 1, freed + r["bytes"]
        else:
            print(f"skipped {r['key']}: in use by a live process (reading or writing it)")
    print(f"deleted {deleted} cache(s), freed {human_bytes(freed)}")
    return 0
