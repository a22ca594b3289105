"""The run record: what ``train`` returns and ``--json-out`` writes.

One dict per run: the configuration, the model and data, one record per epoch
(the trainer's, with the feed's cache statistics) and a ``final`` summary:
test accuracy, wall-clock, the share of training spent waiting for data,
peak RSS, the schedule's freeze iterations, the feed's report (boundaries,
cache events, bytes) and, under torchrun, every rank's cache bytes and events.

Apart from the loop because it changes for other reasons: the benchmarks,
``compare`` and the docs read these fields; the loop only produces them.
"""

from __future__ import annotations

import resource
from typing import Any

import prefast.distributed as distributed
from prefast.config import TrainConfig
from prefast.data.sources import RawSource, data_share
from prefast.distributed import Dist
from prefast.freezing.adaptive import AutoFreezeSchedule
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.models import StagedModel


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_record(
    cfg: TrainConfig,
    model: StagedModel,
    model_name: str,
    raw: RawSource,
    history: list[dict],
    schedule: FreezeOutSchedule | AutoFreezeSchedule,
    dist: Dist,
    report: dict[str, Any],
    *,
    wall_s: float,
    feed_setup_s: float,
) -> dict:
    """The record of a finished run. Under torchrun every rank calls it (it gathers)."""
    rank_bytes = distributed.gather(dist, report.get("cache_peak_bytes", 0))
    per_rank_events = (
        {"rank_cache_events": distributed.gather(dist, report["cache_events"])}
        if dist.enabled and "cache_events" in report
        else {}
    )
    return {
        "config": cfg.to_json(),
        "model": {"name": model_name, "num_stages": model.num_stages},
        "data": {"name": raw.name, "train": raw.num_train, "test": raw.num_test},
        "epochs": history,
        "final": {
            "test_acc": history[-1]["test_acc"] if history else None,
            "wall_s": wall_s,
            "feed_setup_s": feed_setup_s,
            "data_share": data_share(history),  # of train_s spent waiting for data
            "peak_rss_mb": peak_rss_mb(),
            "batches_per_epoch": raw.batches_per_epoch,
            "freeze_iters": [schedule.freeze_iter(i) for i in range(model.num_stages)],
            # --freeze auto: each decision that froze stages (iteration, stages, rates)
            **(
                {"freeze_decisions": schedule.decisions}
                if isinstance(schedule, AutoFreezeSchedule)
                else {}
            ),
            "world_size": dist.world,
            "rank_cache_bytes": rank_bytes,
            **report,
            # under torchrun: every rank's own cache events (tiers, dtypes and faults are
            # per rank; ``cache_events`` above are rank 0's)
            **per_rank_events,
        },
    }
