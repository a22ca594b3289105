"""How fast each cache tier moves a boundary's rows on this machine: measured, kept, pinned.

One set of figures prices every boundary, in the planner (``costmodel.plan_boundaries``),
the governor (``governor._decide``) and ``--freeze auto``'s online boundaries
(``online.py``), so a boundary that fits GPU memory is priced at the GPU's speed and one
that goes to disk at the disk's: before, every boundary was priced at fixed disk speeds
whatever its tier, and on a GPU nothing was ever planned.

What is measured (``measure``): a few MiB of activation-like rows (post-ReLU: half exact
zeros) in the run's cache dtype, written as a write-through step writes them (encoded,
decoded again and checked for overflow, ``CacheContext.as_stored``, then the tier's own
writer, compression included) and read back as one shuffled epoch through the tier's
reader onto the training device, decoded as the model takes them: ``gpu`` (device-to-device), ``ram`` (host memcpy on a CPU;
device-to-host and pinned host-to-device on CUDA), ``mmap`` and ``zarr`` with and
without zstd (cold reads: the files are dropped from the page cache first). Figures
are logical bytes per second (uncompressed stored bytes), as the store benchmark's are.

Kept: ``bandwidths.json`` beside the caches (``--cache-dir``), keyed by host, device,
dtype and torch version, measured again after ``MAX_AGE_DAYS`` or on request
(``bandwidths='measure'``). Pinned: ``bandwidths=PATH`` (``--bandwidths PATH``, or
``$PREFAST_BANDWIDTHS``) reads them from a file (a kept file, or a run record's
``pricing``), so a plan can be reproduced on another machine or day.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefast.caching.fits import mend
from prefast.errors import CacheError, ConfigError
from prefast.store import CacheRoot, CacheSpec, Writer, open_writer
from prefast.store.device import is_accelerator, synchronize
from prefast.store.encoding import decode, encode, row_bytes
from prefast.store.layout import drop_page_cache, process_alive
from prefast.store.manage import Root
from prefast.store.objectstore import ObjectRoot

log = logging.getLogger("prefast.caching.bandwidth")
MIB = 2**20
KEPT = "bandwidths.json"  # in the cache root
MAX_AGE_DAYS = 30  # kept figures older than this are measured again
MEASURE_BYTES = 8 * MIB  # per tier: half a second on 2 CPU cores, paid once per host and dtype
ROW_SHAPE = (64, 16, 16)  # a DenseNet-like boundary row
KEYS = ("gpu", "ram", "mmap", "zarr", "zarr+zstd")  # zarr+zstd: the compressed zarr tier


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second each tier writes (a boundary stored once) and reads (an epoch
    brought to the training device), keyed as ``KEYS``."""

    write: dict[str, float]
    read: dict[str, float]
    source: str = "defaults"  # measured (when, where), kept (file), pinned (file), defaults
    measure_s: float = 0.0  # what measuring them cost this run (0: kept or pinned)
    meta: dict = field(default_factory=dict)  # host, device, dtype, torch, measured_at

    def of(self, tier: str, compressed: bool = False) -> tuple[float, float]:
        """(write, read) bytes/s of ``tier``; ``compressed``: zarr with zstd."""
        key = "zarr+zstd" if tier == "zarr" and compressed else tier
        return self.write.get(key, DEFAULTS.write[key]), self.read.get(key, DEFAULTS.read[key])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict, source: str) -> Bandwidths:
        try:
            write = {k: float(v) for k, v in doc["write"].items() if k in KEYS}
            read = {k: float(v) for k, v in doc["read"].items() if k in KEYS}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"{source}: no bandwidths in it (a 'write' and a 'read' table of bytes/s per "
                f"tier: {', '.join(KEYS)})"
            ) from None
        bad = [f"{k}={v}" for table in (write, read) for k, v in table.items() if not v > 0]
        if bad:
            raise ConfigError(f"{source}: bandwidths must be positive bytes/s: {', '.join(bad)}")
        meta = doc.get("meta")
        return cls(write, read, source, 0.0, dict(meta) if isinstance(meta, dict) else {})


