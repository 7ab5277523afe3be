"""The `posttrain` command. Each subcommand lives in posttrain/commands/<name>.py and defines
`register(subparsers)`; heavy imports (JAX, kopf) happen inside the command, never here."""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `posttrain --help`.
COMMANDS = ["validate", "render", "plan", "run", "score", "crd", "operator"]


def build_parser() -> argparse.ArgumentParser:
    from posttrain import __version__

    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Kubernetes-native LLM post-training in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"posttrain.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
