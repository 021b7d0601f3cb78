"""The S3 sink agent: events topic -> tumbling event-time windows -> S3, exactly once.

A separate agent from the meter: both read the same records from one fetch, and
only this one commits the events topic (after the objects are durable).
"""

from __future__ import annotations

import asyncio
import logging

import faust
from faust.types import StreamT, TopicT

from streamapp.sink import S3Sink

log = logging.getLogger(__name__)


def register_sink(app: faust.App, sink: S3Sink, events: TopicT) -> None:

    # concurrency=1 on purpose: faust-streaming #606 (concurrency>1 commits past unprocessed
    # records). Events (not values) because the sink needs each record's partition and offset;
    # no take(): the window state machines batch by themselves and acks are ours (see transport).
    @app.agent(events, name="s3-sink")
    async def s3_sink(stream: StreamT) -> None:
        await sink.consume(stream)

    @app.task
    async def sink_commits() -> None:
        await sink.commit_loop()

    # The overflow lane's own producer (streamapp.overflow.lane) lives as long as the worker.
    @app.task
    async def overflow_producer() -> None:
        await sink.overflow.start()

    @app.on_before_shutdown.connect
    async def stop_overflow_producer(app: faust.App, **kwargs: object) -> None:
        await asyncio.shield(sink.overflow.stop())

    @app.timer(interval=max(0.5, sink.settings.idle_flush_seconds / 2))
    async def sink_ticks() -> None:
        await sink.tick_idle_partitions()

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        sink.revoke(revoked)