# The figures every boundary was priced at before tiers had their own (DESIGN.md §5 for the
# disk tiers); used only where nothing was measured: a planner test, or an old plan file.
DEFAULTS = Bandwidths(
    write={"gpu": 300e6, "ram": 300e6, "mmap": 300e6, "zarr": 300e6, "zarr+zstd": 300e6},
    read={"gpu": 1e9, "ram": 1e9, "mmap": 1.5e9, "zarr": 1e9, "zarr+zstd": 1e9},
)


def _rows(dtype: str, device: torch.device, nbytes: int) -> torch.Tensor:
    """Activation-like rows adding up to about ``nbytes`` stored in ``dtype``, on ``device``."""
    n = max(64, nbytes // row_bytes(ROW_SHAPE, dtype))
    g = torch.Generator().manual_seed(0)
    return torch.relu_(torch.randn(n, *ROW_SHAPE, generator=g)).to(device)


def _to_compute(stored: torch.Tensor, dtype: str, device: torch.device) -> torch.Tensor:
    """Stored rows as the model takes them: decoded, in float32 (a 16-bit cache stays 16-bit
    on CUDA, where the step runs under autocast)."""
    x = decode(stored, dtype, ROW_SHAPE)
    return x if device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) else x.float()


def _tier_speed(
    tier: str, codec: str, x: torch.Tensor, dtype: str, device: torch.device, scratch: Root
) -> tuple[float, float]:
    """(write, read) logical bytes/s of ``x`` stored in ``dtype`` through ``tier``; the
    disk tiers in ``scratch`` (a local directory, or an object store's prefix)."""
    from prefast.store.object_writer import ObjectZarrWriter
    from prefast.store.zarr_writer import ZarrWriter

    root = scratch.sub(f"{tier}-{codec}")
    zarr_writer = ObjectZarrWriter if root.remote else ZarrWriter
    batch = 64  # a training batch
    spec = CacheSpec(f"bandwidth-{tier}-{codec}", len(x), ROW_SHAPE, dtype)
    labels, ids = torch.zeros(len(x), dtype=torch.int64), torch.arange(len(x))
    synchronize(device)
    t = time.perf_counter()
    writer: Writer = (
        zarr_writer(root, spec, codec=codec)  # type: ignore[arg-type]
        if tier == "zarr"
        else open_writer(tier, spec, root, device)
    )
    try:
        for s in range(0, len(x), batch):  # as a write-through step does (CacheContext.as_stored)
            xb = x[s : s + batch]
            stored = encode(xb, dtype)
            mend(xb, _to_compute(stored, dtype, device), dtype)  # the rows' overflow check
            writer.append(stored, labels[s : s + batch], ids[s : s + batch])
        reader = writer.finish()
    except BaseException:
        writer.abort()  # its thread and its lock go with it
        raise
    synchronize(device)
    write_s = time.perf_counter() - t
    if tier in ("mmap", "zarr") and isinstance(root, CacheRoot):
        drop_page_cache(root.dir_for(spec.key))  # a cold read, as a boundary larger than RAM reads
    # The reader's own pass, on this thread: what the loader thread does each epoch, without
    # its start (paid once per epoch, not per byte) or its read-ahead.
    try:
        t = time.perf_counter()
        for acts, _, _ in reader.epoch_batches(0, 1, batch, 4 * MIB):
            _to_compute(acts.to(device, non_blocking=True), dtype, device)  # decoded for the step
        synchronize(device)
        read_s = time.perf_counter() - t
    finally:
        reader.close()
    written = len(x) * spec.row_bytes
    return written / max(write_s, 1e-9), written / max(read_s, 1e-9)


