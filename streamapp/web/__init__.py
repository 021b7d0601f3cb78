"""HTTP endpoints on the worker's own web server."""

from __future__ import annotations

import faust

from streamapp.runtime import Runtime


def register_web(app: faust.App, runtime: Runtime) -> None:
    __import__("streamapp.api", fromlist=["register_api"]).register_api(app, runtime)  # Keen API (#5)
    __import__("streamapp.web.admin", fromlist=["register_admin"]).register_admin(app, runtime)  # admin API (#5)
    __import__("streamapp.web.views", fromlist=["register_views"]).register_views(app, runtime)  # read views (#6)
