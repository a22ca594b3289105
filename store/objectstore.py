"""Caches in an S3-compatible object store (``--cache-dir s3://BUCKET/PREFIX``).

::

    <prefix>/<key>/COMPLETE.json          the completion record; names the writer's prefix
    <prefix>/<key>/<writer>/zarr.json     Zarr v3 group of one writer's copy (attributes)
    <prefix>/<key>/<writer>/activations/  chunk objects: raw or zstd bytes + crc32c, 32 MiB
    <prefix>/<key>/<writer>/WRITING.json  host, pid and start of the writer (purge --partial)
    <prefix>/<key>/LAST_USED              rewritten by each run that reads the cache
    <prefix>/bandwidths.json, .costs/     what a local cache root keeps beside its caches

An object store has no flock and no rename, so what makes a local cache safe is done
another way here:

- Each writer writes under a prefix of its own (host, pid, a random suffix), so two
  writers of one key never touch the same object. A cache becomes complete by one
  *conditional* write of ``COMPLETE.json`` (``If-None-Match: *``; S3, MinIO and moto
  honour it): the first writer to get there wins, the other deletes its copy and reads the
  winner's. A reader follows the record to one writer's prefix, so it never sees a mix.
- A writer killed mid-write leaves its prefix and no record naming it: never read,
  listed as partial, removed by ``cache purge --partial``.
- No locks: ``cache purge`` deletes a cache a run may be reading (the record first, so no
  new reader opens it). The reader's next chunk is then missing, a ``CacheCorruptedError``,
  and the run computes the prefix again from that point with one warning
  (``docs/object-store.md``).
- ``last used`` is the time of ``LAST_USED``'s last write (object stores keep no access
  times and a record cannot be touched), else the record's.

Endpoint and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` through boto3 when it is
installed, ``AWS_REGION``); they are never written into a record, a log or an error:
messages name the ``s3://`` URL only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .errors import CacheNotFoundError, CacheUnavailableError, first_line
from .layout import MARKER, process_alive
from .local_copies import LocalCopies
from .s3url import connect, is_url, parse_url  # noqa: F401 - is_url: config imports it here

KEY_NAME = re.compile(r"[0-9a-f]{24}")  # layout.cache_key's names
LAST_USED = "LAST_USED"
WRITING = "WRITING.json"
# A partial copy whose writer is on another host is taken for live while any of its
# objects is younger than this (a writer puts a chunk every few seconds).
LIVE_WRITER_S = 15 * 60


def _errors() -> tuple[type[BaseException], ...]:
    from obstore.exceptions import BaseError

    return (BaseError, OSError)


def not_found(exc: BaseException) -> bool:
    """obstore's answer for an absent object (zarr turns it into FileNotFoundError)."""
    from obstore.exceptions import NotFoundError

    return isinstance(exc, NotFoundError | FileNotFoundError)


@dataclass
class NoLock:
    """What a local root's ``KeyLock`` is, for a store that has no locks (see the module
    docstring): always held, nothing to release."""

    shared: bool = False
    held: bool = field(default=True)

    def try_acquire(self, shared: bool) -> bool:
        self.shared = shared
        return True

    def downgrade(self) -> None:
        self.shared = True

    def release(self) -> None:
        pass

    def remove_file(self) -> None:
        pass


