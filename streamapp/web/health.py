"""``GET /healthz`` and ``GET /readyz``: is this worker's process up, and is it ready for traffic.

* ``/healthz``: the process is up (always open, never needs a token); a partition the transport
  stopped at a batch it cannot decode is reported (``degraded``) and stays 200: the process
  serves the rest, and a restart would meet the same batch again.
* ``/readyz``: control plane caught up, consumer assigned and each assigned events partition
  caught up within thresholds (``?max_lag=``, ``?max_age=``); 503 with reasons otherwise.

Both are open (no read token): orchestrators probe them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import faust
from faust.types import TP
from faust.web import Request, Response, View

from streamapp.control import ControlPlane
from streamapp.settings import Settings
from streamapp.web.cluster import Cluster
from streamapp.web.read_view import BadRequest, query_float

if TYPE_CHECKING:
    from streamapp.sink.service import S3Sink


def stopped_partitions(app: Any) -> list[dict[str, Any]]:
    """Partitions the transport stopped at an undecodable batch (streamapp.infra.transport, point 6)."""
    stopped = getattr(app.consumer, "stopped", None)
    return stopped() if callable(stopped) else []


class Readiness:
    """The readiness of one worker: control plane, assignment, and the sink's backlog per partition."""

    def __init__(
        self, app: faust.App, settings: Settings, control: ControlPlane, sink: S3Sink, cluster: Cluster
    ) -> None:
        self.app = app
        self.settings = settings
        self.control = control
        self.sink = sink
        self.cluster = cluster  # for this worker's URL, named in the answers
        self.assigned_at: float | None = None
        self.started_at = time.time()

    @property
    def url(self) -> str:
        return self.cluster.url

    def readiness(self, max_lag: float, max_age: float) -> tuple[bool, dict[str, Any]]:
        reasons: list[str] = []
        app = self.app
        if not self.control.caught_up.is_set():
            reasons.append("control plane has not caught up with the control topic yet")
        assigned: list[int] = []
        if self.assigned_at is None:
            reasons.append("consumer has no partition assignment yet")
        else:
            if getattr(app, "rebalancing", False):
                reasons.append("consumer group is rebalancing")
            try:
                assigned = sorted(
                    tp.partition for tp in app.consumer.assignment() if tp.topic == self.settings.events_topic
                )
            except Exception as exc:  # noqa: BLE001
                reasons.append(f"consumer assignment unknown: {exc!r}")
        backlog: dict[str, Any] = {}
        try:
            backlog = self.sink.backlog()
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"sink backlog unknown: {exc!r}")
        consumer: Any = app.consumer
        committed_known: Mapping[Any, int] = getattr(consumer, "_committed_offset", {}) or {}
        partitions = {}
        for partition in assigned:
            info = backlog.get(str(partition))
            if info is not None:
                lag = info.get("read_lag", 0)
                age = info.get("oldest_unflushed_age_seconds", 0.0)
            else:  # not opened by the sink yet: nothing read since the committed offset
                tp = TP(self.settings.events_topic, partition)
                highwater = consumer.highwater(tp) or 0
                lag = max(0, highwater - int(committed_known.get(tp) or 0))
                age = 0.0
            partitions[str(partition)] = {"read_lag": lag, "oldest_unflushed_age_seconds": age}
            if lag > max_lag:
                reasons.append(f"partition {partition}: {lag} offsets behind (> {max_lag:g})")
            if age > max_age:
                reasons.append(f"partition {partition}: oldest unflushed window {age:.0f}s old (> {max_age:g}s)")
        body = {
            "status": "ready" if not reasons else "not ready",
            "reasons": reasons,
            "worker": self.url,
            "assigned_partitions": assigned,
            "partitions": partitions,
            "thresholds": {"max_lag": max_lag, "max_age_seconds": max_age},
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        return not reasons, body

    def default_max_age(self) -> float:
        s = self.settings
        # A window is open for its length plus the lateness in normal operation; beyond that by
        # more than the health threshold, the sink is not keeping up.
        return float(s.window_seconds + s.allowed_lateness_seconds + s.health_backlog_seconds)

    def default_max_lag(self) -> float:
        return 50_000.0  # records behind the high watermark: about two seconds of a busy partition


def register_health(app: faust.App, health: Readiness) -> None:
    """Mount ``/healthz`` and ``/readyz``."""

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: Any = None, **kwargs: Any) -> None:
        health.assigned_at = time.time()

    @app.page("/healthz")
    class Healthz(View):
        async def get(self, request: Request) -> Response:
            # A partition stopped at a batch it cannot decode is reported, and stays 200: the
            # process serves the rest, and a restart would meet the same batch again.
            stopped = stopped_partitions(app)
            if stopped:
                errors = [s["error"] for s in stopped]
                return self.json({"status": "degraded", "worker": health.url, "errors": errors, "stopped": stopped})
            return self.json({"status": "ok", "worker": health.url})

    @app.page("/readyz")
    class Readyz(View):
        async def get(self, request: Request) -> Response:
            try:
                max_lag = query_float(request, "max_lag", health.default_max_lag())
                max_age = query_float(request, "max_age", health.default_max_age())
            except BadRequest as exc:
                return self.json({"error": str(exc)}, status=400)
            ready, body = health.readiness(max_lag, max_age)
            return self.json(body, status=200 if ready else 503)

    return health
