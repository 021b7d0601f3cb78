"""The meter's own debug page, ``/_meter/``: everything the meter of this worker holds, at once.

Internal (the operator views are /rates/, /shed/), readable with the read token (or the peer
token), never the admin token, and never with a token in the URL. ``?project=<id>`` adds that
project's quota, effective limit, mode and per-second series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import faust

from streamapp.web.auth import read_allowed, token_in_url

if TYPE_CHECKING:
    from streamapp.settings import Settings

    from .service import Meter


def meter_debug_body(
    meter: Meter, drain_status: Mapping[str, Any], project: str | None, series_seconds: int
) -> dict[str, Any]:
    """The page's JSON body: the meter's status, top, shed, counters, drain, and ``project``'s detail."""
    body: dict[str, Any] = {
        **meter.status(),
        "top": meter.top(1000),
        "shed": meter.shed(),
        "counters": meter.counters(),
        "drain": drain_status,
    }
    if project:
        quota = meter.quota_for(project)
        effective = meter.effective_quota(project)
        body["project"] = {
            "project_id": project,
            "quota_eps": quota.eps,
            "quota_bps": quota.bps,
            "burst": quota.burst,
            "effective_eps": effective.eps,
            "mode": meter.mode_for(project),
            "series": meter.series(project, series_seconds),
        }
    return body


def register_meter_page(
    app: faust.App, meter: Meter, drain_status: Callable[[], Mapping[str, Any]], settings: Settings
) -> None:
    """Serve ``/_meter/`` on ``app`` from ``meter`` (and the overflow drain's ``status``)."""

    @app.page("/_meter/")
    async def meter_debug(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        """Internal: the meter's state on this worker (the operator views are /rates/, /shed/)."""
        # The read token (or peer token), never the admin token.
        if token_in_url(request) or not read_allowed(request, settings.read_token, settings.peer_token):
            return self.json({"error": "unauthorized"}, status=401)
        project = request.query.get("project")
        return self.json(meter_debug_body(meter, drain_status(), project, settings.sustained_horizon_seconds))
