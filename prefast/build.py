"""Names to objects: the device, dataset, model and schedule a config asks for.

The trainer, the planner and ``compare`` build their runs through these, so
a config means the same run everywhere.
"""

from __future__ import annotations

import torch

from prefast.config import TrainConfig
from prefast.data import Dataset, load_dataset
from prefast.errors import ConfigError
from prefast.models import StagedModel, build_model
from prefast.schedule import FreezeOutSchedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible: use --device cpu"
        )
    return torch.device(name)


def load_for(cfg: TrainConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.subset, cfg.seed, cfg.synthetic_size)


def model_for(cfg: TrainConfig, ds_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    c, h, _ = ds_shape
    return build_model(
        cfg.model,
        in_channels=c,
        num_classes=num_classes,
        image_size=h,
        depth=cfg.depth,
        growth_rate=cfg.growth_rate,
        width=cfg.width,
    )


def schedule_for(cfg: TrainConfig, num_stages: int, batches_per_epoch: int) -> FreezeOutSchedule:
    # Baseline = t0 of 1: no stage freezes early, every stage anneals over the run.
    baseline = cfg.mode == "baseline"
    return FreezeOutSchedule(
        num_stages,
        cfg.epochs * batches_per_epoch,
        t0=1.0 if baseline else cfg.t0,
        scale=cfg.scale,
        scale_lr=cfg.scale_lr and not baseline,
        base_lr=cfg.lr,
    )
