"""Helpers shared by integration tests: read what the sink wrote, wait for a condition."""

from __future__ import annotations

import gzip
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


def events_in(s3: dict[str, bytes]) -> Counter[str]:
    """How often each event ``n`` occurs in the gzip JSON-lines objects of a simulated bucket (key -> body)."""
    seen: Counter[str] = Counter()
    for key, body in s3.items():
        if key.endswith(".json.gz"):
            for line in gzip.decompress(body).splitlines():
                seen[orjson.loads(line)["n"]] += 1
    return seen


def list_keys(s3_client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def read_objects(s3_client: Any, bucket: str, prefix: str = "") -> dict[str, list[dict[str, Any]]]:
    """Every gzip JSON-lines object under ``prefix``: key -> decoded events."""
    objects = {}
    for key in list_keys(s3_client, bucket, prefix):
        if key.endswith(".json.gz"):
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            objects[key] = [orjson.loads(line) for line in gzip.decompress(body).splitlines()]
    return objects


def event_counts(objects: dict[str, list[dict[str, Any]]], field: str = "n") -> Counter[tuple[str, Any]]:
    """How often each (project, event[field]) appears across objects (key layout gives the project)."""
    seen: Counter[tuple[str, Any]] = Counter()
    for key, events in objects.items():
        project = key.split("/")[1]
        for event in events:
            seen[(project, event.get(field))] += 1
    return seen


def wait_until(check: Callable[[], T], timeout: float, interval: float = 0.5, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)
        last = check()
    return last


def every_partition_has_a_watermark(web_url: str, partitions: int = 4) -> bool:
    """Whether the worker at ``web_url`` (its merged /sink/ view) has a watermark on every partition.

    Idle partitions are ticked from their assignment on, so this is the moment after which every
    new window gets a manifest part from every partition.
    """
    with urllib.request.urlopen(f"{web_url}/sink/", timeout=5) as response:
        parts = json.loads(response.read())["partitions"]
    return len(parts) == partitions and all(info["watermark"] is not None for info in parts.values())


def earlier_overflow_record(
    project_id: str, collection: str, source_partition: int, positions: list[int], lines: list[bytes]
) -> bytes:
    """An overflow record as versions before whole-record diversion wrote it (events already
    enriched, one position each): the drain still reads them, e.g. after an upgrade."""
    head = orjson.dumps(
        {
            "project_id": project_id,
            "collection": collection,
            "source_partition": source_partition,
            "positions": positions,
        }
    )
    return head[:-1] + b',"events":[' + b",".join(lines) + b"]}"
