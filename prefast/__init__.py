"""PreFast: progressively freeze early layers (FreezeOut) and stream their cached outputs.

Public API::

    from prefast import TrainConfig, train, FreezeOutSchedule, build_model
    result = train(TrainConfig(mode="prefast", dataset="digits", model="densenet-bc", depth=16))
    result = train(cfg, model=my_module, train_data=train_ds, test_data=test_ds)

The activation store is :mod:`prefast.store`; the command line is :mod:`prefast.cli`.
"""

from prefast.compare import compare
from prefast.config import TrainConfig
from prefast.errors import (
    CacheCorruptedError,
    CacheError,
    CacheLockedError,
    CacheUnavailableError,
    ConfigError,
    DataUnavailableError,
    DiskFullError,
    PrefastError,
)
from prefast.models import StagedModel, build_model, from_sequential, from_torchvision_resnet
from prefast.schedule import FreezeOutSchedule
from prefast.store.order import batch_slices, epoch_order
from prefast.trainer import train

__version__ = "0.1.0"
__all__ = [
    "CacheCorruptedError",
    "CacheError",
    "CacheLockedError",
    "CacheUnavailableError",
    "ConfigError",
    "DataUnavailableError",
    "DiskFullError",
    "FreezeOutSchedule",
    "PrefastError",
    "StagedModel",
    "TrainConfig",
    "batch_slices",
    "compare",
    "build_model",
    "epoch_order",
    "from_sequential",
    "from_torchvision_resnet",
    "train",
]
