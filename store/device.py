"""The device boundary: the one place where tensors cross between host and device.

Where tensors live:

- **Host, always**: sample ids, seen-masks, epoch orders, row counts, checksums,
  chunk buffers, the ``ram``, ``mmap`` and ``zarr`` caches, and every cache's
  labels and ids. Host code reads these freely; none of it ever moves.
- **Device** (the training device): the model, a batch's activations and
  labels once they crossed, the ``gpu`` tier's activations, an epoch's running
  loss and accuracy sums.

How they cross (each a function or class below, nothing else moves tensors):

- host -> device, a cache reader's batches: :class:`Uploader`. Activations and
  labels are copied into a small ring of staging buffers allocated once per
  reader (pinned on CUDA) and sent ``non_blocking`` on a side stream; the
  consumer's :meth:`Transfer.wait` makes the compute stream wait on the copy's
  event, so neither thread blocks on the GPU.
- host -> device, anything else (the in-memory dataset once, a batch's few
  indices, a DataLoader batch that PyTorch's pin-memory thread pinned):
  :func:`to_device`, ``non_blocking``.
- device -> host: :class:`HostCopies` for the ``ram`` tier's rows (pinned,
  ``non_blocking``, landed lazily; :meth:`HostCopies.wait` before the cache is
  read), and :func:`to_host`, an explicit sync for what the trainer reads once
  per epoch. Disk writers call ``.cpu()`` on their own thread.

Who may synchronize with the device: whoever stages a batch (a loader thread,
or the training thread when it reads a test cache) waits for that slot's last
copy to finish before reusing its buffer; a cache writer waits when it
finishes; the trainer reads the device once per epoch (:func:`to_host`).
Nothing in a training step does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import CacheAllocationError


def canonical(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``cuda`` becomes ``cuda:N`` (the current GPU), as the
    tensors on it report themselves, so ``t.device == device`` means what it says."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def is_accelerator(device: torch.device | str) -> bool:
    """True for any training device whose tensors the host cannot read directly."""
    return torch.device(device).type != "cpu"


def pins_host_memory(device: torch.device | str) -> bool:
    """Staging buffers are pinned where that makes copies asynchronous: CUDA."""
    return torch.device(device).type == "cuda"


def is_allocation_failure(exc: BaseException) -> bool:
    """An allocator saying no: CUDA or host out of memory."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate", "cannot allocate")
    )


def allocate(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, what: str
) -> torch.Tensor:
    """``torch.empty`` on ``device`` (host memory for ``cpu``); an allocator's refusal
    becomes :class:`CacheAllocationError`, which callers treat as a tier decision."""
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:
        if not is_allocation_failure(exc):
            raise
        nbytes = math.prod(shape) * dtype.itemsize
        raise CacheAllocationError(what, nbytes, str(torch.device(device)), exc) from exc


