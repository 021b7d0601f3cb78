"""``streamapp replay``: the command's arguments and its run live in :mod:`streamapp.replay.command`
(a product command with its own package: scenario, stack, traffic, measure, analysis, report)."""

from __future__ import annotations

import argparse

from streamapp.cli.command import Command
from streamapp.replay.command import configure as configure_replay_args
from streamapp.replay.command import main as replay_main


def replay(args: argparse.Namespace) -> int:
    """Replay the 2019 incident: baseline (nothing shed) vs protected, side by side, with plots."""
    return replay_main(args)


REPLAY_COMMAND = Command("replay", configure_replay_args, replay)
