"""Faust agents, timers and services, wired to one Runtime."""

from __future__ import annotations

import faust

from streamapp.agents.sink import register_sink
from streamapp.runtime import Runtime


def register_agents(app: faust.App, runtime: Runtime) -> None:
    register_sink(app, runtime)
