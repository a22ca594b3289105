from __future__ import annotations

import os
import subprocess
import threading

import pytest
import strict_device
import torch

from prefast.store.device import canonical

# `make check` runs two pytest-xdist workers on a 2-core machine: one thread each (and in
# every process a test starts), since two workers of two threads measured slower than one.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
# Every run in the tests (and the CLI processes they start) prices boundaries with these
# figures, not this machine's measured ones: plans that do not move with the machine's load,
# and no measurement per test. tests/test_bandwidth.py measures for real.
os.environ["PREFAST_BANDWIDTHS"] = os.path.join(os.path.dirname(__file__), "bandwidths.json")

# One test body per training device: the strict test device stands in for a GPU on
# a machine without one (tests/strict_device.py); real CUDA runs where there is one
# (`pytest -m cuda`, benchmarks/gpu_check.sh). Registered, the strict backend would
# become the process's accelerator and take pinned memory away from CUDA, so it is
# not used where CUDA is.
CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STRICT = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a real GPU is here: the strict stand-in is not needed"
)
ACCELERATORS = [pytest.param("strict", marks=STRICT), pytest.param("cuda", marks=CUDA)]
if not torch.cuda.is_available():
    # Before any backward pass: autograd's engine sizes its per-device queues once.
    strict_device.device()


def pytest_addoption(parser):
    parser.addoption(
        "--slow-fsync",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a loaded machine's disk: every cache completion's fsync in the test process "
        "takes SECONDS more (not in the processes a test starts). Finds tests whose short "
        "bounds also cover healthy writes: CI's loaded disk once took over 1 s to complete one",
    )


def pytest_configure(config):
    delay = config.getoption("--slow-fsync")
    if delay > 0:
        import time

        from prefast.store import disk_writer

        real = disk_writer.fsync_tree

        def slow_fsync_tree(path):
            time.sleep(delay)
            return real(path)

        disk_writer.fsync_tree = slow_fsync_tree


@pytest.fixture(params=["cpu", *ACCELERATORS])
def device(request):
    """Each training device in turn (the strict one entered with fresh counters)."""
    if request.param != "strict":
        yield canonical(request.param)  # cuda:N, as its tensors report themselves
        return
    with strict_device.strict_device() as memory:
        yield memory.device


@pytest.fixture(params=ACCELERATORS)
def accelerator(request, monkeypatch):
    """An accelerator as the training device of every run in the test: yields
    (device, the strict device's Memory or None on CUDA)."""
    if request.param == "cuda":
        yield canonical("cuda"), None
        return
    with strict_device.strict_device() as memory:
        monkeypatch.setattr("prefast.training.build.resolve_device", lambda name: memory.device)
        yield memory.device, memory


@pytest.fixture
def strict(monkeypatch):
    """The strict device as the training device, for tests that turn its knobs."""
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the strict stand-in is not needed")
    with strict_device.strict_device() as memory:
        monkeypatch.setattr("prefast.training.build.resolve_device", lambda name: memory.device)
        yield memory


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


@pytest.fixture(scope="module")
def server():
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py), one per test module that asks."""
    import s3_server

    srv = s3_server.start()
    yield srv
    srv.stop()
