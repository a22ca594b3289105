"""Checkpoints: written atomically by rank 0 after every epoch, read at ``--resume``.

A checkpoint holds the model and optimizer state (host copies: it loads on any
device), the epoch records so far, the configuration it was made with, the world
size, and every rank's feed state (``PrefastFeed.state``: the caches to reopen,
their tiers and dtypes, the probe's costs; tiers, auto dtypes and fault re-plans
are per rank, so each rank resumes its own). What a resumed run does with another
``--epochs`` is the trainer's business (``ResumedSchedule``); this module checks
that the rest of the configuration is the same.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from prefast.config import TrainConfig
from prefast.distributed import Dist
from prefast.errors import ConfigError
from prefast.store.device import to_host

log = logging.getLogger("prefast")

# More epochs (or fewer) may be asked for on resume; these change nothing that was trained.
MAY_CHANGE = (
    "resume", "checkpoint", "epochs", "dist_timeout", "check_replicas", "workers",
    "weights", "pretrained",  # the starting weights: a resumed run takes the checkpoint's
    "bandwidths",  # a resumed run prices with the bandwidths its first part had
)  # fmt: skip


def host_state(state: dict) -> dict:
    """A state dict (a module's or an optimizer's) with host copies of its tensors; a
    module's keeps its version metadata."""
    out = tree_map(lambda v: to_host(v) if isinstance(v, torch.Tensor) else v, state)
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Resumed:
    """What a rank takes from a checkpoint."""

    next_epoch: int
    num_frozen: int
    model: dict
    optimizer: dict
    history: list[dict]
    feed: dict | None  # this rank's feed state (rank 0's after a world size change)
    freeze_rule: dict | None = None  # --freeze auto: its decisions and running sums


def load(path: Path, cfg: TrainConfig, ctx: Dist) -> Resumed:
    """Read ``path`` for ``cfg``'s run on this rank; ConfigError (exit 2, one line) when the
    checkpoint was made with other settings or has trained more epochs than ``cfg``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = json.loads(json.dumps(state["config"]))
    mine = json.loads(json.dumps(cfg.to_json()))
    # a setting the checkpoint predates had its default then
    defaults = json.loads(json.dumps(TrainConfig().to_json()))
    changed = sorted(
        k for k in mine if k not in MAY_CHANGE and saved.get(k, defaults[k]) != mine[k]
    )
    if changed:
        raise ConfigError(
            f"checkpoint {path} was made with different settings ({', '.join(changed)}): "
            "resume with the same flags, or start a new run without --resume"
        )
    if state["next_epoch"] > cfg.epochs:
        raise ConfigError(
            f"checkpoint {path} has trained {state['next_epoch']} epochs, more than "
            f"--epochs {cfg.epochs}: resume with --epochs {state['next_epoch']} or more, "
            "or start a new run without --resume"
        )
    # This rank's own feed state; with another world size the shards are dealt again and
    # rank 0's serves (its costs; its caches are not read: resharded).
    feeds = state.get("feeds") or [state.get("feed")]  # "feed": rank 0's alone, before
    world = state.get("world", 1)
    same_world = world == ctx.world and len(feeds) == ctx.world
    if world != ctx.world:
        log.warning("checkpoint %s was written by %d process(es), resuming with %d: "
                    "resharding (the caches of the old shards are not used)",
                    path, world, ctx.world)  # fmt: skip
    return Resumed(
        next_epoch=state["next_epoch"],
        num_frozen=state["num_frozen"],
        model=state["model"],
        optimizer=state["optimizer"],
        history=state["history"],
        feed=(feeds[ctx.rank] if same_world else feeds[0]) or None,
        freeze_rule=state.get("freeze_rule"),
    )
