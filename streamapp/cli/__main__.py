"""``python -m streamapp.cli``: the same as the ``streamapp`` console script."""

import sys

from streamapp.cli.main import main

sys.exit(main())
