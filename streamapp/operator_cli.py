"""Operator commands of the ``streamapp`` console script (quota, shed, project, status)."""

# ============================================================================================
# status (issue #6): the dashboard's picture in the terminal. Reads /rates/, /shed/ and /sink/.
# ============================================================================================
# (imports kept local to this section so other sections of this file stay independent)
import argparse as _st_argparse  # noqa: E402
import time as _st_time  # noqa: E402
from typing import Any as _StAny  # noqa: E402

from streamapp.cli import _get_json as _st_get_json  # noqa: E402
from streamapp.cli import command as _st_command  # noqa: E402

_SPARK = "▁▂▃▄▅▆▇█"


def _status_args(parser: _st_argparse.ArgumentParser) -> None:
    parser.add_argument("--web", default=None, help="worker web URL (default http://127.0.0.1:$STREAMAPP_WEB_PORT)")
    parser.add_argument("--token", default=None, help="read token (default $STREAMAPP_READ_TOKEN)")
    parser.add_argument("--limit", type=int, default=10, help="top projects to show")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    parser.add_argument("--json", action="store_true", help="print the raw views as one JSON object")


@_st_command("status", _status_args)
def status(args: _st_argparse.Namespace) -> int:
    """Top projects, shed projects and sink backlog of a running worker (all workers, merged)."""
    import json

    from streamapp.settings import Settings

    settings = Settings.from_env()
    web = (args.web or f"http://127.0.0.1:{settings.web_port}").rstrip("/")
    token = args.token if args.token is not None else settings.read_token  # the admin token is no read token
    while True:
        try:
            views = fetch_status(web, token, args.limit)
        except OSError as exc:
            print(f"streamapp status: {web} not answering: {exc}")
            if args.watch is None:
                return 1
        else:
            if args.json:
                print(json.dumps(views, indent=2, sort_keys=True))
            else:
                if args.watch is not None:
                    print("\033[2J\033[H", end="")
                print(render_status(web, views["rates"], views["shed"], views["sink"]))
        if args.watch is None:
            return 0
        try:
            _st_time.sleep(max(0.2, args.watch))
        except KeyboardInterrupt:
            return 0


def fetch_status(web: str, token: str, limit: int) -> dict[str, _StAny]:
    return {
        "rates": _st_get_json(f"{web}/rates/?limit={int(limit)}&series=30", token),
        "shed": _st_get_json(f"{web}/shed/", token),
        "sink": _st_get_json(f"{web}/sink/", token),
    }


def spark(values: list[float]) -> str:
    """Unicode sparkline of ``values`` (scaled to their max)."""
    top = max(values, default=0) or 1
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))] for v in values)


def _per_second(series: list[dict[str, _StAny]], now: int, seconds: int) -> list[float]:
    by = {int(p.get("second", 0)): float(p.get("events", 0)) for p in series or []}
    return [by.get(s, 0.0) for s in range(now - seconds, now)]


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, now - float(ts))
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min"


