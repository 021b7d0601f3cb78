"""``streamapp quota set|reset|list``, ``shed`` and ``unshed`` (issue #4): quotas and manual shed
overrides, published straight to the control topic with a plain producer (no worker needed); every
worker's meter applies them within a fetch round trip. The admin HTTP API publishes the same records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from streamapp.cli.command import Command
from streamapp.cli.control_topic import add_control_topic_args, control_topic_target
from streamapp.contract import is_valid_name, name_rule
from streamapp.control import override_record, publish_records, quota_record, read_view
from streamapp.metering import SHED_MODES
from streamapp.settings import Settings


def publish_and_print(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    """Publish ``records`` to the control topic, then print each as one JSON line; exit code 0."""
    bootstrap, topic = control_topic_target(args)
    asyncio.run(publish_records(bootstrap, topic, records))
    for record in records:
        print(json.dumps(record, sort_keys=True))
    return 0


def project_id_arg(text: str) -> str:
    """argparse ``type`` of a project id argument: the id, or the contract's rule it breaks."""
    if not is_valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid project id ({name_rule(text)})")
    return text


def _quota_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="quota_command", required=True)
    qset = sub.add_parser("set", help="set a project's quota (only the options given change)")
    qset.add_argument("project_id", type=project_id_arg)
    qset.add_argument("--eps", type=float, default=None, help="events/s quota")
    qset.add_argument("--bps", type=float, default=None, help="bytes/s quota")
    qset.add_argument(
        "--burst", type=float, default=None, help="burst tolerance: shed above quota x (1 + BURST), e.g. 0.5"
    )
    qset.add_argument("--mode", choices=SHED_MODES, default=None, help="what shedding does")
    reset = sub.add_parser("reset", help="put a project's quota, burst and mode back to the defaults")
    reset.add_argument("project_id", type=project_id_arg)
    listing = sub.add_parser("list", help="quotas and shed states of all projects")
    listing.add_argument("--json", action="store_true")
    for p in (qset, reset, listing):
        add_control_topic_args(p)


def quota(args: argparse.Namespace) -> int:
    """Set, reset or list per-project quotas (events/s, bytes/s, burst tolerance, shed mode)."""
    if args.quota_command == "set":
        if args.eps is None and args.bps is None and args.burst is None and args.mode is None:
            print("streamapp quota set: give at least one of --eps, --bps, --burst, --mode", file=sys.stderr)
            return 2
        try:
            record = quota_record(
                args.project_id, quota_eps=args.eps, quota_bps=args.bps, burst=args.burst, shed_mode=args.mode
            )
        except ValueError as exc:
            print(f"streamapp quota set: {exc}", file=sys.stderr)
            return 2
        return publish_and_print(args, [record])
    if args.quota_command == "reset":
        return publish_and_print(args, [quota_record(args.project_id, reset=True)])
    return _quota_list(args)


def _quota_list(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    bootstrap, topic = control_topic_target(args)
    view = asyncio.run(read_view(bootstrap, topic))
    rows = []
    for project_id in sorted(set(view.projects) | set(view.shed_states) | set(view.overrides)):
        project = view.projects.get(project_id)
        state = view.shed_states.get(project_id) or {}
        override = view.overrides.get(project_id) or {}
        rows.append(
            {
                "project_id": project_id,
                "quota_eps": project.quota_eps if project else None,
                "quota_bps": project.quota_bps if project else None,
                "burst": project.burst if project else None,
                "shed_mode": project.shed_mode if project else None,
                "state": state.get("state", "ok"),
                "since": state.get("since"),
                "reason": state.get("reason"),
                "override": override.get("action"),
            }
        )
    defaults = {
        "quota_eps": settings.default_eps_limit,
        "quota_bps": settings.default_bps_limit,
        "burst": settings.burst_tolerance,
        "shed_mode": settings.shed_mode,
    }
    if args.json:
        print(json.dumps({"defaults": defaults, "projects": rows}, indent=2, sort_keys=True))
        return 0

    def show(value: Any, default: Any) -> str:
        return f"{value:g}" if isinstance(value, int | float) else (str(value) if value else f"({default:g})")

    print(f"{'project':<24} {'ev/s':>10} {'bytes/s':>12} {'burst':>7} {'mode':<8} {'state':<6} override")
    for r in rows:
        mode = r["shed_mode"] or f"({defaults['shed_mode']})"
        print(
            f"{r['project_id'][:24]:<24} {show(r['quota_eps'], defaults['quota_eps']):>10} "
            f"{show(r['quota_bps'], defaults['quota_bps']):>12} {show(r['burst'], defaults['burst']):>7} "
            f"{mode:<8} {r['state']:<6} {r['override'] or '-'}"
        )
    print(
        f"(defaults in parentheses: {defaults['quota_eps']:g} ev/s, {defaults['quota_bps']:g} bytes/s, "
        f"burst {defaults['burst']:g}, mode {defaults['shed_mode']})"
    )
    return 0


def _shed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project_id", type=project_id_arg)
    parser.add_argument("--reason", default="", help="why (shown with the shed state)")
    parser.add_argument("--mode", choices=SHED_MODES, default=None, help="mode of this manual shed")
    parser.add_argument("--clear", action="store_true", help="remove the manual override: the rates decide again")
    add_control_topic_args(parser)


def _unshed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project_id", type=project_id_arg)
    parser.add_argument("--reason", default="")
    parser.add_argument("--clear", action="store_true", help="remove the manual override: the rates decide again")
    add_control_topic_args(parser)


def shed(args: argparse.Namespace) -> int:
    """Shed a project by hand (it keeps its quota, the excess is diverted) until cleared."""
    action = "clear" if args.clear else "shed"
    return publish_and_print(
        args, [override_record(args.project_id, action, args.reason, None if args.clear else args.mode)]
    )


def unshed(args: argparse.Namespace) -> int:
    """Keep a project unshed whatever its rate, until cleared (``--clear``)."""
    return publish_and_print(args, [override_record(args.project_id, "clear" if args.clear else "unshed", args.reason)])


QUOTA_COMMAND = Command("quota", _quota_args, quota)
SHED_COMMAND = Command("shed", _shed_args, shed)
UNSHED_COMMAND = Command("unshed", _unshed_args, unshed)
