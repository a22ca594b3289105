"""The ``prefast`` command for subprocess tests (torchrun), with test-only options first.

    python tests/run_prefast.py [--strict] [--fail-rank R --fail-step N]
                                [--pause-in-finish FILE [--pause-rank R]]
                                [--kill-at-epoch E [--kill-at-step S]]
                                [--chunk-bytes N] [--truncate-at E:S | --truncate-after E]
                                [--ids-out FILE] [--disk-free-rank R BYTES]
                                [--assert-ddp-freed] [--decisions-out FILE] -- train ...

``--strict`` trains on the strict test device (``tests/strict_device.py``) instead
of the CPU; ``--fail-rank R --fail-step N`` makes rank R raise a local error (a
CUDA out-of-memory's message) at its N-th training step; ``--pause-in-finish FILE``
makes a disk writer's ``finish()`` (of rank R, default every rank) write the
process id to FILE and sleep before it syncs, so a test can signal the process
there; ``--kill-at-epoch E`` SIGKILLs the process at step S (default 5) of
epoch E, after epoch E-1's checkpoint and with epoch E's caches half written;
``--chunk-bytes N`` writes disk chunks of N bytes; ``--truncate-at E:S`` truncates
every training cache's activation files under ``--cache-dir`` to zero bytes right
after a disk reader has loaded a chunk, from step S of epoch E on (while the reader
holds it and before its rows are gathered), ``--truncate-after E`` once epoch E has
ended (between epochs); ``--ids-out FILE`` writes, per epoch, the number
of steps and whether the steps' sample ids were every sample exactly once;
``--disk-free-rank R BYTES``: rank R's disk holds BYTES less what its caches take (another
node, with a fuller disk), so its tiers and auto dtypes differ from the other ranks';
``--assert-ddp-freed`` fails the rank if a DDP wrapper is still in memory (even as
uncollected garbage) when the process group is destroyed: freed later, gloo could
abort the process at exit; ``--decisions-out FILE`` (``{rank}`` in it: the rank) writes the
rank's own ``--freeze auto`` decisions (iteration, stages) as JSON when it has trained.
Everything after ``--`` goes to the real CLI.
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
    p.add_argument("--chunk-bytes", type=int)
    p.add_argument("--truncate-at")
    p.add_argument("--truncate-after", type=int)
    p.add_argument("--ids-out")
    p.add_argument("--disk-free-rank", nargs=2, type=int, metavar=("R", "BYTES"))
    p.add_argument("--assert-ddp-freed", action="store_true")
    p.add_argument("--decisions-out")
    opts = p.parse_args(sys.argv[1:split])
    rank = int(os.environ.get("RANK", "0"))
    cli_args = sys.argv[split + 1 :]
    if opts.disk_free_rank and opts.disk_free_rank[0] == rank:
        from prefast.caching.governor import Governor
        from prefast.store.layout import disk_usage

        disk_bytes = opts.disk_free_rank[1]

        def free(self):
            return disk_bytes - disk_usage(self.budgets.cache_dir)

        Governor.disk_free = free  # type: ignore[method-assign]
    if opts.assert_ddp_freed:
        import gc

        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        destroy = dist.destroy_process_group

        def checked_destroy(*args, **kw):
            alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
            destroy(*args, **kw)
            if alive:
                print(f"rank {rank}: {alive} DDP wrapper(s) outlive the process group",
                      file=sys.stderr)  # fmt: skip
                os._exit(3)

        dist.destroy_process_group = checked_destroy
    if opts.decisions_out:
        import json

        from prefast.training.trainer import Trainer

        real_run = Trainer.run

        def run_and_tell(self, *a, **kw):
            record = real_run(self, *a, **kw)
            mine = [{"iter": d["iter"], "stages": d["stages"]} for d in self.schedule.decisions]
            Path(opts.decisions_out.format(rank=rank)).write_text(json.dumps(mine))
            return record

        Trainer.run = run_and_tell  # type: ignore[method-assign]
    if opts.chunk_bytes:
        import prefast.store.base

        prefast.store.base.CHUNK_BYTES = opts.chunk_bytes
    if opts.truncate_at or opts.truncate_after is not None or opts.ids_out:
        watch_epochs(opts, Path(cli_args[cli_args.index("--cache-dir") + 1]))
    if opts.kill_at_epoch is not None:
        import signal

        from prefast.training.trainer import Trainer

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

        import prefast.training.build

        prefast.training.build.resolve_device = lambda name: strict_device.device()
    if opts.fail_rank is not None and int(os.environ.get("RANK", "0")) == opts.fail_rank:
        from prefast.training.trainer import Trainer

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

    return prefast_main(cli_args)


def truncate_train_caches(cache_dir: Path) -> None:
    """Cut every file of activations of the complete training caches to zero bytes (a file
    cut short by another process, a full NFS export, a careless ``truncate``)."""
    from prefast.store import CacheRoot

    root = CacheRoot(cache_dir)
    for key in root.cache_keys():
        d = root.dir_for(key)
        if not root.is_complete(key) or '"split": "train"' not in (d / "zarr.json").read_text():
            continue
        files = [d / "activations.bin"] if (d / "activations.bin").is_file() else []
        files += [f for f in (d / "activations").rglob("*") if f.is_file()] if not files else []
        for f in files:
            os.truncate(f, 0)
        print(f"truncated {len(files)} file(s) of cache {key}", file=sys.stderr, flush=True)


def watch_epochs(opts: argparse.Namespace, cache_dir: Path) -> None:
    import json

    import numpy as np

    from prefast.store.chunkio import ChunkPrefetcher
    from prefast.training.trainer import Trainer

    at = tuple(int(v) for v in opts.truncate_at.split(":")) if opts.truncate_at else None
    step, run_epoch, get = Trainer._step, Trainer.run_epoch, ChunkPrefetcher.get
    ids: list = []
    record: dict = {}
    armed: list = []

    def watched_step(self, batch, it):
        bpe = self.raw.batches_per_epoch
        if at is not None and (it // bpe, it % bpe) == at:
            armed.append(True)
        ids.append(batch.ids.numpy().copy())
        return step(self, batch, it)

    def get_then_truncate(self, c):
        chunk = get(self, c)
        if armed:  # the chunk is loaded; its rows are gathered after this returns
            armed.clear()
            truncate_train_caches(cache_dir)
        return chunk

    def watched_epoch(self, epoch, progress=False):
        ids.clear()
        out = run_epoch(self, epoch, progress)
        seen = np.sort(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
        once = bool(np.array_equal(seen, np.arange(self.raw.num_train)))
        record[epoch] = {"steps": len(ids), "every_sample_once": once}
        if opts.ids_out:
            Path(opts.ids_out).write_text(json.dumps(record))
        if opts.truncate_after == epoch:
            truncate_train_caches(cache_dir)
        return out

    Trainer._step = watched_step  # type: ignore[method-assign]
    ChunkPrefetcher.get = get_then_truncate  # type: ignore[method-assign]
    Trainer.run_epoch = watched_epoch  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
