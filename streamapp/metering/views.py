"""The meter's read views: ``GET /rates/``, ``GET /rates/{project_id}/`` and ``GET /shed/``.

* ``/rates/``: top projects by current rate, merged over all workers (``?limit=``, ``?series=``
  seconds of per-second series per project);
* ``/rates/{project_id}/``: one project's per-second series, answered by the worker that owns
  the project's events partition (the request is forwarded there: :meth:`Cluster.owner_of`);
* ``/shed/``: projects currently shed and recent episodes. The shed list itself comes from the
  replicated control view, which every worker holds for all projects, so it is complete even
  when a peer is down; rates and episodes come from each project's owner.

Cluster-wide answers fan out ``?local=1`` to every peer (:class:`streamapp.web.cluster.Cluster`)
and say ``"partial": true`` when a peer did not answer. Behind the read token
(:class:`streamapp.web.read_view.ReadView`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import faust
from faust.web import Request, Response

from streamapp.contract import is_valid_name
from streamapp.control import ControlView
from streamapp.settings import Settings
from streamapp.web.auth import forward_headers
from streamapp.web.cluster import Cluster, is_local
from streamapp.web.read_view import ReadView, query_int

if TYPE_CHECKING:
    from streamapp.metering.service import Meter

DEFAULT_LIMIT = 20
MAX_LIMIT = 500
DEFAULT_SERIES_SECONDS = 60
MAX_SERIES_SECONDS = 3600
MAX_EPISODES = 50


def merge_top(lists: Iterable[Iterable[Mapping[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Top ``limit`` projects by burst rate over several workers' top lists.

    A project normally appears on one worker only (its partition's owner); during a rebalance it
    may briefly appear on two: the entry with the higher received count wins.
    """
    best: dict[str, dict[str, Any]] = {}
    for entries in lists:
        for entry in entries:
            project_id = entry.get("project_id")
            if not isinstance(project_id, str):
                continue
            old = best.get(project_id)
            if old is None or _received(entry) > _received(old):
                best[project_id] = dict(entry)
    ranked = sorted(best.values(), key=lambda e: (-float(e.get("eps_burst") or 0.0), e["project_id"]))
    return ranked[:limit]


def _received(entry: Mapping[str, Any]) -> int:
    counters = entry.get("counters") or {}
    return int(counters.get("received", 0) or 0)


def rate_from_series(series: Iterable[Mapping[str, Any]], now_second: int, horizon: int) -> dict[str, float]:
    """Events/s and bytes/s over the complete seconds of the last ``horizon`` before ``now_second``.

    Like the meter's burst rate, a project that started sending less than ``horizon`` seconds
    ago is averaged over the seconds since its first data, not diluted over the whole horizon.
    """
    lo = now_second - horizon
    events = nbytes = 0
    first: int | None = None
    for point in series:
        second = int(point.get("second", 0))
        if lo <= second < now_second and (point.get("events") or point.get("bytes")):
            events += int(point.get("events", 0))
            nbytes += int(point.get("bytes", 0))
            first = second if first is None else min(first, second)
    if first is None:
        return {"eps": 0.0, "bps": 0.0}
    span = now_second - first
    return {"eps": events / span, "bps": nbytes / span}


