"""Faust agents, timers and services, wired to one Runtime."""

from __future__ import annotations

import faust

from streamapp.agents.drain import register_drain
from streamapp.agents.meter import register_meter
from streamapp.agents.parking import register_parking
from streamapp.agents.sink import register_sink
from streamapp.runtime import Runtime


def register_agents(app: faust.App, runtime: Runtime) -> None:
    register_sink(app, runtime)
    register_meter(app, runtime)
    register_drain(app, runtime)
    register_parking(app, runtime)
