"""Data parallelism under ``torchrun``: who we are, and the few collectives we need.

Everything comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); without
it there is one process and nothing here does anything. The backend is
``nccl`` on GPUs and ``gloo`` on CPUs. Every collective has the process
group's timeout (``--dist-timeout``), so a rank that dies makes the others
fail within that time instead of hanging.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from prefast.errors import PrefastError
from prefast.store.errors import first_line


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The process's place in a torchrun job (a one-process Dist without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend="nccl" if torch.cuda.is_available() else "gloo",
    )


def init(ctx: Dist, timeout_s: float) -> None:
    """Join the process group (once per process)."""
    if ctx.enabled and not dist.is_initialized():
        if ctx.backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(ctx.backend, timeout=datetime.timedelta(seconds=timeout_s))


def all_sum(ctx: Dist, *values: float) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64 on the CPU for gloo)."""
    if not ctx.enabled:
        return list(values)
    device = torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(ctx: Dist, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def slowest_data_wait(ctx: Dist, stats: dict[str, Any]) -> dict[str, Any]:
    """An epoch's stats with ``data_s`` the longest any rank waited for raw data (the
    ranks step together, so the slowest loader sets the pace) and every rank's wait in
    ``rank_data_s``."""
    if not ctx.enabled:
        return stats
    waits = gather(ctx, stats.get("data_s", 0.0))
    return {**stats, "data_s": max(waits), "rank_data_s": waits}


def broadcast(ctx: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def state_digest(module: torch.nn.Module) -> str:
    """Digest of every parameter and buffer: equal digests = identical replicas."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Replicas:
    """What the training step calls: the model itself, or DDP over its trainable stages.

    DDP registers the parameters that need a gradient when it is built, so a
    stage that freezes mid-run would leave it waiting for gradients that never
    come (a hang, or an error). The wrapper is therefore rebuilt whenever the
    frozen prefix grows, at the same iteration on every rank (freezing is a
    pure function of the iteration); frozen stages are never all-reduced.
    """

    def __init__(self, ctx: Dist, model: torch.nn.Module, frozen: Callable[[], int]):
        self.ctx, self.model, self.frozen = ctx, model, frozen
        self.wrapped: torch.nn.Module | None = None
        self.built_at = -1

    def module(self) -> torch.nn.Module:
        if not self.ctx.enabled:
            return self.model
        if self.frozen() != self.built_at:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.local_rank] if self.ctx.backend == "nccl" else None
            self.wrapped = DDP(self.model, device_ids=ids)  # syncs buffers at each forward
            self.built_at = self.frozen()
        assert self.wrapped is not None
        return self.wrapped

    def close(self) -> None:
        """Let go of the DDP wrapper at the end of the run, while the process group lives:
        left to the garbage collector (the trainer holds a reference cycle) it was freed
        after ``destroy_process_group``, with gloo's threads still holding its buckets."""
        self.wrapped, self.built_at = None, -1

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank. DDP syncs buffers when a forward
        starts, so after an epoch's last step each rank holds its own batch's update:
        without this, ranks would evaluate (and checkpoint) different models."""
        if self.ctx.enabled:
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets the others:
    gloo aborts the process (``terminate called ...``) when a rank tears down its
    connections while a peer is still using them. Garbage that still holds the group (a
    DDP wrapper in a reference cycle) is collected first: freed later, during the
    interpreter's teardown, it made gloo abort the process the same way (PyTorch's
    destroy_process_group documentation asks for this order)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


class DistributedError(PrefastError):
    """The process group failed: another rank died, was killed, or timed out."""


# What gloo and NCCL say when a peer died, hung or closed its connection.
_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "timed out",
    "timeout",
    "broken pipe",
    "nccl",
    "gloo",
    "processgroup",
    "aborted",
)


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that timed out or was aborted, as opposed to this rank's own error
    (a CUDA out-of-memory, a bad batch): only the first is "lost the process group"."""
    if isinstance(exc, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_LOST)


def lost(ctx: Dist, exc: RuntimeError) -> Exception:
    """A collective's failure, said plainly (outside torchrun: ``exc`` unchanged)."""
    if not ctx.enabled or isinstance(exc, PrefastError):
        return exc
    return DistributedError(
        f"rank {ctx.rank} of {ctx.world} lost the process group ({first_line(exc, 200)}): another rank "
        "probably failed or was killed; see its log. Completed caches stay valid: rerun "
        "(with --resume and --checkpoint to continue)"
    )
