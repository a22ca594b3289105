"""`prefast train` and `prefast compare`."""

from __future__ import annotations

import argparse

from .common import (
    add_train_flags,
    config_from_args,
    epoch_line,
    is_main_rank,
    stderr_is_tty,
    world_size,
    write_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model in one mode",
        description="Train a model with baseline, FreezeOut or PreFast scheduling. Prints one "
        "line per epoch; --json-out writes the full run record.",
    )
    add_train_flags(p)
    p.add_argument("--json-out", help="write the run record as JSON here ('-' for stdout)")
    p.set_defaults(func=run_train)

    c = sub.add_parser(
        "compare",
        help="run several modes side by side and print a speedup table",
        description="Runs the modes one after another in one process on the same data and "
        "seed, then prints wall-clock, speedups and accuracy.",
    )
    add_train_flags(c, modes=False)
    c.add_argument(
        "--modes",
        default="baseline,freezeout,prefast",
        help="comma-separated modes to run (default: %(default)s)",
    )
    c.add_argument("--json-out", help='write {"runs": {mode: run record}} here')
    c.set_defaults(func=run_compare)


def run_train(args: argparse.Namespace) -> int:
    from prefast.training.trainer import train

    cfg = config_from_args(args)
    say = print if is_main_rank() else _quiet  # under torchrun, rank 0 speaks for all
    world = f", {world_size()} ranks" if world_size() > 1 else ""
    say(f"training {cfg.model} on {cfg.dataset} ({cfg.mode}, {cfg.epochs} epochs{world})")
    result = train(
        cfg,
        progress=stderr_is_tty() and is_main_rank(),
        on_epoch=lambda r: say(epoch_line(r, cfg.epochs), flush=True),
    )
    final = result["final"]
    say(
        f"done: test_acc {final['test_acc']:.4f}  wall {final['wall_s']:.1f}s  "
        f"waiting for data {100 * final['data_share']:.0f}% of training  "
        f"peak_rss {final['peak_rss_mb']:.0f} MiB"
    )
    if is_main_rank():
        write_json(args.json_out, result)
    return 0


def _quiet(*_: object, **__: object) -> None:
    pass


def run_compare(args: argparse.Namespace) -> int:
    from prefast.errors import ConfigError
    from prefast.training.compare import accuracy_notes, compare, format_table

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("baseline", "freezeout", "prefast")]
    if bad or not modes:
        raise ConfigError(
            f"--modes {args.modes!r}: use a comma list of baseline, freezeout, prefast"
        )
    # built for a freezing mode: baseline takes --freeze auto off by itself (for_mode)
    cfg = config_from_args(args, mode=next((m for m in modes if m != "baseline"), modes[0]))
    main = is_main_rank()
    runs = compare(cfg, modes, progress=stderr_is_tty() and main, log=print if main else None)
    if main:
        print(format_table(runs))
        print("\n".join(accuracy_notes(runs)))
        write_json(args.json_out, {"runs": runs})
    return 0
