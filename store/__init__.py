"""The activation store: frozen-stage outputs on a tier, written once, read every epoch.

Four tiers behind one interface, chosen by name::

    writer = open_writer("zarr", CacheSpec(key, rows, (C, H, W), "float16"), root=CacheRoot(d))
    for acts, labels, ids in batches:
        writer.append(acts, labels, ids)
    reader = writer.finish()            # atomic: readable only from here on
    for acts, labels, ids in PrefetchLoader(lambda: reader.epoch_batches(seed, epoch, 256)):
        ...
    reader.close()                      # releases the shared lock that kept the cache alive

It lives in the top-level ``store/`` folder, imported as ``prefast.store`` (``setup.cfg``'s
``package_dir``). The store imports nothing from the trainer side: it owns its errors
(``prefast.store.errors``) and its sample-order functions (``prefast.store.order``).
"""

from __future__ import annotations

import torch

from .base import TIERS, CacheSpec, Reader, Writer
from .device import is_accelerator
from .errors import ConfigError
from .layout import CacheRoot, cache_key
from .loader import PrefetchLoader
from .memory import MemoryWriter
from .objectstore import ObjectRoot
from .readers import open_reader


def open_writer(
    tier: str,
    spec: CacheSpec,
    root: CacheRoot | ObjectRoot | None = None,
    device: torch.device | str | None = None,
) -> Writer:
    """A writer for ``tier`` (gpu, ram, mmap or zarr); ``device`` is the training device
    (the ``gpu`` tier's home).

    Disk tiers raise CacheLockedError when another process holds the key and
    CacheExistsError when a complete cache with the key exists (open it with
    :func:`open_reader` instead).
    """
    if tier == "gpu":
        if device is None or not is_accelerator(device):
            raise ConfigError(
                "cache tier 'gpu' keeps the cache in the training device's memory: it needs "
                "a GPU training device (--device cuda); on a CPU use --cache-tier ram"
            )
        return MemoryWriter(spec, device)
    if tier == "ram":
        return MemoryWriter(spec, "cpu")
    if tier in ("mmap", "zarr"):
        if root is None:
            raise ConfigError(f"cache tier {tier!r} needs a cache directory (--cache-dir)")
        from .mmap_writer import MmapWriter
        from .zarr_writer import ZarrWriter

        if root.remote:  # an s3:// root: the zarr tier only (mmap maps a local file)
            from .object_writer import ObjectZarrWriter

            if tier == "mmap":
                raise ConfigError(
                    f"cache tier 'mmap' maps a local file; {root.path} is an object store: "
                    "use the zarr tier there, or a local --cache-dir"
                )
            return ObjectZarrWriter(root, spec)  # type: ignore[arg-type]

        assert isinstance(root, CacheRoot)
        return ZarrWriter(root, spec) if tier == "zarr" else MmapWriter(root, spec)
    raise ConfigError(f"unknown cache tier {tier!r}: choose one of {', '.join(TIERS)}")


__all__ = [
    "TIERS",
    "CacheRoot",
    "CacheSpec",
    "ObjectRoot",
    "PrefetchLoader",
    "Reader",
    "Writer",
    "cache_key",
    "open_reader",
    "open_writer",
]
