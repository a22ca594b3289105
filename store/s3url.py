"""Where an ``s3://`` cache dir is, and the client that reaches it (``objectstore.py``)."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any

from .errors import ConfigError

SCHEMES = ("s3",)
# Every wait on the store is bounded. A request, its body included, gets REQUEST_S
# (CONNECT_S to connect): a GET is at most an 8 MiB range, a PUT one chunk (at most 32 MiB),
# so a request slower than ~0.5 MiB/s fails. One that fails as a network store fails (5xx
# such as 503 SlowDown, a dropped connection, a timeout) is retried with exponential backoff
# and jitter (obstore's), at most RETRIES times, none started after RETRY_S: a request is
# given up within about RETRY_S + REQUEST_S + 5 s. The error then reaches the reader, which
# gives the boundary up and computes the prefix again, or the writer, which gives the cache
# up: a run never hangs on the store, and never trains on a row it did not check. Read at
# call time (tests shrink them).
RETRIES, RETRY_S, REQUEST_S, CONNECT_S = 5, 30.0, 60.0, 5.0


def is_url(text: str | os.PathLike[str]) -> bool:
    return isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def parse_url(url: str, named: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)/?(.*)$", url)
    if m is not None and "@" in m.group(2):  # KEY:SECRET@host: not repeated in any message
        raise ConfigError(
            "the cache dir's URL holds credentials: give the bucket alone "
            "(s3://BUCKET/PREFIX); credentials come from AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or a profile, never from the URL"
        )
    if m is None or m.group(1).lower() not in SCHEMES:
        scheme = m.group(1) if m else url.split(":", 1)[0]
        raise ConfigError(
            f"{named}: {scheme}:// is not a store PreFast writes to: pass a local directory "
            "or an S3-compatible bucket as s3://BUCKET/PREFIX"
        )
    bucket, prefix = m.group(2), m.group(3).strip("/")
    if "@" in bucket or ":" in bucket:  # s3://KEY:SECRET@bucket: not repeated in the message
        raise ConfigError(
            "the cache dir's s3:// URL holds credentials: give the bucket alone "
            "(s3://BUCKET/PREFIX); credentials come from AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or a profile, never from the URL"
        )
    if not bucket:
        raise ConfigError(f"{named}: no bucket in {url!r}: pass s3://BUCKET/PREFIX")
    return bucket, prefix


def connect(bucket: str, prefix: str) -> Any:
    """An obstore S3Store for ``bucket``/``prefix`` from the environment's AWS settings."""
    try:
        from obstore.store import S3Store
    except ImportError:
        raise ConfigError("an s3:// cache dir needs obstore: pip install 'prefast[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint and endpoint.startswith("http://"):  # a MinIO or a test server on loopback
        options["allow_http"] = True
    options["timeout"] = timedelta(seconds=REQUEST_S)
    options["connect_timeout"] = timedelta(seconds=CONNECT_S)
    retry = {
        "max_retries": RETRIES,
        "retry_timeout": timedelta(seconds=RETRY_S),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
        },
    }
    kw: dict[str, Any] = {
        "prefix": prefix or None,
        "client_options": options,
        "retry_config": retry,
    }
    if endpoint:
        kw["endpoint"] = endpoint
    if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
        kw["region"] = "us-east-1"  # what S3-compatible servers accept when none is named
    if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        try:  # a named profile: boto3 resolves it (obstore reads environment keys only)
            from obstore.auth.boto3 import Boto3CredentialProvider

            kw["credential_provider"] = Boto3CredentialProvider()
        except ImportError:
            pass
    return S3Store(bucket, **kw)  # the rest from the environment (AWS_*), as boto3 reads it
