"""A strict test device: tensors that refuse host reads the way CUDA tensors do, on a CPU.

PyTorch's spare backend slot (PrivateUse1), renamed ``strict`` and registered
from Python (``torch.utils.backend_registration``), stands in for a GPU:

- A ``strict`` tensor is a wrapper subclass around a CPU tensor that reports
  ``device strict:0``. Every aten op on it runs on the CPU tensor inside, so
  the numbers are bit for bit those of a CPU run: a test can compare a run on
  this device with a CPU reference.
- Host reads raise, as a CUDA tensor's ``.numpy()`` does: ``.numpy()``,
  ``.tolist()``, ``.item()``, ``bool()``/``int()``/``float()``, using it to
  index a numpy array (``__array__``), ``__index__``. On CUDA ``.item()`` and
  ``.tolist()`` work by synchronizing with the device; here they raise, so a
  per-batch host sync fails a test. An explicit ``.cpu()`` / ``.to("cpu")`` is
  the one way back to the host, and it is counted per thread (``host_reads``),
  as is every ``torch.strict.synchronize()`` (``syncs``: what
  ``prefast.store.device.synchronize`` calls, the stand-in for a CUDA sync).
- An op that mixes a strict tensor with a host tensor of one or more dimensions
  raises "Expected all tensors to be on the same device", as on CUDA (0-dim
  host tensors pass, as CUDA lets CPU scalars pass). Copies between the two
  (``.to``, ``copy_``) are the crossings and are allowed.
- Memory: ``capacity`` bytes, the live bytes of every storage (released when
  its last tensor dies) and ``occupied`` bytes held "by another process". An
  allocation that does not fit raises ``torch.OutOfMemoryError`` (as CUDA's
  caching allocator does); ``refuse`` makes chosen allocations fail the same
  way. ``torch.strict.mem_get_info()`` reports (free, total) like
  ``torch.cuda.mem_get_info``.
- Pinned host memory does not exist on this backend: ``pin_memory=True``
  raises, a real failed pin.

Use :func:`strict_device` (a context manager) for the device with fresh counters
and knobs. Nothing is registered on import; :func:`device` registers the backend,
and must run before the process's first backward pass (autograd's engine sizes
its per-device queues once): the suite's conftest does it. Once registered,
PyTorch takes the strict backend for *the* accelerator of the process, so on a
machine with CUDA the suite does not register it and tests the real GPU instead.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_leaves, tree_map

NAME = "strict"
CPU = torch.device("cpu")
aten = torch.ops.aten

# Tensor methods that read a device tensor's values on the host.
HOST_READS = {
    "numpy",
    "tolist",
    "item",
    "__array__",
    "__index__",
    "__bool__",
    "__int__",
    "__float__",
}


class HostReadError(RuntimeError):
    """A strict-device tensor was read on the host without an explicit ``.cpu()``."""


class Memory:
    """The device's memory: what is live, what is free, which allocations fail."""

    def __init__(self) -> None:
        self.reset()

    @property
    def device(self) -> torch.device:
        return device()

    def reset(self, capacity: int = 16 * 2**30) -> None:
        self.capacity = capacity
        self.occupied = 0  # held "by another process": lowers what is free
        self.live: dict[int, int] = {}  # id(storage) -> bytes
        self.refuse: Callable[[int], bool] = lambda nbytes: False
        self.host_reads: Counter[str] = Counter()  # thread name -> device-to-host copies
        self.syncs: Counter[str] = Counter()  # thread name -> device synchronizations
        self.failed: list[int] = []  # sizes of the allocations that raised

    @property
    def used(self) -> int:
        return sum(self.live.values())

    def free(self) -> int:
        return max(0, self.capacity - self.occupied - self.used)

    def track(self, t: torch.Tensor) -> None:
        """Account for ``t``'s storage if it is new; raise if it does not fit."""
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes()
        if nbytes and (self.refuse(nbytes) or nbytes > self.free()):
            self.failed.append(nbytes)
            raise torch.OutOfMemoryError(
                f"strict device out of memory: tried to allocate {nbytes} bytes "
                f"({self.free()} free of {self.capacity})"
            )
        self.live[key] = nbytes
        weakref.finalize(storage, self.live.pop, key, None)

    def count_host_read(self) -> None:
        self.host_reads[threading.current_thread().name] += 1