def render_status(web: str, rates: dict[str, _StAny], shed: dict[str, _StAny], sink: dict[str, _StAny]) -> str:
    now = _st_time.time()
    now_second = int(rates.get("generated_at") or now)
    shed_ids = {s.get("project_id") for s in shed.get("shed", [])}
    workers = rates.get("workers") or {web: "ok"}
    down = [w for w, s in workers.items() if s != "ok"]
    lines = [
        f"streamapp status  {web}  ({len(workers)} worker{'s' if len(workers) != 1 else ''}"
        f"{', NOT ANSWERING: ' + ', '.join(down) if down else ''})  {_st_time.strftime('%H:%M:%S')}",
        "",
        f"TOP PROJECTS  {'project':<24} {'ev/s':>9} {'ev/s 60s':>9} {'KB/s':>8} {'quota':>8}  {'last 30s':<30}  state",
    ]
    projects = rates.get("projects", [])
    for p in projects:
        is_shed = p.get("state") == "shed" or p.get("project_id") in shed_ids
        state = f"SHED ({p.get('mode')})" if is_shed else "ok"
        quota = p.get("quota_eps")
        lines.append(
            f"{'>>' if is_shed else '  '}            {str(p.get('project_id'))[:24]:<24} "
            f"{float(p.get('eps_burst') or 0):>9.1f} {float(p.get('eps_sustained') or 0):>9.1f} "
            f"{float(p.get('bps_burst') or 0) / 1024:>8.1f} {'-' if quota is None else f'{float(quota):.0f}':>8}  "
            f"{spark(_per_second(p.get('series', []), now_second, 30)):<30}  {state}"
        )
    if not projects:
        lines.append("              (no traffic metered yet)")
    shed_list = shed.get("shed", [])
    lines += ["", f"SHED ({len(shed_list)})"]
    for s in shed_list:
        rate, limit = s.get("rate"), s.get("limit")
        lines.append(
            f"  {s.get('project_id'):<24} {s.get('mode') or '-':<7} since {_ago(s.get('since'), now):>6}  "
            f"rate {'-' if rate is None else f'{float(rate):.1f}'} ev/s, "
            f"limit {'-' if limit is None else f'{float(limit):.0f}'}"
            f"{'  (manual)' if s.get('manual') else ''}  {s.get('reason') or ''}"
        )
    partitions = sink.get("partitions", {}) or {}
    behind = sum(int(p.get("offsets_behind", 0)) for p in partitions.values())
    unread = sum(int(p.get("read_lag", 0)) for p in partitions.values())
    age = max((float(p.get("oldest_unflushed_age_seconds", 0)) for p in partitions.values()), default=0.0)
    lines += [
        "",
        f"SINK  events in {sink.get('events_in', 0)} | objects written {sink.get('objects_written', 0)} | "
        f"lag {unread} unread, {behind} uncommitted offsets, oldest unflushed {age:.0f}s | "
        f"S3 errors {sink.get('s3_errors', 0)}, retries {sink.get('s3_retries', 0)}",
    ]
    for name, p in sorted(partitions.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        lines.append(
            f"  partition {name:>3}: unread {int(p.get('read_lag', 0)):>8}, uncommitted "
            f"{int(p.get('offsets_behind', 0)):>8}, unflushed "
            f"{float(p.get('oldest_unflushed_age_seconds', 0)):>5.0f}s, open windows {p.get('open_windows', 0)}, "
            f"last flush {_ago(p.get('last_flush_at'), now)} ago"
        )
    overflow = sink.get("overflow") or {}
    if overflow:
        lines.append(f"OVERFLOW  {_overflow_summary(overflow)}")
    return "\n".join(lines)


def _overflow_summary(overflow: dict[str, _StAny]) -> str:
    from streamapp.metrics import overflow_backlog_by_partition, overflow_drain_rate

    backlog = sum(overflow_backlog_by_partition(overflow).values())
    rate = overflow_drain_rate(overflow)
    rate_text = f"{rate:.0f} ev/s" if rate is not None else "-"
    return f"backlog {backlog:.0f}, drain rate {rate_text}"


# ============================================================================================
# project create|list (issue #5): projects and their write keys. Straight through the control
# topic by default (like quota/shed: no worker needed), or with --web through the admin HTTP API of
# a running worker (which answers once its own view has the project). admin_request() is the HTTP
# helper for any command calling /admin/ endpoints.
# ============================================================================================
import argparse as _pj_argparse  # noqa: E402
import asyncio as _pj_asyncio  # noqa: E402
import json as _pj_json  # noqa: E402
import sys as _pj_sys  # noqa: E402
import time as _pj_time  # noqa: E402
import urllib.error as _pj_urlerror  # noqa: E402
import urllib.request as _pj_urlrequest  # noqa: E402
from collections.abc import Iterable as _PjIterable  # noqa: E402
from typing import Any as _PjAny  # noqa: E402

from streamapp.cli import command as _pj_command  # noqa: E402


class AdminApiError(RuntimeError):
    """An /admin/ call answered with an error status (``status`` 0: nothing answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def admin_target(web: str | None, token: str | None) -> tuple[str, str]:
    """(base URL, admin token): the arguments, else http://127.0.0.1:$STREAMAPP_WEB_PORT and $STREAMAPP_ADMIN_TOKEN."""
    from streamapp.settings import Settings

    settings = Settings.from_env()
    base = (web or f"http://127.0.0.1:{settings.web_port}").rstrip("/")
    return base, settings.admin_token if token is None else token


def admin_request(
    web: str, token: str, method: str, path: str, body: dict[str, _PjAny] | None = None, timeout: float = 15.0
) -> dict[str, _PjAny]:
    """Call an admin endpoint; the decoded JSON answer, or AdminApiError with the server's message."""
    data = _pj_json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = _pj_urlrequest.Request(web + path, data=data, method=method, headers=headers)
    try:
        with _pj_urlrequest.urlopen(request, timeout=timeout) as response:
            return _pj_json.loads(response.read() or b"{}")
    except _pj_urlerror.HTTPError as exc:
        payload = exc.read()
        try:
            message = str(_pj_json.loads(payload).get("message"))
        except (ValueError, AttributeError):
            message = payload.decode("utf-8", "replace")[:200]
        raise AdminApiError(exc.code, message) from None
    except OSError as exc:
        raise AdminApiError(0, f"{web} not answering: {exc}") from None


def _project_args(parser: _pj_argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="project_command", required=True)
    create = sub.add_parser("create", help="create a project; prints its write key (once) as JSON")
    create.add_argument("project_id")
    create.add_argument("--no-s3", dest="s3_streaming", action="store_false", help="do not export it to S3")
    create.add_argument("--quota-eps", type=float, default=None, help="events/s quota (default: the global one)")
    listing = sub.add_parser("list", help="list projects with their quota, shed state and key state")
    listing.add_argument("--show-keys", action="store_true", help=_pj_argparse.SUPPRESS)  # keys are not kept
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
        p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default $STREAMAPP_KAFKA_BOOTSTRAP)")
        p.add_argument("--topic", default=None, help="control topic (default $STREAMAPP_EVENTS_TOPIC-control)")


