from __future__ import annotations

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