def pinned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (raises as the allocator does when it cannot pin)."""
    return torch.empty(numel, dtype=dtype, pin_memory=True)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` (a no-op when it is there): ``non_blocking``, so a
    pinned source copies asynchronously and a pageable one without a device sync."""
    return t.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host. Synchronizes with the device: once per epoch, never per step."""
    return t.detach().to("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timing only: the probe). Any accelerator's: the
    ``synchronize`` of its module (``torch.cuda``, ``torch.xpu``, the test suite's strict
    device, which counts the calls so a test sees a sync where none is allowed)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()  # one device, no argument
    elif is_accelerator(device):
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        if sync is not None:
            sync(device)


def memory_info(device: torch.device | str) -> tuple[int, int] | None:
    """(free, total) bytes of the device's memory, or None when it cannot be read.

    CUDA's ``mem_get_info``, or the same function of another backend's module
    (``torch.xpu``, the test suite's strict device); a CPU has none.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    get = getattr(module, "mem_get_info", None)
    if get is None:
        return None
    free, total = get(device)
    if device.type == "cuda":  # blocks PyTorch's allocator holds but does not use are free too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free), int(total)


# -- host -> device: staging ring -------------------------------------------------------
@dataclass
class Transfer:
    """Tensors on their way to the device; :meth:`wait` hands them to the compute stream."""

    tensors: tuple[torch.Tensor, ...]
    event: torch.cuda.Event | None = None

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self.event is not None:
            stream = torch.cuda.current_stream(self.tensors[0].device)
            stream.wait_event(self.event)  # the GPU waits, not the host
            for t in self.tensors:
                t.record_stream(stream)  # freed memory is not reused before the step used it
        return self.tensors


@dataclass
class _Slot:
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # flat, by position
    event: torch.cuda.Event | None = None  # the last copy out of this slot


class Uploader:
    """Host batches to the device through a ring of reused staging buffers.

    ``upload`` may run on a loader thread: it copies each host tensor into the
    next slot (waiting first for that slot's previous copy to the device to
    finish) and starts a ``non_blocking`` copy on a side stream. Tensors already
    on the device pass through. With a CPU training device nothing moves.
    ``on_note(event, detail)`` hears when pinned staging could not be allocated
    (the buffers are then pageable: slower, still correct).
    """

    def __init__(
        self,
        device: torch.device | str,
        slots: int = 3,
        on_note: Callable[[str, str], None] | None = None,
    ):
        self.device = canonical(device)
        self.moves = is_accelerator(self.device)
        self.pinned = pins_host_memory(self.device)
        self.on_note = on_note
        self.ring = [_Slot() for _ in range(slots)]
        self.next = 0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def upload(self, *tensors: torch.Tensor) -> Transfer:
        if not self.moves or all(t.device == self.device for t in tensors):
            return Transfer(tensors)
        slot = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        if slot.event is not None:
            slot.event.synchronize()  # the copy that last read this slot is done
        staged = [self._stage(slot, i, t) for i, t in enumerate(tensors)]
        if self.stream is None:
            return Transfer(tuple(to_device(s, self.device) for s in staged))
        with torch.cuda.stream(self.stream):
            moved = tuple(to_device(s, self.device) for s in staged)
            slot.event = torch.cuda.Event()
            slot.event.record(self.stream)
        return Transfer(moved, slot.event)

    def _stage(self, slot: _Slot, i: int, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied into slot buffer ``i`` (grown once to the largest batch); a tensor
        already on the device is passed through."""
        if t.device == self.device:
            return t
        buf = slot.buffers.get(i)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            buf = slot.buffers[i] = self._buffer(t.numel(), t.dtype)
        view = buf[: t.numel()].view(t.shape)
        view.copy_(t)
        return view

    def _buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.pinned:
            try:
                return pinned_empty(numel, dtype)
            except RuntimeError as exc:  # no pinned memory: pageable staging, said once
                self.pinned = False
                if self.on_note is not None:
                    self.on_note("staging_unpinned", f"pinned staging unavailable ({exc})")
        return torch.empty(numel, dtype=dtype)


# -- device -> host ---------------------------------------------------------------------
class HostCopies:
    """Device rows into host memory without stalling the trainer.

    On CUDA each copy goes to pinned memory ``non_blocking`` and lands in its
    destination once its event has fired (checked at the next copy, forced by
    :meth:`wait`); elsewhere copies are immediate.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor]] = []

    def copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "cuda" or dest.device.type != "cpu":
            dest.copy_(src)  # on one device (queued on its stream), or a synchronous device
            return
        try:
            staged = src.to("cpu", non_blocking=True)  # pinned by PyTorch's host allocator
        except RuntimeError:  # no pinned memory left: a synchronous copy, still correct
            dest.copy_(src)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(src.device))
        self.pending.append((event, staged, dest))
        self._land(block=False)

    def wait(self) -> None:
        """Every copy has landed (call before the host reads the destination)."""
        self._land(block=True)

    def _land(self, block: bool) -> None:
        while self.pending:
            event, staged, dest = self.pending[0]
            if not block and not event.query():
                return
            event.synchronize()
            dest.copy_(staged)
            self.pending.pop(0)
