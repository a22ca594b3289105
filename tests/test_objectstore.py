"""Caches in an object store (``--cache-dir s3://BUCKET/PREFIX``), against a real S3 API
server on loopback (moto's, started here: ``tests/s3_server.py``).

What a local root gets from POSIX (flock, rename, mtimes) is done with objects here
(``store/objectstore.py``); each of those is tested with the server answering for real:
two writers racing to complete one key, a writer SIGKILLed mid-write, a purge under a
reading run, and the ``cache`` commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import s3_server
import torch
from helpers import DIGITS, cli_in_process

from prefast import TrainConfig, train
from prefast.store import CacheSpec, ObjectRoot, open_reader, open_writer
from prefast.store.errors import CacheCorruptedError, CacheNotFoundError

pytest.importorskip("moto.server", reason="the object-store tests need moto[server]")
pytest.importorskip("obstore", reason="the object-store tier needs obstore")

HERE = Path(__file__).parent


@pytest.fixture
def bucket(server, monkeypatch, tmp_path):
    """A fresh bucket on the server, the AWS settings that reach it, and nowhere local to
    write to by accident: HOME, the XDG cache and the working directory are empty folders
    the test checks afterwards."""
    for name, value in s3_server.environment(server.endpoint).items():
        monkeypatch.setenv(name, value)
    for name in ("PREFAST_CACHE_DIR", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.chdir(home)
    return s3_server.new_bucket(server.endpoint)


def objects(server, bucket: str, prefix: str = "") -> list[str]:
    return s3_server.keys(server.endpoint, bucket, prefix)


def write_cache(root: ObjectRoot, key: str, x: torch.Tensor) -> None:
    spec = CacheSpec(key, len(x), tuple(x.shape[1:]), "float32", chunk_bytes=64 * 2**10)
    writer = open_writer("zarr", spec, root)
    for s in range(0, len(x), 100):
        n = len(x[s : s + 100])
        writer.append(x[s : s + 100], torch.zeros(n, dtype=torch.int64), torch.arange(s, s + n))
    writer.finish().close()


def test_a_cache_round_trips_through_the_bucket_as_a_plain_zarr_group(server, bucket):
    root = ObjectRoot(f"s3://{bucket}/caches")
    x = torch.relu(torch.randn(1000, 4, 8, 8))
    write_cache(root, "a" * 24, x)
    reader = open_reader(root, "a" * 24)
    try:
        assert reader.num_chunks == 16  # 64 KiB chunks of 1 KiB rows
        assert torch.equal(reader.read_rows(np.arange(1000))[0], x)
        rows = sum(len(b[0]) for b in reader.epoch_batches(0, 1, 64, 200 * 2**10))  # windowed
        assert rows == 1000
    finally:
        reader.close()
    listed = objects(server, bucket, "caches/")
    assert f"caches/{'a' * 24}/COMPLETE.json" in listed
    assert sum("/activations/c/" in k for k in listed) == 16  # one object per chunk
    # zarr-python reads the copy the record names, through zarr's own object-store support
    import obstore.store
    import zarr

    record = json.loads(root.get(f"{'a' * 24}/COMPLETE.json") or b"{}")
    store = obstore.store.S3Store(bucket, prefix=f"caches/{'a' * 24}/{record['data']}",
                                  client_options={"allow_http": True})  # fmt: skip
    group = zarr.open_group(zarr.storage.ObjectStore(store, read_only=True), mode="r")
    assert np.array_equal(np.asarray(group["activations"][:1000]), x.numpy())


def test_two_writers_of_one_key_at_once_one_completes_it_and_both_read_it(server, bucket, tmp_path):
    """Two processes write the same key (different values, so a mix would show) and reach
    the completion record together (a file barrier): exactly one record is written (the
    conditional PUT), the loser deletes its copy and reads the winner's, and no reader sees
    a mix. With an unconditional PUT both 'win' and the key's record names whichever came
    last: checked by hand, this test fails then."""
    url = f"s3://{bucket}/race"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "s3_writer.py"), "race", url, "9" * 24,
                          str(fill), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        for fill in (1.0, 2.0)
    ]  # fmt: skip
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["won"] for o in outs) == [False, True], outs
    winner = 1.0 if outs[0]["won"] else 2.0
    assert [o["values"] for o in outs] == [[winner], [winner]]  # both read one copy, whole
    copies = {k.split("/")[2] for k in objects(server, bucket, f"race/{'9' * 24}/w-")}
    assert len(copies) == 1  # the loser's copy is gone
    reader = open_reader(ObjectRoot(url), "9" * 24)
    assert set(reader.read_rows(np.arange(512))[0].flatten().tolist()) == {winner}
    reader.close()


def test_a_writer_killed_mid_write_leaves_nothing_that_reads_as_complete(
    server, bucket, capsys, caplog
):
    """SIGKILL a process while it writes chunk objects: nothing reads as complete, `cache
    ls` shows it partial, and `cache purge --partial` finds its objects and removes them;
    while the writer lived, purge skipped them. (A dead pid of this host is not taken for
    a live writer: with that check removed, purge skips it and this test fails.)"""
    url, key = f"s3://{bucket}/kill", "d" * 24
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, str(HERE / "s3_writer.py"), "slow", url, key], env=env)
    try:
        deadline = time.monotonic() + 60
        while sum("/activations/c/" in k for k in objects(server, bucket, "kill/")) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no chunk written"
            time.sleep(0.1)
        # while its writer lives, the partial copy is not purged
        live = cli_in_process(capsys, caplog, "cache", "purge", "--partial", "--yes",
                              "--cache-dir", url)  # fmt: skip
        assert "nothing to purge" in live.stdout, live.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = ObjectRoot(url)
    assert not root.is_complete(key)
    with pytest.raises(CacheNotFoundError):
        open_reader(root, key)
    ls = cli_in_process(capsys, caplog, "cache", "ls", "--cache-dir", url, "--json")
    assert [(r["key"], r["status"]) for r in json.loads(ls.stdout)] == [(key, "partial")]
    purge = cli_in_process(capsys, caplog, "cache", "purge", "--partial", "--yes",
                           "--cache-dir", url)  # fmt: skip
    assert purge.returncode == 0, purge.stderr
    assert f"delete {key}  partial" in purge.stdout
    assert objects(server, bucket, "kill/") == []


def test_cache_ls_inspect_verify_purge_on_s3(server, bucket, capsys, caplog):
    url = f"s3://{bucket}/cmds"
    root = ObjectRoot(url)
    write_cache(root, "e" * 24, torch.relu(torch.randn(300, 4, 8, 8)))

    def run(*args: str) -> subprocess.CompletedProcess:
        return cli_in_process(capsys, caplog, "cache", *args, "--cache-dir", url)

    ls = run("ls")
    assert ls.returncode == 0 and f"caches under {url}" in ls.stdout and "eeeeeeeeeeee" in ls.stdout
    row = json.loads(run("ls", "--json").stdout)[0]
    assert row["status"] == "complete" and row["rows"] == 300 and row["last_used"] is not None
    s3 = s3_server.client(server.endpoint)
    sizes = s3.list_objects_v2(Bucket=bucket, Prefix="cmds/")["Contents"]
    assert row["bytes"] == sum(o["Size"] for o in sizes) > 0  # the objects' sizes
    info = json.loads(run("inspect", "eeee").stdout)
    assert info["arrays"]["activations"]["chunks"] == 5 and info["marker"]["data"].startswith("w-")
    ok = run("verify", "--all")
    assert ok.returncode == 0 and f"{'e' * 24}  ok" in ok.stdout
    # A damaged chunk object is found over the network, by its checksum
    (chunk,) = [k for k in objects(server, bucket, "cmds/") if k.endswith("/activations/c/2/0/0/0")]
    data = bytearray(s3.get_object(Bucket=bucket, Key=chunk)["Body"].read())
    data[100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=chunk, Body=bytes(data))
    bad = run("verify", "--all")
    assert bad.returncode == 1 and "CORRUPTED" in bad.stdout
    assert "chunk 2 of activations does not match its checksum" in bad.stdout
    assert f"--cache-dir {url}" in bad.stdout  # the purge hint names the bucket
    older = run("purge", "--older-than", "1d", "--yes")  # used just now: kept
    assert "nothing to purge" in older.stdout
    gone = run("purge", "eeee", "--yes")
    assert gone.returncode == 0 and "deleted 1 cache(s)" in gone.stdout
    assert objects(server, bucket, "cmds/") == []
    assert s3_server.SECRET not in "".join(r.getMessage() for r in caplog.records)


def test_a_purge_under_a_reading_run_makes_it_compute_the_prefix_again(server, bucket):
    """No lock keeps a cache in an object store alive: purge deletes it under a run that
    reads it. The run's next chunk is then missing, the boundary is given up with one
    warning, and the epoch goes on from raw data: never zeros for the missing rows (zarr
    returns its fill value for an absent chunk; our reader refuses. With a reader that
    returned zeros for a chunk it could not load, this test fails)."""
    url = f"s3://{bucket}/purged"
    cfg = TrainConfig(**{**DIGITS, "epochs": 5, "mode": "prefast", "cache_tier": "zarr",
                         "cache_boundaries": "every", "cache_dir": url})  # fmt: skip
    purged: list[int] = []

    def purge_once(record: dict) -> None:  # after the epoch that wrote the second boundary
        if record["epoch"] == 3 and not purged:
            root = ObjectRoot(url)
            for key in root.cache_keys():
                root.remove(key)
            purged.append(record["epoch"])

    from helpers import train_recording

    result, _ = train_recording(cfg, on_epoch=purge_once)
    assert purged and len(result["epochs"]) == 5
    events = result["final"]["cache_events"]
    gone = [e for e in events if e["event"] == "corrupted"]
    assert gone and all("missing" in e["detail"] for e in gone), events
    assert all(np.isfinite(e["train_loss"]) for e in result["epochs"])


def test_a_prefast_run_on_s3_matches_a_local_zarr_run_and_the_next_reads_it(
    server, bucket, tmp_path, caplog
):
    """Losses equal to the same run on a local zarr cache (float32, no augmentation); a
    second run of the sweep reads the prefix from the bucket from its first epoch; the
    objects are in the bucket and nothing was written locally; no credential anywhere."""
    base = {**DIGITS, "epochs": 3, "mode": "prefast", "t0": 1.0, "freeze_prefix": "all",
            "cache_tier": "zarr", "lr": 0.05}  # fmt: skip
    local = train(TrainConfig(**{**base, "cache_dir": str(tmp_path / "local")}))
    url = f"s3://{bucket}/sweep"
    home = Path(os.environ["HOME"])
    tmp = Path(tempfile.gettempdir())
    before = sorted(p.name for p in tmp.iterdir())
    first = train(TrainConfig(**{**base, "cache_dir": url}))
    assert [e["train_loss"] for e in first["epochs"]] == [e["train_loss"] for e in local["epochs"]]
    assert first["final"]["test_acc"] == local["final"]["test_acc"]
    second = train(TrainConfig(**{**base, "cache_dir": url, "lr": 0.02}))
    epoch1 = second["epochs"][0]
    assert epoch1["cached_batches"] == epoch1["steps"]  # read from the bucket from epoch 1
    assert any(e["event"] == "reused" for e in second["final"]["cache_events"])
    listed = objects(server, bucket, "sweep/")
    assert sum(k.endswith("/COMPLETE.json") for k in listed) == 2  # train and test rows
    assert any(k.startswith("sweep/.costs/") for k in listed)  # the kept stage costs too
    assert list(home.rglob("*")) == []  # nothing in HOME, its cache dir or the working dir
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".bandwidth")) == [
        n for n in before if n.startswith(".bandwidth")
    ]
    text = json.dumps([first, second]) + caplog.text
    assert s3_server.SECRET not in text and s3_server.ENV["AWS_ACCESS_KEY_ID"] not in text


def test_a_reader_refuses_a_record_naming_no_copy(server, bucket):
    root = ObjectRoot(f"s3://{bucket}/bad")
    write_cache(root, "f" * 24, torch.ones(100, 4, 8, 8))
    record = json.loads(root.get(f"{'f' * 24}/COMPLETE.json") or b"{}")
    root.put(f"{'f' * 24}/COMPLETE.json", json.dumps({**record, "data": "w-nobody"}).encode())
    with pytest.raises(CacheCorruptedError, match="missing"):
        open_reader(root, "f" * 24)


def test_a_wrong_bucket_is_refused_before_training_in_one_line(server, bucket, capsys, caplog):
    res = cli_in_process(capsys, caplog, "train", "--dataset", "digits", "--model",
                         "densenet-bc", "--depth", "10", "--epochs", "1", "--device", "cpu",
                         "--cache-dir", "s3://no-such-bucket-prefast/x")  # fmt: skip
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "--cache-dir s3://no-such-bucket-prefast/x cannot be listed" in line
    assert s3_server.SECRET not in res.stderr


def test_a_local_cache_serves_later_reads_and_never_a_damaged_copy(server, bucket, tmp_path):
    """--local-cache: the chunks a reader fetched are read from the local copy afterwards
    (the bucket's chunk objects deleted, the reader still reads the rows); a damaged copy
    fails its own crc32c, is deleted and fetched again (here: gone, so the cache is
    corrupted, never the damaged bytes); the folder stays under its size limit."""
    from prefast.store.local_copies import LocalCopies

    url, key = f"s3://{bucket}/lc", "c" * 24
    x = torch.relu(torch.randn(1000, 4, 8, 8))
    write_cache(ObjectRoot(url), key, x)
    copies = LocalCopies(tmp_path / "lc", max_bytes=10 * 2**20)
    reader = open_reader(ObjectRoot(url, local=copies), key)
    assert torch.equal(reader.read_rows(np.arange(1000))[0], x)  # fetched, and copied
    files = sorted(p for p in (tmp_path / "lc").rglob("*") if p.is_file())
    assert len(files) == reader.num_chunks
    s3 = s3_server.client(server.endpoint)
    for k in objects(server, bucket, f"lc/{key}/"):
        if "/activations/c/" in k:
            s3.delete_object(Bucket=bucket, Key=k)
    assert torch.equal(reader.read_rows(np.arange(1000))[0], x)  # from the local copies
    data = bytearray(files[0].read_bytes())
    data[10] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(CacheCorruptedError, match="missing"):
        reader.read_rows(np.arange(1000))
    assert not files[0].exists()  # the damaged copy was deleted
    reader.close()
    small = LocalCopies(tmp_path / "small", max_bytes=3 * 65 * 2**10)  # room for 3 chunks
    write_cache(ObjectRoot(url), "b" * 24, x)
    reader = open_reader(ObjectRoot(url, local=small), "b" * 24)
    reader.read_rows(np.arange(1000))
    reader.close()
    held = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file())
    assert 0 < held <= 3 * 65 * 2**10


def test_local_cache_needs_an_object_store_cache_dir(tmp_path):
    from prefast.errors import ConfigError

    with pytest.raises(ConfigError, match="this run's cache dir is local already"):
        TrainConfig(cache_dir=str(tmp_path), local_cache=str(tmp_path / "lc"))
    cfg = TrainConfig(cache_dir="s3://b-ucket/p", local_cache=str(tmp_path), local_cache_size="2GB")
    assert cfg.local_cache_size == 2 * 2**30


def test_prefast_cache_dir_may_name_the_bucket(server, bucket, monkeypatch, capsys, caplog):
    monkeypatch.setenv("PREFAST_CACHE_DIR", f"s3://{bucket}/env")
    cfg = TrainConfig(**{**DIGITS, "epochs": 2, "mode": "prefast", "t0": 1.0,
                         "freeze_prefix": "all", "cache_tier": "zarr"})  # fmt: skip
    train(cfg)
    assert any(k.endswith("/COMPLETE.json") for k in objects(server, bucket, "env/"))
    ls = cli_in_process(capsys, caplog, "cache", "ls", "--json")
    assert len(json.loads(ls.stdout)) == 2
    with pytest.raises(Exception, match="--cache-tier mmap maps a local file"):
        TrainConfig(cache_tier="mmap")


def test_a_record_never_names_a_copy_that_is_gone(server, bucket):
    """A commit whose reply was lost is retried and finds a record: its own, so it won (it
    does not delete the copy the record names). A commit that landed after ``finish`` gave up
    on it is cleaned up record first. Before, both deleted the named copy: every later reader
    found the cache corrupted."""
    root = ObjectRoot(f"s3://{bucket}/commit")
    spec = CacheSpec("a1" * 12, 64, (4, 8, 8), "float32", chunk_bytes=64 * 2**10)
    writer = open_writer("zarr", spec, root)
    writer.append(torch.ones(64, 4, 8, 8), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    reader = writer.finish()
    reader.close()
    writer._commit(writer._marker())  # the retried PUT: the record is there, and ours
    assert writer.won and root.is_complete(spec.key)
    open_reader(root, spec.key).close()  # its copy is whole
    writer._remove()  # the cleanup of a commit finish gave up on
    assert not root.is_complete(spec.key) and objects(server, bucket, f"commit/{spec.key}/w-") == []


def test_a_run_deletes_only_the_copy_it_read(server, bucket):
    """A run giving up a superseded or corrupted cache on an object store deletes the copy it
    read, and the record only while it names that copy: another writer's copy of the key, in
    progress, is left alone (before, the whole key went, under that writer)."""
    root = ObjectRoot(f"s3://{bucket}/mine")
    key = "b2" * 12
    spec = CacheSpec(key, 100, (4, 8, 8), "float32", chunk_bytes=64 * 2**10)
    other = open_writer("zarr", spec, root)  # another process's copy, being written
    other.append(torch.ones(64, 4, 8, 8), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    write_cache(root, key, torch.ones(100, 4, 8, 8))  # meanwhile one completes the key
    first = json.loads(root.get(f"{key}/COMPLETE.json") or b"{}")["data"]
    time.sleep(0.5)
    root.remove(key, first)  # and a run gives that one up
    left = {k.split("/")[2] for k in objects(server, bucket, f"mine/{key}/w-")}
    assert left == {other.copy} and not root.is_complete(key)
    other.append(torch.ones(36, 4, 8, 8), torch.zeros(36, dtype=torch.int64), torch.arange(64, 100))
    other.finish().close()  # and it completes the key
    assert json.loads(root.get(f"{key}/COMPLETE.json") or b"{}")["data"] == other.copy


def test_purge_older_than_goes_by_the_last_use(server, bucket, capsys, caplog, monkeypatch):
    """By the time of LAST_USED's last write (the server's clock, whole seconds): kept an
    hour early, purged an hour later (purge's clock moved on, not the server's)."""
    import types

    url = f"s3://{bucket}/old"
    write_cache(ObjectRoot(url), "c3" * 12, torch.ones(100, 4, 8, 8))
    open_reader(ObjectRoot(url), "c3" * 12).close()  # a use
    args = ("cache", "purge", "--older-than", "30m", "--yes", "--cache-dir", url)
    assert "nothing to purge" in cli_in_process(capsys, caplog, *args).stdout
    later = time.time() + 3600
    monkeypatch.setattr("prefast.store.manage.time", types.SimpleNamespace(time=lambda: later))
    assert "deleted 1 cache(s)" in cli_in_process(capsys, caplog, *args).stdout


def test_no_message_repeats_a_server_s_reply_body():
    """obstore's errors go on with the server's reply; on AWS a signature error's body names
    the access key and the canonical request (a session token in it). Messages keep the
    first line only."""
    from prefast.store.errors import first_line, write_error

    body = "Error performing PUT http://x/b/k\n<AWSAccessKeyId>" + s3_server.SECRET + "</…>"
    assert s3_server.SECRET not in str(write_error(RuntimeError(body), "cache k"))
    assert s3_server.SECRET not in first_line(RuntimeError(body))
    assert s3_server.SECRET not in first_line(RuntimeError("x" * 400 + s3_server.SECRET))


def test_bench_store_measures_the_bucket_against_raw_range_gets(
    server, bucket, tmp_path, capsys, caplog
):
    out = tmp_path / "bench.json"
    res = cli_in_process(capsys, caplog, "bench", "store", "--dir", f"s3://{bucket}/b",
                         "--size", "24MB", "--trials", "1", "--json-out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    cells = {(s["codec"], s["range_mib"]) for s in doc["summary"]}
    assert cells == {("none", 8.0), ("none", 0.0), ("zstd", 8.0), ("zstd", 0.0)}
    for s in doc["summary"]:
        assert s["write_mb_s"] > 0 and s["read_mb_s"] > 0 and s["raw_get_floor_mb_s"] > 0
    assert "| read / floor (median; each trial) |" in res.stdout and "functional" in res.stdout
    assert objects(server, bucket, "b/") == []  # the scratch prefix is gone
