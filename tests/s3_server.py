"""A real S3 API server on loopback for the object-store tests: moto's, in a thread of the
test process (``ThreadedMotoServer``, port 0), one per pytest worker. Nothing outside this
machine is reached: every request goes to 127.0.0.1."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

# A secret the tests look for in every record, log and message (it must never appear).
SECRET = "prefast-test-secret-5f1c2a"
ENV = {
    "AWS_ACCESS_KEY_ID": "prefast-test-key",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_REGION": "us-east-1",
}


@dataclass
class Server:
    endpoint: str
    _server: object

    def stop(self) -> None:
        self._server.stop()  # type: ignore[attr-defined]


def start() -> Server:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return Server(f"http://{host}:{port}", server)


def client(endpoint: str):  # type: ignore[no-untyped-def]
    """A plain S3 client (boto3): how a user would look into the bucket."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )


def new_bucket(endpoint: str) -> str:
    name = f"prefast-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    s3 = client(endpoint)
    found: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [o["Key"] for o in page.get("Contents", [])]
    return sorted(found)


def environment(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the server: the usual AWS settings."""
    return {**ENV, "AWS_ENDPOINT_URL": endpoint}


def export(endpoint: str) -> None:
    os.environ.update(environment(endpoint))
