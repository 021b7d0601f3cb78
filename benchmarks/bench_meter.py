"""The meter's own throughput next to a bare Faust agent, on the same data in the same run.

    .venv/bin/python benchmarks/bench_meter.py [--records 200000] [--batched-records 20000]

On an embedded Tansu broker it pre-produces two backlogs (one event per record, and batch
records of 100 events), 100 projects with one of them carrying 20 % of the records (over
its quota, so the meter sheds it and writes shed markers). Then, each in a worker process
of its own consuming the whole backlog from the start:

* ``bare kafka://``: a bare Faust agent iterating raw records (``async for value in stream``)
  on Faust's stock aiokafka transport;
* ``bare streamapp://``: the same agent on streamapp's transport (faster fetch loop);
* ``bare take_events``: a bare agent on ``stream.take_events(5000, within=0.2)`` on
  ``streamapp://`` (how a meter reading record by record would batch);
* ``meter`` (run first, while the backlog is inside its sustained horizon): the real meter
  agent (``streamapp.agents.meter``) on the bulk events topic: per-project rate rows in
  changelogged RocksDB tables, the shed state machine, shed markers; no S3 sink.

Rates are measured from the first record a process sees to the last of the backlog
(startup and group join excluded), in records/s and events/s.
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
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTITIONS = 4
PROJECTS = 100
HOT_SHARE = 0.2  # share of the records of project-0 (the one that gets shed)
# The backlog's records carry Kafka timestamps spread over the SPREAD_SECONDS before it is
# produced, as if it had arrived at a steady rate (the meter counts by record time). project-0's
# sustained 60 s rate is then records/5/60 events/s, every other project's burst rate at most
# ~records*0.8/99/SPREAD_SECONDS: the quota per dataset lies between them.
SPREAD_SECONDS = 50.0
QUOTA_EPS = {1: 100.0, 100: 1000.0}
# The meter first: its rates are judged while the backlog is inside its 60 s sustained horizon.
VARIANTS = ("meter", "bare-kafka", "bare-streamapp", "bare-take-events")
CHILD_TIMEOUT = 240.0


# ------------------------------------------------------------------ data
def hot_and_cold(i: int) -> str:
    """project-0 gets HOT_SHARE of the records, the other projects share the rest."""
    return "project-0" if i % round(1 / HOT_SHARE) == 0 else f"project-{1 + i % (PROJECTS - 1)}"


# ----------------------------------------------------------------- children
def app_kwargs() -> dict[str, Any]:
    """The performance-relevant settings of streamapp.app.create_app (kept in step with it)."""
    return {
        "consumer_auto_offset_reset": "earliest",
        "stream_wait_empty": False,
        "broker_max_poll_records": 5000,
        "consumer_max_fetch_size": 8 * 1024 * 1024,
        "stream_buffer_maxsize": 64,
        "producer_linger": 0.005,
        "broker_rebalance_timeout": 5.0,
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 1.0,
        "topic_partitions": PARTITIONS,
        "web_enabled": False,
        "env_prefix": "BENCH_FAUST_",
    }


class Clock:
    """Counts records; reports and exits the process when the backlog is consumed.

    The clock starts when the consumer received the first record (``message.time_in``, set by
    Faust's monitor from ``time.monotonic``), not when the agent got it: a batching agent gets
    its first records thousands at a time. Only offsets not seen before count, so records
    delivered again after a rebalance (nothing is committed here) are not counted twice.
    """

    def __init__(self, records: int, per_record: int, extra: Any = None, settle: Any = None) -> None:
        self.records = records
        self.per_record = per_record
        self.n = 0
        self.first = 0.0
        self.extra = extra
        self.settle = settle  # coroutine function awaited after the clock stops, before ``extra``
        self.high: dict[int, int] = {}

    def add(self, messages: list[Any]) -> None:
        if self.n == 0:
            self.first = getattr(messages[0], "time_in", None) or time.monotonic()
        high = self.high
        for m in messages:
            if m.offset > high.get(m.partition, -1):
                high[m.partition] = m.offset
                self.n += 1
        if self.n >= self.records and self.first:
            elapsed = time.monotonic() - self.first
            result = {"records": self.n, "seconds": elapsed, "rate": self.n / elapsed}
            self.first = 0.0  # report once
            if self.settle is None:
                self.report(result)
            else:
                asyncio.ensure_future(self._settle_and_report(result))

    async def _settle_and_report(self, result: dict[str, Any]) -> None:
        await self.settle()
        self.report(result)

    def report(self, result: dict[str, Any]) -> None:
        if self.extra is not None:
            result.update(self.extra())
        # Faust redirects print() into its logger: write to the real stdout.
        os.write(1, (json.dumps(result) + "\n").encode())
        os._exit(0)


def child(args: argparse.Namespace) -> None:
    import uvloop

    uvloop.install()
    import faust

    import streamapp.infra.transport  # noqa: F401 - registers streamapp://

    variant = args.child
    transport = "kafka" if variant == "bare-kafka" else "streamapp"
    data_dir = tempfile.mkdtemp(prefix="bench-meter-")
    app_id = f"bench-{variant}-{uuid.uuid4().hex[:8]}"
    if variant == "meter":
        from streamapp.agents import register_control, register_meter
        from streamapp.app import StreamappApp
        from streamapp.settings import Settings
        from streamapp.topics import declare_topics
        from streamapp.wiring import build_services

        settings = Settings(
            kafka_bootstrap=args.bootstrap,
            app_id=app_id,
            events_topic=args.topic,
            topic_partitions=PARTITIONS,
            data_dir=data_dir,
            default_eps_limit=QUOTA_EPS[args.per_record],
            unknown_projects="export",  # the projects are never created: meter each on its own, as before
        )
        app = StreamappApp(app_id, broker=settings.broker_url, store="rocksdb://", datadir=data_dir, **app_kwargs())
        topics = declare_topics(app, settings)
        services = build_services(app, settings, topics)  # only the meter (and the control plane) run
        meter = services.meter
        register_meter(app, meter, services.tables, topics.events, topics.control)
        register_control(app, services.control)

        def extra() -> dict[str, Any]:
            return {
                "events": meter.events_in,
                "batches": meter.batches,
                "shed": [s["project_id"] for s in meter.shed()["shed"]],
                "markers": meter.markers_written,
                "projects": len(meter.projects),
            }

        async def settle() -> None:
            """After the clock stopped: let the meter decide on what it counted (its decisions
            wait for the control view, and a one-event backlog is read in well under a second)."""
            deadline = time.monotonic() + 15.0
            while not meter.can_decide() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # one meter tick: decide, then write the markers

        clock = Clock(args.count, args.per_record, extra, settle)
        handle = meter.handle

        async def counted(batch: list[Any]) -> None:
            await handle(batch)
            # Faust events (take_events) or the raw records of a bulk topic: both have offsets.
            clock.add([getattr(item, "message", item) for item in batch])

        meter.handle = counted  # type: ignore[method-assign]

    else:
        app = faust.App(
            app_id, broker=f"{transport}://{args.bootstrap}", store="memory://", datadir=data_dir, **app_kwargs()
        )
        # The events topic exactly as streamapp declares it (raw bytes, acks disabled).
        topic = app.topic(
            args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", acks=False
        )
        clock = Clock(args.count, args.per_record)

        if variant == "bare-take-events":

            @app.agent(topic)
            async def take(stream):  # type: ignore[no-untyped-def]
                async for events in stream.take_events(5000, within=0.2):
                    clock.add([e.message for e in events])

        else:

            @app.agent(topic)
            async def iterate(stream):  # type: ignore[no-untyped-def]
                async for _value in stream:
                    clock.add([stream.current_event.message])

    sys.argv = [sys.argv[0], "worker", "--loglevel", os.environ.get("BENCH_LOGLEVEL", "warn"), "--without-web"]
    app.main()


def run_child(variant: str, bootstrap: str, topic: str, records: int, per_record: int, log_dir: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--count",
        str(records),
        "--per-record",
        str(per_record),
    ]
    log_path = Path(log_dir) / f"{variant}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            proc.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{variant} produced no result (log {log_path}):\n{text[-3000:]}")


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="one-event records")
    parser.add_argument("--batched-records", type=int, default=20_000, help="records of 100 events")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant (the median is reported)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--per-record", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from benchmarks.backlog import fill
    from streamapp.dev import BrokerProcess

    log_dir = tempfile.mkdtemp(prefix="bench-meter-")
    rows = []
    with BrokerProcess(log_dir=log_dir) as broker:
        for label, records, per_record in (
            ("1 event/record", args.records, 1),
            ("100 events/record", args.batched_records, 100),
        ):
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            started = time.monotonic()
            spread_from_ms = int((time.time() - SPREAD_SECONDS) * 1000)

            def record_time_ms(i: int, n: int = records, t0: int = spread_from_ms) -> int:
                return t0 + int(i * SPREAD_SECONDS * 1000 / n)

            events = fill(
                broker.bootstrap, topic, PARTITIONS, records, per_record, hot_and_cold, record_time_ms=record_time_ms
            )
            print(f"{label}: produced {records} records ({events} events) in {time.monotonic() - started:.1f}s")
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for rep in range(args.repeat):
                # Rotate the order so that no variant always runs at the same point of the run.
                for variant in VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]:
                    r = run_child(variant, broker.bootstrap, topic, records, per_record, log_dir)
                    runs[variant].append(r)
                    print(f"  {variant:<17} {r['rate']:>10,.0f} records/s {r['rate'] * per_record:>12,.0f} events/s")
            results = {v: sorted(rs, key=lambda r: r["rate"])[len(rs) // 2] for v, rs in runs.items()}
            for r in runs["meter"]:
                if r["events"] != events:  # e.g. a rebalance re-delivered records still to be counted
                    print(f"  note: the meter had counted {r['events']} of {events} events when the clock stopped")
            rows.append((label, records, events, results, runs["meter"][0]))

    print()
    print(
        f"Meter benchmark: one worker process each, {PARTITIONS} partitions, {PROJECTS} projects, "
        f"project-0 = {HOT_SHARE:.0%} of records (shed by the meter), median of {args.repeat} run(s)"
    )
    header = (
        f"{'records':<18} {'events':>9} {'bare kafka://':>14} {'bare streamapp://':>18} {'bare take_events':>17} "
        f"{'meter':>10} {'meter/bare':>11} {'meter/bare*':>12}"
    )
    print(header)
    for label, _records, events, results, _first in rows:
        per_record = events // _records
        stock = results["bare-kafka"]["rate"] * per_record
        fast = results["bare-streamapp"]["rate"] * per_record
        take = results["bare-take-events"]["rate"] * per_record
        meter = results["meter"]["rate"] * per_record
        print(
            f"{label:<18} {events:>9} {stock:>14,.0f} {fast:>18,.0f} {take:>17,.0f} {meter:>10,.0f} "
            f"{meter / stock:>11.2f} {meter / fast:>12.2f}"
        )
    print("events/s; meter/bare = vs stock kafka://, meter/bare* = vs streamapp:// (the transport the meter runs on)")
    for label, _records, _events, _results, m in rows:  # the first meter run: data still fresh
        print(
            f"meter, {label}: {m['batches']} batches, {m['events']} events counted, shed {m['shed']}, "
            f"{m['markers']} shed markers written"
        )


if __name__ == "__main__":
    main()
