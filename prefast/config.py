"""Run configuration: one frozen dataclass, validated once at the edge."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prefast.data.datasets import AUGMENTS, DATASETS
from prefast.data.normalize import NORMALIZE
from prefast.errors import ConfigError
from prefast.freezing.adaptive import FREEZE_RULES
from prefast.freezing.schedule import SCALES
from prefast.models import MODELS, is_library_model
from prefast.store.encoding import DTYPES

MODES = ("baseline", "freezeout", "prefast")
TIERS = ("auto", "gpu", "ram", "mmap", "zarr")
CACHE_DTYPES = ("auto", *DTYPES)  # store/encoding.py says what each stores
BOUNDARY_POLICIES = ("auto", "every")  # the cost model's choice, or every stage boundary
FEATURE_OPS = ("shift", "flip", "mix")  # prefast/caching/feature_augment.py applies them
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def setting(name: str, value: object) -> str:
    """A setting as both of its users know it, for messages and run records: the
    ``TrainConfig`` field and the command line's flag (``cache_tier='zarr' (--cache-tier
    zarr)``), so a reason read by a Python caller does not name a flag alone."""
    return f"{name}={value!r} (--{name.replace('_', '-')} {value})"


def parse_size(text: str | int | None, field: str = "size") -> int | None:
    """'64MB', '1.5GiB', '2G', '1024' -> bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{field}={text!r} is not a size: write e.g. 512MB, 2GB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_ops(text: str) -> tuple[str, ...]:
    """'shift,flip' -> ('shift', 'flip'); '' -> (); an unknown op is a ConfigError."""
    ops = tuple(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
    bad = [o for o in ops if o not in FEATURE_OPS]
    if bad:
        raise ConfigError(
            f"--feature-augment {text!r}: {', '.join(bad)} is not an op; choose from "
            + ", ".join(FEATURE_OPS)
            + " (comma-separated, e.g. shift,flip)"
        )
    return ops


def clock_flags_refused(flags: list[str]) -> ConfigError:
    """The one line for FreezeOut's schedule flags given with ``--freeze auto``."""
    one = len(flags) == 1
    return ConfigError(
        f"{' and '.join(flags)} set{'s' if one else ''} FreezeOut's clock, which --freeze auto "
        "does not follow (stages freeze when their gradients settle; the rest share one "
        f"cosine rate): drop {'it' if one else 'them'}, or use --freeze freezeout"
    )


def rule_flags_refused() -> ConfigError:
    """The one line for ``--freeze auto``'s flags given without it."""
    return ConfigError(
        "--freeze-interval and --freeze-percentile set --freeze auto's rule: add "
        "--freeze auto, or drop them"
    )


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw])\s*", text)
    if not m:
        raise ConfigError(f"duration {text!r} is not valid: write e.g. 7d, 12h or 30m")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * scale


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Invalid fields raise ConfigError."""

    mode: str = "prefast"  # FreezeOut's schedule, and the frozen stages' outputs cached
    model: str = "densenet-bc"
    dataset: str = "synthetic"
    depth: int | None = None
    growth_rate: int = 12
    width: int = 4
    weights: str | None = None  # a state dict or checkpoint file to start from
    pretrained: bool = False  # the model library's own default weights (torchvision:, timm:)
    normalize: str = "data"  # input statistics: the training set's, or ImageNet's
    freeze_prefix: int | str = 0  # stages frozen from the first iteration, or "all" (probe)
    epochs: int = 10
    batch_size: int = 64
    freeze: str = "freezeout"  # FreezeOut's fixed clock, or "auto": AutoFreeze's gradient rule
    freeze_interval: int | None = None  # auto: iterations per decision (None: a quarter epoch)
    freeze_percentile: float = 50.0  # auto: freeze below this percentile of change rates
    t0: float = 0.8
    scale: str = "cubic"
    scale_lr: bool = True
    lr: float = 0.1
    seed: int = 0
    device: str = "auto"
    data_dir: str = "data"
    subset: int | None = None
    synthetic_size: tuple[int, int] = (50_000, 10_000)
    # standard for built-in datasets (none with freeze_prefix="all": a linear probe reads one
    # cached view of its features), none (your transform) for yours
    augment: str = "auto"
    image_size: int | None = None  # imagefolder: resize to N x N
    workers: int | None = None  # DataLoader processes for dataset objects (None: cores - 1)
    checkpoint: str | None = None
    plan_from: str | None = None  # prefast: replay this JSON's boundaries, tiers and dtypes
    # prefast: each tier's speed for pricing boundaries (caching/bandwidth.py): None = kept
    # beside the caches or measured, 'measure' = measured now, PATH = pinned from a file
    bandwidths: str | None = None
    resume: bool = False
    # prefast mode
    cache_dir: str | None = None
    cache_tier: str = "auto"
    cache_dtype: str = "auto"
    cache_views: int = 1
    feature_augment: str = ""  # ops on cached activations: shift, flip, mix (comma-separated)
    cache_boundaries: str = "auto"
    max_ram: int | None = None
    max_gpu_mem: int | None = None
    max_disk: int | None = None
    # an s3:// cache dir: a local copy of the chunks read, at most local_cache_size bytes
    local_cache: str | None = None
    local_cache_size: int | None = None
    # GPU habits (CUDA only; each can be switched off)
    amp: bool = True  # bf16 autocast for the step, evaluation and the prefix run
    channels_last: bool = True  # model and inputs in channels_last layout
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels for the fixed shapes
    deterministic: bool = False  # deterministic kernels: the same numbers on every run
    # torchrun
    dist_timeout: float = 300.0  # seconds a collective may wait before the run fails
    check_replicas: bool = False  # compare every rank's weights after each epoch

    def __post_init__(self) -> None:
        choices = {
            "mode": MODES,
            "freeze": FREEZE_RULES,
            "dataset": DATASETS,
            "scale": tuple(SCALES),
            "augment": ("auto", *AUGMENTS),
            "cache_tier": TIERS,
            "cache_dtype": CACHE_DTYPES,
            "cache_boundaries": BOUNDARY_POLICIES,
            "device": ("auto", "cpu", "cuda"),
            "normalize": NORMALIZE,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value!r} is not valid: choose one of "
                    + ", ".join(allowed)
                )
        if self.model not in MODELS and not is_library_model(self.model):
            raise ConfigError(
                f"--model {self.model!r} is not valid: choose one of {', '.join(MODELS)} or "
                "torchvision:NAME or timm:NAME (e.g. torchvision:resnet50)"
            )
        prefix = self.freeze_prefix
        digits = isinstance(prefix, str) and prefix.isascii() and prefix.isdigit()
        if isinstance(prefix, bool) or not (isinstance(prefix, int) or prefix == "all" or digits):
            raise ConfigError(
                f"--freeze-prefix {prefix!r} is not valid: a number of stages "
                "(0: none) or all (every stage but the head: a linear probe)"
            )
        if digits:
            object.__setattr__(self, "freeze_prefix", int(prefix))
        if isinstance(self.freeze_prefix, int) and self.freeze_prefix < 0:
            raise ConfigError(f"--freeze-prefix {self.freeze_prefix} must be >= 0")
        where: Path | str | None = None
        if self.cache_dir is not None or os.environ.get("PREFAST_CACHE_DIR"):
            where = resolved_cache_dir(self.cache_dir, setting("cache_dir", self.cache_dir))
            if isinstance(where, str) and self.cache_tier == "mmap":
                raise ConfigError(
                    f"--cache-tier mmap maps a local file; the cache dir {where} is an object "
                    "store: use --cache-tier zarr (or auto), or a local --cache-dir"
                )
        if self.local_cache is not None:
            local_dir(self.local_cache, setting("local_cache", self.local_cache))
            if not isinstance(where, str):
                raise ConfigError(
                    f"--local-cache {self.local_cache} keeps local copies of what a run reads "
                    "from an s3:// --cache-dir; this run's cache dir is local already: drop it"
                )
        positive = ("epochs", "batch_size", "growth_rate", "width", "cache_views")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if not 0.0 < self.t0 <= 1.0:
            raise ConfigError(f"--t0 {self.t0} must be in (0, 1]; FreezeOut's default is 0.8")
        self._check_freeze_rule()
        if self.dist_timeout <= 0:
            raise ConfigError(
                f"--dist-timeout {self.dist_timeout} must be a positive number of seconds"
            )
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} must be positive")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(
                f"--workers {self.workers} must be >= 0 (0: load in the main process)"
            )
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size {self.image_size} must be a positive pixel count")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"--subset {self.subset} must be a positive sample count")
        if min(self.synthetic_size) < 1:
            train, test = self.synthetic_size
            raise ConfigError(
                f"--synthetic-size {train},{test}: the training and the test set each need at "
                "least one sample, e.g. --synthetic-size 2048,512"
            )
        if parse_ops(self.feature_augment) and self.mode != "prefast":
            raise ConfigError(
                f"--feature-augment {self.feature_augment} augments cached activations: it "
                "needs --mode prefast"
            )
        if self.resume and not self.checkpoint:
            raise ConfigError("--resume needs --checkpoint PATH (the file to resume from)")
        for name in ("max_ram", "max_gpu_mem", "max_disk", "local_cache_size"):
            value = getattr(self, name)
            if isinstance(value, str):  # "4GB" from Python too, as the CLI takes it
                value = parse_size(value, name)
                object.__setattr__(self, name, value)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive size")

    def _check_freeze_rule(self) -> None:
        """``--freeze auto`` decides freeze points from gradients: FreezeOut's clock settings
        mean nothing to it, and baseline freezes nothing."""
        if self.freeze_interval is not None and self.freeze_interval < 1:
            raise ConfigError(f"--freeze-interval {self.freeze_interval} must be >= 1 iteration")
        if not 0.0 < self.freeze_percentile <= 100.0:
            raise ConfigError(
                f"--freeze-percentile {self.freeze_percentile} must be in (0, 100]; "
                "AutoFreeze's median is 50"
            )
        if self.freeze != "auto":
            if self.freeze_interval is not None or self.freeze_percentile != 50.0:
                raise rule_flags_refused()
            return
        if self.mode == "baseline":
            raise ConfigError(
                "--freeze auto freezes stages as they stop learning, and baseline mode freezes "
                "nothing: use --mode freezeout or prefast with it (or drop --freeze auto)"
            )
        clock = [
            flag
            for flag, value, default in (
                ("--t0", self.t0, 0.8),
                ("--scale", self.scale, "cubic"),
                ("--no-scale-lr", self.scale_lr, True),
            )
            if value != default
        ]
        if clock:
            raise clock_flags_refused(clock)
        if self.plan_from:
            raise ConfigError(
                "--plan-from replays boundaries planned from a fixed schedule, but --freeze auto "
                "decides them during the run: drop --plan-from (or use --freeze freezeout)"
            )

    def for_mode(self, mode: str) -> TrainConfig:
        """This configuration in ``mode``; baseline drops ``--freeze auto`` (it freezes
        nothing), so ``compare`` and ``plan`` can put the three modes side by side."""
        if mode == "baseline" and self.freeze == "auto":
            return self.replace(
                mode=mode, freeze="freezeout", freeze_interval=None, freeze_percentile=50.0
            )
        return self.replace(mode=mode)

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def local_dir(text: str, named: str) -> Path:
    """``text`` as a local directory; a URL (``s3://bucket/prefix``) is refused in one line:
    caches live on a local or mounted filesystem until an object-store tier exists (a URL
    taken as a path would write a folder named ``s3:`` in the current directory)."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise ConfigError(
            f"{named}: {scheme.group(1)}:// URLs are not supported yet (caches live on "
            "a local or mounted filesystem): pass a directory, e.g. a mount of the bucket"
        )
    return Path(text)


