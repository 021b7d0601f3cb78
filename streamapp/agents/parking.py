"""The redeliverer of parked objects (``streamapp.sink.parking``): one background task per worker."""

from __future__ import annotations

import faust

from streamapp.sink import Parking


def register_parking(app: faust.App, parking: Parking) -> None:
    @app.task
    async def sink_parked_redelivery() -> None:
        await parking.run()
