"""Prometheus metrics of one worker, on a registry of its own (several apps may share a process in tests).

Two kinds of series:

* Event-driven ones, updated where things happen: S3 objects/bytes/events by kind
  (``object_written``, called by the sink and the drain), S3 put latency (an
  ``S3Writer.on_put`` observer) and HTTP latency (an aiohttp middleware, see
  ``streamapp.web.metrics_view``).
* Scrape-time ones, read from the worker's services when ``/metrics`` is rendered
  (``bind(ScrapeSources(...))``, ``WorkerCollector``): per-project counters, rates and shed
  state from the meter (rendered by ``streamapp.metering.project_families``), per-partition lag
  and oldest-unflushed age from the sink, S3 retries/errors, the overflow drain and parked
  objects. ``Metrics`` itself is built first (every service counts into it), the sources last.

Label cardinality is bounded whatever the number of projects: per-project series
exist only for the ``top_n`` projects by current rate; everything else is summed
into ``project="other"`` (see ``streamapp.metering.BoundedProjectCounters``). Partition
labels are bounded by the partition count, route labels by the registered routes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamapp.metering import DEFAULT_TOP_N, OTHER, BoundedProjectCounters, project_families

if TYPE_CHECKING:
    from streamapp.metering.service import Meter
    from streamapp.sink import Parking, S3Sink, S3Writer

log = logging.getLogger(__name__)

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, top_n: int = DEFAULT_TOP_N) -> None:
        self.registry = CollectorRegistry()
        self.s3_objects = Counter("streamapp_s3_objects", "Objects written to S3", ["kind"], registry=self.registry)
        self.s3_bytes = Counter(
            "streamapp_s3_bytes", "Compressed bytes written to S3", ["kind"], registry=self.registry
        )
        self.s3_events = Counter("streamapp_s3_events", "Events written to S3", ["kind"], registry=self.registry)
        self.flush_seconds = Histogram(
            "streamapp_s3_put_seconds",
            "Time to build and write one S3 object (flush latency)",
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "streamapp_http_request_seconds",
            "Latency of HTTP requests served by the worker, by route template",
            ["route", "method", "status"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.control_rejected = Counter(
            "streamapp_control_records_rejected",
            "NUL-keyed records in the events topic refused as control records (unsigned, forged, misplaced)",
            registry=self.registry,
        )
        self.projects = BoundedProjectCounters(top_n)
        self._bound = False

    def object_written(self, obj: Any, size: int) -> None:
        self.s3_objects.labels(obj.kind).inc()
        self.s3_bytes.labels(obj.kind).inc(size)
        self.s3_events.labels(obj.kind).inc(obj.events)

    def observe_put(self, seconds: float) -> None:
        """``S3Writer.on_put`` observer."""
        self.flush_seconds.observe(seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(route, method, str(status)).observe(seconds)

    def bind(self, sources: ScrapeSources) -> None:
        """Read the meter, the sink, S3, parking and the drain at every scrape (idempotent)."""
        if self._bound:
            return
        self._bound = True
        sources.s3.on_put.append(self.observe_put)
        self.registry.register(WorkerCollector(sources, self.projects))


@dataclass(frozen=True)
class ScrapeSources:
    """What ``/metrics`` reads at scrape time: the worker's services, each by what it offers."""

    meter: Meter
    sink: S3Sink
    s3: S3Writer
    parking: Parking
    drain_status: Callable[[], Mapping[str, Any]]  # the overflow drain's ``status``


