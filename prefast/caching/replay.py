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
    plan = _plan_in(doc)
    if not isinstance(plan, list):
        raise ConfigError(f"--plan-from {path} holds no prefast plan: {hint}")
    out = []
    for b in plan:
        if not (isinstance(b, dict) and {"epoch", "stage", "tier", "dtype"} <= set(b)):
            raise ConfigError(f"--plan-from {path}: a boundary lacks epoch, stage, tier or dtype")
        for field in ("epoch", "stage"):  # a fraction is not truncated in silence
            if not _whole(b[field]):
                raise ConfigError(
                    f"--plan-from {path}: a boundary's {field} is {b[field]!r}, not a whole "
                    f"number: plans count {field}s from 0 (as `prefast plan --json` writes them)"
                )
        out.append({"epoch": int(b["epoch"]), "stage": int(b["stage"]), "tier": b["tier"],
                    "dtype": b["dtype"]})  # fmt: skip
    return out


def _plan_in(doc: object) -> object:
    """The boundary list of a run record, a compare record or ``prefast plan --json``."""
    if not isinstance(doc, dict):
        return None
    runs = doc.get("runs")
    if isinstance(runs, dict):  # a compare record: its prefast run
        doc = runs.get("prefast")
        if not isinstance(doc, dict):
            return None
    final = doc.get("final")
    if isinstance(final, dict) and "plan" in final:
        return final["plan"]
    return doc.get("boundaries")


def _whole(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def check_plan(plan: list[dict], schedule: Schedule, batches_per_epoch: int, epochs: int) -> None:
    """Each boundary must fit this run: an epoch it has, a prefix frozen by then."""
    for b in plan:
        epoch, stage = b["epoch"], b["stage"]
        frozen = schedule.frozen_prefix(epoch * batches_per_epoch) if 0 <= epoch < epochs else 0
        # The feed caches the whole prefix frozen at an epoch's start: a boundary replays
        # only where its stage is exactly that prefix (a shallower one would never be
        # looked up, and the governor would pick its own tier and dtype in silence).
        if not (0 <= epoch < epochs and 1 <= stage == frozen):
            raise ConfigError(
                f"--plan-from: the boundary after stage {stage} at epoch {epoch} (0-based) does "
                f"not fit this run ({epochs} epochs; {frozen} stages frozen at that epoch's "
                "start): replay a plan with the --epochs, --t0, --scale and --model it was made "
                "with, or drop --plan-from"
            )
        if b["tier"] not in TIERS or (b["tier"] != "recompute" and b["dtype"] not in DTYPES):
            raise ConfigError(
                f"--plan-from: boundary at epoch {epoch} has tier {b['tier']!r}, dtype "
                f"{b['dtype']!r}: not a tier and cache dtype this PreFast knows"
            )
