"""``streamapp dev``: the embedded stack (Tansu broker, moto S3 server, one worker) in the foreground,
optionally with demo traffic, and a status line every 3 s until Ctrl-C or ``--duration``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import tempfile
import time
from typing import Any

from streamapp.cli.command import Command
from streamapp.dev import BrokerProcess, DevStackError, S3Process, WorkerProcess
from streamapp.settings import Settings
from streamapp.web.client import get_json


def _dev_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka-port", type=int, default=9092)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--web-port", type=int, default=6066)
    parser.add_argument("--info-file", default=None, help="write the endpoints here as JSON")
    parser.add_argument("--duration", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("--demo", action="store_true", help="also run a traffic generator with one spiking project")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--window-seconds", type=int, default=None)


def dev(args: argparse.Namespace) -> int:
    """Embedded stack: Tansu broker, moto S3 server, one worker; Ctrl-C or --duration stops all."""
    base = Settings.from_env()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="streamapp-dev-")
    log_dir = os.path.join(data_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    admin_token = base.admin_token or secrets.token_urlsafe(16)
    # One secret per stack, shared by its workers: they sign and check control records with it.
    control_secret = base.control_secret or secrets.token_hex(32)
    broker = BrokerProcess(port=args.kafka_port, log_dir=log_dir)
    s3 = S3Process(port=args.s3_port, log_dir=log_dir)
    worker_proc: WorkerProcess | None = None
    demo: Any = None
    try:
        broker.start()
        s3.start()
        s3.create_bucket(base.s3_bucket)
        env = {
            "STREAMAPP_KAFKA_BOOTSTRAP": broker.bootstrap,
            "STREAMAPP_S3_ENDPOINT_URL": s3.endpoint_url,
            "STREAMAPP_WEB_PORT": str(args.web_port),
            "STREAMAPP_DATA_DIR": os.path.join(data_dir, "worker"),
            "STREAMAPP_ADMIN_TOKEN": admin_token,
            "STREAMAPP_CONTROL_SECRET": control_secret,
        }
        if args.window_seconds:
            env["STREAMAPP_WINDOW_SECONDS"] = str(args.window_seconds)
        elif args.demo and "STREAMAPP_WINDOW_SECONDS" not in os.environ:
            env["STREAMAPP_WINDOW_SECONDS"] = "10"  # the demo should show objects within seconds
            env.setdefault("STREAMAPP_ALLOWED_LATENESS_SECONDS", "2")
            env.setdefault("STREAMAPP_IDLE_FLUSH_SECONDS", "2")
        worker_proc = WorkerProcess(
            {**{k: v for k, v in os.environ.items() if k.startswith("STREAMAPP_")}, **env}, log_dir=log_dir
        )
        worker_proc.start()
        web = f"http://127.0.0.1:{args.web_port}"
        info = {
            "kafka": broker.bootstrap,
            "s3_endpoint_url": s3.endpoint_url,
            "bucket": base.s3_bucket,
            "web": web,
            "admin_token": admin_token,
            "logs": log_dir,
            "pids": {"broker": broker.pid, "s3": s3.pid, "worker": worker_proc.pid},
        }
        print(f"streamapp dev: kafka {broker.bootstrap}  s3 {s3.endpoint_url} (bucket {base.s3_bucket})", flush=True)
        print(f"               web {web}  dashboard {web}/  metrics {web}/metrics  logs {log_dir}", flush=True)
        print(f"               admin token {admin_token}", flush=True)
        if args.info_file:
            with open(args.info_file, "w") as fh:
                json.dump(info, fh, indent=2)
        try:
            worker_proc.wait_ready(timeout=120)
        except DevStackError as exc:  # it died starting: say why (the log tail), exit non-zero
            print(f"streamapp dev: {exc}", flush=True)
            return 1
        if args.demo:
            # Imported only with --demo: it pulls in the Keen API module and so Faust (~1 s).
            from streamapp.dev.demo import DemoTraffic

            demo = DemoTraffic(broker.bootstrap, web, admin_token, base.events_topic)
            demo.start()
        started = time.monotonic()
        next_status = started + 3
        while not stop["now"]:
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            if not worker_proc.is_running():
                print(
                    f"streamapp dev: the worker exited with code {worker_proc.returncode}; log tail "
                    f"({worker_proc.log_path}):\n" + worker_proc.log_tail(40),
                    flush=True,
                )
                return 1
            time.sleep(0.2)
            if time.monotonic() >= next_status:
                next_status += 3
                print(status_line(web, base.read_token), flush=True)  # the admin token is no read token
        return 0
    finally:
        if demo is not None:
            demo.stop()
        if worker_proc is not None:
            worker_proc.stop()
        s3.stop()
        broker.stop()


_last: dict[str, float] = {}


def status_line(web: str, token: str = "") -> str:
    """One line: events/s in, objects written, projects shed, backlog."""
    try:
        sink = get_json(f"{web}/sink/", token)
    except OSError as exc:
        return f"[status] worker not answering yet ({exc})"
    now = time.monotonic()
    events = sink.get("events_in", 0)
    rate = 0.0
    if "t" in _last:
        rate = (events - _last["events"]) / max(1e-6, now - _last["t"])
    _last.update(t=now, events=events)
    parts = sink.get("partitions", {}).values()
    behind = sum(p.get("offsets_behind", 0) for p in parts)
    age = max((p.get("oldest_unflushed_age_seconds", 0) for p in parts), default=0)
    shed = "?"
    with contextlib.suppress(OSError):
        shed = str(len(get_json(f"{web}/shed/", token).get("shed", [])))
    return (
        f"[status] {rate:8.0f} events/s in | {sink.get('objects_written', 0)} objects written | "
        f"{shed} projects shed | backlog {behind} offsets, oldest unflushed {age:.0f}s"
    )


DEV_COMMAND = Command("dev", _dev_args, dev)
