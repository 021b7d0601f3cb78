"""The sink's read view: ``GET /sink/``: windows, per-partition backlog, S3 counters, parked
destinations and the overflow drain, of this worker (``?local=1``) or merged over the cluster.

Each partition has one owner, so the merge is a union of partitions; counters are summed, ages
and times maxed (:func:`merge_sink`). A peer that does not answer is named in ``workers`` and
the answer says ``"partial": true``. Behind the read token
(:class:`streamapp.web.read_view.ReadView`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response

from streamapp.web.cluster import Cluster, is_local
from streamapp.web.health import stopped_partitions
from streamapp.web.read_view import ReadView

if TYPE_CHECKING:
    from streamapp.settings import Settings
    from streamapp.sink.parking import Parking
    from streamapp.sink.s3 import S3Writer
    from streamapp.sink.service import S3Sink

_MAX_FIELDS = ("age_seconds", "_at", "watermark")


def merge_sink(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Cluster-wide /sink/ from per-worker ones: partitions united, counters summed, ages and times maxed."""
    out: dict[str, Any] = {}
    partitions: dict[str, dict[str, Any]] = {}
    overflow: list[Mapping[str, Any]] = []
    parked: dict[str, Any] = {}
    for payload in payloads:
        if isinstance(payload.get("parked"), Mapping):
            parked.update(payload["parked"])  # a project's partition has one owner: a union
        for partition, info in (payload.get("partitions") or {}).items():
            old = partitions.get(partition)
            if old is None or info.get("committed_offset", 0) > old.get("committed_offset", 0):
                partitions[partition] = dict(info)
        if isinstance(payload.get("overflow"), Mapping):
            overflow.append(payload["overflow"])
        for key, value in payload.items():
            if key in ("partitions", "overflow", "worker", "workers", "partial", "parked"):
                continue
            if key == "stopped_partitions" and isinstance(value, list):  # each worker reports its own
                out.setdefault(key, []).extend(value)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                if value and not out.get(key):
                    out[key] = value
                else:
                    out.setdefault(key, value)
            elif any(mark in key for mark in _MAX_FIELDS):
                out[key] = max(float(out.get(key) or 0), value)
            else:
                out[key] = out.get(key, 0) + value
    out["partitions"] = dict(sorted(partitions.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))
    out["overflow"] = merge_numbers(overflow)
    out["parked"] = dict(sorted(parked.items()))
    return out


def merge_numbers(dicts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Recursive merge: numbers summed (ages and timestamps maxed), dicts merged, other values kept first."""
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            old = out.get(key)
            if isinstance(value, Mapping):
                out[key] = merge_numbers([old, value] if isinstance(old, Mapping) else [value])
            elif isinstance(value, bool) or not isinstance(value, int | float):
                out.setdefault(key, value)
            elif isinstance(old, bool) or not isinstance(old, int | float):
                out[key] = value
            elif any(mark in key for mark in _MAX_FIELDS):
                out[key] = max(old, value)
            else:
                out[key] = old + value
    return out


def parked_view(parking: Parking) -> dict[str, Any]:
    """The parked destinations of this worker (``streamapp.sink.parking``) for /sink/."""
    book = parking.book
    objects, nbytes = book.totals()
    return {
        "parked": book.snapshot(),
        "parked_projects": len(book.tenants),
        "parked_objects": objects,
        "parked_bytes": nbytes,
        "objects_parked": book.objects_parked,
        "objects_redelivered": book.objects_redelivered,
    }


class SinkViews:
    """The logic of ``/sink/`` on one worker; the Faust page below is a thin wrapper.

    ``drain_status``: the overflow drain's status (today ``Meter.drain_status``, a proxy);
    ``app``: the Faust app, whose consumer names the partitions the transport stopped.
    """

    def __init__(
        self,
        app: faust.App,
        sink: S3Sink,
        s3: S3Writer,
        parking: Parking,
        drain_status: Callable[[], dict[str, Any]],
        cluster: Cluster,
    ) -> None:
        self.app = app
        self.s3_sink = sink
        self.s3 = s3
        self.parking = parking
        self.drain_status = drain_status
        self.cluster = cluster

    @property
    def url(self) -> str:
        return self.cluster.url

    def local_sink(self) -> dict[str, Any]:
        sink = self.s3_sink
        s3 = self.s3.stats
        partitions = sink.backlog()
        values = list(partitions.values())
        return {
            "worker": self.url,
            "partitions": partitions,
            "open_windows": sum(p.get("open_windows", 0) for p in values),
            "offsets_behind": sum(p.get("offsets_behind", 0) for p in values),
            "read_lag": sum(p.get("read_lag", 0) for p in values),
            "oldest_unflushed_age_seconds": max(
                (p.get("oldest_unflushed_age_seconds", 0.0) for p in values), default=0.0
            ),
            "last_flush_at": max((p.get("last_flush_at", 0.0) for p in values), default=0.0),
            "objects_written": sink.objects_written,
            "bytes_written": s3.bytes,
            "s3_puts": s3.objects,
            "s3_retries": s3.retries,
            "s3_errors": s3.errors,
            "last_error": s3.last_error,
            "last_write_at": s3.last_write_at,
            "pending_bytes": sink.pending_bytes,
            "events_in": sink.events_in,
            "invalid": sink.invalid_out,
            "control_rejected": sink.control_rejected,
            "stopped_partitions": stopped_partitions(self.app),
            "overflow": self.drain_status(),
            **parked_view(self.parking),
        }

    async def sink(self, request: Any) -> dict[str, Any]:
        if is_local(request):
            return self.local_sink()
        answers, status = await self.cluster.fan_out(request, "/sink/", {}, self.local_sink)
        merged = merge_sink(answers)
        merged["worker"] = self.url
        merged["generated_at"] = time.time()
        merged["workers"] = status
        merged["partial"] = any(s != "ok" for s in status.values())
        return merged


def register_sink_views(app: faust.App, views: SinkViews, settings: Settings) -> None:
    """Mount ``/sink/``: the sink, its parked objects and the overflow drain, cluster-wide."""

    @app.page("/sink/")
    class Sink(ReadView):
        async def get(self, request: Request) -> Response:
            return self.json(await views.sink(request))

    Sink.settings = settings
