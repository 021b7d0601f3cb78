"""The control plane's tail (``streamapp.control.plane``): started and stopped with the worker.

Not an agent (the control topic is read by every worker in full, with no consumer group), but
the same thin wiring: the sink, the meter, the drain and the API all answer from its view.
"""

from __future__ import annotations

import asyncio

import faust

from streamapp.control import ControlPlane


def register_control(app: faust.App, control: ControlPlane) -> None:
    @app.task
    async def control_plane() -> None:
        await control.start()

    @app.on_before_shutdown.connect
    async def stop_control(app: faust.App, **kwargs: object) -> None:
        await asyncio.shield(control.stop())
