"""Prometheus metrics of one worker, on a registry of its own (several apps may share a process in tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.s3_objects = Counter("streamapp_s3_objects", "Objects written to S3", ["kind"], registry=self.registry)
        self.s3_bytes = Counter(
            "streamapp_s3_bytes", "Compressed bytes written to S3", ["kind"], registry=self.registry
        )
        self.s3_events = Counter("streamapp_s3_events", "Events written to S3", ["kind"], registry=self.registry)
        self.flush_seconds = Histogram(
            "streamapp_s3_put_seconds", "Time to build and write one S3 object", registry=self.registry
        )

    def object_written(self, obj: Any, size: int) -> None:
        self.s3_objects.labels(obj.kind).inc()
        self.s3_bytes.labels(obj.kind).inc(size)
        self.s3_events.labels(obj.kind).inc(obj.events)