def _scratch_prefix(pid: int | None = None) -> str:
    """The measurement's scratch dir name: host and pid, so a later run on this host can
    tell one whose process died (SIGKILL, OOM) from one still measuring."""
    # "_" after the host: hostnames have none, so one host's prefix never matches another's
    return f".bandwidth-{platform.node()}_{os.getpid() if pid is None else pid}-"


def _sweep_dead_scratch(scratch: Root) -> None:
    """Remove this host's measurement scratch dirs whose process is gone (up to 32 MiB each:
    a killed run's ``finally`` never ran). Another host's, and a live process's, stay."""
    host = f".bandwidth-{platform.node()}_"
    for name in scratch.names():
        pid = name[len(host) :].split("-", 1)[0]
        if not name.startswith(host) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_alive(int(pid)):
            _remove_scratch(scratch.sub(name))


def _remove_scratch(work: Root) -> None:
    with contextlib.suppress(CacheError):  # an object store that does not answer now
        work.clear()


def measure(device: torch.device, dtype: str, scratch: Root | Path, nbytes: int = MEASURE_BYTES):  # type: ignore[no-untyped-def]
    """Measure every tier this device has (``gpu`` only on an accelerator); the disk tiers
    in ``scratch`` (an object store's: its zarr tier only, mmap maps a local file)."""
    start = time.perf_counter()
    scratch = CacheRoot(scratch) if isinstance(scratch, Path) else scratch
    _sweep_dead_scratch(scratch)
    work = (
        scratch.sub(_scratch_prefix() + uuid.uuid4().hex[:8])
        if isinstance(scratch, ObjectRoot)
        else CacheRoot(Path(tempfile.mkdtemp(prefix=_scratch_prefix(), dir=scratch.path)))
    )
    write, read, failed = {}, {}, {}
    try:
        x = _rows(dtype, device, nbytes)
        _tier_speed("ram", "none", x[:64], dtype, device, work)  # first calls: not timed
        plan = [("ram", "none"), ("mmap", "none"), ("zarr", "none"), ("zarr", "zstd")]
        if work.remote:
            plan.remove(("mmap", "none"))
        if is_accelerator(device):
            plan.insert(0, ("gpu", "none"))
        for tier, codec in plan:
            key = "zarr+zstd" if codec == "zstd" else tier
            try:
                write[key], read[key] = _tier_speed(tier, codec, x, dtype, device, work)
            except (OSError, CacheError, RuntimeError) as exc:  # a full disk, an allocation
                failed[key] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        _remove_scratch(work)
    seconds = time.perf_counter() - start
    meta = _identity(device, dtype) | {"measured_at": _now()}
    if failed:  # priced at the defaults, and measured again next run
        meta["not_measured"] = failed
        log.warning("bandwidths: could not measure %s: priced at the defaults", failed)
    return Bandwidths(write, read, f"measured here ({seconds:.2f} s)", seconds, meta)


