"""The `unclip-jax` command line: one subcommand per job.

Each subcommand is a `Command` in `COMMANDS`: its name, a one-line help, a function that adds
its arguments and the function that runs it. Later capabilities add theirs here; `--help`
lists every one. Config overrides (`--config.KEY=VALUE`) are passed through to the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from unclip_jax.config import (
    ConfigError,
    apply_overrides,
    config_to_json,
    iterate_sweep,
    load_config,
    parse_override_args,
)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `add_args(parser)` declares its flags, `run(args, overrides)` runs it."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, dict[str, str]], int]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE[:VARIANT]",
        help="a stage config, e.g. configs/decoder.py:tiny; override fields with "
        "--config.KEY=VALUE",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="print every point of the file's sweep() instead"
    )


def _run_config(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if args.sweep:
        for point, config in iterate_sweep(args.config):
            print(f"# {point}")
            print(config_to_json(apply_overrides(config, overrides)))
        return 0
    print(config_to_json(load_config(args.config, overrides)))
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        name="config",
        help="print a stage config as JSON after overrides (or every point of its sweep)",
        add_args=_add_config_args,
        run=_run_config,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command in COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="unclip-jax",
        description="unCLIP (DALL-E 2's cascade) in JAX/Flax: train, sample and evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_args(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for a usage or config error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_override_args(rest)
        command = next(c for c in COMMANDS if c.name == args.command)
        return command.run(args, overrides)
    except ConfigError as err:
        print(f"unclip-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