@_pj_command("project", _project_args)
def project(args: _pj_argparse.Namespace) -> int:
    """Create, list, rotate or revoke projects' write keys: through the control topic, or a worker with --web.

    Keys are stored only as SHA-256 hashes: create and rotate-key print the key once; list never can.
    """
    from streamapp.web.keen import curl_example

    command = args.project_command
    try:
        if args.web:
            web, token = admin_target(args.web, args.token)
            path = f"/admin/projects/{args.project_id}/key" if command in ("rotate-key", "revoke-key") else ""
            if command == "create":
                body: dict[str, _PjAny] = {"project_id": args.project_id, "s3_streaming": args.s3_streaming}
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
            result = _pj_asyncio.run(run(args))
    except AdminApiError as exc:
        print(f"streamapp project {command}: {exc}", file=_pj_sys.stderr)
        return 1
    if command in ("create", "rotate-key"):
        shown = {"project_id": result["project_id"], "write_key": result["write_key"]}
        if command == "rotate-key":
            shown["previous_key_expires_at"] = result.get("previous_key_expires_at")
        print(_pj_json.dumps(shown))
        print("the key is shown only now; try: " + curl_example(web, result["project_id"], result["write_key"]),
              file=_pj_sys.stderr)  # fmt: skip
        return 0
    if command == "revoke-key":
        print(_pj_json.dumps({"project_id": args.project_id, "revoked": True}))
        return 0
    if args.json:
        print(_pj_json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render_projects(result.get("projects", [])))
    return 0


def _pj_target(args: _pj_argparse.Namespace) -> tuple[str, str]:
    from streamapp.settings import Settings

    settings = Settings.from_env()
    return args.bootstrap or settings.kafka_bootstrap, args.topic or settings.topic_name("control")