MEMORY = Memory()


class StrictTensor(torch.Tensor):
    """A device tensor of the strict device: a CPU tensor inside, refusing host reads."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> StrictTensor:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=device(),
            requires_grad=inner.requires_grad,
        )
        t.inner = inner
        return t

    def __init__(self, inner: torch.Tensor) -> None:
        MEMORY.track(inner)

    def __repr__(self, *, tensor_contents: object = None) -> str:  # type: ignore[override]
        return f"StrictTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):  # type: ignore[no-untyped-def]
        return StrictTensor(inner_tensors["inner"])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise HostReadError(
                f"{name}() read a strict-device tensor on the host: on CUDA this raises or "
                "synchronizes with the device. Keep bookkeeping on the host, or copy "
                "explicitly (.cpu()) where a sync is meant"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        crossing = func in (aten._to_copy.default, aten.copy_.default)
        if not crossing:
            host = [
                a
                for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor) and not isinstance(a, StrictTensor) and a.dim() > 0
            ]
            if host:
                raise RuntimeError(
                    f"{func}: Expected all tensors to be on the same device, but found at "
                    f"least two devices, {device()} and cpu!"
                )
        uargs, ukwargs = tree_map(_unwrap, (args, kwargs))
        to_host = func is aten._to_copy.default and _is_host(kwargs.get("device"))
        if "device" in ukwargs and _is_strict(ukwargs["device"]):
            ukwargs["device"] = CPU
        out = func(*uargs, **ukwargs)
        if to_host:
            MEMORY.count_host_read()
            return out
        if func is aten.copy_.default and not isinstance(args[0], StrictTensor):
            MEMORY.count_host_read()  # a device tensor copied into host memory
            return args[0]
        wrapped = tree_map(_wrap, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped)


def _unwrap(a: object) -> object:
    return a.inner if isinstance(a, StrictTensor) else a


def _wrap(o: object) -> object:
    return StrictTensor(o) if isinstance(o, torch.Tensor) else o


def _is_strict(device: object) -> bool:
    return device is not None and torch.device(device).type == NAME  # type: ignore[arg-type]


def _is_host(device: object) -> bool:
    return device is not None and torch.device(device).type == "cpu"  # type: ignore[arg-type]


def _factory(op, *args, **kwargs):  # type: ignore[no-untyped-def]
    """PrivateUse1 kernels for ops whose tensors are all on the host: factories with
    ``device="strict"`` and the allocation behind a host-to-device ``.to()``."""
    if _is_strict(kwargs.get("device")):
        kwargs = {**kwargs, "device": CPU}
    return tree_map(_wrap, op(*args, **kwargs))


class _Module:
    """``torch.strict``: what PyTorch asks of a device module, plus ``mem_get_info``."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def synchronize(self, device: object = None) -> None:
        # Every op has run to completion on the CPU already; counted, as a CUDA sync costs.
        MEMORY.syncs[threading.current_thread().name] += 1

    def mem_get_info(self, device: object = None) -> tuple[int, int]:
        return MEMORY.free(), MEMORY.capacity


_REGISTERED: list = []  # the fallback library, once registered


def device() -> torch.device:
    """The strict device (its backend is registered at the first call, once per process)."""
    if not _REGISTERED:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(NAME, backend_module=_Module())
        library = torch.library.Library("_", "IMPL")
        library.fallback(_factory, "PrivateUse1")
        _REGISTERED.append(library)
    return torch.device(NAME, 0)


@contextlib.contextmanager
def strict_device(capacity: int = 16 * 2**30) -> Iterator[Memory]:
    """The strict device with fresh counters: yields its :class:`Memory` (the knobs)."""
    device()
    MEMORY.reset(capacity)
    try:
        yield MEMORY
    finally:
        MEMORY.reset()
