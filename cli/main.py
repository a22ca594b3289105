"""Entry point of the ``prefast`` console script: parse, call the library, print."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from prefast.errors import PrefastError, Terminated


def build_parser() -> argparse.ArgumentParser:
    from . import bench, cache, plan, train

    parser = argparse.ArgumentParser(
        prog="prefast",
        description="Train CNNs faster: progressively freeze early layers (FreezeOut) and "
        "stream their cached outputs instead of recomputing them (PreFast).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log decisions (governor, store)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, plan, cache, bench):
        module.register(sub)
    _show_defaults(parser)
    _verbose_anywhere(parser)
    return parser


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the subcommand too (``prefast train -v ...``): each command's parser
    takes it, defaulting to SUPPRESS so it never resets a ``-v`` given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--verbose" in a.option_strings for a in child._actions):
                    child.add_argument(
                        "-v",
                        "--verbose",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help="log decisions (governor, store); also accepted before the command",
                    )
                _verbose_anywhere(child)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help shows each option's default (common.DefaultsFormatter)."""
    from .common import DefaultsFormatter

    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(  # under torchrun only rank 0 logs decisions; others warnings and errors
        level=logging.INFO if args.verbose and rank == 0 else logging.WARNING,
        format=("%(levelname)s %(name)s: %(message)s" if "RANK" not in os.environ
                else f"%(levelname)s [rank {rank}] %(name)s: %(message)s"),
    )  # fmt: skip
    # One line each that a user sees without -v (a cache reused, a cache kept or not kept),
    # between the epoch lines on stdout; the main rank's only.
    notice = logging.getLogger("prefast.notice")
    if not any(isinstance(h, _Stdout) for h in notice.handlers):  # once per process
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        notice.addHandler(handler)
    notice.propagate = False
    notice.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # torchrun stops the other ranks with SIGTERM when one fails: unwind (abort writers,
    # release locks) instead of dying mid-write, and say why.
    signal.signal(signal.SIGTERM, _terminated)
    prefix = f"prefast[rank {rank}]" if "RANK" in os.environ else "prefast"
    clean = False
    try:
        code = int(args.func(args) or 0)
        clean = True
        return code
    except PrefastError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(
            f"{prefix}: terminated (SIGTERM; under torchrun: another rank failed)", file=sys.stderr
        )
        return 143
    except Exception as exc:
        if "RANK" not in os.environ:
            raise
        # Under torchrun, this rank's own error (not a lost peer): say which rank, keep the
        # error's own words; the traceback follows.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{prefix}: error: {type(exc).__name__}: {first[:300]}", file=sys.stderr)
        raise
    finally:
        from prefast.distributed import shutdown

        shutdown(clean)


class _Stdout(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at each line (a caller may have replaced it)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
