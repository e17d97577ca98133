"""The `spatialrl` console command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from spatialrl.config import ConfigError
from spatialrl.errors import InputError

# Imported lazily by name so `spatialrl --help` stays fast and a command's heavy
# dependencies (Ray, DeepSpeed) load only when that command runs.
COMMAND_MODULES = [
    "spatialrl.commands.tiny_models",
    "spatialrl.commands.data",
    "spatialrl.commands.train",
    "spatialrl.commands.reward",
    "spatialrl.commands.cluster",
    "spatialrl.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spatialrl", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, InputError) as err:
        print(f"spatialrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
