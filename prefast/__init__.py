"""PreFast: progressively freeze early layers (FreezeOut) and stream their cached outputs.

Public API::

    from prefast import TrainConfig, train, FreezeOutSchedule, build_model
    result = train(TrainConfig(mode="prefast", dataset="digits", model="densenet-bc", depth=16))
    result = train(cfg, model=my_module, train_data=train_ds, test_data=test_ds)

The packages, lowest layer first; each imports only the layers below it
(``tests/test_shape.py`` checks it), and each package's docstring says what it owns:

- :mod:`prefast.store` (the top-level ``store/`` folder, mapped into this namespace by
  ``setup.cfg``'s ``package_dir``): the activation store (tiers, encodings, prefetching);
  stands alone.
- :mod:`prefast.errors`: the errors a user can catch.
- :mod:`prefast.models`, :mod:`prefast.data`, :mod:`prefast.freezing`,
  :mod:`prefast.distributed`: staged models; datasets and raw batches; the freeze
  schedule; process-group helpers.
- :mod:`prefast.config`: :class:`TrainConfig`, one validated description of a run.
- :mod:`prefast.caching`: the caching policy that plans, places and moves boundaries.
- :mod:`prefast.training`: the training loop and the run around it.
- :mod:`prefast.cli` (the top-level ``cli/`` folder, mapped the same way): the ``prefast``
  command line.
"""

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
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.models import StagedModel, build_model, from_sequential, from_torchvision_resnet
from prefast.store.order import batch_slices, epoch_order
from prefast.training.compare import compare
from prefast.training.trainer import train

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
