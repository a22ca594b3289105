"""Prefetching loader: a background thread fills a bounded queue of batches.

Decoding (zstd, crc32c, numpy gathers) releases the GIL for most of its time,
so a reader thread overlaps it with the trainer's compute. On CUDA the batch
is pinned and copied with ``non_blocking=True`` on a side stream so the copy
overlaps the previous step's kernels.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

from .base import TorchBatch

_DONE = object()


class PrefetchLoader:
    """Iterate batches produced by ``make_batches()`` in a background thread.

    Parameters
    ----------
    make_batches
        Called once in the thread; yields ``(acts, labels, ids)`` CPU or device tensors.
    device
        Where batches should end up.
    depth
        Queue bound: at most this many batches are decoded ahead.
    """

    def __init__(
        self,
        make_batches: Callable[[], Iterable[TorchBatch]],
        device: torch.device | str = "cpu",
        depth: int = 4,
    ):
        self.device = torch.device(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.thread = threading.Thread(
            target=self._run, args=(make_batches,), name="prefast-loader", daemon=True
        )
        self.thread.start()
        self.closed = False

    def _to_device(self, batch: TorchBatch) -> TorchBatch:
        if self.stream is None or all(t.device == self.device for t in batch):
            return batch
        with torch.cuda.stream(self.stream):
            moved = tuple(
                t if t.device == self.device else t.pin_memory().to(self.device, non_blocking=True)
                for t in batch
            )
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved[0], moved[1], moved[2], event  # type: ignore[return-value]

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_batches: Callable[[], Iterable[TorchBatch]]) -> None:
        try:
            for batch in make_batches():
                if not self._put(self._to_device(batch)):
                    return
        except BaseException as exc:  # re-raised in the consumer
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[TorchBatch]:
        try:
            while True:
                item = self.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if len(item) == 4:  # wait for the side-stream copy, on the compute stream
                    torch.cuda.current_stream().wait_event(item[3])
                    item = item[:3]
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread and drop queued batches; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self.thread.join()

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
