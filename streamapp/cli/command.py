"""What a ``streamapp`` subcommand is: its name, a function adding its arguments, a function running it.

Each command group's module declares its commands as :class:`Command` values; :mod:`streamapp.cli.commands`
lists them all explicitly (no registration on import).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    """One subcommand: ``configure`` adds its arguments to its parser, ``run`` runs it (the exit code)."""

    name: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    @property
    def help(self) -> str | None:
        """The command's line in ``streamapp --help``: the first line of ``run``'s docstring."""
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else None
