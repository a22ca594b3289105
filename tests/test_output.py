"""What a person reads: an 80-column cache table, dates, hints, stage counts, no leftovers."""

from __future__ import annotations

import datetime as dt
import json
import re

import torch
from helpers import cli_in_process

from prefast.cli.common import epoch_line
from prefast.store import CacheRoot, CacheSpec, open_writer
from prefast.store.layout import MARKER


def make_cache(root: CacheRoot, key: str) -> None:
    w = open_writer("zarr", CacheSpec(key, 64, (4, 4, 4), "float16"), root)
    w.append(torch.randn(64, 4, 4, 4), torch.zeros(64, dtype=torch.int64), torch.arange(64))
    w.finish().close()


def test_cache_ls_fits_80_columns_and_long_shows_every_column(
    tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "80")
    make_cache(CacheRoot(tmp_path), "a" * 64)
    res = cli_in_process(capsys, caplog, "cache", "ls", "--cache-dir", str(tmp_path))
    assert res.returncode == 0 and "aaaaaaaaaaaa" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80, res.stdout
    assert "…" not in res.stdout, res.stdout  # no cell cut short
    res = cli_in_process(capsys, caplog, "cache", "ls", "--long", "--cache-dir", str(tmp_path))
    assert "logical" in res.stdout and "codec" in res.stdout


def test_an_empty_cache_ls_says_why_and_how_to_keep_caches(tmp_path, capsys, caplog):
    res = cli_in_process(capsys, caplog, "cache", "ls", "--cache-dir", str(tmp_path))
    assert "ram tiers live only as long as their run" in res.stdout
    assert "--cache-tier mmap or zarr keeps them on disk for the next run" in res.stdout


def test_inspect_shows_dates_a_person_reads(tmp_path, capsys, caplog):
    make_cache(CacheRoot(tmp_path), "k1")
    res = cli_in_process(capsys, caplog, "cache", "inspect", "k1", "--cache-dir", str(tmp_path))
    created = json.loads(res.stdout)["created"]
    assert dt.datetime.fromisoformat(created).year >= 2024  # an ISO date, not 1.7e9
    # ... at every depth: no number that looks like a Unix time is left
    assert not re.search(r"\b1[0-9]{9}\.[0-9]+", res.stdout), res.stdout


def test_purge_leaves_no_lock_file_behind(tmp_path, capsys, caplog):
    root = CacheRoot(tmp_path)
    for key in ("k1", "k2"):
        make_cache(root, key)
    assert sorted(p.name for p in (tmp_path / ".locks").iterdir()) == ["k1.lock", "k2.lock"]
    res = cli_in_process(
        capsys, caplog, "cache", "purge", "--all", "--yes", "--cache-dir", str(tmp_path)
    )
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / ".locks").iterdir()) == []
    # a lock taken after the purge works on a fresh file: a reader and a deleter still exclude
    make_cache(root, "k1")
    reader = root.acquire("k1", shared=True)
    assert not root.remove("k1")
    reader.release()
    assert root.remove("k1") and not (tmp_path / ".locks" / "k1.lock").exists()


def test_a_lock_taken_on_a_file_a_deleter_unlinked_is_retaken_on_the_new_one(tmp_path, monkeypatch):
    """The race a purge's unlink opens: a taker opens the lock file, the deleter unlinks it
    (still holding it) and releases, the taker locks the unlinked file. Without the inode
    check it would hold a lock no one else sees, and an exclusive taker would get in."""
    from prefast.store import layout

    root = CacheRoot(tmp_path)
    make_cache(root, "k")
    deleter = root.lock("k")
    assert deleter.try_acquire(shared=False)
    real = layout.fcntl.flock
    armed = [True]

    def flock(fd: int, op: int) -> None:
        if armed[0]:  # between the taker's open and its flock: the deleter is done
            armed[0] = False
            deleter.remove_file()
        real(fd, op)

    monkeypatch.setattr(layout.fcntl, "flock", flock)
    taker = root.lock("k")
    assert taker.try_acquire(shared=True)
    assert not root.lock("k").try_acquire(shared=False)  # the taker's lock is the real one
    taker.release()


def test_the_epoch_line_says_how_many_stages_there_are():
    rec = {"epoch": 2, "train_loss": 0.5, "test_acc": 0.9, "time_s": 1.0, "frozen_stages": 2,
           "num_stages": 4, "cache_tier": "ram"}  # fmt: skip
    assert "epoch   3/5" in epoch_line(rec, 5) and "frozen 2/4 stages" in epoch_line(rec, 5)


def test_verify_and_inspect_are_not_uses_and_purge_older_than_still_finds_the_cache(
    tmp_path, capsys, caplog
):
    """Before: `cache verify` (and `inspect`) opened caches as a run does, which records a
    use, so `purge --older-than` then skipped every cache just verified."""
    import os
    import time

    root = CacheRoot(tmp_path)
    make_cache(root, "b" * 64)
    marker = root.dir_for("b" * 64) / MARKER
    assert marker.exists(), sorted(p.name for p in root.dir_for("b" * 64).iterdir())
    ten_days_ago = time.time() - 10 * 86400
    os.utime(marker, (ten_days_ago, ten_days_ago))
    for args in (["verify", "--all"], ["inspect", "b" * 12]):
        res = cli_in_process(capsys, caplog, "cache", *args, "--cache-dir", str(tmp_path))
        assert res.returncode == 0, res.stderr
    assert abs(marker.stat().st_mtime - ten_days_ago) < 1  # not recorded as a use
    res = cli_in_process(capsys, caplog, "cache", "purge", "--older-than", "7d", "--yes",
                         "--cache-dir", str(tmp_path))  # fmt: skip
    assert res.returncode == 0 and not root.dir_for("b" * 64).exists(), res.stdout
