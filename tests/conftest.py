from __future__ import annotations

import os
import subprocess
import threading

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def no_thread_leak():
    """Fails a test that leaves a PreFast background thread running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("prefast")
    ]
    assert not leaked, f"threads left behind: {leaked}"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs) that fills up: ENOSPC from the kernel, not a mock.

    Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped with the reason.
    """
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run the suite as root to test a real full disk")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
