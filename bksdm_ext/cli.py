"""`bksdm`: the command line. Each area adds its commands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import BKSDMError

# Modules with `add_commands(subparsers)`; heavy imports stay inside the command functions.
COMMAND_MODULES = (
    "bksdm_ext.commands.model",
    "bksdm_ext.commands.report",
    "bksdm_ext.commands.prune",
    "bksdm_ext.commands.train",
    "bksdm_ext.commands.timing",
    "bksdm_ext.commands.evaluate",
    "bksdm_ext.commands.app",
    "bksdm_ext.commands.lora",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bksdm", description="BK-SDM tools: convert, inspect, train, time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .noise import quiet_imports

    quiet_imports()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except BKSDMError as error:
        print(f"bksdm {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
