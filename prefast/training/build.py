"""Names to objects: the device, data, model and schedule of a run.

``train(cfg)`` and ``train(cfg, model=..., train_data=..., test_data=...)``
meet here: names from the config become the same kind of objects a user
passes (a StagedModel, two map-style Datasets), and both go through
:func:`build_run` into the one trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from prefast.config import TrainConfig, cache_root
from prefast.data.datasets import Splits, TensorImageDataset, load_dataset
from prefast.data.sources import RawSource, TensorSource
from prefast.distributed import SINGLE, Dist
from prefast.errors import CacheUnavailableError, ConfigError
from prefast.freezing.adaptive import AutoFreezeSchedule, default_interval
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.models import StagedModel, as_staged_model, build_model
from prefast.models.staged import remember_state
from prefast.store.device import canonical, is_accelerator
from prefast.store.objectstore import ObjectRoot

log = logging.getLogger("prefast")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible: use --device cpu"
        )
    return canonical(name)  # cuda:N, as its tensors report themselves


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """Options that need a GPU fail here, before any data is loaded or epoch trained."""
    if is_accelerator(device):
        return
    where = "no CUDA GPU is visible" if not torch.cuda.is_available() else "--device is cpu"
    if cfg.cache_tier == "gpu":
        raise ConfigError(
            f"--cache-tier gpu keeps caches in the training GPU's memory, but {where}: "
            "use --cache-tier ram (or auto)"
        )
    if cfg.max_gpu_mem is not None:
        raise ConfigError(
            f"--max-gpu-mem budgets the training GPU's memory, but {where}: drop it "
            "(--max-ram and --max-disk budget the other tiers)"
        )


def deterministic_kernels(on: bool) -> None:
    """``--deterministic`` on CUDA: kernels whose sums do not depend on thread timing, so
    two runs of one command give the same numbers (without it, atomics in the backward
    pass make every run differ in the last bits, and training amplifies that). cuBLAS
    needs a fixed workspace for it; an op with no deterministic kernel warns, naming
    itself, instead of failing the run. Off, the process's own settings stay as they are."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at each call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True


def check_not_empty(train: Dataset, test: Dataset, name: str | None = None) -> None:
    """An empty split would train nothing or report accuracy 0.0: refuse it, naming it."""
    for split, ds in (("training", train), ("test", test)):
        if len(ds) == 0:  # type: ignore[arg-type]
            raise ConfigError(
                f"the {split} set of {name or type(ds).__name__} is empty (0 samples): give it "
                "at least one sample (for synthetic data, --synthetic-size TRAIN,TEST, both > 0)"
            )


def built_in_augment(cfg: TrainConfig) -> TrainConfig:
    """``augment="auto"`` (the default) for a built-in dataset: the standard crop and flip,
    or none for a linear probe (``freeze_prefix="all"``), whose features are computed once
    and cached: one augmented view would be the same crop in every epoch."""
    if cfg.augment != "auto":
        return cfg
    return cfg.replace(augment="none" if cfg.freeze_prefix == "all" else "standard")


def load_for(cfg: TrainConfig) -> Splits:
    """The (train, test) datasets ``cfg.dataset`` names."""
    cfg = built_in_augment(cfg)
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        cfg.subset,
        cfg.seed,
        cfg.synthetic_size,
        image_size=cfg.image_size,
        augment=cfg.augment,
        normalize=cfg.normalize,
    )


def source_for(
    cfg: TrainConfig,
    train: Dataset,
    test: Dataset,
    device: torch.device,
    data_id: str | None = None,
    ctx: Dist = SINGLE,
) -> RawSource:
    """In-memory built-in splits are served from device memory; any other dataset
    goes through a DataLoader. Under torchrun each rank reads only its shard."""
    r, w = ctx.rank, ctx.world
    if isinstance(train, TensorImageDataset) and isinstance(test, TensorImageDataset):
        return TensorSource(train, test, cfg.batch_size, cfg.seed, cfg.augment, device, r, w)
    from prefast.data.loader import LoaderSource

    return LoaderSource(
        train, test, cfg.batch_size, cfg.seed, device, cfg.workers, data_id, rank=r, world=w
    )


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
        # a resumed run's weights are its checkpoint's: the file need not be there again
        weights=None if resuming(cfg) else cfg.weights,
        pretrained=cfg.pretrained and not resuming(cfg),
    )


def resuming(cfg: TrainConfig) -> bool:
    return bool(cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists())


def check_cache_dir(cfg: TrainConfig) -> None:
    """A prefast run's cache dir must be a writable directory (created if missing): refused
    here, before any training, instead of each boundary failing and the run going on as
    FreezeOut."""
    root = cache_root(cfg.cache_dir)
    if isinstance(root, ObjectRoot):  # one request: a wrong bucket or key fails here
        try:
            root.check()
        except CacheUnavailableError as exc:
            raise ConfigError(f"--cache-dir {root.path} cannot be listed: {exc.detail}") from None
        return
    path = root.path
    name = f"--cache-dir {path}" if cfg.cache_dir else f"the cache dir {path}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name} is not a directory: pass a directory (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{name} cannot be created ({exc.strerror}): pass a writable directory"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} is not writable: pass a directory this process may write")


