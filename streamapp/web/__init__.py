"""HTTP endpoints on the worker's own web server."""

from __future__ import annotations

import faust

from streamapp.runtime import Runtime
from streamapp.web.cluster import Cluster


def register_web(app: faust.App, runtime: Runtime) -> None:
    # (H-EDGE: the routes moved to their domains; `__import__` strings kept as the lead wrote them,
    # because streamapp.api / streamapp.control.views import streamapp.web.auth, which runs this
    # package's __init__ first: see the H-EDGE report.)
    cluster = Cluster(app, runtime.settings)  # peers and fan-out, shared by every view
    __import__("streamapp.api", fromlist=["register_api"]).register_api(app, runtime)  # Keen API (#5)
    __import__("streamapp.control.views", fromlist=["register_admin"]).register_admin(app, runtime, cluster)  # admin
    __import__("streamapp.web.health", fromlist=["register_health"]).register_health(app, runtime, cluster)
    __import__("streamapp.metering.views", fromlist=["register_metering_views"]).register_metering_views(
        app, runtime, cluster
    )
    __import__("streamapp.sink.views", fromlist=["register_sink_views"]).register_sink_views(app, runtime, cluster)
    __import__("streamapp.web.metrics_view", fromlist=["register_metrics"]).register_metrics(app, runtime)
    __import__("streamapp.web.dashboard", fromlist=["register_dashboard"]).register_dashboard(app, runtime)
