"""``streamapp project create|list|rotate-key|revoke-key`` (issue #5): projects and their write keys.

Straight through the control topic by default (like quota/shed: no worker needed), or with ``--web``
through the admin HTTP API of a running worker (which answers once its own view has the project).
Keys are stored only as SHA-256 hashes: create and rotate-key print the key once; list never can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from streamapp.cli.command import Command
from streamapp.cli.control_topic import add_control_topic_args, control_topic_target
from streamapp.cli.text_table import render_table
from streamapp.contract import is_valid_name, name_rule
from streamapp.control import (
    SECRET_KEY_FIELDS,
    ProjectSettings,
    hash_key,
    key_record,
    new_write_key,
    project_record,
    publish_records,
    read_view,
)
from streamapp.web.client import AdminApiError, admin_request, admin_target


def _project_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="project_command", required=True)
    create = sub.add_parser("create", help="create a project; prints its write key (once) as JSON")
    create.add_argument("project_id")
    create.add_argument("--no-s3", dest="s3_streaming", action="store_false", help="do not export it to S3")
    create.add_argument("--quota-eps", type=float, default=None, help="events/s quota (default: the global one)")
    listing = sub.add_parser("list", help="list projects with their quota, shed state and key state")
    listing.add_argument("--show-keys", action="store_true", help=argparse.SUPPRESS)  # keys are not kept
    listing.add_argument("--json", action="store_true", help="print the admin API's JSON")
    rotate = sub.add_parser("rotate-key", help="new write key (printed once); the old one stays valid for --grace")
    rotate.add_argument("project_id")
    rotate.add_argument(
        "--grace", type=float, default=24 * 3600.0, help="seconds the old key stays valid (default 86400; 0 = none)"
    )
    revoke = sub.add_parser("revoke-key", help="no write key of the project is valid any more")
    revoke.add_argument("project_id")
    for p in (create, listing, rotate, revoke):
        p.add_argument("--web", default=None, help="go through this worker's admin API instead of the control topic")
        p.add_argument("--token", default=None, help="admin token for --web (default $STREAMAPP_ADMIN_TOKEN)")
        add_control_topic_args(p)


def project(args: argparse.Namespace) -> int:
    """Create, list, rotate or revoke projects' write keys: through the control topic, or a worker with --web.

    Keys are stored only as SHA-256 hashes: create and rotate-key print the key once; list never can.
    """
    # Imported when the command runs: the Keen API module pulls in Faust (~1 s) the other commands skip.
    from streamapp.api import curl_example

    command = args.project_command
    try:
        if args.web:
            web, token = admin_target(args.web, args.token)
            path = f"/admin/projects/{args.project_id}/key" if command in ("rotate-key", "revoke-key") else ""
            if command == "create":
                body: dict[str, Any] = {"project_id": args.project_id, "s3_streaming": args.s3_streaming}
                if args.quota_eps is not None:
                    body["quota_eps"] = args.quota_eps
                result = admin_request(web, token, "POST", "/admin/projects", body)
            elif command == "rotate-key":
                result = admin_request(web, token, "POST", path, {"grace_seconds": args.grace})
            elif command == "revoke-key":
                result = admin_request(web, token, "DELETE", path)
            else:
                result = admin_request(web, token, "GET", "/admin/projects")
        else:
            web = admin_target(None, "")[0]
            run = {
                "create": create_project_via_topic,
                "list": list_projects_via_topic,
                "rotate-key": rotate_key_via_topic,
                "revoke-key": revoke_key_via_topic,
            }[command]
            result = asyncio.run(run(args))
    except AdminApiError as exc:
        print(f"streamapp project {command}: {exc}", file=sys.stderr)
        return 1
    if command in ("create", "rotate-key"):
        shown = {"project_id": result["project_id"], "write_key": result["write_key"]}
        if command == "rotate-key":
            shown["previous_key_expires_at"] = result.get("previous_key_expires_at")
        print(json.dumps(shown))
        print("the key is shown only now; try: " + curl_example(web, result["project_id"], result["write_key"]),
              file=sys.stderr)  # fmt: skip
        return 0
    if command == "revoke-key":
        print(json.dumps({"project_id": args.project_id, "revoked": True}))
        return 0
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render_projects(result.get("projects", [])))
    return 0


async def create_project_via_topic(args: argparse.Namespace) -> dict[str, Any]:
    """Publish a new project with the hash of a fresh write key; refuses one that already has a key."""
    if not is_valid_name(args.project_id):
        raise AdminApiError(0, f"{args.project_id!r} is not a valid project id ({name_rule(args.project_id)})")
    if args.quota_eps is not None and not args.quota_eps > 0:
        raise AdminApiError(0, "--quota-eps must be > 0")
    bootstrap, topic = control_topic_target(args)
    key = new_write_key()
    try:
        view = await read_view(bootstrap, topic)
        existing = view.projects.get(args.project_id)
        if existing is not None and (existing.key_hash or existing.previous_key_hash or existing.key_revoked_at):
            raise AdminApiError(0, f"project {args.project_id!r} already exists (a new key: project rotate-key)")
        fields = asdict(existing) if existing is not None else {}  # keeps a quota set before
        fields.update(project_id=args.project_id, s3_streaming=args.s3_streaming, key_hash=hash_key(key))
        fields.update(previous_key_hash="", previous_key_expires_at=None, key_revoked_at=None)
        if args.quota_eps is not None:
            fields["quota_eps"] = float(args.quota_eps)
        project = ProjectSettings(**{**fields, "created_at": time.time()})
        await publish_records(bootstrap, topic, [project_record(project)])
    except AdminApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - Kafka errors: one line for the operator
        raise AdminApiError(0, f"control topic {topic} on {bootstrap}: {exc!r}") from None
    return {"project_id": project.project_id, "write_key": key}


async def _publish_key_change(args: argparse.Namespace, grace: float | None) -> dict[str, Any]:
    """Rotate (``grace`` seconds for the old key) or revoke (``grace`` None) through the control topic."""
    bootstrap, topic = control_topic_target(args)
    try:
        view = await read_view(bootstrap, topic)
        project = view.projects.get(args.project_id)
        if project is None:
            raise AdminApiError(0, f"project {args.project_id!r} not found")
        if grace is None:
            await publish_records(bootstrap, topic, [key_record(args.project_id, "")])
            return {"project_id": args.project_id, "revoked": True}
        if not 0 <= grace <= 30 * 24 * 3600:
            raise AdminApiError(0, "--grace must be in 0..2592000 seconds")
        key = new_write_key()
        old = project.key_hash if grace > 0 else ""
        record = key_record(args.project_id, hash_key(key), old, time.time() + grace if old else None)
        await publish_records(bootstrap, topic, [record])
    except AdminApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - Kafka errors: one line for the operator
        raise AdminApiError(0, f"control topic {topic} on {bootstrap}: {exc!r}") from None
    return {
        "project_id": args.project_id,
        "write_key": key,
        "previous_key_expires_at": record["previous_key_expires_at"],
    }


async def rotate_key_via_topic(args: argparse.Namespace) -> dict[str, Any]:
    return await _publish_key_change(args, float(args.grace))


async def revoke_key_via_topic(args: argparse.Namespace) -> dict[str, Any]:
    return await _publish_key_change(args, None)


async def list_projects_via_topic(args: argparse.Namespace) -> dict[str, Any]:
    """The projects as the control topic has them, in the admin API's shape (no keys, no hashes)."""
    bootstrap, topic = control_topic_target(args)
    try:
        view = await read_view(bootstrap, topic)
    except Exception as exc:  # noqa: BLE001
        raise AdminApiError(0, f"control topic {topic} on {bootstrap}: {exc!r}") from None
    projects = []
    for pid, p in sorted(view.projects.items()):
        listed = {k: v for k, v in asdict(p).items() if k not in SECRET_KEY_FIELDS}
        listed.update(has_key=bool(p.key_hash), previous_key_expires_at=p.previous_key_expires_at or None)
        projects.append({**listed, "shed_state": view.shed_states.get(pid), "override": view.overrides.get(pid)})
    return {"projects": projects}


def _project_row(p: dict[str, Any], now: float) -> str:
    expires = p.get("previous_key_expires_at")
    shown = "set" if p.get("has_key") else "revoked" if p.get("key_revoked_at") else "none"
    if isinstance(expires, int | float) and expires > now:
        shown += f", old key valid {expires - now:.0f}s more"
    state = (p.get("shed_state") or {}).get("state") or "ok"
    override = (p.get("override") or {}).get("action")
    if override in ("shed", "unshed"):
        state = f"{state} (manual {override})"
    quota = p.get("quota_eps")
    return (
        f"{str(p.get('project_id'))[:24]:<24} {'yes' if p.get('s3_streaming') else 'no':<4} "
        f"{'default' if quota is None else f'{float(quota):g}':>10}  {state:<14} {shown}"
    )


def render_projects(projects: list[dict[str, Any]]) -> str:
    """The ``project list`` table; the key column says whether a key is valid (keys are never kept)."""
    now = time.time()
    return render_table(
        f"{'project':<24} {'s3':<4} {'quota ev/s':>10}  {'state':<14} write key",
        (_project_row(p, now) for p in projects),
        "(no projects: create one with `streamapp project create ID`)",
    )


PROJECT_COMMAND = Command("project", _project_args, project)
