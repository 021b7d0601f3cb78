"""``GET /``: the live dashboard, one self-contained HTML page (inline CSS, vanilla JS, SVG sparklines).

The page holds no data: its script polls ``/rates/?series=60``, ``/shed/`` and ``/sink/`` every
second (``?interval=`` ms to change), so the page itself needs no token; when a read token is
set, open it as ``/?token=<read token>`` and the script sends it as a bearer token.
No CDN, no build step: the worker may have no internet access.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

import faust
from faust.web import Request, Response, View

if TYPE_CHECKING:
    from streamapp.runtime import Runtime
    from streamapp.web.views import Views


@cache
def dashboard_html() -> str:
    return resources.files("streamapp.web").joinpath("dashboard.html").read_text(encoding="utf-8")


def register_dashboard(app: faust.App, runtime: Runtime, views: Views) -> None:
    # Registered before Faust's own blueprints are applied (at server start), so this "/" wins
    # over Faust's production index page at the same path.
    @app.page("/")
    class Dashboard(View):
        async def get(self, request: Request) -> Response:
            return self.html(dashboard_html(), headers={"Cache-Control": "no-store"})
