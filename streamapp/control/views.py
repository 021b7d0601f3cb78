"""The admin API's routes (``/admin/...``, ``Authorization: Bearer $STREAMAPP_ADMIN_TOKEN``): thin
wrappers around :class:`streamapp.control.admin.AdminApi`, each answering Keen-shaped JSON errors.

``POST /admin/sink/retry-parked`` redelivers parked objects (``streamapp.sink.parking``) here and,
through :class:`streamapp.web.cluster.Cluster`, on every peer (``?local=1``: this worker only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import faust
import orjson
from aiohttp import web

from streamapp.api import ApiError
from streamapp.control.admin import AdminApi
from streamapp.web.cluster import Cluster, is_local

if TYPE_CHECKING:
    from streamapp.sink.parking import Parking


async def retry_parked(admin: AdminApi, parking: Parking, cluster: Cluster, request: web.Request) -> dict[str, Any]:
    """``POST /admin/sink/retry-parked``: make parked projects due now here and on every peer."""
    doc = await admin.body(request, required=False)
    project_id = doc.get("project_id", request.query.get("project_id"))
    if project_id is not None:
        project_id = admin.project_id(project_id)
    projects = parking.retry_now(project_id)
    workers: dict[str, Any] = {cluster.url: {"projects": projects}}
    if not is_local(request):
        body = {"project_id": project_id} if project_id is not None else {}
        # The caller's admin token goes along: the peers check it themselves.
        headers = {"Authorization": request.headers.get("Authorization", "")}

        async def ask(peer: str) -> Any:
            answer = await cluster.post(peer, "/admin/sink/retry-parked", {"local": "1"}, body, headers)
            return answer.get("workers", {}).get(peer, {})

        for peer, answer in await cluster.ask_peers(ask):
            workers[peer] = {"error": repr(answer)[:200]} if isinstance(answer, BaseException) else answer
    retried = sorted({p for w in workers.values() for p in w.get("projects", [])})
    return {"project_id": project_id, "retried": retried, "workers": workers}


def _respond(status: int, payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


async def _guard(admin: AdminApi, request: web.Request, call: Callable[[], Any]) -> web.Response:
    try:
        admin.authorize(request)
        result = call()
        if asyncio.iscoroutine(result):
            result = await result
    except ApiError as exc:
        return web.Response(body=exc.body(), status=exc.status, content_type="application/json", headers=exc.headers)
    status, payload = result if isinstance(result, tuple) else (200, result)
    return _respond(status, payload)


def register_admin(app: faust.App, admin: AdminApi, parking: Parking, cluster: Cluster) -> None:
    """Mount the admin API (``/admin/...``); retrying parked objects asks every worker."""

    @app.page("/admin/projects")
    class AdminProjects(faust.web.View):
        async def get(self, request: web.Request) -> web.Response:
            return await _guard(admin, request, admin.list)

        async def post(self, request: web.Request) -> web.Response:
            return await _guard(admin, request, lambda: admin.create(request))

    @app.page("/admin/projects/{project_id}")
    class AdminProject(faust.web.View):
        async def get(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.get(project_id))

    @app.page("/admin/projects/{project_id}/key")
    class AdminKey(faust.web.View):
        async def post(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.rotate_key(request, project_id))

        async def delete(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.revoke_key(project_id))

    @app.page("/admin/projects/{project_id}/quota")
    class AdminQuota(faust.web.View):
        async def put(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.set_quota(request, project_id))

    @app.page("/admin/projects/{project_id}/shed")
    class AdminShed(faust.web.View):
        async def post(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.override(request, project_id, "shed"))

        async def delete(self, request: web.Request, project_id: str) -> web.Response:
            return await _guard(admin, request, lambda: admin.override(request, project_id, "unshed"))

    @app.page("/admin/sink/retry-parked")
    class AdminRetryParked(faust.web.View):
        async def post(self, request: web.Request) -> web.Response:
            return await _guard(admin, request, lambda: retry_parked(admin, parking, cluster, request))
