"""Prefetching loader: a background thread fills a bounded queue of batches.

Decoding (zstd, crc32c, numpy gathers) releases the GIL for most of its time,
so a reader thread overlaps it with the trainer's compute. For an accelerator
the thread also starts each batch's copy to the device (``store/device.py``:
staged in the loader's own reused buffers, pinned on CUDA, copied on a side
stream); the consumer gets the batch once the compute stream waits on it.
Sample ids never leave the host.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

from .base import TorchBatch
from .device import Uploader

_DONE = object()


class PrefetchLoader:
    """Iterate batches produced by ``make_batches()`` in a background thread.

    Parameters
    ----------
    make_batches
        Called once in the thread; yields ``(acts, labels, ids)``, ids on the host.
    device
        Where activations and labels should end up (ids stay on the host).
    depth
        Queue bound: at most this many batches are decoded ahead.
    on_note
        Told ``(event, detail)`` when staging falls back (no pinned memory).
    """

    def __init__(
        self,
        make_batches: Callable[[], Iterable[TorchBatch]],
        device: torch.device | str = "cpu",
        depth: int = 4,
        on_note: Callable[[str, str], None] | None = None,
    ):
        self.device = torch.device(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        # The ring holds what the queue holds, the batch the trainer is using and the
        # one being staged, so the thread never waits on a copy not yet dequeued.
        self.uploader = Uploader(self.device, slots=depth + 2, on_note=on_note)
        self.thread = threading.Thread(
            target=self._run, args=(make_batches,), name="prefast-loader", daemon=True
        )
        self.thread.start()
        self.closed = False

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
            for acts, labels, ids in make_batches():
                if not self._put((self.uploader.upload(acts, labels), ids, labels)):
                    return
        except BaseException as exc:  # re-raised in the consumer
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[TorchBatch]:
        """``(acts, labels, ids)``: activations and labels on the device, ids on the host."""
        for acts, labels, ids, _ in self.batches():
            yield acts, labels, ids

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(acts, labels, ids, host_labels)``: also the labels as the host read them."""
        try:
            while True:
                item = self.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                transfer, ids, host_labels = item
                acts, labels = transfer.wait()  # the compute stream waits, not the host
                yield acts, labels, ids, host_labels
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
