"""The redeliverer of parked objects (``streamapp.sink.parking``): one background task per worker."""

from __future__ import annotations

import faust

from streamapp.runtime import Runtime


def register_parking(app: faust.App, runtime: Runtime) -> None:
    @app.task
    async def sink_parked_redelivery() -> None:
        await runtime.parking.run()
