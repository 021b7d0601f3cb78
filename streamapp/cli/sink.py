"""``streamapp sink parked|retry-parked`` (issue #9): projects whose own S3 destination fails are
parked (:mod:`streamapp.sink.parking`); show them, or have every worker try to redeliver them now,
through a worker's admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from streamapp.cli.command import Command
from streamapp.cli.text_table import render_table
from streamapp.web.client import AdminApiError, admin_request, admin_target


def _sink_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sink_command", required=True)
    parked = sub.add_parser("parked", help="projects whose own S3 destination is parked, with reason and backlog")
    parked.add_argument("--json", action="store_true", help="print the /sink/ view's parked projects as JSON")
    retry = sub.add_parser("retry-parked", help="redeliver parked objects now (one project or all)")
    retry.add_argument("--project", default=None, help="only this project")
    for p in (parked, retry):
        p.add_argument("--web", default=None, help="worker web URL (default http://127.0.0.1:$STREAMAPP_WEB_PORT)")
        p.add_argument("--token", default=None, help="admin token (default $STREAMAPP_ADMIN_TOKEN)")


def sink(args: argparse.Namespace) -> int:
    """Parked destinations: list them, or retry their redelivery now (through a worker's admin API)."""
    web, token = admin_target(args.web, args.token)
    try:
        if args.sink_command == "retry-parked":
            body = {"project_id": args.project} if args.project else {}
            answer = admin_request(web, token, "POST", "/admin/sink/retry-parked", body)
            print(json.dumps(answer, sort_keys=True))
            if args.project and args.project not in answer.get("retried", []):
                print(f"streamapp sink retry-parked: {args.project} is not parked on any worker", file=sys.stderr)
                return 1
            return 0
        view = admin_request(web, token, "GET", "/sink/")
    except AdminApiError as exc:
        print(f"streamapp sink {args.sink_command}: {exc}", file=sys.stderr)
        return 1
    parked = view.get("parked") or {}
    if args.json:
        print(json.dumps(parked, indent=2, sort_keys=True))
    else:
        print(render_parked(parked))
    return 0


def _parked_row(pid: str, p: dict[str, Any], now: float) -> str:
    since = p.get("since")
    age = f"{max(0.0, now - float(since)):.0f}s" if isinstance(since, int | float) else "-"
    return (
        f"{str(pid)[:24]:<24} {age:>7} {int(p.get('backlog_objects') or 0):>8} "
        f"{int(p.get('backlog_bytes') or 0):>12}  {p.get('reason') or ''}"
    )


def render_parked(parked: dict[str, Any]) -> str:
    """The ``sink parked`` table."""
    now = time.time()
    return render_table(
        f"{'project':<24} {'since':>7} {'objects':>8} {'bytes':>12}  reason",
        (_parked_row(pid, p, now) for pid, p in sorted(parked.items())),
        "(no parked destinations)",
    )


SINK_COMMAND = Command("sink", _sink_args, sink)