def _identity(device: torch.device, dtype: str) -> dict:
    name = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {"host": platform.node(), "device": name, "dtype": dtype, "torch": torch.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fresh(meta: dict) -> bool:
    try:
        when = datetime.datetime.fromisoformat(meta["measured_at"])
    except (KeyError, TypeError, ValueError):
        return False
    if when.tzinfo is None:  # written by hand without a zone: read as UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    age = datetime.datetime.now(datetime.timezone.utc) - when
    return age < datetime.timedelta(days=MAX_AGE_DAYS)


def read_json(path: str, where: str) -> Any:
    """``path``'s JSON; a file that cannot be read or is not JSON is a one-line
    ConfigError that starts with ``where`` (the setting or flag that named it)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"{where} is not JSON") from None


def pricing_of(doc: Any) -> dict | None:
    """What a plan was priced with (``final.pricing``): of a run record, of a compare
    record's prefast run, or of ``prefast plan --json``'s output; None if it has none."""
    if isinstance(doc, dict) and isinstance(doc.get("runs"), dict):  # a compare record
        doc = doc["runs"].get("prefast") or next(iter(doc["runs"].values()), {})
    if isinstance(doc, dict) and isinstance(doc.get("final"), dict):  # a run record
        doc = doc["final"]
    pricing = doc.get("pricing") if isinstance(doc, dict) else None
    return pricing if isinstance(pricing, dict) else None


def pinned(path: str, key: str | None = None) -> Bandwidths:
    """Bandwidths from a file: a kept ``bandwidths.json`` (the entry for ``key``: this
    host, device, dtype and torch; its only entry when it has one), a run or compare record
    (its ``pricing.bandwidths``), ``prefast plan --json``'s output, or a bare
    ``{"write": …, "read": …}``."""
    where = f"bandwidths={path!r}"
    doc = read_json(path, where)
    pricing = pricing_of(doc)
    if pricing is not None:
        doc = pricing.get("bandwidths", {})
    elif isinstance(doc, dict) and isinstance(doc.get("entries"), dict) and doc["entries"]:
        entries = doc["entries"]
        if key in entries or len(entries) == 1:
            doc = entries.get(key) or next(iter(entries.values()))
        else:
            raise ConfigError(
                f"{where} keeps figures for {', '.join(sorted(entries))}, none for {key}: "
                "pin one entry (copy it into a file of its own) or drop --bandwidths"
            )
    return Bandwidths.from_json(doc if isinstance(doc, dict) else {}, f"pinned from {path}")


def for_run(setting: str | None, device: torch.device, dtype: str, root: Root | Path) -> Bandwidths:
    """The run's bandwidths: pinned (``setting`` a path), kept beside the caches in
    ``root`` when fresh, else measured now and kept (``setting='measure'``: always)."""
    setting = setting or os.environ.get("PREFAST_BANDWIDTHS") or None
    ident = _identity(device, dtype)
    key = "|".join(str(ident[k]) for k in ("host", "device", "dtype", "torch"))
    if setting and setting != "measure":
        return pinned(setting, key)
    root = CacheRoot(root) if isinstance(root, Path) else root
    kept_path = f"{root.path}/{KEPT}"
    kept: Any = {}
    with contextlib.suppress(CacheError, ValueError):
        kept = json.loads(root.read_side(KEPT) or b"{}")
    entries = kept.get("entries", {}) if isinstance(kept, dict) else {}
    entry = entries.get(key) if isinstance(entries, dict) else None
    meta = entry.get("meta", {}) if isinstance(entry, dict) else {}
    if isinstance(entry, dict) and setting != "measure" and _fresh(meta):
        try:
            if not meta.get("not_measured"):
                return Bandwidths.from_json(entry, f"kept in {kept_path} ({meta['measured_at']})")
        except ConfigError:
            pass  # a damaged entry is measured again
    try:
        if isinstance(root, CacheRoot):
            root.path.mkdir(parents=True, exist_ok=True)
        bw = measure(device, dtype, root)
    except (OSError, CacheError) as exc:  # a cache dir this process cannot write (or list)
        log.warning("bandwidths: cannot measure in %s (%s): the temporary directory's disk "
                    "stands in for it", root.path, getattr(exc, "strerror", None) or exc)  # fmt: skip
        bw = measure(device, dtype, CacheRoot(Path(tempfile.gettempdir())))
    log.info("bandwidths (bytes/s) %s: write %s, read %s", bw.source, _fmt(bw.write), _fmt(bw.read))
    entries = dict(entries) if isinstance(entries, dict) else {}
    entries[key] = {"write": bw.write, "read": bw.read, "meta": bw.meta}
    try:
        root.write_side(KEPT, {"entries": entries})
    except (OSError, CacheError) as exc:  # a read-only cache directory: measured again next run
        log.warning("could not keep the measured bandwidths in %s: %s", kept_path, exc)
    return bw


def _fmt(speeds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 1e6:,.0f} MB/s" for k, v in speeds.items())
