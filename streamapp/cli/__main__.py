"""``python -m streamapp.cli``: the same as the ``streamapp`` console script."""

import sys

from streamapp.cli.commands import run

sys.exit(run())
