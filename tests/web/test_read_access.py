"""Read access: a non-loopback bind needs a read token (or the worker does not start); the admin
token is no read token; tokens only in headers or the dashboard's cookie, never in URLs; peers
get the peer token, never the caller's; no token in logs or views. One worker bound to 0.0.0.0."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streamapp.dev import BrokerProcess, S3Process, WorkerProcess, free_port
from streamapp.settings import Settings, SettingsError, is_loopback
from streamapp.web.auth import (
    READ_COOKIE,
    forward_headers,
    peer_token,
    read_allowed,
    request_token,
    session_cookie_value,
)
from tests.api_helpers import ADMIN_TOKEN, create_project, module_worker, request, write

pytestmark = pytest.mark.integration

READ_TOKEN = "read-tok-8d2e41"
PEER_TOKEN = "peer-tok-5b7a03"
READ_VIEWS = ("/rates/", "/shed/", "/sink/", "/metrics", "/_meter/", "/rates/some-project/")


class FakeRequest:
    def __init__(self, headers: dict[str, str], query: dict[str, str], cookies: dict[str, str] | None = None):
        self.headers = headers
        self.query = query
        self.cookies = cookies or {}


# --------------------------------------------------------------------------- pure


def test_settings_refuse_a_non_loopback_bind_without_a_read_token() -> None:
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.internal"):
        with pytest.raises(SettingsError, match="STREAMAPP_READ_TOKEN"):
            Settings.from_env({"STREAMAPP_WEB_HOST": host})
        assert Settings.from_env({"STREAMAPP_WEB_HOST": host, "STREAMAPP_READ_TOKEN": "r"}).read_token == "r"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host) and Settings.from_env({"STREAMAPP_WEB_HOST": host}).read_token == ""


@pytest.mark.parametrize(
    ("headers", "query", "cookies", "allowed"),
    [
        ({}, {}, {}, False),
        ({"Authorization": "Bearer r"}, {}, {}, True),
        ({"Authorization": "bearer p"}, {}, {}, True),  # the peer token
        ({"Authorization": "Bearer a"}, {}, {}, False),  # the admin token is no read token
        ({}, {"token": "r"}, {}, False),  # never from the URL
        ({"Authorization": "Basic r"}, {}, {}, False),
        ({}, {}, {READ_COOKIE: session_cookie_value("r")}, True),
        ({}, {}, {READ_COOKIE: "r"}, False),  # the cookie holds a derived value, not the token
        ({}, {}, {READ_COOKIE: session_cookie_value("other")}, False),
    ],
)
def test_read_allowed(headers: dict[str, str], query: dict[str, str], cookies: dict[str, str], allowed: bool) -> None:
    assert read_allowed(FakeRequest(headers, query, cookies), "r", "p") is allowed
    assert read_allowed(FakeRequest(headers, query, cookies), "", "p") is True  # no read token: loopback, open


def test_peers_get_the_peer_token_never_the_callers() -> None:
    settings = Settings(read_token="r", admin_token="a")
    derived = peer_token("r")
    assert derived not in ("r", "a", "") and forward_headers(settings) == {"Authorization": f"Bearer {derived}"}
    assert forward_headers(Settings(read_token="r", peer_token="p")) == {"Authorization": "Bearer p"}
    assert forward_headers(Settings()) == {}
    # The caller's token does not even reach the function that builds a peer request's headers.
    assert request_token(FakeRequest({}, {"token": "r"})) == ""


# --------------------------------------------------------------------------- worker


@pytest.fixture(scope="module")
def worker(
    broker: BrokerProcess, s3: S3Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, dict[str, object]]]:
    with module_worker(
        broker,
        s3,
        tmp_path_factory.mktemp("read"),
        web_host="0.0.0.0",
        read_token=READ_TOKEN,
        peer_token=PEER_TOKEN,
    ) as started:
        yield started


def get(web: str, path: str, **headers: str) -> Any:
    return request(web, "GET", path, headers=headers)


def test_the_worker_refuses_to_start_on_a_public_bind_without_a_read_token(
    broker: BrokerProcess, tmp_path: Any
) -> None:
    proc = WorkerProcess(
        {"kafka_bootstrap": broker.bootstrap, "web_host": "0.0.0.0", "web_port": free_port(),
         "app_id": f"t{uuid.uuid4().hex[:8]}", "data_dir": tmp_path / "data", "control_secret": "s"},
        tmp_path,
    )  # fmt: skip
    proc.start()
    deadline = time.monotonic() + 60
    while proc.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not proc.is_running() and proc.returncode != 0
        assert "STREAMAPP_READ_TOKEN" in proc.log_tail(40)
    finally:
        proc.stop()


def test_read_views_need_the_read_token_on_a_public_bind(worker: Any) -> None:
    web = worker[0].web_url
    for path in READ_VIEWS:
        assert get(web, path).status == 401, path
        assert get(web, path, Authorization=f"Bearer {ADMIN_TOKEN}").status == 401, path
        assert get(web, path, Authorization="Bearer wrong").status == 401, path
        assert get(web, path + f"?token={READ_TOKEN}").status in (400, 401), path
        ok = get(web, path, Authorization=f"Bearer {READ_TOKEN}")
        assert ok.status in (200, 404), (path, ok)  # 404: no data for that project yet
        assert get(web, path, Authorization=f"Bearer {PEER_TOKEN}").status == ok.status, path
    assert get(web, f"/rates/?token={READ_TOKEN}", Authorization=f"Bearer {READ_TOKEN}").status == 400
    assert get(web, "/healthz").status == 200 and get(web, "/").status == 200  # open: no data in them


def test_the_dashboard_trades_the_token_for_a_derived_cookie(worker: Any) -> None:
    web = worker[0].web_url
    assert request(web, "POST", "/dashboard/session", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status == 401
    assert request(web, "POST", "/dashboard/session", headers={"Authorization": f"Bearer {PEER_TOKEN}"}).status == 401
    opened = request(web, "POST", "/dashboard/session", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert opened.status == 200, opened
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ_TOKEN not in cookie
    value = cookie.split(";", 1)[0]
    assert get(web, "/sink/", Cookie=value).status == 200
    assert get(web, "/sink/", Cookie=f"{READ_COOKIE}={READ_TOKEN}").status == 401
    html = get(web, "/").body.decode()
    assert "/dashboard/session" in html and "?token=" not in html


def test_no_token_or_key_appears_in_logs_or_views(worker: Any) -> None:
    proc, _ = worker
    web = proc.web_url
    key = create_project(web, "secretive")
    assert write(web, "secretive", key, {"n": 1}, "clicks").status == 201
    assert request(web, "POST", f"/3.0/projects/secretive/events/clicks?api_key={key}", {"n": 2}).status == 201
    assert write(web, "secretive", "wrong-" + key, {"n": 3}, "clicks").status == 401
    secrets = (READ_TOKEN, PEER_TOKEN, ADMIN_TOKEN, key, peer_token(READ_TOKEN), session_cookie_value(READ_TOKEN))
    bodies = [get(web, path, Authorization=f"Bearer {READ_TOKEN}").body for path in READ_VIEWS]
    bodies += [get(web, "/readyz").body, get(web, "/healthz").body]
    bodies.append(request(web, "GET", "/admin/projects", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).body)
    for body in bodies:
        for secret in secrets:
            assert secret.encode() not in body
    log = proc.log_path.read_text(errors="replace")
    assert "secretive" in log or "API producer started" in log  # the log is the worker's
    for secret in secrets:
        assert secret not in log


def test_fan_out_sends_peers_the_peer_token_and_nothing_the_caller_sent() -> None:
    """Cluster.fan_out against a real HTTP peer that records what it receives."""
    import asyncio
    from types import SimpleNamespace

    import aiohttp
    from aiohttp import web

    from streamapp.web.cluster import Cluster

    received: list[dict[str, str]] = []

    async def peer_shed(request: web.Request) -> web.Response:
        received.append({**request.headers, "query": request.query_string})
        return web.json_response({"worker": "peer", "shed": [], "episodes": [], "rates": {}})

    async def scenario() -> None:
        server = web.Application()
        server.router.add_get("/shed/", peer_shed)
        runner = web.AppRunner(server)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        peer = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            app = SimpleNamespace(
                conf=SimpleNamespace(canonical_url="http://127.0.0.1:1"),
                assignor=SimpleNamespace(external_topics_metadata=lambda: {peer: {}}, tables_metadata=lambda: {}),
                http_client=session,
            )
            settings = Settings(read_token=READ_TOKEN, admin_token=ADMIN_TOKEN)
            cluster = Cluster(app, settings)  # type: ignore[arg-type]
            caller = FakeRequest(
                {"Authorization": f"Bearer {READ_TOKEN}", "Cookie": f"{READ_COOKIE}=x"}, {}, {READ_COOKIE: "x"}
            )
            answers, status = await cluster.fan_out(caller, "/shed/", {}, lambda: {"worker": "me"})
        await runner.cleanup()
        assert status[peer] == "ok" and len(answers) == 2, status

    asyncio.run(scenario())
    assert len(received) == 1
    headers = received[0]
    assert headers["Authorization"] == f"Bearer {peer_token(READ_TOKEN)}"
    assert "Cookie" not in headers and headers["query"] == "local=1"
    for secret in (READ_TOKEN, ADMIN_TOKEN, session_cookie_value(READ_TOKEN)):
        assert all(secret not in value for value in headers.values())
