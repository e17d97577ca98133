"""The `spatialrl` console command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import version

from spatialrl.config import ConfigError
from spatialrl.errors import InputError

# Imported lazily by name so `spatialrl --help` stays fast and a command's heavy
# dependencies (Ray, DeepSpeed) load only when that command runs.
COMMAND_MODULES = [
    "spatialrl.commands.tiny_models",
    "spatialrl.commands.data",
    "spatialrl.commands.train",
    "spatialrl.commands.reward",
    "spatialrl.commands.spatialreward",
    "spatialrl.commands.cluster",
    "spatialrl.commands.serve",
    "spatialrl.commands.pretrain",
    "spatialrl.commands.eval_policy",
    "spatialrl.commands.eval_editor",
]


DESCRIPTION = """Online RL that teaches text-to-image flow models (FLUX) spatial relations:
filtered GRPO against SpatialScore, a learned spatial reward model, on Ray, tracked in MLflow.
Build data (`data`), train or evaluate the reward (`reward`), train the policy (`train`),
serve or use the reward (`serve`, `generate`), and size a cluster (`capacity`,
`cluster-check`). `spatialrl COMMAND --help` describes each."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already speaks of it or
    there is none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS or not action.option_strings
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """Every command's parser, sub-commands included, shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spatialrl", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('spatialrl')}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
