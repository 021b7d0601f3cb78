"""Baseline: a bare Faust agent that only iterates raw bytes. Prints one JSON line with its rate.

Run by bench_sink.py / bench_meter.py in a subprocess:
    python benchmarks/bare_faust.py --bootstrap HOST:PORT --topic T --count N [--transport kafka|streamapp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True, help="records to consume before reporting")
    parser.add_argument("--transport", choices=["kafka", "streamapp"], default="kafka")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    import uvloop

    uvloop.install()
    import faust

    import streamapp.infra.transport  # noqa: F401 - registers streamapp://

    app = faust.App(
        f"bare-{uuid.uuid4().hex[:8]}",
        broker=f"{args.transport}://{args.bootstrap}",
        store="memory://",
        datadir=tempfile.mkdtemp(),
        web_enabled=False,
        topic_partitions=args.partitions,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=5000,
        consumer_max_fetch_size=8 * 1024 * 1024,
        stream_buffer_maxsize=20000,
        broker_rebalance_timeout=5.0,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        env_prefix="BARE_FAUST_",
    )
    topic = app.topic(args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    state = {"n": 0, "first": 0.0}

    @app.agent(topic)
    async def iterate(stream):  # type: ignore[no-untyped-def]
        async for _value in stream:
            if state["n"] == 0:
                state["first"] = time.perf_counter()
            state["n"] += 1
            if state["n"] >= args.count:
                elapsed = time.perf_counter() - state["first"]
                # Faust redirects print() into its logger: write to the real stdout.
                result = {"records": state["n"], "seconds": elapsed, "rate": state["n"] / elapsed}
                os.write(1, (json.dumps(result) + "\n").encode())
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
