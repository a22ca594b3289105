"""Bad input exits 2 with one line naming the value and the fix, before any training."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import cli, cli_in_process
from test_user_data import write_image_folder

DIGITS = ("--dataset", "digits", "--model", "densenet-bc", "--depth", "10", "--device", "cpu")


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    return lines[0]


def test_a_cache_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys, caplog):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    res = cli_in_process(
        capsys, caplog, "train", "--mode", "prefast", *DIGITS, "--cache-dir", str(afile)
    )
    assert one_line(res) == (
        f"prefast: error: --cache-dir {afile} is not a directory: pass a directory "
        "(created if missing)"
    )
    assert "epoch   1/" not in res.stdout  # nothing trained
    for cmd in (("ls",), ("verify", "--all"), ("purge", "--all", "--yes")):
        res = cli_in_process(capsys, caplog, "cache", *cmd, "--cache-dir", str(afile))
        assert "is not a directory" in one_line(res)
    assert afile.read_text() == "not a directory"


def test_a_cache_dir_on_a_read_only_filesystem_is_refused(tmp_path, capsys, caplog):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)])
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        res = cli_in_process(
            capsys, caplog, "train", "--mode", "prefast", *DIGITS, "--cache-dir", str(mnt / "c")
        )
        assert "cannot be created (Read-only file system)" in one_line(res)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_unreadable_image_found_while_scanning_is_one_line(tmp_path, capsys, caplog):
    data = write_image_folder(tmp_path / "imgs", per_class=(3, 2))
    bad = sorted((data / "train" / "one").iterdir())[0]
    bad.write_text("this is text, not a PNG")
    res = cli_in_process(
        capsys, caplog, "train", "--dataset", "imagefolder", "--data-dir", str(data),
        "--device", "cpu", "--epochs", "1",
    )  # fmt: skip
    assert one_line(res) == (
        f"prefast: error: cannot decode image {bad} (cannot identify image file): remove the "
        "file or replace it"
    )


@pytest.mark.slow
def test_an_unreadable_image_found_mid_epoch_in_a_dataloader_worker_is_one_line(tmp_path):
    """600 training images: the channel statistics read every 2nd one, so the file at
    index 1 is first read by a DataLoader worker during the epoch."""
    from torchvision.datasets import ImageFolder

    data = write_image_folder(tmp_path / "imgs", per_class=(200, 4))
    bad = ImageFolder(str(data / "train")).samples[1][0]
    with open(bad, "w") as f:
        f.write("text")
    res = cli(
        "train", "--dataset", "imagefolder", "--data-dir", str(data), "--device", "cpu",
        "--epochs", "1", "--workers", "2", "--model", "densenet-bc", "--depth", "10",
        "--image-size", "8", "--augment", "none",
    )  # fmt: skip
    assert one_line(res) == (
        f"prefast: error: cannot decode image {bad} (cannot identify image file): remove the "
        "file or replace it"
    )
    assert "epoch   1/1" not in res.stdout
