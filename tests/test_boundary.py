"""The boundary state machine: every valid transition, and invalid ones raise."""

from __future__ import annotations

import pytest
import torch
from helpers import relu_batch

from prefast.caching.boundary import BoundaryCache, State
from prefast.errors import BoundaryStateError
from prefast.store import CacheRoot, CacheSpec, open_writer

SHAPE = (4, 2, 2)


def writer(root, key, tier="zarr", rows=10):
    return open_writer(tier, CacheSpec(key, rows, SHAPE, "float32"), root)


def fill(b: BoundaryCache, rows=10):
    b.write(relu_batch(rows, SHAPE), torch.zeros(rows, dtype=torch.int64), torch.arange(rows))


def boundary(tmp_path, views=1, released=None):
    released = released if released is not None else []
    return BoundaryCache("train@2", 2, "zarr", views, CacheRoot(tmp_path), released.append)


def test_planned_writing_complete_superseded(tmp_path):
    released: list[str] = []
    b = boundary(tmp_path, views=2, released=released)
    assert b.state is State.PLANNED and b.missing_view(4) == 0
    b.begin_view(0, writer(b.root, "v0"))
    assert b.state is State.WRITING and b.reader_for(4) is None
    fill(b)
    b.finish_view()
    assert b.state is State.PLANNED and b.reader_for(4) is not None and b.missing_view(5) == 1
    b.begin_view(1, writer(b.root, "v1"))
    fill(b)
    b.finish_view()
    assert b.state is State.COMPLETE and b.reader_for(5).spec.key == "v1"
    b.supersede()
    assert b.state is State.SUPERSEDED and released == ["train@2"]
    assert CacheRoot(tmp_path).cache_keys() == [], "a superseded disk cache is deleted"


def test_abandon_while_writing_removes_the_partial_view(tmp_path, no_thread_leak):
    b = boundary(tmp_path)
    b.begin_view(0, writer(b.root, "v0"))
    fill(b, 4)
    b.abandon("disk full")
    assert b.state is State.ABANDONED and b.why == "disk full"
    assert CacheRoot(tmp_path).cache_keys() == []


def test_reuse_then_corrupt(tmp_path):
    root = CacheRoot(tmp_path)
    w = writer(root, "old")
    w.append(relu_batch(10, SHAPE), torch.zeros(10, dtype=torch.int64), torch.arange(10))
    b = boundary(tmp_path)
    b.reuse_view(0, w.finish())
    assert b.state is State.COMPLETE
    b.corrupt("chunk 0 missing")
    assert b.state is State.CORRUPTED and root.cache_keys() == []


def test_spill_replaces_the_reader_and_tier(tmp_path):
    b = BoundaryCache("train@1", 1, "ram", 1, CacheRoot(tmp_path))
    b.begin_view(0, writer(b.root, "k", tier="ram"))
    fill(b)
    b.finish_view()
    ram_reader = b.readers[0]
    disk = writer(b.root, "k")
    disk.append(*ram_reader.read_rows(torch.arange(10).numpy()))
    b.spill("zarr", {0: disk.finish()})
    assert b.tier == "zarr" and b.readers[0].tier == "zarr" and b.state is State.COMPLETE
    b.close()  # end of run: the complete disk cache stays
    assert CacheRoot(tmp_path).is_complete("k")


def test_a_spill_moves_a_boundary_without_views_and_refuses_a_partial_copy(tmp_path):
    """A boundary whose views are all still to be written moves too (they will be written
    in the new tier); a spill must copy every view written so far, or nothing moves."""
    b = BoundaryCache("train@1", 1, "ram", 2, CacheRoot(tmp_path))
    b.spill("mmap", {})
    assert b.tier == "mmap" and b.state is State.PLANNED
    b.begin_view(0, writer(b.root, "v0"))
    fill(b)
    b.finish_view()
    with pytest.raises(BoundaryStateError, match="a spill copies views"):
        b.spill("zarr", {})
    assert b.tier == "mmap" and list(b.readers) == [0]
    b.close()


INVALID = [
    ("finish_view", State.PLANNED),
    ("write", State.PLANNED),
    ("supersede", State.PLANNED),
    ("spill", State.WRITING),  # a view being written is not spilled (PLANNED views are)
    ("begin_view", State.WRITING),
    ("reuse_view", State.WRITING),
    ("supersede", State.WRITING),
    ("corrupt", State.WRITING),
    ("abandon", State.COMPLETE),
    ("begin_view", State.COMPLETE),
    ("finish_view", State.COMPLETE),
    ("supersede", State.SUPERSEDED),
    ("abandon", State.ABANDONED),
    ("corrupt", State.CORRUPTED),
    ("begin_view", State.ABANDONED),
]


@pytest.mark.parametrize("method,state", INVALID)
def test_invalid_transitions_raise(method, state, tmp_path):
    b = boundary(tmp_path)
    b.state = state
    args = {
        "finish_view": (),
        "write": (torch.zeros(1, *SHAPE), torch.zeros(1), torch.zeros(1)),
        "supersede": (),
        "spill": ("zarr", {}),
        "begin_view": (0, None),
        "reuse_view": (0, None),
        "corrupt": ("x",),
        "abandon": ("x",),
    }[method]
    with pytest.raises(BoundaryStateError, match="this transition needs state"):
        getattr(b, method)(*args)
    assert b.state is state


def test_a_view_is_written_once(tmp_path):
    b = boundary(tmp_path, views=2)
    b.begin_view(0, writer(b.root, "v0"))
    fill(b)
    b.finish_view()
    with pytest.raises(BoundaryStateError, match="view 0 already exists"):
        b.begin_view(0, None)  # type: ignore[arg-type]
    b.close()
