"""Entry point of the ``prefast`` console script: parse, call the library, print."""

from __future__ import annotations

import argparse
import logging
import sys

from prefast.errors import PrefastError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except PrefastError as exc:
        print(f"prefast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("prefast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
