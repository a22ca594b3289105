"""The ``prefast`` command for subprocess tests (torchrun), with test-only options first.

    python tests/run_prefast.py [--strict] [--fail-rank R --fail-step N] -- train ...

``--strict`` trains on the strict test device (``tests/strict_device.py``) instead
of the CPU; ``--fail-rank R --fail-step N`` makes rank R raise a local error (a
CUDA out-of-memory's message) at its N-th training step. Everything after
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
    opts = p.parse_args(sys.argv[1:split])
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
