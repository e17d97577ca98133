"""CLI subcommands. Each module exposes `register(subparsers)`; spatialrl.cli lists them."""
