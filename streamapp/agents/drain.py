"""The overflow drain agent: the overflow topic -> ``OverflowDrain`` (streamapp.overflow.drain).

A separate agent from the sink: its pacing waits only hold back the overflow partitions.
"""

from __future__ import annotations

import faust
from faust.types import StreamT

from streamapp.overflow import OverflowDrain
from streamapp.runtime import Runtime

DRAIN_BATCH = 16  # fetched batches of the overflow topic (bulk: each one a RecordBatch)


def register_drain(app: faust.App, runtime: Runtime) -> OverflowDrain:
    settings = runtime.settings
    drain = OverflowDrain(
        app=app,
        settings=settings,
        topic=runtime.topics.overflow.get_topic_name(),
        objects_topic=runtime.topics.objects.get_topic_name(),
        checkpoints=runtime.checkpoints,
        parking=runtime.parking,
        export_target=runtime.export_target,
        sink_backlog=runtime.sink.backlog,
        metrics=runtime.metrics,
        spawn=runtime.spawn,
    )
    # The meter's views and metrics read the drain's status through it (meter.drain_status()).
    meter = getattr(runtime, "meter", None)
    if meter is not None:
        meter.drain = drain

    @app.agent(runtime.topics.overflow, name="overflow-drain")
    async def overflow_drain(stream: StreamT) -> None:
        async for events in stream.take_events(DRAIN_BATCH, within=0.2):
            await drain.handle(events)

    @app.timer(interval=0.5)
    async def drain_ticks() -> None:
        await drain.tick_idle_partitions()

    @app.on_partitions_revoked.connect
    async def drain_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        drain.revoke(revoked)

    return drain
