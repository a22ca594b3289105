"""The ``prefast`` command for subprocess tests (torchrun), with test-only options first.

    python tests/run_prefast.py [--strict] [--fail-rank R --fail-step N]
                                [--pause-in-finish FILE [--pause-rank R]]
                                [--kill-at-epoch E [--kill-at-step S]] -- train ...

``--strict`` trains on the strict test device (``tests/strict_device.py``) instead
of the CPU; ``--fail-rank R --fail-step N`` makes rank R raise a local error (a
CUDA out-of-memory's message) at its N-th training step; ``--pause-in-finish FILE``
makes a disk writer's ``finish()`` (of rank R, default every rank) write the
process id to FILE and sleep before it syncs, so a test can signal the process
there; ``--kill-at-epoch E`` SIGKILLs the process at step S (default 5) of
epoch E, after epoch E-1's checkpoint and with epoch E's caches half written.
Everything after
``--`` goes to the real CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    split = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--strict", action="store_true")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int, default=1)
    p.add_argument("--pause-in-finish")
    p.add_argument("--pause-rank", type=int)
    p.add_argument("--kill-at-epoch", type=int)
    p.add_argument("--kill-at-step", type=int, default=5)
    opts = p.parse_args(sys.argv[1:split])
    rank = int(os.environ.get("RANK", "0"))
    if opts.kill_at_epoch is not None:
        import signal

        from prefast.trainer import Trainer

        real_step = Trainer._step

        def step_or_die(self, batch, it):
            bpe = self.raw.batches_per_epoch
            if (it // bpe, it % bpe) == (opts.kill_at_epoch, opts.kill_at_step):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, batch, it)

        Trainer._step = step_or_die  # type: ignore[method-assign]
    if opts.pause_in_finish and opts.pause_rank in (None, rank):
        import time

        import prefast.store.disk_writer as disk_writer

        sync = disk_writer.fsync_tree

        def paused(path):
            Path(opts.pause_in_finish).write_text(str(os.getpid()))
            time.sleep(120)  # the test signals us here
            sync(path)

        disk_writer.fsync_tree = paused
    if opts.strict:
        import strict_device

        import prefast.build

        prefast.build.resolve_device = lambda name: strict_device.device()
    if opts.fail_rank is not None and int(os.environ.get("RANK", "0")) == opts.fail_rank:
        from prefast.trainer import Trainer

        step, calls = Trainer._step, [0]

        def failing(self, batch, it):
            calls[0] += 1
            if calls[0] == opts.fail_step:
                raise RuntimeError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)"
                )
            return step(self, batch, it)

        Trainer._step = failing  # type: ignore[method-assign]
    from prefast.cli.main import main as prefast_main

    return prefast_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