async def create_project_via_topic(args: _pj_argparse.Namespace) -> dict[str, _PjAny]:
    """Publish a new project with the hash of a fresh write key; refuses one that already has a key."""
    from dataclasses import asdict

    from streamapp.contract import is_valid_name, name_rule
    from streamapp.control import ProjectSettings, hash_key, new_write_key, project_record, publish_records, read_view

    if not is_valid_name(args.project_id):
        raise AdminApiError(0, f"{args.project_id!r} is not a valid project id ({name_rule(args.project_id)})")
    if args.quota_eps is not None and not args.quota_eps > 0:
        raise AdminApiError(0, "--quota-eps must be > 0")
    bootstrap, topic = _pj_target(args)
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
        project = ProjectSettings(**{**fields, "created_at": _pj_time.time()})
        await publish_records(bootstrap, topic, [project_record(project)])
    except AdminApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - Kafka errors: one line for the operator
        raise AdminApiError(0, f"control topic {topic} on {bootstrap}: {exc!r}") from None
    return {"project_id": project.project_id, "write_key": key}


async def _publish_key_change(args: _pj_argparse.Namespace, grace: float | None) -> dict[str, _PjAny]:
    """Rotate (``grace`` seconds for the old key) or revoke (``grace`` None) through the control topic."""
    from streamapp.control import hash_key, key_record, new_write_key, publish_records, read_view

    bootstrap, topic = _pj_target(args)
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
        record = key_record(args.project_id, hash_key(key), old, _pj_time.time() + grace if old else None)
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


async def rotate_key_via_topic(args: _pj_argparse.Namespace) -> dict[str, _PjAny]:
    return await _publish_key_change(args, float(args.grace))


async def revoke_key_via_topic(args: _pj_argparse.Namespace) -> dict[str, _PjAny]:
    return await _publish_key_change(args, None)


async def list_projects_via_topic(args: _pj_argparse.Namespace) -> dict[str, _PjAny]:
    """The projects as the control topic has them, in the admin API's shape (no keys, no hashes)."""
    from dataclasses import asdict

    from streamapp.control import SECRET_KEY_FIELDS, read_view

    bootstrap, topic = _pj_target(args)
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


def render_table(header: str, rows: _PjIterable[str], empty: str) -> str:
    """An operator table: the header line, one line per row, or ``empty`` when there is none."""
    lines = [header, *rows]
    if len(lines) == 1:
        lines.append(empty)
    return "\n".join(lines)


def _project_row(p: dict[str, _PjAny], now: float) -> str:
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


def render_projects(projects: list[dict[str, _PjAny]]) -> str:
    """The ``project list`` table; the key column says whether a key is valid (keys are never kept)."""
    now = _pj_time.time()
    return render_table(
        f"{'project':<24} {'s3':<4} {'quota ev/s':>10}  {'state':<14} write key",
        (_project_row(p, now) for p in projects),
        "(no projects: create one with `streamapp project create ID`)",
    )


# ============================================================================================
# quota set|list|reset, shed, unshed (issue #4): quotas and manual shed overrides, published
# straight to the control topic with a plain producer (no worker needed); every worker's meter
# applies them within a fetch round trip. The admin HTTP API publishes the same records.
# ============================================================================================
import argparse as _qt_argparse  # noqa: E402
import asyncio as _qt_asyncio  # noqa: E402
import json as _qt_json  # noqa: E402
import sys as _qt_sys  # noqa: E402
from typing import Any as _QtAny  # noqa: E402

from streamapp.cli import command as _qt_command  # noqa: E402
from streamapp.metering import SHED_MODES  # noqa: E402 - the one shed vocabulary


def _qt_connection_args(parser: _qt_argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default $STREAMAPP_KAFKA_BOOTSTRAP)")
    parser.add_argument("--topic", default=None, help="control topic (default $STREAMAPP_EVENTS_TOPIC-control)")


