"""The meter agent: per-project rate tables, shed decisions and shed markers.

It reads the same events-topic records as the S3 sink (one Faust consumer, two agents)
and never commits: the sink does, once events are in S3. See ``streamapp.metering.service``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import faust
from faust.types import StreamT

from streamapp.metering.service import Meter
from streamapp.runtime import Runtime
from streamapp.tables.meter import declare_tables
from streamapp.web.views import read_allowed, token_in_url

if TYPE_CHECKING:
    from streamapp.app import StreamappApp

log = logging.getLogger(__name__)


def register_meter(app: StreamappApp, runtime: Runtime) -> Meter:
    tables = declare_tables(app, runtime.settings)
    meter = Meter(runtime.app, runtime.settings, runtime.control, runtime.sink, tables)
    runtime.meter = meter  # type: ignore[attr-defined]

    @tables.states.on_recover
    async def meter_recovered() -> None:
        # Called after every rebalance once the changelogs are replayed, before the streams resume.
        meter.reload()

    # On shutdown: write what is counted, then count no more. Faust flushes its producer before
    # it exits, so these rows reach the changelog, and the next owner counts exactly the records
    # this worker did not (a crash instead loses up to a second of rows: those are counted twice).
    app.before_consumer_stop.append(meter.revoke)

    @app.on_partitions_revoked.connect
    async def meter_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        meter.revoke()

    # The events topic is a bulk topic (streamapp.transport): each Faust event is one fetched
    # batch of one partition and its value the raw records, so Faust's per-record machinery
    # runs once per batch. Meter.observe counts the records; each touched project's row is
    # written at most once a second (never per event) through PartitionContext, which sets
    # Faust's current event for the write: see streamapp/tables/meter.py.
    @app.agent(runtime.topics.events, name="meter")
    async def meter_agent(stream: StreamT) -> None:
        async for event in stream.events():
            await meter.handle_batch(event.value)

    @app.timer(interval=1.0)
    async def meter_tick() -> None:
        try:
            await meter.tick()
        except Exception:
            log.exception("meter: tick failed")

    @app.task
    async def meter_flusher() -> None:
        await meter.run_flusher()

    @app.task
    async def meter_publisher() -> None:
        # The control topic must exist for every worker's control-plane tail to catch up.
        try:
            await runtime.topics.control.maybe_declare()
        except Exception as exc:  # noqa: BLE001 - it is created on first publish anyway
            log.warning("meter: declaring the control topic failed: %r", exc)
        await meter.run_publisher()

    @app.page("/_meter/")
    async def meter_debug(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        """Internal: the meter's state on this worker (the operator views are /rates/, /shed/)."""
        settings = runtime.settings  # the read token (or peer token), never the admin token
        if token_in_url(request) or not read_allowed(request, settings.read_token, settings.peer_token):
            return self.json({"error": "unauthorized"}, status=401)
        body: dict[str, Any] = {
            **meter.status(),
            "top": meter.top(1000),
            "shed": meter.shed(),
            "counters": meter.counters(),
            "drain": meter.drain_status(),
        }
        project = request.query.get("project")
        if project:
            quota = meter.quota_for(project)
            effective = meter.effective_quota(project)
            body["project"] = {
                "project_id": project,
                "quota_eps": quota.eps,
                "quota_bps": quota.bps,
                "burst": quota.burst,
                "effective_eps": effective.eps,
                "mode": meter.mode_for(project),
                "series": meter.series(project, runtime.settings.sustained_horizon_seconds),
            }
        return self.json(body)

    return meter
