"""``GET /``: the live dashboard, one self-contained HTML page (inline CSS, vanilla JS, SVG sparklines).

The page holds no data: its script polls ``/rates/?series=60``, ``/shed/`` and ``/sink/`` every
second (``?interval=`` ms to change), so the page itself needs no token. When a read token is
set, the page asks for it (or takes it from ``/#token=...``: a fragment never reaches a server,
and the script removes it from the address bar at once) and trades it at
``POST /dashboard/session`` (token in the ``Authorization`` header) for an HttpOnly, SameSite=Strict
cookie whose value is derived from the token; the views accept that cookie.
No CDN, no build step: the worker may have no internet access.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import faust
from faust.web import Request, Response, View

from streamapp.settings import Settings
from streamapp.web.auth import READ_COOKIE, is_read_token, session_cookie_value

SESSION_SECONDS = 12 * 3600


@cache
def dashboard_html() -> str:
    return resources.files("streamapp.web").joinpath("dashboard.html").read_text(encoding="utf-8")


def register_dashboard(app: faust.App, settings: Settings) -> None:
    # Registered before Faust's own blueprints are applied (at server start), so this "/" wins
    # over Faust's production index page at the same path.
    @app.page("/")
    class Dashboard(View):
        async def get(self, request: Request) -> Response:
            return self.html(dashboard_html(), headers={"Cache-Control": "no-store"})

    @app.page("/dashboard/session")
    class DashboardSession(View):
        async def post(self, request: Request) -> Response:
            read_token = settings.read_token
            if not read_token:
                return self.json({"session": "not needed: read views are open on this loopback worker"})
            # Only the read token itself opens a session (not a cookie, not the peer token).
            if not is_read_token(request, read_token):
                return self.json({"error": "unauthorized: send Authorization: Bearer <read token>"}, status=401)
            response = self.json({"session": "ok"})
            response.set_cookie(
                READ_COOKIE,
                session_cookie_value(read_token),
                max_age=SESSION_SECONDS,
                path="/",
                httponly=True,
                samesite="Strict",
            )
            return response

        async def delete(self, request: Request) -> Response:
            response = self.json({"session": "ended"})
            response.del_cookie(READ_COOKIE, path="/")
            return response