class ObjectRoot:
    """An ``s3://bucket/prefix`` holding caches, one prefix per key; the local
    ``CacheRoot``'s interface (``layout.py``) over object requests."""

    remote = True

    def __init__(self, url: str, store: Any | None = None, local: LocalCopies | None = None):
        self.bucket, self.prefix = parse_url(url, f"--cache-dir {url}")
        self.local = local  # --local-cache: copies of the chunk objects read (local_copies.py)
        self.path = f"s3://{self.bucket}/{self.prefix}".rstrip("/")  # what messages name
        self.store = store if store is not None else connect(self.bucket, self.prefix)

    def __repr__(self) -> str:
        return f"ObjectRoot({self.path!r})"

    def sub(self, name: str) -> ObjectRoot:
        """The root one level down (a scratch root beside the caches)."""
        return ObjectRoot(f"s3://{self.bucket}/" + f"{self.prefix}/{name}".strip("/"))

    def zarr_store(self, at: str, read_only: bool) -> Any:
        """A zarr store rooted at ``at`` under the prefix: a group opened at its root
        (zarr would write a group ``zarr.json`` at every level above a path given to it)."""
        import zarr

        inner = connect(self.bucket, f"{self.prefix}/{at}".strip("/"))
        return zarr.storage.ObjectStore(inner, read_only=read_only)

    # -- plain object requests -----------------------------------------------------------
    def get(self, path: str) -> bytes | None:
        """An object's bytes; None when there is none."""
        import obstore

        try:
            return bytes(obstore.get(self.store, path).bytes())
        except _errors() as exc:
            if not_found(exc):
                return None
            raise self._unavailable(f"reading {path}", exc) from exc

    def put(self, path: str, data: bytes, create: bool = False) -> bool:
        """Write an object; ``create``: only where none exists (``If-None-Match: *``).
        False when ``create`` found one there."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            # One PUT per object (chunks are at most 32 MiB): a multipart upload that a kill
            # interrupts would hold storage no LIST shows, and purge could not find it.
            obstore.put(self.store, path, data, mode="create" if create else "overwrite",
                        use_multipart=False)  # fmt: skip
        except (AlreadyExistsError, PreconditionError):
            return False
        except _errors() as exc:
            raise self._unavailable(f"writing {path}", exc) from exc
        return True

    def head(self, path: str) -> dict | None:
        import obstore

        try:
            return dict(obstore.head(self.store, path))
        except _errors() as exc:
            if not_found(exc):
                return None
            raise self._unavailable(f"reading {path}", exc) from exc

    def listing(self, prefix: str) -> list[dict]:
        """Every object under ``prefix`` (path, size, last_modified)."""
        import obstore

        try:
            return [dict(o) for batch in obstore.list(self.store, prefix) for o in batch]
        except _errors() as exc:
            raise self._unavailable(f"listing {prefix}", exc) from exc

    def delete_under(self, prefix: str) -> int:
        """Delete every object under ``prefix``; the bytes they held."""
        import obstore

        listed = self.listing(prefix)
        paths = [o["path"] for o in listed]
        try:
            for i in range(0, len(paths), 1000):  # one DeleteObjects request per 1000
                obstore.delete(self.store, paths[i : i + 1000])
        except _errors() as exc:
            if not not_found(exc):
                raise self._unavailable(f"deleting {prefix}", exc) from exc
        return sum(int(o["size"]) for o in listed)

    def _unavailable(self, what: str, exc: BaseException) -> CacheUnavailableError:
        return CacheUnavailableError(f"under {self.path}", f"{what}: {first_line(exc)}")

    # -- what a local root offers --------------------------------------------------------
    def check(self) -> None:
        """One request that fails in one line when the bucket or the credentials are wrong."""
        self.listing(f"{MARKER}-probe-none/")

    def dir_for(self, key: str) -> PurePosixPath:
        """The key's prefix in the bucket, relative: never a local path (the object tier's
        writer and reader override every file operation of the local ones)."""
        return PurePosixPath(key)

    def lock(self, key: str) -> NoLock:
        return NoLock()

    def acquire(self, key: str, shared: bool = False) -> NoLock:
        return NoLock(shared)

    def marker(self, key: str) -> dict:
        data = self.get(f"{key}/{MARKER}")
        if data is None:
            raise CacheNotFoundError(f"cache {key} under {self.path} is missing or partial")
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("the completion record is not a JSON object")
        return doc

    def is_complete(self, key: str) -> bool:
        return self.head(f"{key}/{MARKER}") is not None

    def data_prefix(self, key: str) -> str:
        """The prefix of the copy the completion record names."""
        return f"{key}/{named_copy(self.marker(key))}"

    def names(self) -> list[str]:
        """The first level of names under the prefix (keys, and dot-named side data)."""
        import obstore

        try:
            listed = obstore.list_with_delimiter(self.store)
        except _errors() as exc:
            raise self._unavailable("listing the caches", exc) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"])

    def clear(self) -> None:
        """Delete every object under the prefix (a scratch root)."""
        self.delete_under("")

    def cache_keys(self) -> list[str]:
        """Names that are cache keys (24 hex digits): a prefix shared with other data never
        has its other folders listed, verified or purged as caches."""
        return [n for n in self.names() if KEY_NAME.fullmatch(n)]

    def resolve(self, key_or_prefix: str) -> str:
        from .layout import resolve_key

        return resolve_key(self.cache_keys(), key_or_prefix, self.path)

    def remove(self, key: str, copy: str | None = None) -> bool:
        """What a run deletes (a superseded or corrupted cache): one copy, ``copy`` or the
        one the record names now, and the record only while it names that copy; another
        writer's copy of the key, in progress or newer, is left alone. No lock to respect:
        a run reading it falls back to computing the prefix."""
        try:
            named = self.marker(key).get("data")
        except (CacheNotFoundError, ValueError):
            named = None
        target = copy or named
        if not isinstance(target, str) or not target or "/" in target:
            return True
        if named == target:
            self._delete(f"{key}/{MARKER}")
        self.delete_under(f"{key}/{target}/")
        return True

    def purge(self, key: str) -> bool:
        """`cache purge`: the whole key, every copy (the record first)."""
        self.remove_held(key)
        return True

    def _delete(self, path: str) -> None:
        import obstore

        try:
            obstore.delete(self.store, path)
        except _errors() as exc:
            if not not_found(exc):
                raise self._unavailable(f"deleting {path}", exc) from exc

    def remove_held(self, key: str) -> None:
        self._delete(f"{key}/{MARKER}")
        self.delete_under(f"{key}/")

    def touch(self, key: str) -> None:
        """Best effort: read-only credentials still read the cache."""
        with contextlib.suppress(CacheUnavailableError):
            self.put(f"{key}/{LAST_USED}", str(time.time()).encode())

    def usage(self, key: str) -> int:
        return sum(int(o["size"]) for o in self.listing(f"{key}/"))

    def attrs(self, key: str) -> dict:
        """The zarr group attributes of the key's complete copy, else of any copy."""
        try:
            prefix = self.data_prefix(key)
        except (CacheNotFoundError, ValueError):
            groups = [o["path"] for o in self.listing(f"{key}/") if o["path"].count("/") == 2
                      and o["path"].endswith("/zarr.json")]  # fmt: skip
            if not groups:
                return {}
            prefix = groups[0].rsplit("/", 1)[0]
        try:
            return dict(json.loads(self.get(f"{prefix}/zarr.json") or b"{}").get("attributes", {}))
        except (ValueError, AttributeError, TypeError):  # damaged metadata: `cache ls` goes on
            return {}

    def times(self, key: str) -> tuple[float | None, float | None]:
        """(first object written, last used): object times, no file times."""
        objects = self.listing(f"{key}/")
        stamps = {o["path"]: o["last_modified"].timestamp() for o in objects}
        created = min(stamps.values()) if stamps else None
        used = stamps.get(f"{key}/{LAST_USED}") or stamps.get(f"{key}/{MARKER}")
        return created, used

    def live_writer(self, key: str) -> bool:
        """A partial copy whose writer may still be writing: a live process on this host,
        or (another host's) one with an object younger than ``LIVE_WRITER_S``."""
        objects = self.listing(f"{key}/")
        for o in objects:
            if not o["path"].endswith("/" + WRITING):
                continue
            try:
                doc = json.loads(self.get(o["path"]) or b"{}")
            except ValueError:  # damaged: judged by its objects' age, as another host's
                doc = {}
            if isinstance(doc, dict) and doc.get("host") == platform.node():
                if process_alive(int(doc.get("pid", -1))):
                    return True
                continue
            copy = o["path"].rsplit("/", 1)[0] + "/"
            newest = max(p["last_modified"].timestamp() for p in objects
                         if p["path"].startswith(copy))  # fmt: skip
            if time.time() - newest < LIVE_WRITER_S:
                return True
        return False

    def orphans(self, key: str) -> list[str]:
        """Copies of a complete key that its record does not name (a killed writer's, or a
        loser's whose delete failed): what ``purge --partial`` removes besides partials."""
        try:
            named = self.data_prefix(key) + "/"
        except (CacheNotFoundError, ValueError):
            return []
        copies = {
            o["path"].split("/")[1] for o in self.listing(f"{key}/") if o["path"].count("/") >= 2
        }
        return sorted(f"{key}/{c}/" for c in copies if f"{key}/{c}/" != named)

    def remove_orphans(self, key: str) -> int:
        """Delete the copies of ``key`` its record does not name; the bytes freed."""
        return sum(self.delete_under(copy) for copy in self.orphans(key))

    def read_side(self, name: str) -> bytes | None:
        return self.get(name)

    def write_side(self, name: str, doc: dict) -> None:
        self.put(name, json.dumps(doc, indent=1, sort_keys=True).encode())


def named_copy(record: dict) -> str:
    """The writer's copy a completion record names; ValueError when it names none."""
    data = record.get("data")
    if not isinstance(data, str) or "/" in data or not data:
        raise ValueError("the completion record names no writer's copy")
    return data


def writer_prefix() -> str:
    """A copy's name under its key: who wrote it, and a random part so two never collide."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", platform.node()) or "host"
    return f"w-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
