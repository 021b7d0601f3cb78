"""The S3 sink's throughput, this checkout against another revision, on one backlog, alternating.

    .venv/bin/python benchmarks/bench_sink_ab.py --base ../base-checkout [--rounds 3] [--records 200000]

A machine shared with other work drifts by tens of per cent within an hour, so two separate
``bench_sink.py`` runs cannot show a 5 % difference. Here one broker and one backlog serve both:
the base's worker and this checkout's worker read it in turn (base, head, base, head, ...), each
from the start with its own consumer group and bucket, and the figures are compared pairwise.
The base is any checkout of this repository (``git worktree add --detach ../base REV``), or this
one with other settings (``--base . --base-env STREAMAPP_S3_UPLOAD_CONCURRENCY=8``); its worker
runs in this checkout's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.backlog import fill  # noqa: E402
from benchmarks.bench_sink import BACKLOG_SECONDS, PARTITIONS, PROJECTS, backlog_timestamp, sink_run  # noqa: E402
from streamapp.dev import BrokerProcess, S3Process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--per-record", type=int, default=1, help="events per record")
    parser.add_argument(
        "--base-env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the base worker"
    )
    parser.add_argument(
        "--head-env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the head worker"
    )
    args = parser.parse_args()
    base = args.base.resolve()
    env = {
        "base": dict(kv.split("=", 1) for kv in args.base_env),
        "head": dict(kv.split("=", 1) for kv in args.head_env),
    }
    if not (base / "streamapp" / "__init__.py").exists():
        parser.error(f"{base} is not a checkout of streamapp")
    log_dir = tempfile.mkdtemp(prefix="bench-sink-ab-")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    results: dict[str, list[float]] = {"base": [], "head": []}
    with BrokerProcess(log_dir=log_dir) as broker, S3Process(log_dir=log_dir) as s3:
        topic = f"bench-{uuid.uuid4().hex[:6]}"
        start = time.time() - BACKLOG_SECONDS - 600  # ends 10 minutes ago: every window completes

        def timestamp_for(i: int) -> str:
            return backlog_timestamp(i, args.records, start)

        events = fill(
            broker.bootstrap,
            topic,
            PARTITIONS,
            args.records,
            args.per_record,
            lambda i: f"project-{i % PROJECTS}",
            timestamp_for,
        )
        for round_no in range(args.rounds):
            for side, root in (("base", base), ("head", ROOT)):
                rate, _ = sink_run(broker, s3, topic, events, log_dir, code_root=root, settings=env[side])
                results[side].append(rate)
                print(f"round {round_no + 1} {side:<4} {rate:>10,.0f} events/s", flush=True)
    ratios = [h / b for b, h in zip(results["base"], results["head"], strict=True)]
    print()
    print(f"{args.records} records of {args.per_record} event(s), {PARTITIONS} partitions, {PROJECTS} projects")
    print(f"base {base} {env['base'] or ''}: median {statistics.median(results['base']):,.0f} events/s")
    print(f"head {ROOT} {env['head'] or ''}: median {statistics.median(results['head']):,.0f} events/s")
    print(
        "head / base per round: " + ", ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
