"""The Keen write routes on the worker's web server, and the server option they need (long image
beacon URLs); and the ``curl`` line that records one event on them (printed by the demo and the CLI).

* ``POST /3.0/projects/{project_id}/events/{collection}``, ``GET`` (the image beacon), ``OPTIONS``;
* ``POST /3.0/projects/{project_id}/events`` (a batch), ``OPTIONS``.

The checks and the produce are :class:`streamapp.api.ingest.IngestApi`'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiohttp import web
from faust.types import TopicT

from streamapp.api.browser import preflight_headers
from streamapp.api.ingest import IngestApi

log = logging.getLogger(__name__)

#: Keen's JavaScript SDK sends image beacons of up to 16,000 URL characters; aiohttp's default
#: request line limit is 8,190 bytes.
MAX_REQUEST_LINE_BYTES = 16 * 1024 + 64


def allow_long_beacon_urls(app: faust.App) -> None:
    """Raise the web server's request line limit to what Keen's SDK sends (faust's aiohttp driver
    keeps the server options in its runner; a driver without one keeps aiohttp's 8 KiB)."""
    kwargs = getattr(getattr(app.web, "_runner", None), "_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs.setdefault("max_line_size", MAX_REQUEST_LINE_BYTES)


async def declare_control_topic(control_topic: TopicT) -> None:
    """Declare the one-partition control topic (idempotent): the API answers only once the control
    plane has caught up with it, and a broker's auto-created topic could get the wrong partitions."""
    try:
        await control_topic.maybe_declare()
    except Exception as exc:  # noqa: BLE001 - the control plane keeps waiting; say why
        log.warning("could not declare the control topic: %r", exc)


def register_api(app: faust.App, api: IngestApi, control_topic: TopicT) -> None:
    """Mount Keen's write routes, and start and stop the API's producer with the worker."""
    allow_long_beacon_urls(app)

    @app.page("/3.0/projects/{project_id}/events/{collection}")
    class KeenEvent(faust.web.View):
        async def post(self, request: web.Request, project_id: str, collection: str) -> web.Response:
            return await api.record_one(request, project_id, collection)

        async def get(self, request: web.Request, project_id: str, collection: str) -> web.Response:
            return await api.record_pixel(request, project_id, collection)

        async def options(self, request: web.Request, **kwargs: Any) -> web.Response:
            return web.Response(status=204, headers=preflight_headers(request.headers))

    @app.page("/3.0/projects/{project_id}/events")
    class KeenBatch(faust.web.View):
        async def post(self, request: web.Request, project_id: str) -> web.Response:
            return await api.record_batch(request, project_id)

        async def options(self, request: web.Request, **kwargs: Any) -> web.Response:
            return web.Response(status=204, headers=preflight_headers(request.headers))

    @app.task
    async def api_producer() -> None:
        await declare_control_topic(control_topic)
        await api.start()

    @app.on_before_shutdown.connect
    async def stop_api_producer(app: faust.App, **kwargs: object) -> None:
        await asyncio.shield(api.stop())


def curl_example(web: str, project_id: str, write_key: str, collection: str = "pageviews") -> str:
    """A working ``curl`` line recording one event (printed by the demo and the CLI)."""
    return (
        f"curl -sS -X POST '{web.rstrip('/')}/3.0/projects/{project_id}/events/{collection}' "
        f"-H 'Authorization: {write_key}' -H 'Content-Type: application/json' "
        """-d '{"page": "/home", "user": {"id": 42}}'"""
    )
