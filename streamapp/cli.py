"""The ``streamapp`` console script.

* ``streamapp dev [--demo]``: embedded broker + S3 + one worker, with a status line.
* ``streamapp worker``: a Faust worker against configured Kafka/S3.
* ``streamapp produce``: a load generator that follows the event contract.
Operator commands (quota, shed, project, status) are added by their modules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from streamapp.dev import produce_load
from streamapp.settings import Settings, SettingsError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = (configure, fn)
        return fn

    return register


# ------------------------------------------------------------------ worker
def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loglevel", default=None)
    parser.add_argument("--datadir", default=None, help="local state directory (STREAMAPP_DATA_DIR wins if set)")
    parser.add_argument(
        "--reset-local-state",
        action="store_true",
        help="delete the local table stores before starting (they are rebuilt from the changelog topics)",
    )


@command("worker", _worker_args)
def worker(args: argparse.Namespace) -> int:
    """Same as ``faust -A streamapp.app worker``, with uvloop."""
    settings = Settings.from_env()
    if not settings.control_secret:
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
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from streamapp.app import app

    if args.reset_local_state:
        from streamapp.local_state import reset_local_state

        if reset_local_state(app.conf.tabledir):
            print(f"streamapp: deleted local table state in {app.conf.tabledir}", file=sys.stderr)
    sys.argv = argv
    app.main()
    return 0


# -------------------------------------------------------------------- dev
def _dev_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka-port", type=int, default=9092)
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--web-port", type=int, default=6066)
    parser.add_argument("--info-file", default=None, help="write the endpoints here as JSON")
    parser.add_argument("--duration", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("--demo", action="store_true", help="also run a traffic generator with one spiking project")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--window-seconds", type=int, default=None)


@command("dev", _dev_args)
def dev(args: argparse.Namespace) -> int:
    """Embedded stack: Tansu broker, moto S3 server, one worker; Ctrl-C or --duration stops all."""
    from streamapp.dev import BrokerProcess, DevStackError, S3Process, WorkerProcess

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
        sink = _get_json(f"{web}/sink/", token)
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
        shed = str(len(_get_json(f"{web}/shed/", token).get("shed", [])))
    return (
        f"[status] {rate:8.0f} events/s in | {sink.get('objects_written', 0)} objects written | "
        f"{shed} projects shed | backlog {behind} offsets, oldest unflushed {age:.0f}s"
    )


def _get_json(url: str, token: str = "") -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------- produce
def _produce_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="default: STREAMAPP_KAFKA_BOOTSTRAP")
    parser.add_argument("--topic", default=None, help="default: STREAMAPP_EVENTS_TOPIC")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s in total (before spikes)")
    parser.add_argument("--projects", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1, help="events per Kafka record (batch form of the contract)")
    parser.add_argument("--spike", action="append", default=[], help="PROJECT:FACTOR:START_S:LENGTH_S")
    parser.add_argument("--collection", default="pageviews")


def parse_spike(text: str) -> tuple[str, float, float, float]:
    try:
        project, factor, start, length = text.split(":")
        return project, float(factor), float(start), float(length)
    except ValueError:
        raise SettingsError(f"--spike {text!r}: expected PROJECT:FACTOR:START_S:LENGTH_S") from None


@command("produce", _produce_args)
def produce(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    spikes = [parse_spike(s) for s in args.spike]
    sent = asyncio.run(
        produce_load(
            args.bootstrap or settings.kafka_bootstrap,
            args.topic or settings.events_topic,
            rate=args.rate,
            projects=[f"project-{i}" for i in range(args.projects)],
            duration=args.duration,
            batch=args.batch,
            spikes=spikes,
            collection=args.collection,
        )
    )
    print(json.dumps(sent))
    return 0


# ----------------------------------------------------------------- replay
def _replay_args(parser: argparse.ArgumentParser) -> None:
    from streamapp.replay.command import configure

    configure(parser)


@command("replay", _replay_args)
def replay(args: argparse.Namespace) -> int:
    """Replay the 2019 incident: baseline (nothing shed) vs protected, side by side, with plots."""
    from streamapp.replay.command import main as replay_main

    return replay_main(args)


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import streamapp.operator_cli  # noqa: F401 - registers quota/shed/project/status

    parser = argparse.ArgumentParser(prog="streamapp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        configure(sub_parser)
        sub_parser.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(f"streamapp: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
