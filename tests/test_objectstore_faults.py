"""What a network store does that a disk does not, injected by a proxy in front of the test
S3 server (``tests/s3_proxy.py``): throttling (503 SlowDown), dropped connections, slow
answers, and a server that stops answering. Retries with backoff and jitter ride out the
first three; every wait is bounded, so the fourth costs the boundary (the prefix is computed
again), never a hang, and no run ever trains on a row it did not check."""

from __future__ import annotations

import time

import numpy as np
import pytest
import s3_server
import torch
from helpers import DIGITS
from s3_proxy import Proxy, Rule

from prefast import TrainConfig, train
from prefast.store import CacheSpec, ObjectRoot, open_reader, open_writer
from prefast.store.errors import CacheUnavailableError

pytest.importorskip("moto.server", reason="the object-store tests need moto[server]")

X = torch.relu(torch.randn(600, 4, 8, 8, generator=torch.Generator().manual_seed(0)))


@pytest.fixture
def proxy(server, monkeypatch, tmp_path):
    """A fresh bucket, reached through the proxy (no faults until a test adds a rule)."""
    bucket = s3_server.new_bucket(server.endpoint)
    p = Proxy(server.endpoint).start()
    for name, value in s3_server.environment(p.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    p.url = f"s3://{bucket}/faults"  # type: ignore[attr-defined]
    yield p
    p.stop()


def write(url: str, key: str) -> None:
    spec = CacheSpec(key, len(X), (4, 8, 8), "float32", chunk_bytes=64 * 2**10)
    writer = open_writer("zarr", spec, ObjectRoot(url))
    for s in range(0, len(X), 100):
        writer.append(X[s : s + 100], torch.zeros(100, dtype=torch.int64), torch.arange(s, s + 100))
    writer.finish().close()


def read_all(url: str, key: str) -> torch.Tensor:
    reader = open_reader(ObjectRoot(url), key)
    try:
        return reader.read_rows(np.arange(len(X)))[0]
    finally:
        reader.close()


@pytest.mark.parametrize("fault", ["slowdown", "drop"])
def test_throttling_and_dropped_connections_are_retried(proxy, fault):
    """Three chunk PUTs and three chunk GETs answered 503 SlowDown, or cut without an
    answer: retried (with backoff and jitter), and the rows read back are the rows written.
    With retries off (RETRIES = 0 in store/s3url.py) the write fails: checked by hand."""
    proxy.rules = [Rule(fault, method="PUT", times=3), Rule(fault, method="GET", times=3)]
    write(proxy.url, "a1" * 12)
    assert torch.equal(read_all(proxy.url, "a1" * 12), X)
    assert proxy.hits(fault) == 6


def test_slow_answers_are_waited_for(proxy):
    """Answers 0.5 s late are waited for, not retried: one GET per chunk (10 chunks of 64
    KiB, one range each), the rows as written."""
    write(proxy.url, "b2" * 12)
    proxy.rules = [Rule("slow", method="GET", times=4, delay_s=0.5)]
    proxy.seen.clear()
    t = time.perf_counter()
    assert torch.equal(read_all(proxy.url, "b2" * 12), X)
    assert time.perf_counter() - t >= 0.5 and proxy.hits("slow") == 4
    chunk_gets = [p for m, p in proxy.seen if m == "GET" and "/activations/c/" in p]
    assert len(chunk_gets) == 10 == len(set(chunk_gets))


def test_a_server_that_stops_answering_costs_the_boundary_not_the_run(proxy, monkeypatch):
    """The cache a sweep's first run kept; the second run finds the server no longer answers
    reads (its completion records' first: the run gives the cache up there). Every wait is bounded (a request's timeout, the retries' deadline), so the run
    gives the cache up in one warning and computes the prefix: it finishes, with the losses of
    a run that computes the prefix (FreezeOut's). With obstore's own defaults (30 s a request, retried for 3
    minutes) this run waits minutes: checked by hand, it fails the bound below."""
    base = {**DIGITS, "epochs": 2, "mode": "prefast", "t0": 1.0, "freeze_prefix": "all",
            "cache_tier": "zarr", "cache_dir": proxy.url}  # fmt: skip
    train(TrainConfig(**{**base, "lr": 0.05}))  # keeps the prefix's caches in the bucket
    plain = train(TrainConfig(**{**base, "lr": 0.02, "mode": "freezeout"}))
    # The short bounds only for the run that meets the silent server: the two runs before it
    # keep the defaults, so a slow write on a loaded machine cannot lose the kept caches.
    monkeypatch.setattr("prefast.store.s3url.REQUEST_S", 1.0)
    monkeypatch.setattr("prefast.store.s3url.RETRY_S", 2.0)
    proxy.rules = [Rule("hang", method="GET", path="/COMPLETE.json"), Rule("hang", method="GET")]
    t = time.perf_counter()
    hung = train(TrainConfig(**{**base, "lr": 0.02}))
    assert time.perf_counter() - t < 30, "a wait on the store was not bounded"
    assert proxy.hits("hang") >= 1
    for a, b in zip(hung["epochs"], plain["epochs"], strict=True):  # the rows it computed
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * b["train_loss"], (a, b)
    assert hung["epochs"][0]["cached_batches"] == 0  # nothing read from the silent server


def test_a_read_that_never_answers_is_unavailable_within_its_bound(proxy, monkeypatch):
    write(proxy.url, "c3" * 12)
    monkeypatch.setattr("prefast.store.s3url.REQUEST_S", 1.0)
    monkeypatch.setattr("prefast.store.s3url.RETRY_S", 2.0)
    reader = open_reader(ObjectRoot(proxy.url), "c3" * 12)
    proxy.rules = [Rule("hang", method="GET")]
    t = time.perf_counter()
    with pytest.raises(CacheUnavailableError):
        reader.read_rows(np.arange(len(X)))
    assert time.perf_counter() - t < 15
    reader.close()