def _qt_target(args: _qt_argparse.Namespace) -> tuple[str, str]:
    from streamapp.settings import Settings

    settings = Settings.from_env()
    return args.bootstrap or settings.kafka_bootstrap, args.topic or settings.topic_name("control")


def _qt_publish(args: _qt_argparse.Namespace, records: list[dict[str, _QtAny]]) -> int:
    from streamapp.control import publish_records

    bootstrap, topic = _qt_target(args)
    _qt_asyncio.run(publish_records(bootstrap, topic, records))
    for record in records:
        print(_qt_json.dumps(record, sort_keys=True))
    return 0


def _qt_project_id(text: str) -> str:
    from streamapp.contract import is_valid_name, name_rule

    if not is_valid_name(text):
        raise _qt_argparse.ArgumentTypeError(f"{text!r} is not a valid project id ({name_rule(text)})")
    return text


def _quota_args(parser: _qt_argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="quota_command", required=True)
    qset = sub.add_parser("set", help="set a project's quota (only the options given change)")
    qset.add_argument("project_id", type=_qt_project_id)
    qset.add_argument("--eps", type=float, default=None, help="events/s quota")
    qset.add_argument("--bps", type=float, default=None, help="bytes/s quota")
    qset.add_argument(
        "--burst", type=float, default=None, help="burst tolerance: shed above quota x (1 + BURST), e.g. 0.5"
    )
    qset.add_argument("--mode", choices=SHED_MODES, default=None, help="what shedding does")
    reset = sub.add_parser("reset", help="put a project's quota, burst and mode back to the defaults")
    reset.add_argument("project_id", type=_qt_project_id)
    listing = sub.add_parser("list", help="quotas and shed states of all projects")
    listing.add_argument("--json", action="store_true")
    for p in (qset, reset, listing):
        _qt_connection_args(p)


@_qt_command("quota", _quota_args)
def quota(args: _qt_argparse.Namespace) -> int:
    """Set, reset or list per-project quotas (events/s, bytes/s, burst tolerance, shed mode)."""
    from streamapp.control import quota_record

    if args.quota_command == "set":
        if args.eps is None and args.bps is None and args.burst is None and args.mode is None:
            print("streamapp quota set: give at least one of --eps, --bps, --burst, --mode", file=_qt_sys.stderr)
            return 2
        try:
            record = quota_record(
                args.project_id, quota_eps=args.eps, quota_bps=args.bps, burst=args.burst, shed_mode=args.mode
            )
        except ValueError as exc:
            print(f"streamapp quota set: {exc}", file=_qt_sys.stderr)
            return 2
        return _qt_publish(args, [record])
    if args.quota_command == "reset":
        return _qt_publish(args, [quota_record(args.project_id, reset=True)])
    return _quota_list(args)


def _quota_list(args: _qt_argparse.Namespace) -> int:
    from streamapp.control import read_view
    from streamapp.settings import Settings

    settings = Settings.from_env()
    bootstrap, topic = _qt_target(args)
    view = _qt_asyncio.run(read_view(bootstrap, topic))
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
        print(_qt_json.dumps({"defaults": defaults, "projects": rows}, indent=2, sort_keys=True))
        return 0

    def show(value: _QtAny, default: _QtAny) -> str:
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


def _shed_args(parser: _qt_argparse.ArgumentParser) -> None:
    parser.add_argument("project_id", type=_qt_project_id)
    parser.add_argument("--reason", default="", help="why (shown with the shed state)")
    parser.add_argument("--mode", choices=SHED_MODES, default=None, help="mode of this manual shed")
    parser.add_argument("--clear", action="store_true", help="remove the manual override: the rates decide again")
    _qt_connection_args(parser)


def _unshed_args(parser: _qt_argparse.ArgumentParser) -> None:
    parser.add_argument("project_id", type=_qt_project_id)
    parser.add_argument("--reason", default="")
    parser.add_argument("--clear", action="store_true", help="remove the manual override: the rates decide again")
    _qt_connection_args(parser)


