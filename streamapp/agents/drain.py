"""The overflow drain agent: the overflow topic -> ``OverflowDrain`` (streamapp.overflow.drain).

A separate agent from the sink: its pacing waits only hold back the overflow partitions.
"""

from __future__ import annotations

import faust
from faust.types import StreamT, TopicT

from streamapp.overflow import OverflowDrain

DRAIN_BATCH = 16  # fetched batches of the overflow topic (bulk: each one a RecordBatch)


def register_drain(app: faust.App, drain: OverflowDrain, overflow: TopicT) -> None:
    @app.agent(overflow, name="overflow-drain")
    async def overflow_drain(stream: StreamT) -> None:
        async for events in stream.take_events(DRAIN_BATCH, within=0.2):
            await drain.handle(events)

    @app.timer(interval=0.5)
    async def drain_ticks() -> None:
        await drain.tick_idle_partitions()

    # The drain's export pool (STREAMAPP_DRAIN_PROCESSES) lives as long as the worker.
    @app.task
    async def start_export_pool() -> None:
        drain.start_pool()

    @app.on_before_shutdown.connect
    async def stop_export_pool(app: faust.App, **kwargs: object) -> None:
        drain.close()

    @app.on_partitions_revoked.connect
    async def drain_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        drain.revoke(revoked)
