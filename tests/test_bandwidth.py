"""Each tier's speed on this machine (prefast/caching/bandwidth.py): measured through the
tiers' own writers and readers, kept beside the caches, measured again when stale or on
request, pinned from a file. The rest of the suite pins them (conftest.py); these tests
measure for real."""

from __future__ import annotations

import datetime
import json

import pytest
import torch

from prefast.caching import bandwidth
from prefast.caching.bandwidth import KEPT, Bandwidths, for_run, measure, pinned
from prefast.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def unpinned(monkeypatch):
    monkeypatch.delenv("PREFAST_BANDWIDTHS", raising=False)


def test_every_host_tier_is_measured_through_its_own_store(tmp_path):
    bw = measure(CPU, "float16", tmp_path, nbytes=4 * 2**20)
    assert set(bw.write) == set(bw.read) == {"ram", "mmap", "zarr", "zarr+zstd"}  # no GPU here
    assert all(v > 1e6 for v in [*bw.write.values(), *bw.read.values()]), bw
    assert bw.measure_s > 0 and bw.meta["dtype"] == "float16" and "measured_at" in bw.meta
    assert list(tmp_path.iterdir()) == []  # the scratch caches are gone


def test_kept_beside_the_caches_reused_and_measured_again_when_stale_or_asked(tmp_path):
    first = for_run(None, CPU, "float16", tmp_path)
    assert first.source.startswith("measured here") and first.measure_s > 0
    kept = json.loads((tmp_path / KEPT).read_text())
    (key,) = kept["entries"]
    assert "|cpu|float16|" in key
    again = for_run(None, CPU, "float16", tmp_path)
    assert again.source.startswith("kept in") and again.measure_s == 0
    assert again.read == first.read
    # another dtype is its own entry
    for_run(None, CPU, "int8", tmp_path)
    assert len(json.loads((tmp_path / KEPT).read_text())["entries"]) == 2
    # stale: measured again
    doc = json.loads((tmp_path / KEPT).read_text())
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        days=bandwidth.MAX_AGE_DAYS + 1
    )
    doc["entries"][key]["meta"]["measured_at"] = old.isoformat()
    (tmp_path / KEPT).write_text(json.dumps(doc))
    assert for_run(None, CPU, "float16", tmp_path).measure_s > 0
    # asked: measured again though fresh
    assert for_run("measure", CPU, "float16", tmp_path).measure_s > 0


def test_pinned_from_a_file_a_run_record_or_the_environment(tmp_path, monkeypatch):
    figures = {"write": {"ram": 2e9, "zarr": 1e8}, "read": {"ram": 4e9, "zarr": 5e8}}
    bare = tmp_path / "bw.json"
    bare.write_text(json.dumps(figures))
    bw = pinned(str(bare))
    assert bw.of("ram") == (2e9, 4e9) and bw.of("zarr") == (1e8, 5e8)
    assert bw.of("mmap") == bandwidth.DEFAULTS.of("mmap")  # what the file leaves out
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"final": {"pricing": {"bandwidths": figures}}}))
    assert pinned(str(record)).of("ram") == (2e9, 4e9)
    monkeypatch.setenv("PREFAST_BANDWIDTHS", str(bare))
    assert for_run(None, CPU, "float16", tmp_path).source == f"pinned from {bare}"
    assert not (tmp_path / KEPT).exists()  # nothing measured


@pytest.mark.parametrize(
    "text, says",
    [
        ("{", "is not JSON"),
        ('{"write": {"ram": 0}, "read": {"ram": 1e9}}', "must be positive bytes/s: ram=0.0"),
        ('{"read": {}}', "no bandwidths in it"),
    ],
)
def test_a_bad_pinned_file_is_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "bw.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        pinned(str(path))
    with pytest.raises(ConfigError, match="cannot read it"):
        pinned(str(tmp_path / "missing.json"))


def test_a_full_disk_leaves_its_tiers_at_the_defaults_and_measures_them_next_run(tiny_disk):
    """8 MiB of tmpfs cannot take 16 MiB of rows: the disk tiers fail to measure, the run
    goes on with their default figures, and the entry says so (measured again next run)."""
    bw = for_run(None, CPU, "float32", tiny_disk)
    assert "ram" in bw.write and "mmap" not in bw.write, bw
    assert set(bw.meta["not_measured"]) >= {"mmap", "zarr"}
    assert bw.of("mmap") == bandwidth.DEFAULTS.of("mmap")
    assert for_run(None, CPU, "float32", tiny_disk).measure_s > 0  # not kept as measured


def test_bandwidths_round_trip_through_json():
    bw = Bandwidths({"ram": 1e9}, {"ram": 2e9}, "x", 0.5, {"host": "h"})
    back = Bandwidths.from_json(json.loads(json.dumps(bw.to_json())), "y")
    assert back.of("ram") == (1e9, 2e9) and back.meta == {"host": "h"}


def test_a_cache_dir_that_cannot_be_written_is_measured_in_the_temporary_directory(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    bw = for_run(None, CPU, "float16", blocked / "cache")  # mkdir fails: NotADirectoryError
    assert bw.measure_s > 0 and "mmap" in bw.write  # the disk tiers measured elsewhere


def test_a_kept_file_pins_the_entry_of_this_host_device_and_dtype(tmp_path):
    for_run(None, CPU, "float16", tmp_path)
    for_run(None, CPU, "int8", tmp_path)
    kept = str(tmp_path / KEPT)
    doc = json.loads((tmp_path / KEPT).read_text())
    key16 = next(k for k in doc["entries"] if "|float16|" in k)
    assert pinned(kept, key16).read == doc["entries"][key16]["read"]
    with pytest.raises(ConfigError, match="none for other-host"):
        pinned(kept, "other-host|cpu|float16|x")


def test_a_killed_measurement_s_scratch_is_removed_by_the_next_one(tmp_path):
    # A run SIGKILLed while measuring never reaches its `finally`: its scratch dir (up to
    # 32 MiB of tier files) stayed in the cache root for good. The next measurement on this
    # host removes it, and leaves a live process's and another host's alone.
    import os
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL
    )
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    dead = tmp_path / f"{bandwidth._scratch_prefix(child.pid)}abc"
    (dead / "zarr-none").mkdir(parents=True)
    (dead / "zarr-none" / "chunk").write_bytes(b"x" * 4096)
    alive = tmp_path / f"{bandwidth._scratch_prefix(os.getppid())}def"
    other_host = tmp_path / f".bandwidth-not-this-host_{child.pid}-ghi"
    alive.mkdir()
    other_host.mkdir()
    measure(CPU, "float16", tmp_path, nbytes=2**20)
    assert not dead.exists()
    assert alive.is_dir() and other_host.is_dir()
    assert not list(tmp_path.glob(f"{bandwidth._scratch_prefix()}*"))  # its own: removed