class MeteringViews:
    """The logic of the meter's read views on one worker; the Faust pages below are thin wrappers."""

    def __init__(self, settings: Settings, meter: Meter, control_view: ControlView, cluster: Cluster) -> None:
        self.settings = settings
        self.meter = meter
        self.control_view = control_view
        self.cluster = cluster

    @property
    def url(self) -> str:
        return self.cluster.url

    # ------------------------------------------------------------------------------------ rates
    def local_rates(self, limit: int, series_seconds: int) -> dict[str, Any]:
        meter = self.meter
        projects = []
        for entry in meter.top(limit):
            item = dict(entry)
            item["worker"] = self.url
            if series_seconds:
                item["series"] = meter.series(entry["project_id"], series_seconds)
            projects.append(item)
        return {"worker": self.url, "projects": projects}

    async def rates(self, request: Any) -> dict[str, Any]:
        limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        series_seconds = query_int(request, "series", 0, 0, MAX_SERIES_SECONDS)
        body = {
            "generated_at": time.time(),
            "limit": limit,
            "horizons": {
                "burst_seconds": self.settings.burst_horizon_seconds,
                "sustained_seconds": self.settings.sustained_horizon_seconds,
            },
        }
        if is_local(request):
            return {**body, **self.local_rates(limit, series_seconds)}
        answers, status = await self.cluster.fan_out(
            request,
            "/rates/",
            {"limit": str(limit), "series": str(series_seconds)},
            lambda: self.local_rates(limit, series_seconds),
        )
        projects = merge_top((a.get("projects", []) for a in answers), limit)
        return {
            **body,
            "worker": self.url,
            "projects": projects,
            "workers": status,
            "partial": any(s != "ok" for s in status.values()),
        }

    def project_rates(self, project_id: str, seconds: int) -> tuple[int, dict[str, Any]]:
        meter = self.meter
        series = meter.series(project_id, seconds)
        counters = meter.counters_of(project_id)  # not every project's: 100,000 must not slow this view
        shed = self.control_view.shed_states.get(project_id)
        if not series and counters is None:
            return 404, {"error": f"no recent data for project {project_id!r} on its owner", "worker": self.url}
        now_second = int(time.time())
        burst = rate_from_series(series, now_second, self.settings.burst_horizon_seconds)
        return 200, {
            "project_id": project_id,
            "worker": self.url,
            "seconds": seconds,
            "series": series,
            "rate": {"eps_burst": burst["eps"], "bps_burst": burst["bps"]},
            "counters": counters,
            "shed": shed,
        }

    # ------------------------------------------------------------------------------------- shed
    def local_shed(self) -> dict[str, Any]:
        meter = self.meter
        info = meter.shed()
        now_second = int(time.time())
        horizon = self.settings.burst_horizon_seconds
        rates = {}
        for state in info.get("shed", []):
            project_id = state.get("project_id")
            if not isinstance(project_id, str):
                continue
            if isinstance(state.get("current_eps"), int | float):
                rates[project_id] = {"eps": state["current_eps"], "bps": state.get("current_bps") or 0.0}
            else:
                rates[project_id] = rate_from_series(meter.series(project_id, horizon + 1), now_second, horizon)
        return {
            "worker": self.url,
            "shed": list(info.get("shed", [])),
            "episodes": list(info.get("episodes", [])),
            "rates": rates,
        }

    async def shed(self, request: Any) -> dict[str, Any]:
        if is_local(request):
            return self.local_shed()
        answers, status = await self.cluster.fan_out(request, "/shed/", {}, self.local_shed)
        rates: dict[str, dict[str, float]] = {}
        local_states: dict[str, dict[str, Any]] = {}
        episodes: list[dict[str, Any]] = []
        for answer in answers:
            rates.update(answer.get("rates", {}))
            for state in answer.get("shed", []):
                if isinstance(state.get("project_id"), str):
                    local_states.setdefault(state["project_id"], state)
            episodes.extend(answer.get("episodes", []))
        view = self.control_view
        # The replicated view covers all projects; a meter's own list covers a change not yet replicated.
        states = {pid: s for pid, s in view.shed_states.items() if s.get("state") == "shed"}
        for pid, state in local_states.items():
            if state.get("state", "shed") == "shed":
                states.setdefault(pid, state)
        shed = []
        for pid, state in sorted(states.items(), key=lambda kv: -float(kv[1].get("since") or 0)):
            rate = rates.get(pid)
            shed.append(
                {
                    "project_id": pid,
                    "state": state.get("state", "shed"),
                    "mode": state.get("mode"),
                    "since": state.get("since"),
                    "reason": state.get("reason"),
                    "rate": rate["eps"] if rate else state.get("observed_eps"),
                    "rate_bps": rate["bps"] if rate else state.get("observed_bps"),
                    "limit": state.get("limit_eps"),
                    "limit_bps": state.get("limit_bps"),
                    "observed_eps": state.get("observed_eps"),
                    "manual": state.get("manual"),
                    "episode": state.get("episode"),
                }
            )
        episodes.sort(key=lambda e: -float(e.get("start") or 0))
        return {
            "worker": self.url,
            "generated_at": time.time(),
            "shed": shed,
            "overrides": [dict(o) for o in view.overrides.values()],
            "episodes": episodes[:MAX_EPISODES],
            "workers": status,
            "partial": any(s != "ok" for s in status.values()),
        }


def register_metering_views(app: faust.App, views: MeteringViews) -> None:
    """Mount ``/rates/``, ``/rates/{project_id}/`` and ``/shed/``, cluster-wide."""
    cluster = views.cluster

    @app.page("/rates/")
    class Rates(ReadView):
        async def get(self, request: Request) -> Response:
            return self.json(await views.rates(request))

    @app.page("/rates/{project_id}/")
    class ProjectRates(ReadView):
        async def get(self, request: Request, project_id: str) -> Response:
            if not is_valid_name(project_id):
                return self.json({"error": f"invalid project id {project_id!r}"}, status=400)
            seconds = query_int(request, "seconds", DEFAULT_SERIES_SECONDS, 1, MAX_SERIES_SECONDS)
            owner = None if is_local(request) else cluster.owner_of(project_id)
            if owner is not None:
                try:
                    body = await cluster.fetch(
                        owner,
                        f"/rates/{project_id}/",
                        {"seconds": str(seconds), "local": "1"},
                        forward_headers(views.settings),
                    )
                except RuntimeError as exc:
                    if "HTTP 404" in str(exc):
                        return self.json(
                            {"error": f"no recent data for project {project_id!r}", "worker": owner}, status=404
                        )
                    return self.json({"error": f"owner {owner} failed: {exc}", "worker": owner}, status=502)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return self.json({"error": f"owner {owner} not answering: {exc!r}", "worker": owner}, status=502)
                body["routed_from"] = views.url
                return self.json(body)
            status, body = views.project_rates(project_id, seconds)
            return self.json(body, status=status)

    @app.page("/shed/")
    class Shed(ReadView):
        async def get(self, request: Request) -> Response:
            return self.json(await views.shed(request))

    for view_cls in (Rates, ProjectRates, Shed):
        view_cls.settings = views.settings