def build_run(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    data_id: str | None = None,
    ctx: Dist = SINGLE,
) -> tuple[TrainConfig, StagedModel, RawSource]:
    """The run's config (as recorded), model on its device, and raw data source."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per rank
    check_device_options(cfg, device)
    if cfg.mode == "prefast":
        check_cache_dir(cfg)
    if (train_data is None) != (test_data is None):
        raise ConfigError("pass both train_data and test_data (or neither, to use cfg.dataset)")
    if train_data is None or test_data is None:
        cfg = built_in_augment(cfg)
        train_data, test_data = load_for(cfg)
        check_not_empty(train_data, test_data, cfg.dataset)
    else:
        check_not_empty(train_data, test_data, data_id)
        applied = getattr(train_data, "augment_applied", None)  # our imagefolder's
        if cfg.augment == "auto":  # not asked for: as the data comes (your transform)
            standard = isinstance(train_data, TensorImageDataset)
            probe = cfg.freeze_prefix == "all"  # as built_in_augment: a probe's view is fixed
            cfg = cfg.replace(augment="standard" if standard and not probe else applied or "none")
        elif (
            not isinstance(train_data, TensorImageDataset)
            and cfg.augment != "none"
            and applied != cfg.augment
        ):
            log.warning(
                "augment=%r is ignored for your own datasets: their transform is the augmentation",
                cfg.augment,
            )
            cfg = cfg.replace(augment="none")
        # Loaded by name (compare loads once, then passes the splits): normalized already.
        normalized = getattr(train_data, "normalize_applied", None) == cfg.normalize
        if cfg.normalize != "data" and not normalized:
            log.warning("normalize=%r is ignored for your own datasets: their transform "
                        "normalizes", cfg.normalize)  # fmt: skip
    source = source_for(cfg, train_data, test_data, device, data_id, ctx)
    if model is None:
        torch.manual_seed(cfg.seed)  # the same initial weights in every mode
        staged = model_for(cfg, *shape_and_classes(train_data))
    else:  # a model split by a rule is checked against its own forward on two samples
        two = _two_samples(train_data, model)
        staged = as_staged_model(model, check_on=two)
        check_head(staged, two, known_classes(train_data))
    return cfg, staged.to(device), source


def known_classes(ds: Dataset) -> int | None:
    """How many classes a user's dataset has, where it says so without being read: our
    datasets, a ``.classes`` list (torchvision's), a ``TensorDataset``'s label tensor."""
    if isinstance(ds, TensorImageDataset):
        return ds.num_classes
    inner = getattr(ds, "dataset", None)  # a Subset: its dataset's classes
    classes = getattr(ds, "classes", None) or getattr(inner, "classes", None)
    if classes is not None:
        return len(classes)
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2 and len(ds.tensors[1]):
        labels = ds.tensors[1]
        return int(labels.max()) + 1 if not labels.is_floating_point() else None
    return None


def check_head(staged: StagedModel, two: torch.Tensor, classes: int | None) -> None:
    """A head with fewer outputs than the data's classes cannot learn them (one line); one
    with more (a library model's 1000-class head on 3 classes) trains, but its extra
    logits are learnt as never chosen: say so, as the CLI replaces such a head."""
    if classes is None:
        return
    restore = remember_state(staged)
    staged.eval()
    try:
        with torch.no_grad():
            outputs = staged(two).shape[-1]
    finally:
        restore()
    if outputs < classes:
        raise ConfigError(
            f"the model's head gives {outputs} outputs but the data has {classes} classes: "
            f"give it a head of {classes} (e.g. timm's model.reset_classifier({classes}) or a "
            f"new nn.Linear(in_features, {classes}))"
        )
    if outputs > classes:
        log.warning(
            "the model's head gives %d outputs but the data has %d classes: it trains, but the "
            "extra %d logits only learn never to be chosen; replace the head for %d (e.g. "
            "timm's model.reset_classifier(%d), as the CLI does for --model timm:NAME)",
            outputs, classes, outputs - classes, classes, classes,
        )  # fmt: skip


def _two_samples(data: Dataset, model: nn.Module) -> torch.Tensor:
    """Two training inputs as a float batch on the model's device (the split check's)."""
    x = torch.stack([data[i][0] for i in range(min(2, len(data)))])  # type: ignore[arg-type]
    param = next(model.parameters(), None)
    x = x if x.is_floating_point() else x.float()
    return x.to(param.device) if param is not None else x


def shape_and_classes(ds: Dataset) -> tuple[tuple[int, int, int], int]:
    """Input shape and class count of a dataset, for building a zoo model on it."""
    if isinstance(ds, TensorImageDataset):
        return ds.shape, ds.num_classes
    x, _ = ds[0]
    classes = getattr(ds, "classes", None) or getattr(getattr(ds, "dataset", None), "classes", None)
    if x.dim() != 3 or classes is None:
        raise ConfigError(
            "cannot build a zoo model for this dataset (items must be (C, H, W) images and the "
            "dataset needs a .classes list): pass model= (a StagedModel or nn.Sequential)"
        )
    c, h, w = x.shape
    return (int(c), int(h), int(w)), len(classes)


def schedule_for(
    cfg: TrainConfig, num_stages: int, batches_per_epoch: int
) -> FreezeOutSchedule | AutoFreezeSchedule:
    # Baseline = t0 of 1: no stage freezes early, every stage anneals over the run (but a
    # fixed frozen prefix, which every mode keeps frozen from the first iteration).
    baseline = cfg.mode == "baseline"
    prefix = num_stages - 1 if cfg.freeze_prefix == "all" else int(cfg.freeze_prefix)
    if cfg.freeze == "auto" and not baseline:  # freeze points decided during the run
        return AutoFreezeSchedule(
            num_stages,
            cfg.epochs * batches_per_epoch,
            cfg.freeze_interval or default_interval(batches_per_epoch),
            cfg.freeze_percentile,
            base_lr=cfg.lr,
            prefix=prefix,
        )
    return FreezeOutSchedule(
        num_stages,
        cfg.epochs * batches_per_epoch,
        t0=1.0 if baseline else cfg.t0,
        scale=cfg.scale,
        scale_lr=cfg.scale_lr and not baseline,
        base_lr=cfg.lr,
        prefix=prefix,
    )
