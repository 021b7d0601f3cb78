"""S3 sink throughput, end to end, next to its baselines on the same data in the same run.

    .venv/bin/python benchmarks/bench_sink.py [--records 200000] [--batched-events 1000000]

On an embedded Tansu broker and moto S3 server it pre-produces a backlog (one hour of
event time, like a pipeline that fell behind), then measures:

1. plain aiokafka consume + orjson decode (the ceiling of any Python consumer);
2. a bare Faust agent iterating raw bytes, on stock ``kafka://`` and on ``streamapp://``;
3. the streamapp S3 sink (parse, enrich, window, gzip, upload, checkpoint, commit), from
   its first record until every partition's offset is committed, in a worker that also
   runs the meter on every record (quotas set high: this measures the real-time export
   path, not shedding), and that worker's peak resident memory;
for one event per record and for batch records of 100 events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.backlog import fill  # noqa: E402
from streamapp.dev import BrokerProcess, S3Process, WorkerProcess, free_port  # noqa: E402

PARTITIONS = 4
PROJECTS = 50
BACKLOG_SECONDS = 3600


def backlog_timestamp(i: int, records: int, start: float) -> str:
    """Event times spread over one hour from ``start``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + BACKLOG_SECONDS * i / records)) + ".000Z"


async def aiokafka_decode(bootstrap: str, topic: str, records: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    seen = 0
    first = 0.0
    try:
        while seen < records:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10000)
            for batch in batches.values():
                if not first:
                    first = time.perf_counter()
                for record in batch:
                    orjson.loads(record.value)
                seen += len(batch)
    finally:
        await consumer.stop()
    return records / (time.perf_counter() - first)


def bare_faust(bootstrap: str, topic: str, records: int, transport: str) -> float:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bare_faust.py"),
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--count",
            str(records),
            "--transport",
            transport,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return float(json.loads(line)["rate"])
    raise RuntimeError(f"bare faust produced no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sink_run(
    broker: BrokerProcess,
    s3: S3Process,
    topic: str,
    events: int,
    log_dir: str,
    code_root: Path = ROOT,
    settings: dict[str, str] | None = None,
) -> tuple[float, dict]:
    """The sink's events/s over the backlog in ``topic``; the worker runs the code in ``code_root``
    with ``settings`` (``STREAMAPP_*`` variables) over the benchmark's own."""
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    port = free_port()
    worker = WorkerProcess(
        {
            "STREAMAPP_KAFKA_BOOTSTRAP": broker.bootstrap,
            "STREAMAPP_S3_ENDPOINT_URL": s3.endpoint_url,
            "STREAMAPP_S3_BUCKET": bucket,
            "STREAMAPP_APP_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "STREAMAPP_EVENTS_TOPIC": topic,
            "STREAMAPP_WEB_PORT": str(port),
            "STREAMAPP_DATA_DIR": tempfile.mkdtemp(),
            "STREAMAPP_IDLE_FLUSH_SECONDS": "1",
            "STREAMAPP_CONTROL_SECRET": "bench-control-secret",
            # The backlog was produced in seconds (up to ~2,000 events/s per project): with the
            # default 1,000 events/s quota the meter would shed every project and the sink would
            # divert most events to the overflow lane. This measures the real-time export path;
            # the meter still reads and counts every record.
            "STREAMAPP_DEFAULT_EPS_LIMIT": "1000000000",
            "STREAMAPP_DEFAULT_BPS_LIMIT": "1000000000000",
            "STREAMAPP_LOG_LEVEL": "warn",
            # The projects are never created: meter each on its own, as the figures were measured.
            "STREAMAPP_UNKNOWN_PROJECTS": "export",
            **(settings or {}),
        },
        log_dir=log_dir,
        cwd=code_root,  # `python -m streamapp` imports the package from its working directory
    )
    worker.start()
    try:
        worker.wait_ready(timeout=120)
        first = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            sink = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/sink/", timeout=5).read())
            now = time.perf_counter()
            if first is None and sink["events_in"] > 0:
                first = now
            parts = sink["partitions"].values()
            # Done when every event was read and every partition committed past its data.
            done = first and sink["events_in"] >= events and len(parts) == PARTITIONS
            if done and all(p["committed_offset"] >= p["highwater"] - 1 and p["open_windows"] == 0 for p in parts):
                sink["peak_rss_mb"] = peak_rss_mb(worker.pid)
                return events / (now - first), sink
            time.sleep(0.05)
        raise RuntimeError("sink did not finish: " + worker.log_tail(30))
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="one-event records")
    parser.add_argument("--batched-events", type=int, default=1_000_000, help="events in 100-event records")
    args = parser.parse_args()
    log_dir = tempfile.mkdtemp(prefix="bench-sink-")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with BrokerProcess(log_dir=log_dir) as broker, S3Process(log_dir=log_dir) as s3:
        rows = []
        for label, records, per_record in (
            ("1 event/record", args.records, 1),
            ("100 events/record", args.batched_events // 100, 100),
        ):
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            # The backlog ends 10 minutes ago: once it is consumed every window is complete.
            start = time.time() - BACKLOG_SECONDS - 600

            def project_for(i: int) -> str:
                return f"project-{i % PROJECTS}"

            def timestamp_for(i: int, n: int = records, t0: float = start) -> str:
                return backlog_timestamp(i, n, t0)

            events = fill(broker.bootstrap, topic, PARTITIONS, records, per_record, project_for, timestamp_for)
            plain = asyncio.run(aiokafka_decode(broker.bootstrap, topic, records)) * per_record
            stock = bare_faust(broker.bootstrap, topic, records, "kafka") * per_record
            fast = bare_faust(broker.bootstrap, topic, records, "streamapp") * per_record
            sink, info = sink_run(broker, s3, topic, events, log_dir)
            rows.append((label, events, plain, stock, fast, sink, info["objects_written"], info["peak_rss_mb"]))
        print()
        print(f"S3 sink benchmark: backlog of one hour of event time, {PARTITIONS} partitions, {PROJECTS} projects")
        header = (
            f"{'records':<18} {'events':>9} {'aiokafka+json':>14} {'bare faust':>11} "
            f"{'bare faust*':>12} {'sink':>9} {'sink/bare':>10} {'sink/bare*':>11} {'objects':>8} {'peak RSS':>9}"
        )
        print(header)
        for label, events, plain, stock, fast, sink, objects, rss in rows:
            print(
                f"{label:<18} {events:>9} {plain:>14,.0f} {stock:>11,.0f} {fast:>12,.0f} {sink:>9,.0f} "
                f"{sink / stock:>10.2f} {sink / fast:>11.2f} {objects:>8} {rss:>6,.0f} MB"
            )
        print("events/s; bare faust = stock kafka:// transport, bare faust* = streamapp:// transport;")
        print("peak RSS = the sink worker's peak resident memory (VmHWM)")


if __name__ == "__main__":
    main()
