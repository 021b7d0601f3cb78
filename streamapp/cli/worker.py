"""``streamapp worker``: a Faust worker against the configured Kafka and S3 (``faust -A streamapp.app
worker`` with uvloop, the web port and host from the settings)."""

from __future__ import annotations

import argparse
import os
import sys

from streamapp.cli.command import Command
from streamapp.settings import Settings


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loglevel", default=None)
    parser.add_argument("--datadir", default=None, help="local state directory (STREAMAPP_DATA_DIR wins if set)")
    parser.add_argument(
        "--reset-local-state",
        action="store_true",
        help="delete the local table stores before starting (they are rebuilt from the changelog topics)",
    )


def worker(args: argparse.Namespace) -> int:
    """Same as ``faust -A streamapp.app worker``, with uvloop."""
    settings = Settings.from_env()
    if not settings.control_secret:
        # streamapp.app is imported only inside this function: importing it builds the Faust app from
        # the environment, which the lines below set first (and the other commands never need Faust).
        from streamapp.app import NO_SECRET

        print(f"streamapp: configuration error: {NO_SECRET}", file=sys.stderr)
        return 2
    if args.datadir:
        os.environ["F_DATADIR"] = args.datadir  # read by streamapp.app.data_dir, like `faust --datadir`
    os.environ.setdefault("STREAMAPP_FAUST_WEB_PORT", str(settings.web_port))
    argv = [
        "streamapp",
        "worker",
        "--loglevel",
        args.loglevel or settings.log_level,
        "--web-port",
        str(settings.web_port),
    ]
    argv += ["--web-host", settings.web_host]
    try:
        import uvloop  # optional: the plain asyncio loop otherwise

        uvloop.install()
    except ImportError:
        pass
    from streamapp.app import app  # now that F_DATADIR and the web port are in the environment

    if args.reset_local_state:
        from streamapp.infra.local_state import reset_local_state  # needs the app's table directory, above

        if reset_local_state(app.conf.tabledir):
            print(f"streamapp: deleted local table state in {app.conf.tabledir}", file=sys.stderr)
    sys.argv = argv
    app.main()
    return 0


WORKER_COMMAND = Command("worker", _worker_args, worker)
