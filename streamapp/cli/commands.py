"""The explicit list of ``streamapp``'s commands, its argument parser and the dispatch to a command."""

from __future__ import annotations

import argparse
import sys

from streamapp.cli.command import Command
from streamapp.cli.dev import DEV_COMMAND
from streamapp.cli.produce import PRODUCE_COMMAND
from streamapp.cli.project import PROJECT_COMMAND
from streamapp.cli.quota import QUOTA_COMMAND, SHED_COMMAND, UNSHED_COMMAND
from streamapp.cli.replay import REPLAY_COMMAND
from streamapp.cli.sink import SINK_COMMAND
from streamapp.cli.status import STATUS_COMMAND
from streamapp.cli.worker import WORKER_COMMAND
from streamapp.settings import SettingsError

#: Every subcommand, in the order ``streamapp --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    WORKER_COMMAND,
    DEV_COMMAND,
    PRODUCE_COMMAND,
    REPLAY_COMMAND,
    STATUS_COMMAND,
    PROJECT_COMMAND,
    QUOTA_COMMAND,
    SHED_COMMAND,
    UNSHED_COMMAND,
    SINK_COMMAND,
)

DESCRIPTION = "The ``streamapp`` console script."


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the command; its exit code."""
    parser = argparse.ArgumentParser(prog="streamapp", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub_parser = sub.add_parser(command.name, help=command.help)
        command.configure(sub_parser)
        sub_parser.set_defaults(fn=command.run)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(f"streamapp: configuration error: {exc}", file=sys.stderr)
        return 2
