"""``streamapp status``: the dashboard's picture in the terminal (issue #6) - top projects with
sparklines, shed projects, sink backlog and the overflow lane - from a worker's ``/rates/``,
``/shed/`` and ``/sink/`` views (merged over all workers), once or every ``--watch`` seconds."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from streamapp.cli.command import Command
from streamapp.metrics import overflow_backlog_by_partition, overflow_drain_rate
from streamapp.settings import Settings
from streamapp.web.client import get_json

_SPARK = "▁▂▃▄▅▆▇█"


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web", default=None, help="worker web URL (default http://127.0.0.1:$STREAMAPP_WEB_PORT)")
    parser.add_argument("--token", default=None, help="read token (default $STREAMAPP_READ_TOKEN)")
    parser.add_argument("--limit", type=int, default=10, help="top projects to show")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    parser.add_argument("--json", action="store_true", help="print the raw views as one JSON object")


def status(args: argparse.Namespace) -> int:
    """Top projects, shed projects and sink backlog of a running worker (all workers, merged)."""
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
            time.sleep(max(0.2, args.watch))
        except KeyboardInterrupt:
            return 0


def fetch_status(web: str, token: str, limit: int) -> dict[str, Any]:
    return {
        "rates": get_json(f"{web}/rates/?limit={int(limit)}&series=30", token),
        "shed": get_json(f"{web}/shed/", token),
        "sink": get_json(f"{web}/sink/", token),
    }


def spark(values: list[float]) -> str:
    """Unicode sparkline of ``values`` (scaled to their max)."""
    top = max(values, default=0) or 1
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))] for v in values)


def _per_second(series: list[dict[str, Any]], now: int, seconds: int) -> list[float]:
    by = {int(p.get("second", 0)): float(p.get("events", 0)) for p in series or []}
    return [by.get(s, 0.0) for s in range(now - seconds, now)]


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, now - float(ts))
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min"


def render_status(web: str, rates: dict[str, Any], shed: dict[str, Any], sink: dict[str, Any]) -> str:
    now = time.time()
    now_second = int(rates.get("generated_at") or now)
    shed_ids = {s.get("project_id") for s in shed.get("shed", [])}
    workers = rates.get("workers") or {web: "ok"}
    down = [w for w, s in workers.items() if s != "ok"]
    lines = [
        f"streamapp status  {web}  ({len(workers)} worker{'s' if len(workers) != 1 else ''}"
        f"{', NOT ANSWERING: ' + ', '.join(down) if down else ''})  {time.strftime('%H:%M:%S')}",
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


def _overflow_summary(overflow: dict[str, Any]) -> str:
    backlog = sum(overflow_backlog_by_partition(overflow).values())
    rate = overflow_drain_rate(overflow)
    rate_text = f"{rate:.0f} ev/s" if rate is not None else "-"
    return f"backlog {backlog:.0f}, drain rate {rate_text}"


STATUS_COMMAND = Command("status", _status_args, status)