def cache_location(text: str, named: str) -> Path | str:
    """A cache root as given: a local directory, or ``s3://BUCKET/PREFIX`` (checked here,
    opened by ``store.objectstore.ObjectRoot``); any other URL is refused in one line."""
    from prefast.store.objectstore import is_url, parse_url

    if is_url(text):
        parse_url(text, named)
        return text
    return Path(text)


def cache_root(cache_dir: str | None, cfg: TrainConfig | None = None):  # type: ignore[no-untyped-def]
    """The run's cache root: ``--cache-dir`` (a directory or an ``s3://`` prefix), else
    ``default_cache_dir()``; a ``CacheRoot`` or an ``ObjectRoot``, one interface. ``cfg``'s
    ``--local-cache`` keeps copies of what is read from an object store."""
    from prefast.store import CacheRoot
    from prefast.store.local_copies import LocalCopies
    from prefast.store.objectstore import ObjectRoot

    where = resolved_cache_dir(cache_dir)
    if isinstance(where, str):
        local = cfg.local_cache if cfg is not None else None
        copies = LocalCopies(local, cfg.local_cache_size) if cfg and local else None
        return ObjectRoot(where, local=copies)
    return CacheRoot(where)


def resolved_cache_dir(cache_dir: str | None, named: str = "--cache-dir") -> Path | str:
    """Where a run's caches live: ``cache_dir``, else $PREFAST_CACHE_DIR (either may be an
    ``s3://`` prefix, returned as the string), else ``default_cache_dir()``."""
    if cache_dir:
        return cache_location(cache_dir, named)
    if env := os.environ.get("PREFAST_CACHE_DIR"):
        return cache_location(env, "PREFAST_CACHE_DIR")
    return default_cache_dir()


def default_cache_dir() -> Path:
    """--cache-dir, else $PREFAST_CACHE_DIR, else $XDG_CACHE_HOME/prefast (~/.cache/prefast)."""
    import os

    if env := os.environ.get("PREFAST_CACHE_DIR"):
        return local_dir(env, f"PREFAST_CACHE_DIR={env}")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefast"
