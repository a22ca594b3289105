"""Shared CLI pieces: training flags, config building, output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from prefast.config import (
    MODES,
    TrainConfig,
    clock_flags_refused,
    parse_size,
    rule_flags_refused,
)
from prefast.data.datasets import AUGMENTS, DATASETS
from prefast.freezing.adaptive import FREEZE_RULES
from prefast.freezing.schedule import SCALES
from prefast.models import MODELS

from .cache_flags import add_cache_flags


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it or there
    is none to say (a switch, or an option whose absence means something the text says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        shown = not (d is None or d is False or d == "" or d == argparse.SUPPRESS)
        switch = action.nargs == 0  # --flag / --no-flag: the text says what it does
        if shown and not switch and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_train_flags(p: argparse.ArgumentParser, modes: bool = True) -> None:
    g = p.add_argument_group("model and data")
    if modes:
        g.add_argument(
            "--mode",
            default="prefast",
            choices=MODES,
            help="baseline: no freezing; freezeout: freeze, skip backward; "
            "prefast: also cache frozen outputs (default: %(default)s)",
        )
    g.add_argument(
        "--model",
        default="densenet-bc",
        metavar="M",
        help=f"one of {', '.join(MODELS)}, or torchvision:NAME / timm:NAME for a torchvision "
        "or timm classification model, split into stages by its structure (docs/models.md) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--dataset",
        default="synthetic",
        metavar="D",
        help=f"one of {', '.join(DATASETS)} (default: %(default)s)",
    )
    g.add_argument(
        "--depth", type=int, help="network depth (default: DenseNet-BC 76, WRN 16, others fixed)"
    )
    g.add_argument("--growth-rate", type=int, default=12, help="DenseNet-BC growth rate k")
    g.add_argument("--width", type=int, default=4, help="WRN widening factor")
    g.add_argument(
        "--freeze-prefix",
        default="0",
        metavar="K",
        help="freeze stages 0..K-1 from the first iteration (fine-tuning a backbone); all: "
        "every stage but the head (a linear probe). FreezeOut's t_i then run over the "
        "other stages (--t0 1: one cosine, no progressive freezing); in prefast mode the "
        "prefix is cached from the first epoch",
    )
    g.add_argument(
        "--normalize",
        default="data",
        choices=("data", "imagenet"),
        help="input statistics: the training set's own per-channel mean and std, or "
        "ImageNet's (what pretrained weights expect; one channel takes their mean)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from the library's own weights: torchvision's default weights from "
        "$TORCH_HOME/hub/checkpoints, timm's pretrained tag from the Hugging Face cache "
        "(downloaded when online; offline and absent: exit 2 naming the file); the "
        "classifier is replaced for the dataset's classes",
    )
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="start from these weights: a state dict or a checkpoint holding one (under "
        "state_dict, model or model_state_dict); keys must match the model's except the "
        "classifier's, which is replaced for the dataset's classes (docs/models.md)",
    )
    g.add_argument(
        "--data-dir",
        default="data",
        help="where torchvision datasets live (downloaded there when online); for "
        "imagefolder the folder holding "
        "train/<class>/* and val/<class>/* (or test/<class>/*)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="imagefolder: resize images to N x N (default: the first image's size)",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="DataLoader processes for imagefolder (default: cores - 1; 0: the main process)",
    )
    g.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="train on a seeded random subset of N training samples (default: all)",
    )
    g.add_argument(
        "--synthetic-size",
        default="50000,10000",
        metavar="TRAIN,TEST",
        help="sample counts of the synthetic set (default: %(default)s)",
    )
    g.add_argument(
        "--augment",
        default="auto",
        choices=("auto", *AUGMENTS),
        help="standard: random crop (padding 1/8 of the side) + horizontal flip; none; auto: "
        "standard, none with --freeze-prefix all (a probe's cached view: one fixed crop). "
        "Built-in datasets only: yours are augmented by their transform (default: %(default)s)",
    )
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    s.add_argument(
        "--batch-size", type=int, default=64, help="samples per step (per rank under torchrun)"
    )
    s.add_argument(
        "--freeze",
        default="freezeout",
        choices=FREEZE_RULES,
        help="when a stage freezes: freezeout, at a fixed fraction of training (--t0, "
        "--scale); auto, when its gradients stop changing (AutoFreeze's rule, decided every "
        "--freeze-interval iterations; the rest train at one cosine rate; docs/freezing.md)",
    )
    s.add_argument(
        "--freeze-interval",
        type=int,
        metavar="N",
        help="--freeze auto: iterations per decision (default: a quarter of an epoch)",
    )
    s.add_argument(
        "--freeze-percentile",
        type=float,
        metavar="P",
        help="--freeze auto: freeze the leading stages whose gradient-norm change is below "
        "the P-th percentile of all training stages' (larger freezes sooner; default: 50, "
        "AutoFreeze's median)",
    )
    s.add_argument(
        "--t0",
        type=float,
        help="FreezeOut's t_0, in (0, 1]: stage i freezes at a fraction t_i of training, "
        "t_i running from t0 (first stage) to 1 (the head) and then raised to the power "
        "--scale. With the default cubic scaling the first stage freezes at t0^3: t0 0.8 "
        "at 51%% of training, 0.5 at 12.5%%. Larger: more accuracy, less time saved "
        "(default: 0.8)",
    )
    s.add_argument(
        "--scale",
        choices=tuple(SCALES),
        help="the power t_i is raised to: linear 1, squared 2, cubic 3 (default: cubic)",
    )
    s.add_argument(
        "--no-scale-lr",
        action="store_true",
        help="do not multiply stage i's learning rate by 1/t_i (FreezeOut does, so a stage "
        "that trains for a short time moves as far; at t0 0.5 cubic that is 8x for stage 0)",
    )
    s.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="base learning rate (SGD, Nesterov momentum 0.9, cosine-annealed per stage)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial weights, the sample order and the augmentation: every mode "
        "sees the same batches",
    )
    s.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when a GPU is visible, else cpu",
    )
    s.add_argument("--checkpoint", metavar="PATH", help="save a checkpoint here after every epoch")
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint (another --epochs re-plans the later freezes)",
    )
    add_cache_flags(p)
    gpu = p.add_argument_group("GPU habits (CUDA only; on by default)")
    gpu.add_argument(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="no bf16 autocast (the step, evaluation and cache writes run in float32)",
    )
    gpu.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the model and inputs in the default (NCHW) memory layout",
    )
    gpu.add_argument(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="do not let cuDNN time and pick its fastest kernels",
    )
    gpu.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms; no cuDNN "
        "autotuning): the same command gives the same numbers on a GPU, somewhat slower "
        "(CPU runs are deterministic already)",
    )
    d = p.add_argument_group("torchrun (data parallel; see docs/distributed.md)")
    d.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a collective may wait for the other ranks before the run fails "
        "(default: %(default)s)",
    )
    d.add_argument(
        "--check-replicas",
        action="store_true",
        help="after every epoch, check that all ranks hold identical weights",
    )


def config_from_args(args: argparse.Namespace, mode: str | None = None) -> TrainConfig:
    """Every flag named like a TrainConfig field fills it; four need converting."""
    try:
        sizes = tuple(int(v) for v in args.synthetic_size.split(","))
        assert len(sizes) == 2
    except (ValueError, AssertionError):
        from prefast.errors import ConfigError

        raise ConfigError(
            f"--synthetic-size {args.synthetic_size!r} must be TRAIN,TEST counts, e.g. 50000,10000"
        ) from None
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    # FreezeOut's clock flags default to None here, so that one given with --freeze auto is
    # refused even at its default value; absent, TrainConfig's defaults apply.
    clock = [f"--{n}" for n in ("t0", "scale") if values.get(n) is not None]
    if args.freeze == "auto" and (clock or args.no_scale_lr):
        raise clock_flags_refused(clock + ["--no-scale-lr"] * args.no_scale_lr)
    # Likewise the rule's percentile: given without --freeze auto it is refused even at 50.
    if args.freeze != "auto" and values.get("freeze_percentile") is not None:
        raise rule_flags_refused()
    unset = ("t0", "scale", "freeze_percentile")  # None: TrainConfig's default applies
    values = {n: v for n, v in values.items() if not (n in unset and v is None)}
    values.update(
        mode=str(mode or getattr(args, "mode", "prefast")),
        scale_lr=not args.no_scale_lr,
        synthetic_size=(sizes[0], sizes[1]),
        **{
            name: parse_size(args.__dict__[name], "--" + name.replace("_", "-"))
            for name in ("max_ram", "max_gpu_mem", "max_disk", "local_cache_size")
        },
    )
    return TrainConfig(**values)


def write_json(path: str | None, doc: object) -> None:
    """Write ``doc`` to ``path`` ("-" = stdout) atomically."""
    if not path:
        return
    text = json.dumps(doc, indent=2, default=str)
    if path == "-":
        print(text)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(target)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def epoch_line(rec: dict, epochs: int) -> str:
    tier = rec.get("cache_tier") or "-"
    return (
        f"epoch {rec['epoch'] + 1:>3}/{epochs}  loss {rec['train_loss']:.4f}  "
        f"test_acc {rec['test_acc']:.4f}  time {rec['time_s']:.2f}s  "
        f"data {rec.get('data_s', 0.0):.2f}s  frozen {rec['frozen_stages']}/{rec.get('num_stages', '?')} stages  cache {tier}"
    )


def is_main_rank() -> bool:
    """Rank 0 under torchrun (or the only process): it alone prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
