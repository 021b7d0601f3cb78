"""``GET /metrics`` (Prometheus text format) and the HTTP-latency middleware.

The series are defined in ``streamapp.metrics``; scrape-time ones (per-project counters with
bounded labels, per-partition lag and unflushed age, S3 retries/errors, overflow backlog) are
read from the worker's services while the page is rendered. HTTP latency is observed by an aiohttp
middleware on Faust's web application, labelled by route *template* (``/rates/{project_id}/``),
so the label set stays bounded whatever the URLs requested.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from aiohttp import web as aioweb
from faust.web import Request, Response
from prometheus_client.exposition import choose_encoder

from streamapp.metrics import Metrics
from streamapp.settings import Settings
from streamapp.web.read_view import ReadView

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(request: Any) -> str:
    """The matched route's template, or "unmatched" (never the raw path: that is unbounded)."""
    try:
        resource = request.match_info.route.resource
    except AttributeError:
        return "unmatched"
    if resource is None:
        return "unmatched"
    return str(resource.canonical)


def latency_middleware(metrics: Metrics) -> Any:

    @aioweb.middleware
    async def observe(request: aioweb.Request, handler: Any) -> aioweb.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except aioweb.HTTPException as exc:
            status = exc.status
            raise
        finally:
            method = request.method if request.method in _METHODS else "OTHER"
            metrics.observe_http(route_template(request), method, status, time.perf_counter() - started)

    return observe


def register_metrics(app: faust.App, metrics: Metrics, settings: Settings) -> None:
    """Mount ``/metrics`` and observe every request's latency (``metrics`` is bound already)."""
    web_app = getattr(app.web, "web_app", None)
    if web_app is not None and not web_app.frozen:
        web_app.middlewares.append(latency_middleware(metrics))

    @app.page("/metrics")
    class MetricsPage(ReadView):
        async def get(self, request: Request) -> Response:
            # Prometheus text format, or OpenMetrics when the scraper asks for it.
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return self.bytes(encoder(metrics.registry), headers={"Content-Type": content_type})

    MetricsPage.settings = settings
