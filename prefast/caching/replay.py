"""Replaying a plan: a run's boundaries, tiers and dtypes, taken again (``--plan-from``).

The plan of a prefast run follows timing probes and free memory, so the same
command can cache other boundaries on another run (or inside ``compare``), and
with a lossy dtype other boundaries give other numbers. A plan replayed from a
run record, a ``compare`` record or ``prefast plan --json`` fixes them: the
boundaries are materialized at the same epochs after the same stages, in the
same dtype, in the same tier when its budget allows (else recomputed, and the
event says why). With ``--seed`` fixed that repeats a CPU run exactly (on a GPU,
add ``--deterministic``).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefast.caching.costmodel import Schedule
from prefast.errors import ConfigError
from prefast.store.encoding import DTYPES

TIERS = ("gpu", "ram", "mmap", "zarr", "recompute")


def load_plan(path: str) -> list[dict]:
    """The planned boundaries a JSON document holds: a run record (``--json-out``), a
    ``compare`` record (its prefast run) or ``prefast plan --json``."""
    hint = "pass a run record (--json-out), a compare record or `prefast plan --json` output"
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--plan-from {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError:
        raise ConfigError(f"--plan-from {path} is not JSON: {hint}") from None
    if isinstance(doc, dict) and "runs" in doc:
        doc = doc["runs"].get("prefast") or {}
    plan = doc.get("final", {}).get("plan") if isinstance(doc, dict) else None
    if plan is None and isinstance(doc, dict):
        plan = doc.get("boundaries")
    if not isinstance(plan, list):
        raise ConfigError(f"--plan-from {path} holds no prefast plan: {hint}")
    try:
        return [
            {"epoch": int(b["epoch"]), "stage": int(b["stage"]), "tier": b["tier"],
             "dtype": b["dtype"]}
            for b in plan
        ]  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"--plan-from {path}: a boundary lacks epoch, stage, tier or dtype"
        ) from None


def check_plan(plan: list[dict], schedule: Schedule, batches_per_epoch: int, epochs: int) -> None:
    """Each boundary must fit this run: an epoch it has, a prefix frozen by then."""
    for b in plan:
        epoch, stage = b["epoch"], b["stage"]
        frozen = schedule.frozen_prefix(epoch * batches_per_epoch) if epoch < epochs else 0
        if not (0 <= epoch < epochs and 1 <= stage <= frozen):
            raise ConfigError(
                f"--plan-from: a boundary after stage {stage} at epoch {epoch} (0-based) does "
                f"not fit this run ({epochs} epochs; {frozen} stages frozen then): was the plan "
                "made with other --epochs, --t0 or --model?"
            )
        if b["tier"] not in TIERS or (b["tier"] != "recompute" and b["dtype"] not in DTYPES):
            raise ConfigError(
                f"--plan-from: boundary at epoch {epoch} has tier {b['tier']!r}, dtype "
                f"{b['dtype']!r}: not a tier and cache dtype this PreFast knows"
            )