class WorkerCollector:
    """Scrape-time series read from one worker's services."""

    def __init__(self, sources: ScrapeSources, projects: BoundedProjectCounters) -> None:
        self.sources = sources
        self.projects = projects

    def describe(self) -> list[Metric]:
        return []  # no fixed description: registering must not call into the services

    def collect(self) -> Iterator[Metric]:
        for part in (
            self._project_families,
            self._sink_families,
            self._s3_families,
            self._overflow_families,
            self._parking_families,
        ):
            try:
                yield from part()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source is not ready
                log.debug("metrics: %s unavailable: %r", part.__name__, exc)

    def _project_families(self) -> list[Metric]:
        return project_families(self.sources.meter, self.projects)

    def _sink_families(self) -> list[Metric]:
        backlog = self.sources.sink.backlog()
        lag = GaugeMetricFamily(
            "streamapp_consumer_lag", "Events-topic offsets not yet read by the sink", labels=["partition"]
        )
        behind = GaugeMetricFamily(
            "streamapp_uncommitted_offsets",
            "Events-topic offsets not yet durable in S3 (highwater - committed)",
            labels=["partition"],
        )
        age = GaugeMetricFamily(
            "streamapp_oldest_unflushed_age_seconds",
            "Age of the oldest open (unflushed) window of a partition",
            labels=["partition"],
        )
        windows = GaugeMetricFamily("streamapp_open_windows", "Open windows of a partition", labels=["partition"])
        corrected = CounterMetricFamily(
            "streamapp_sink_future_corrected",
            "Events stamped more than STREAMAPP_MAX_FUTURE_SECONDS ahead, windowed at their record's time",
            labels=["partition"],
        )
        for partition, info in backlog.items():
            corrected.add_metric([partition], float(info.get("future_corrected", 0)))
            lag.add_metric([partition], float(info.get("read_lag", 0)))
            behind.add_metric([partition], float(info.get("offsets_behind", 0)))
            age.add_metric([partition], float(info.get("oldest_unflushed_age_seconds", 0.0)))
            windows.add_metric([partition], float(info.get("open_windows", 0)))
        sink = self.sources.sink
        pending = GaugeMetricFamily("streamapp_sink_pending_bytes", "Bytes built but not yet durable in S3")
        pending.add_metric([], float(sink.pending_bytes))
        events = CounterMetricFamily("streamapp_sink_events_in", "Events read by the sink")
        events.add_metric([], float(sink.events_in))
        invalid = CounterMetricFamily("streamapp_sink_invalid", "Records dead-lettered by the sink")
        invalid.add_metric([], float(sink.invalid_out))
        return [lag, behind, age, windows, pending, events, invalid, corrected]

    def _s3_families(self) -> list[Metric]:
        stats = self.sources.s3.stats
        out = []
        for name, value, doc in (
            ("streamapp_s3_puts", stats.objects, "S3 puts completed (data objects, manifests and checkpoints)"),
            ("streamapp_s3_put_bytes", stats.bytes, "Bytes of all completed S3 puts"),
            ("streamapp_s3_errors", stats.errors, "Failed S3 calls"),
            ("streamapp_s3_retries", stats.retries, "Retried S3 calls"),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(value))
            out.append(family)
        return out

    def _parking_families(self) -> list[Metric]:
        book = self.sources.parking.book
        return parking_families(book.snapshot(), book, self.projects.top_n)

    def _overflow_families(self) -> list[Metric]:
        status = self.sources.drain_status()
        out = []
        backlog = GaugeMetricFamily(
            "streamapp_overflow_backlog", "Overflow records not yet drained to S3", labels=["partition"]
        )
        for partition, value in overflow_backlog_by_partition(status).items():
            backlog.add_metric([partition], float(value))
        out.append(backlog)
        rate = overflow_drain_rate(status)
        if rate is not None:
            family = GaugeMetricFamily("streamapp_overflow_drain_rate", "Current overflow drain rate, events/s")
            family.add_metric([], float(rate))
            out.append(family)
        return out


def overflow_drain_rate(status: Mapping[str, Any]) -> float | None:
    """Current overflow drain rate (events/s) from the drain's ``status()``, if it says."""
    for key in ("rate_eps", "drain_rate", "drain_rate_eps"):
        value = status.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def overflow_backlog_by_partition(status: Mapping[str, Any]) -> dict[str, float]:
    """Per-partition overflow backlog from the drain's ``status()`` (numbers or dicts with a backlog field)."""
    raw = status.get("backlog", status.get("partitions", {}))
    out: dict[str, float] = {}
    if isinstance(raw, Mapping):
        for partition, value in raw.items():
            if isinstance(value, Mapping):
                value = value.get("backlog", value.get("offsets_behind", value.get("lag", 0)))
            if isinstance(value, int | float):
                out[str(partition)] = float(value)
    return out


def parking_families(parked: Mapping[str, Mapping[str, Any]], counters: Any, top_n: int) -> list[Metric]:
    """Parked destinations (``streamapp.sink.parking``): totals, and per project for the ``top_n``
    largest backlogs (the rest summed into ``project="other"``: labels stay bounded)."""
    projects = GaugeMetricFamily("streamapp_parked_projects", "Projects whose own S3 destination is parked")
    projects.add_metric([], float(len(parked)))
    objects = GaugeMetricFamily(
        "streamapp_parked_objects", "Objects parked, waiting for their project's destination", labels=["project"]
    )
    nbytes = GaugeMetricFamily("streamapp_parked_bytes", "Bytes parked, by project", labels=["project"])
    age = GaugeMetricFamily(
        "streamapp_parked_age_seconds", "Seconds since a project's destination was parked", labels=["project"]
    )
    ranked = sorted(parked.items(), key=lambda kv: (-int(kv[1].get("backlog_bytes") or 0), kv[0]))
    other_objects = other_bytes = 0.0
    other_since: float | None = None
    now = time.time()
    for i, (project_id, state) in enumerate(ranked):
        n, b = float(state.get("backlog_objects") or 0), float(state.get("backlog_bytes") or 0)
        since = float(state.get("since") or now)
        if i < top_n and project_id != OTHER:
            objects.add_metric([project_id], n)
            nbytes.add_metric([project_id], b)
            age.add_metric([project_id], max(0.0, now - since))
        else:
            other_objects += n
            other_bytes += b
            other_since = since if other_since is None else min(other_since, since)
    if other_since is not None:
        objects.add_metric([OTHER], other_objects)
        nbytes.add_metric([OTHER], other_bytes)
        age.add_metric([OTHER], max(0.0, now - other_since))
    parked_total = CounterMetricFamily("streamapp_objects_parked", "Objects parked since the worker started")
    parked_total.add_metric([], float(counters.objects_parked))
    redelivered = CounterMetricFamily(
        "streamapp_objects_redelivered", "Parked objects copied to their destination since the worker started"
    )
    redelivered.add_metric([], float(counters.objects_redelivered))
    return [projects, objects, nbytes, age, parked_total, redelivered]
