"""A candidate boundary priced in the tier it would land in: planner and governor decide
together.

The planner (``costmodel.plan_boundaries``) asks a :class:`Pricer` for each candidate;
the pricer asks the governor which tier and dtype it would give the boundary, next to
what the boundaries planned before it hold (a scratch copy of the governor's ledger:
planning holds nothing real), and prices it at that tier's measured bandwidths
(``bandwidth.py``). A boundary that fits GPU memory is priced at device speed, one that
fits only RAM at host (or pinned host-to-device) speed, one that goes to disk at the
disk's: it is planned where it pays, and the run record says for every candidate which
tier, what it saves and what it costs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

import prefast.distributed as distributed
from prefast.caching import bandwidth
from prefast.caching.bandwidth import Bandwidths
from prefast.caching.costmodel import Boundary, StageCost, TierPrice
from prefast.caching.governor import ZSTD_PAYS, Governor, lossy_candidates
from prefast.config import TrainConfig
from prefast.distributed import Dist
from prefast.store import encoding
from prefast.store.manage import Root

if TYPE_CHECKING:
    from prefast.data.sources import RawSource


class Pricer:
    """``stage -> TierPrice`` for :func:`costmodel.plan_boundaries` (see the module doc)."""

    def __init__(
        self,
        governor: Governor,
        costs: list[StageCost],
        dtype: str,
        rows: tuple[int, int],
        views: int,
        batches_per_epoch: float,
        lossy: tuple[str, ...] = (),
    ):
        self.governor = copy.deepcopy(governor)
        self.costs, self.dtype, self.rows, self.views = costs, dtype, rows, views
        self.batches, self.lossy = batches_per_epoch, lossy
        self.held: str | None = None

    @property
    def bandwidths(self) -> Bandwidths:
        return self.governor.bandwidths

    def __call__(self, stage: int) -> TierPrice:
        d = self.governor.choose_boundary(
            self.costs, stage, self.dtype, self.rows, self.views, self.batches,
            lossy=self.lossy, quiet=True,
        )  # fmt: skip
        out = self.costs[stage - 1]
        compressed = d.tier == "zarr" and out.ratio(d.dtype) >= ZSTD_PAYS
        write_bw, read_bw = (
            (0.0, 0.0) if d.tier == "recompute" else self.bandwidths.of(d.tier, compressed)
        )
        row = encoding.row_bytes(out.out_shape, d.dtype or self.dtype)
        return TierPrice(d.tier, d.dtype, row, write_bw, read_bw, d.bytes, d.reason)

    def take(self, stage: int, price: TierPrice) -> None:
        if price.tier == "recompute":
            return
        if self.held is not None:  # a new boundary replaces the one before it, once complete
            self.governor.release(self.held)
        self.held = f"train@{stage}"
        self.governor.hold(self.held, price.tier, price.bytes)


def candidate_rows(considered: list[Boundary]) -> list[dict]:
    """Every candidate boundary for the run record: epoch, stage, tier, dtype, bytes,
    saving and cost in seconds, taken or not and why."""
    keep = ("epoch", "stage", "tier", "dtype", "bytes", "saving_s", "cost_s", "taken", "why")
    rows = []
    for b in considered:
        row = {k: v for k, v in asdict(b).items() if k in keep}
        row["saving_s"] = round(b.saving_s, 4)
        row["cost_s"] = None if b.cost_s == float("inf") else round(b.cost_s, 4)
        rows.append(row)
    return rows


def stage_cost_rows(costs: list[StageCost]) -> list[dict]:
    """The probe's costs as JSON (``prefast plan --costs-from`` reads them back); a time not
    measured (a training run's probe times forwards only) is null, not NaN."""
    rows = [asdict(c) for c in costs]
    for r in rows:
        if math.isnan(r["fwd_bwd_s"]):
            r["fwd_bwd_s"] = None
    return rows


def costs_from_rows(rows: list[dict]) -> list[StageCost]:
    """Stage costs from ``stage_cost_rows``'s JSON (a ``KeyError``, ``TypeError`` or
    ``ValueError`` on a malformed row: the caller names the file)."""
    return [
        StageCost(
            fwd_s=float(r["fwd_s"]),
            fwd_bwd_s=float(r["fwd_bwd_s"]) if r.get("fwd_bwd_s") is not None else float("nan"),
            out_row_bytes=int(r["out_row_bytes"]),
            out_shape=tuple(int(n) for n in r["out_shape"]),
            compress_ratio=float(r.get("compress_ratio", 1.0)),
            trials=tuple((str(d), float(e), float(q)) for d, e, q in r.get("trials", ())),
        )
        for r in rows
    ]


def pricer_for(
    governor: Governor, cfg: TrainConfig, raw: RawSource, costs: list[StageCost], dtype: str,
    views: int,
) -> Pricer:  # fmt: skip
    """A :class:`Pricer` for a run's boundaries, from what ``governor`` holds now."""
    batches = raw.batches_per_epoch + math.ceil(raw.num_test / cfg.batch_size)
    rows = (raw.num_train, raw.num_test)
    return Pricer(governor, costs, dtype, rows, views, batches, lossy_candidates(cfg.cache_dtype))


def planned_on(governor: Governor) -> dict:
    """The device type and the room each tier has now, for ``pricing_record``."""
    return {"device": governor.device.type, "rooms": governor.report()}


def run_bandwidths(
    cfg: TrainConfig, device: torch.device, dtype: str, root: Root, ctx: Dist, resume: dict
) -> Bandwidths:
    """The run's bandwidths (``bandwidth.for_run``), the same on every rank: the main
    rank's; a resumed run keeps those its first part priced with."""
    bw = None
    if ctx.is_main:  # every rank takes the main rank's, resumed or not: one plan for all
        kept = resume.get("bandwidths")
        bw = (
            Bandwidths.from_json(kept, "kept by the checkpoint")
            if kept is not None
            else bandwidth.for_run(cfg.bandwidths, device, dtype, root)
        )
    return distributed.broadcast(ctx, bw)


def pricing_record(
    bw: Bandwidths, costs: list[StageCost], considered: list[Boundary], planned_on: dict
) -> dict:
    """What the plan was priced with, for the run record: the device and the room each
    tier had (``--costs-from`` plans with them), the bandwidths, each stage's measured
    costs and every candidate boundary."""
    return {
        **planned_on,  # device, rooms
        "bandwidths": bw.to_json(),
        "stage_costs": stage_cost_rows(costs),
        "candidates": candidate_rows(considered),
    }
