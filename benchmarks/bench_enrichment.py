"""Per-event cost of PartitionWindows.process with and without Keen's data enrichment add-ons.

    .venv/bin/python benchmarks/bench_enrichment.py [--events 10000]

In-process and pure (no broker, no S3; a few seconds): the same one-event records as
bench_sink.py's "1 event/record" backlog, fed to the sink's state machine, side by side:

* plain events (no ``keen.addons``): what every event pays for the add-on hook;
* the hook's check alone (``"addons" in event["keen"]``), timed in isolation;
* events asking for each add-on alone, and for all five, with a realistic mix of
  user agents, addresses and URLs (a few hundred distinct values: the parsers' caches are warm
  for repeats, as with real traffic).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamapp.sink.partition import PartitionWindows  # noqa: E402

UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_{v} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.{v} Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.{v} Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/12{v}.0.0.0 Mobile Safari/537.36",
]
ALL_ADDONS = [
    {"name": "keen:ip_to_geo", "input": {"ip": "ip_address"}, "output": "ip_geo_info"},
    {"name": "keen:ua_parser", "input": {"ua_string": "user_agent"}, "output": "parsed_user_agent"},
    {"name": "keen:url_parser", "input": {"url": "page_url"}, "output": "parsed_page_url"},
    {"name": "keen:referrer_parser", "input": {"referrer_url": "referrer", "page_url": "page_url"}, "output": "ref"},
    {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "timestamp_info"},
]


def records(n: int, addons: list[dict[str, Any]] | None, start: float, inputs: bool = True) -> list[bytes]:
    """One-event records; ``addons`` None = no ``keen.addons``; ``inputs`` = carry the add-ons' input
    properties (an IP, a user agent, URLs), so a row with add-ons differs from its baseline only by them."""
    out = []
    for i in range(n):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 3600 * i / n)) + ".000Z"
        event: dict[str, Any] = {"n": i, "page": "/index.html", "user": {"id": i % 997}, "keen": {"timestamp": stamp}}
        if inputs:
            event.update(
                {
                    "ip_address": f"{81 + i % 50}.{i % 7}.{i % 200}.{i % 250 + 1}",
                    "user_agent": UAS[i % len(UAS)].format(v=i % 60),
                    "page_url": f"https://shop.example.com/p/{i % 300}?utm_source=news&item={i % 40}#top",
                    "referrer": f"https://www.google.com/search?q=shoes+{i % 50}",
                }
            )
        if addons is not None:
            event["keen"]["addons"] = addons
        out.append(orjson.dumps({"project_id": f"project-{i % 50}", "collection": "pageviews", "event": event}))
    return out


def per_event_us(values: list[bytes], start_ms: int) -> float:
    windows = PartitionWindows(
        "events",
        0,
        window_seconds=300,
        lateness=60,
        max_object_bytes=1 << 40,
        max_event_bytes=900_000,
        max_record_bytes=1_000_000,
        target=lambda project: ("bucket", "events"),
        manifest_target=("bucket", "manifests"),
    )
    keys = [f"project-{i % 50}".encode() for i in range(len(values))]  # the key is the value's project
    gc.collect()
    began = time.process_time()  # CPU time: on a shared machine wall time measures the neighbours
    for offset, value in enumerate(values):
        windows.process(offset, start_ms + offset, keys[offset], value)
        if len(windows.outbox) > 64:
            windows.outbox.clear()
    elapsed = time.process_time() - began
    assert not windows.invalid, windows.invalid[:1]
    return elapsed / len(values) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    n = args.events
    start = time.time() - 7200
    start_ms = int(start * 1000)
    plain = records(n, None, start, inputs=False)
    five = records(n, ALL_ADDONS, start)
    per_event_us(five[:1000], start_ms)  # warm-up: load the GeoIP database and compile the UA regexes
    runs = [("no add-ons (bench_sink's)", plain), ("no add-ons, with their inputs", records(n, None, start))]
    runs += [(f"only {addon['name']}", records(n, [addon], start)) for addon in ALL_ADDONS]
    runs.append(("all 5 add-ons", five))
    rows = []
    for label, values in runs:
        best = min(per_event_us(values, start_ms) for _ in range(3))
        rows.append((label, best))
    event = {"n": 1, "keen": {"timestamp": "2026-01-01T00:00:00.000Z", "id": "x", "created_at": "y"}}
    check_ns = (
        min(timeit.repeat(lambda: "addons" in event["keen"], number=200_000, repeat=5, timer=time.process_time))
        / 200_000
        * 1e9
    )
    loop_ns = min(timeit.repeat(lambda: None, number=200_000, repeat=5, timer=time.process_time)) / 200_000 * 1e9
    base = rows[1][1]
    print(f"PartitionWindows.process, {n} one-event records each (best of 3), per event:")
    for label, us in rows:
        print(f"  {label:<30} {us:8.2f} us   {us / base:5.2f}x")
    print("  (CPU time of this process: wall time on a shared machine would measure the neighbours)")
    hook = max(0.0, check_ns - loop_ns)
    share = hook / 10 / rows[0][1]
    print(f"  the hook's check alone         {hook / 1000:8.3f} us   ({share:.2f} % of a bench_sink event)")


if __name__ == "__main__":
    main()
