"""What a shed project's excess costs the sink: diverted whole vs exported on time, side by side.

    .venv/bin/python benchmarks/bench_divert.py [--records 400] [--events 500] [--repeat 3] [--plain]

In-process and pure (no broker, no S3; a few seconds). The same backlog of a spiking project's
batch records (the replay's spike: ``--events`` pageviews per record asking for the five add-ons
of Keen's auto-collector; ``--plain``: the replay's plain events) is fed to the sink's state machine
(``PartitionWindows.process`` plus building what it hands on) three ways:

* **export**: no shed marker; every event enriched, encoded and buffered for S3 (the baseline);
* **divert**: shed in divert mode at the replay's share (5 % admitted); the other records go to
  the overflow lane as read (``overflow_record``);
* **drain**: what the overflow drain then spends on the diverted records (``OverflowChunks``),
  paced later on spare capacity.

CPU time of this process (on a shared machine wall time measures the neighbours); the best of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamapp.overflow.chunks import OverflowChunks  # noqa: E402
from streamapp.replay.traffic import encode_events  # noqa: E402
from streamapp.sink.diversions import overflow_record  # noqa: E402
from streamapp.sink.partition import PartitionWindows  # noqa: E402
from streamapp.sink.window_state import Route  # noqa: E402

ADMITTED = 0.05


def backlog(records: int, events: int, epoch_ms: int, addons: bool) -> list[bytes]:
    head = b'{"project_id":"p000","collection":"pageviews","events":['
    return [head + encode_events(0, i * events, events, epoch_ms, addons) + b"]}" for i in range(records)]


def new_windows(route: Route | None) -> PartitionWindows:
    windows = PartitionWindows(
        "events",
        0,
        window_seconds=10,
        lateness=5,
        max_object_bytes=8 << 20,
        max_event_bytes=900_000,
        max_record_bytes=10_000_000,
        target=lambda project: ("bucket", "events"),
        manifest_target=("bucket", "manifests"),
    )
    if route is not None:
        windows.marker(0, "p000", route)
    return windows


def sink_run(values: list[bytes], epoch_ms: int, route: Route | None) -> tuple[float, list[bytes]]:
    """CPU seconds of the sink over ``values``, and the overflow records it produced."""
    windows = new_windows(route)
    overflow: list[bytes] = []
    gc.collect()
    began = time.process_time()
    for offset, value in enumerate(values, start=1):
        windows.process(offset, epoch_ms, b"p000", value)
        for batch in windows.diverted:
            overflow.append(overflow_record(0, batch.offset, batch.timestamp_ms, batch.record))
        windows.diverted.clear()
        windows.outbox.clear()
    return time.process_time() - began, overflow


def drain_run(overflow: list[bytes]) -> float:
    chunks = OverflowChunks(
        "events-overflow", 0, window_seconds=10, max_events=5000, max_bytes=8 << 20, target=lambda p: ("b", "e")
    )
    gc.collect()
    began = time.process_time()
    for offset, value in enumerate(overflow):
        chunks.process(offset, b"p000", value)
        chunks.ready.clear()
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--events", type=int, default=500, help="events per record")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="plain events instead of the spike's pageviews")
    args = parser.parse_args()
    epoch_ms = int(time.time() * 1000)
    values = backlog(args.records, args.events, epoch_ms, addons=not args.plain)
    total = args.records * args.events
    best: dict[str, float] = {}
    diverted_events = 0
    for _ in range(args.repeat):
        export_s, _ = sink_run(values, epoch_ms, None)
        divert_s, overflow = sink_run(values, epoch_ms, Route("divert", ADMITTED))
        drain_s = drain_run(overflow)
        diverted_events = len(overflow) * args.events
        for name, seconds in (("export", export_s), ("divert", divert_s), ("drain", drain_s)):
            best[name] = min(best.get(name, float("inf")), seconds)
    kind = "plain events" if args.plain else "pageviews with 5 add-ons"
    print(f"{args.records} records of {args.events} {kind} ({total:,} events), best of {args.repeat}, CPU time:")
    print(f"  sink, exported on time (baseline)    {total / best['export']:>12,.0f} events/s")
    share = diverted_events / total
    print(f"  sink, shed: {share:.0%} diverted whole        {total / best['divert']:>12,.0f} events/s")
    print(f"  drain, the diverted records later    {diverted_events / best['drain']:>12,.0f} events/s")
    print(f"  sink cost of a shed spike / an exported one: {best['divert'] / best['export']:.2f}")


if __name__ == "__main__":
    main()