@_qt_command("shed", _shed_args)
def shed(args: _qt_argparse.Namespace) -> int:
    """Shed a project by hand (it keeps its quota, the excess is diverted) until cleared."""
    from streamapp.control import override_record

    action = "clear" if args.clear else "shed"
    return _qt_publish(args, [override_record(args.project_id, action, args.reason, None if args.clear else args.mode)])


@_qt_command("unshed", _unshed_args)
def unshed(args: _qt_argparse.Namespace) -> int:
    """Keep a project unshed whatever its rate, until cleared (``--clear``)."""
    from streamapp.control import override_record

    return _qt_publish(args, [override_record(args.project_id, "clear" if args.clear else "unshed", args.reason)])


# ============================================================================================
# sink parked|retry-parked (issue #9): projects whose own S3 destination fails are parked
# (streamapp.sink.parking); show them, or have every worker try to redeliver them now.
# ============================================================================================
import argparse as _pk_argparse  # noqa: E402
import json as _pk_json  # noqa: E402
import sys as _pk_sys  # noqa: E402
import time as _pk_time  # noqa: E402
from typing import Any as _PkAny  # noqa: E402

from streamapp.cli import command as _pk_command  # noqa: E402


def _sink_args(parser: _pk_argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sink_command", required=True)
    parked = sub.add_parser("parked", help="projects whose own S3 destination is parked, with reason and backlog")
    parked.add_argument("--json", action="store_true", help="print the /sink/ view's parked projects as JSON")
    retry = sub.add_parser("retry-parked", help="redeliver parked objects now (one project or all)")
    retry.add_argument("--project", default=None, help="only this project")
    for p in (parked, retry):
        p.add_argument("--web", default=None, help="worker web URL (default http://127.0.0.1:$STREAMAPP_WEB_PORT)")
        p.add_argument("--token", default=None, help="admin token (default $STREAMAPP_ADMIN_TOKEN)")


@_pk_command("sink", _sink_args)
def sink(args: _pk_argparse.Namespace) -> int:
    """Parked destinations: list them, or retry their redelivery now (through a worker's admin API)."""
    web, token = admin_target(args.web, args.token)
    try:
        if args.sink_command == "retry-parked":
            body = {"project_id": args.project} if args.project else {}
            answer = admin_request(web, token, "POST", "/admin/sink/retry-parked", body)
            print(_pk_json.dumps(answer, sort_keys=True))
            if args.project and args.project not in answer.get("retried", []):
                print(f"streamapp sink retry-parked: {args.project} is not parked on any worker", file=_pk_sys.stderr)
                return 1
            return 0
        view = admin_request(web, token, "GET", "/sink/")
    except AdminApiError as exc:
        print(f"streamapp sink {args.sink_command}: {exc}", file=_pk_sys.stderr)
        return 1
    parked = view.get("parked") or {}
    if args.json:
        print(_pk_json.dumps(parked, indent=2, sort_keys=True))
    else:
        print(render_parked(parked))
    return 0


def _parked_row(pid: str, p: dict[str, _PkAny], now: float) -> str:
    since = p.get("since")
    age = f"{max(0.0, now - float(since)):.0f}s" if isinstance(since, int | float) else "-"
    return (
        f"{str(pid)[:24]:<24} {age:>7} {int(p.get('backlog_objects') or 0):>8} "
        f"{int(p.get('backlog_bytes') or 0):>12}  {p.get('reason') or ''}"
    )


def render_parked(parked: dict[str, _PkAny]) -> str:
    """The ``sink parked`` table."""
    now = _pk_time.time()
    return render_table(
        f"{'project':<24} {'since':>7} {'objects':>8} {'bytes':>12}  reason",
        (_parked_row(pid, p, now) for pid, p in sorted(parked.items())),
        "(no parked destinations)",
    )
