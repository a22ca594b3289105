"""Listing, inspecting, verifying and purging caches (`prefast cache ...`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .disk_reader import DiskReader
from .encoding import decode, nonfinite_rows
from .errors import CacheCorruptedError, CacheError, CacheLockedError, CacheReadError
from .layout import CacheRoot
from .objectstore import ObjectRoot
from .readers import open_reader

Root = CacheRoot | ObjectRoot  # a local directory or an s3:// prefix


def describe(root: Root, key: str) -> dict:
    """One `cache ls` row. Partial caches report what their attributes say."""
    attrs = root.attrs(key)
    complete = root.is_complete(key)
    created, used = root.times(key)
    return {
        "key": key,
        "status": "complete" if complete else "partial",
        "tier": attrs.get("tier"),
        "model": attrs.get("model"),
        "boundary": attrs.get("boundary"),
        "split": attrs.get("split"),
        "rank": attrs.get("rank", 0),
        "world": attrs.get("world", 1),
        "rows": attrs.get("rows"),
        "shape": attrs.get("shape"),
        "dtype": attrs.get("dtype"),
        "row_bytes": _row_bytes(attrs),
        "codec": attrs.get("codec"),
        "compression_ratio": attrs.get("compression_ratio"),
        "bytes": root.usage(key),
        "logical_bytes": attrs.get("logical_bytes"),
        "created": attrs.get("created", created),
        "last_used": used if complete else None,
        "orphans": root.orphans(key),  # an object store's copies no record names
    }


def _row_bytes(attrs: dict) -> int | None:
    """Bytes of one stored row, scales included (caches of older versions: from their size)."""
    if attrs.get("row_bytes") is not None:
        return int(attrs["row_bytes"])
    if attrs.get("logical_bytes") and attrs.get("rows"):
        return int(attrs["logical_bytes"]) // int(attrs["rows"])
    return None


def list_caches(root: Root) -> list[dict]:
    return [describe(root, k) for k in root.cache_keys()]


def inspect(root: Root, key: str) -> dict:
    """Attributes, completion record and per-array statistics."""
    info = describe(root, key)
    if info["status"] != "complete":
        return info
    reader = open_reader(root, key, use=False)  # looking is not using
    try:
        stored = reader.read_rows(np.arange(min(reader.spec.rows, reader.chunk_rows)))[0]
        sample = decode(stored, reader.spec.dtype, reader.spec.shape).float()
        info["attributes"] = reader.attrs
        info["marker"] = {k: v for k, v in reader.marker.items() if k != "chunk_crc32c"}
        info["arrays"] = {
            "activations": {
                "shape": [reader.spec.rows, *reader.spec.shape],
                "dtype": reader.spec.dtype,
                "row_bytes": reader.spec.row_bytes,
                "chunk_rows": reader.chunk_rows,
                "chunks": reader.num_chunks,
                "first_chunk_mean": float(sample.mean()),
                "first_chunk_std": float(sample.std()),
                "first_chunk_zero_fraction": float((sample == 0).float().mean()),
            },
            "labels": {"rows": len(reader.labels), "classes": int(len(np.unique(reader.labels)))},
            "ids": {"rows": len(reader.ids()), "unique": int(len(np.unique(reader.ids())))},
        }
    finally:
        reader.close()
    return info


def in_root(exc: BaseException, root: Root) -> BaseException:
    """``exc``, its purge hint naming ``root`` (the --cache-dir the user passed)."""
    if isinstance(exc, CacheCorruptedError):
        exc.root = root.path
    return exc


def verify(root: Root, key: str) -> list[str]:
    """Check that every chunk the completion marker lists is present and matches its
    checksum; returns the problems found (empty: the cache is sound).

    Raises CacheLockedError when another process is deleting the cache.
    """
    if not root.is_complete(key):
        return []  # partial caches are never read; `cache ls` shows them as partial
    try:
        reader: DiskReader = open_reader(root, key, use=False)  # verifying is not using
    except CacheLockedError:
        raise
    except (CacheError, KeyError, OSError, ValueError) as exc:
        return [str(in_root(exc, root))]
    problems = []
    try:
        ids = reader.ids()
        if len(np.unique(ids)) != len(ids) or len(ids) != reader.spec.rows:
            problems.append(f"cache {key}: sample ids are not unique (some samples missing)")
        nonfinite = 0
        for i in range(reader.num_chunks):
            try:
                chunk = reader.read_chunk(i)
            except CacheReadError as exc:
                problems.append(str(in_root(exc, root)))
                continue
            nonfinite += nonfinite_rows(chunk, reader.spec.dtype, reader.spec.shape)
        if nonfinite:
            problems.append(
                f"cache {key}: {nonfinite} of {reader.spec.rows} rows hold NaN or inf (the "
                "run that wrote it diverged). Delete it with "
                f"`prefast cache purge {key} --cache-dir {root.path} --yes`"
            )
    finally:
        reader.close()
    return problems


@dataclass
class PurgeRule:
    all: bool = False
    partial: bool = False
    older_than_s: float | None = None
    max_size: int | None = None


def purge_candidates(root: Root, keys: list[str], rule: PurgeRule) -> list[dict]:
    """Which caches a purge would delete (oldest-used first for --max-size)."""
    rows = list_caches(root)
    chosen = {r["key"] for r in rows if r["key"] in keys}
    # Keys with a partial copy (the whole key, or copies its record does not name), and those
    # of them whose writer is alive: asked once each. A partial cache being written is never
    # chosen.
    stray = {r["key"] for r in rows if r["status"] == "partial" or r["orphans"]}
    writing = {key for key in stray if root.live_writer(key)}
    if rule.all:
        chosen |= {r["key"] for r in rows}
    orphaned: set[str] = set()
    if rule.partial:
        for r in rows:
            if r["key"] in stray and r["key"] not in writing:
                (chosen if r["status"] == "partial" else orphaned).add(r["key"])
    if rule.older_than_s is not None:
        cutoff = time.time() - rule.older_than_s
        chosen |= {r["key"] for r in rows if (r["last_used"] or r["created"] or 0) < cutoff}
    if rule.max_size is not None:
        kept = sorted(
            (r for r in rows if r["key"] not in chosen),
            key=lambda r: r["last_used"] or r["created"] or 0,
            reverse=True,
        )
        total = 0
        for r in kept:
            total += r["bytes"]
            if total > rule.max_size:
                chosen.add(r["key"])
    # A complete key chosen only for the copies its record does not name keeps its cache.
    return [
        {**r, "only_orphans": r["key"] not in chosen}
        for r in rows
        if (r["key"] in chosen or r["key"] in orphaned)
        and not (r["status"] == "partial" and r["key"] in writing)
    ]
