"""Threads that do disk I/O, and the bound on every wait for them.

A disk can hang rather than fail (an NFS server that stops answering, a dying
drive). Whoever waits for such a thread waits at most ``IO_STALL_S`` for it to
make progress, then gives up on that cache (a writer's boundary is abandoned, a
reader's epoch continues on raw data) instead of hanging training.

Why not ``concurrent.futures.ThreadPoolExecutor``: it joins its threads when the
interpreter exits, so one write stuck in a stall keeps a process from exiting after
SIGTERM, Ctrl-C or the end of a run. :class:`IOPool` runs daemon threads and never
joins one that has not finished: a thread still stuck when the process ends dies
with it. (A thread in uninterruptible kernel I/O, state ``D``, can still hold the
process until the kernel lets go: no user-space code reaches that.)
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

# Seconds a waiter allows a disk thread without progress before it gives up on the cache.
# Module-level so tests shrink it. A 32 MiB chunk at 1 MB/s takes ~30 s.
IO_STALL_S = 60.0


def stall_s() -> float:
    return IO_STALL_S  # read at call time (tests shrink it)


def bounded(what: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """``fn(*args)`` on a daemon thread of its own, waited for at most ``timeout`` seconds
    (default ``IO_STALL_S``): disk work the trainer would otherwise do itself, with no
    bound (a test cache's reads, a writer's completion, removing a partial cache). A call
    still running then raises ``TimeoutError`` (``ETIMEDOUT``) here and finishes, or
    stays stuck, on its own thread; ``fn``'s own errors are raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # raised in the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=run, name="prefast-io", daemon=True)
    t.start()
    t.join(stall_s() if timeout is None else max(0.0, timeout))
    if t.is_alive():
        raise TimeoutError(errno.ETIMEDOUT, f"{what} did not return in {stall_s():.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class IOPool:
    """``workers`` daemon threads running submitted calls; ``submit`` returns a Future."""

    def __init__(self, workers: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = workers
        self._then: Callable[[], None] | None = None
        self._shut = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._shut:  # its threads are gone: the future would never complete
            raise RuntimeError("submit() to an IOPool after shutdown()")
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                future, fn, args = job
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the caller sees it through the future
                    future.set_exception(exc)
        finally:
            with self._lock:
                self._alive -= 1
                then = self._then if self._alive == 0 else None
            if then is not None:
                then()

    def shutdown(
        self, timeout: float | None = None, then: Callable[[], None] | None = None
    ) -> bool:
        """Cancel what has not started and stop the threads, waiting at most ``timeout``
        seconds (None: until they end). True when every thread has ended; otherwise
        ``then`` runs in the last thread to end, once its call returns. (From one of the
        pool's own threads: False, and ``then`` runs when that thread ends.)"""
        self._shut = True
        while True:  # cancel what is still queued
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._alive == 0:
                return True
            self._then = then
            return False
