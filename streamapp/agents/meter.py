"""The meter agent: wires the events topic, a 1 s timer and two background tasks to the meter
service (``streamapp.metering.service.Meter``), and its tables' recovery to ``Meter.reload``.

It reads the same events-topic records as the S3 sink (one Faust consumer, two agents)
and never commits: the sink does, once events are in S3.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import faust
from faust.types import StreamT, TopicT

from streamapp.metering.service import Meter
from streamapp.tables.meter import MeterTables

if TYPE_CHECKING:
    from streamapp.app import StreamappApp

log = logging.getLogger(__name__)


def register_meter(app: StreamappApp, meter: Meter, tables: MeterTables, events: TopicT, control: TopicT) -> None:
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

    # The events topic is a bulk topic (streamapp.infra.transport): each Faust event is one fetched
    # batch of one partition and its value the raw records, so Faust's per-record machinery
    # runs once per batch. Meter.observe counts the records; each touched project's row is
    # written at most once a second (never per event) through PartitionContext, which sets
    # Faust's current event for the write: see streamapp/tables/meter.py.
    @app.agent(events, name="meter")
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
            await control.maybe_declare()
        except Exception as exc:  # noqa: BLE001 - it is created on first publish anyway
            log.warning("meter: declaring the control topic failed: %r", exc)
        await meter.run_publisher()
