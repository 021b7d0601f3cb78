"""Read-only JSON views of one worker (and of the cluster), health and readiness.

* ``GET /healthz``: the process is up (always open, never needs a token).
* ``GET /readyz``: consumer assigned and caught up within thresholds; 503 with reasons otherwise.
* ``GET /rates/``: top projects by current rate, merged over all workers.
* ``GET /rates/{project_id}/``: one project's per-second series, answered by the worker that owns
  the project's events partition (the request is forwarded there).
* ``GET /shed/``: projects currently shed and recent episodes.
* ``GET /sink/``: the S3 sink: windows, per-partition backlog, S3 counters, overflow drain.

No view returns event payloads: only counts, rates, states and offsets.

Several workers
---------------
Each worker meters only the partitions it owns. Peers are found in the consumer group's
assignment metadata (Faust's partition assignor gives every member the URL of every other
member, with its partitions), so nothing extra is published:

* ``/rates/{project_id}/`` is forwarded to the owner of ``partition(project_id)`` of the events
  topic (the same murmur2 partitioner the producers use, the same owner the meter's tables
  have), like Faust's ``@app.table_route`` but with ``?local=1`` on the forwarded request so a
  stale assignment can never make two workers bounce a request between them.
* ``/rates/``, ``/shed/`` and ``/sink/`` fan out ``?local=1`` to every peer in parallel (short
  timeout) and merge: each project and each partition has exactly one owner, so the merge is
  a union. A peer that does not answer is named in ``workers`` and the answer says
  ``"partial": true``. The shed list itself comes from the replicated control view, which
  every worker holds for all projects, so it is complete even when a peer is down.

Security: when ``STREAMAPP_READ_TOKEN`` is set (it must be on a non-loopback bind: Settings
refuses to start otherwise), every view here except ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <read token>`` or the dashboard's session cookie (set by
``POST /dashboard/session`` with the read token in the header; its value is derived from the
token, not the token). A token in the URL (``?token=``) is refused with 400: URLs end up in logs
and histories. The admin token is not a read token. Peers never receive the caller's token:
fan-out and forwarding send the peer token (``STREAMAPP_PEER_TOKEN``, else derived from the read
token). Faust's own ``/table/`` dumps are disabled in ``create_app``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import faust
from faust.types import TP
from faust.web import Request, Response, View
from yarl import URL

from streamapp.contract import is_valid_name
from streamapp.partitioning import key_partition

if TYPE_CHECKING:
    from streamapp.runtime import Runtime

log = logging.getLogger(__name__)

PEER_TIMEOUT_SECONDS = 1.5
DEFAULT_LIMIT = 20
MAX_LIMIT = 500
DEFAULT_SERIES_SECONDS = 60
MAX_SERIES_SECONDS = 3600
MAX_EPISODES = 50


class BadRequest(ValueError):
    pass


# ------------------------------------------------------------------------------------------- auth
#: The dashboard's session cookie (HttpOnly, SameSite=Strict): a value derived from the read token.
READ_COOKIE = "streamapp_read"
#: Query parameters that would carry a credential in a URL: refused on read views.
URL_TOKEN_PARAMS = ("token", "access_token", "read_token")


def _derive(secret: str, purpose: bytes) -> str:
    return hmac.new(secret.encode(), purpose, hashlib.sha256).hexdigest()


def peer_token(read_token: str, configured: str = "") -> str:
    """The token workers send each other: STREAMAPP_PEER_TOKEN, else derived from the read token
    (every worker of a deployment has the same read token, so they derive the same one)."""
    if configured:
        return configured
    return _derive(read_token, b"streamapp peer token v1") if read_token else ""


def session_cookie_value(read_token: str) -> str:
    """The dashboard cookie's value: derived, so the read token itself is not stored in the browser."""
    return _derive(read_token, b"streamapp dashboard session v1")


def request_token(request: Any) -> str:
    """The bearer token of a request: ``Authorization: Bearer`` only (never the URL)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ""


def token_in_url(request: Any) -> bool:
    return any(name in request.query for name in URL_TOKEN_PARAMS)


def read_allowed(request: Any, read_token: str, configured_peer_token: str = "") -> bool:
    """True when read views are open (no read token: loopback only) or the request carries the
    read token, the peer token or the dashboard cookie. Constant-time comparisons."""
    if not read_token:
        return True
    given = request_token(request).encode()
    if given:
        peer = peer_token(read_token, configured_peer_token)
        return any(hmac.compare_digest(given, t.encode()) for t in (read_token, peer) if t)
    cookies = getattr(request, "cookies", None) or {}
    cookie = str(cookies.get(READ_COOKIE, ""))
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_cookie_value(read_token).encode())


def forward_headers(settings: Any) -> dict[str, str]:
    """Headers of a request to a peer: the peer token, never anything the caller sent."""
    token = peer_token(settings.read_token, settings.peer_token)
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------------ query
def query_int(request: Any, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def query_float(request: Any, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None
    if not value >= 0:
        raise BadRequest(f"{name} must be >= 0, got {raw!r}")
    return value


def is_local(request: Any) -> bool:
    return str(request.query.get("local", "")).lower() in ("1", "true", "yes")


# ------------------------------------------------------------------------------------------ merge
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


_MAX_FIELDS = ("age_seconds", "_at", "watermark")


def _stopped_partitions(app: Any) -> list[dict[str, Any]]:
    """Partitions the transport stopped at an undecodable batch (streamapp.transport, point 6)."""
    stopped = getattr(app.consumer, "stopped", None)
    return stopped() if callable(stopped) else []


def merge_sink(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Cluster-wide /sink/ from per-worker ones: partitions united, counters summed, ages and times maxed."""
    out: dict[str, Any] = {}
    partitions: dict[str, dict[str, Any]] = {}
    overflow: list[Mapping[str, Any]] = []
    parked: dict[str, Any] = {}
    for payload in payloads:
        if isinstance(payload.get("parked"), Mapping):
            parked.update(payload["parked"])  # a project's partition has one owner: a union
        for partition, info in (payload.get("partitions") or {}).items():
            old = partitions.get(partition)
            if old is None or info.get("committed_offset", 0) > old.get("committed_offset", 0):
                partitions[partition] = dict(info)
        if isinstance(payload.get("overflow"), Mapping):
            overflow.append(payload["overflow"])
        for key, value in payload.items():
            if key in ("partitions", "overflow", "worker", "workers", "partial", "parked"):
                continue
            if key == "stopped_partitions" and isinstance(value, list):  # each worker reports its own
                out.setdefault(key, []).extend(value)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                if value and not out.get(key):
                    out[key] = value
                else:
                    out.setdefault(key, value)
            elif any(mark in key for mark in _MAX_FIELDS):
                out[key] = max(float(out.get(key) or 0), value)
            else:
                out[key] = out.get(key, 0) + value
    out["partitions"] = dict(sorted(partitions.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))
    out["overflow"] = merge_numbers(overflow)
    out["parked"] = dict(sorted(parked.items()))
    return out


def merge_numbers(dicts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Recursive merge: numbers summed (ages and timestamps maxed), dicts merged, other values kept first."""
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            old = out.get(key)
            if isinstance(value, Mapping):
                out[key] = merge_numbers([old, value] if isinstance(old, Mapping) else [value])
            elif isinstance(value, bool) or not isinstance(value, int | float):
                out.setdefault(key, value)
            elif isinstance(old, bool) or not isinstance(old, int | float):
                out[key] = value
            elif any(mark in key for mark in _MAX_FIELDS):
                out[key] = max(old, value)
            else:
                out[key] = old + value
    return out


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


# ------------------------------------------------------------------------------------------ views
class Views:
    """The logic of every read view of one worker; the Faust pages below are thin wrappers."""

    def __init__(self, app: faust.App, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = runtime.settings
        self.assigned_at: float | None = None
        self.started_at = time.time()

    # ---------------------------------------------------------------------------------- cluster
    @property
    def url(self) -> str:
        return str(self.app.conf.canonical_url).rstrip("/")

    def peers(self) -> list[str]:
        """Web URLs of the other members of the consumer group, from the assignor's metadata."""
        urls: set[str] = set()
        assignor: Any = self.app.assignor
        for getter in ("external_topics_metadata", "tables_metadata"):
            try:
                urls.update(str(u).rstrip("/") for u in getattr(assignor, getter)())
            except Exception:  # noqa: BLE001 - no assignment yet
                continue
        me = _ident(self.url)
        return sorted(u for u in urls if u and _ident(u) != me)

    async def fetch(self, base: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]) -> Any:
        session: Any = self.app.http_client
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_SECONDS)
        async with session.get(base + path, params=dict(params), headers=dict(headers), timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return await resp.json(content_type=None)

    async def fan_out(
        self, request: Any, path: str, params: Mapping[str, str], local: Callable[[], Awaitable[Any] | Any]
    ) -> tuple[list[Any], dict[str, str]]:
        """This worker's local answer plus every peer's ``?local=1`` answer; and per-worker status."""
        headers = forward_headers(self.settings)
        peers = self.peers()
        query = {**params, "local": "1"}
        results = await asyncio.gather(
            *(self.fetch(peer, path, query, headers) for peer in peers), return_exceptions=True
        )
        mine = local()
        if asyncio.iscoroutine(mine):
            mine = await mine
        answers = [mine]
        status = {self.url: "ok"}
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                status[peer] = f"error: {result!r}"[:200]
            else:
                answers.append(result)
                status[peer] = "ok"
        return answers, status

    def owner_of(self, project_id: str) -> str | None:
        """Web URL of the worker owning ``project_id``'s events partition; None when it is this one.

        The partition is the one Kafka's default partitioner (murmur2 of the key, as every producer
        of the events topic uses) gives the project id; its owner comes from the assignment
        metadata every member received. Unknown owner (no assignment yet): answer locally.
        """
        topic = self.settings.events_topic
        partition = key_partition(project_id, self.settings.topic_partitions)
        try:
            distribution = self.app.assignor.external_topics_metadata()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - no assignment yet
            return None
        for url, topics in distribution.items():
            if partition in topics.get(topic, ()):
                dest = str(url).rstrip("/")
                return None if _ident(dest) == _ident(self.url) else dest
        return None

    # ------------------------------------------------------------------------------------ rates
    def local_rates(self, limit: int, series_seconds: int) -> dict[str, Any]:
        meter = self.runtime.meter
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
        answers, status = await self.fan_out(
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
        meter = self.runtime.meter
        series = meter.series(project_id, seconds)
        counters = meter.counters_of(project_id)  # not every project's: 100,000 must not slow this view
        shed = self.runtime.control.view.shed_states.get(project_id)
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
        meter = self.runtime.meter
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
        answers, status = await self.fan_out(request, "/shed/", {}, self.local_shed)
        rates: dict[str, dict[str, float]] = {}
        local_states: dict[str, dict[str, Any]] = {}
        episodes: list[dict[str, Any]] = []
        for answer in answers:
            rates.update(answer.get("rates", {}))
            for state in answer.get("shed", []):
                if isinstance(state.get("project_id"), str):
                    local_states.setdefault(state["project_id"], state)
            episodes.extend(answer.get("episodes", []))
        view = self.runtime.control.view
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

    # ------------------------------------------------------------------------------------- sink
    def local_sink(self) -> dict[str, Any]:
        runtime = self.runtime
        sink = runtime.sink
        s3 = runtime.s3.stats
        partitions = sink.backlog()
        values = list(partitions.values())
        return {
            "worker": self.url,
            "partitions": partitions,
            "open_windows": sum(p.get("open_windows", 0) for p in values),
            "offsets_behind": sum(p.get("offsets_behind", 0) for p in values),
            "read_lag": sum(p.get("read_lag", 0) for p in values),
            "oldest_unflushed_age_seconds": max(
                (p.get("oldest_unflushed_age_seconds", 0.0) for p in values), default=0.0
            ),
            "last_flush_at": max((p.get("last_flush_at", 0.0) for p in values), default=0.0),
            "objects_written": sink.objects_written,
            "bytes_written": s3.bytes,
            "s3_puts": s3.objects,
            "s3_retries": s3.retries,
            "s3_errors": s3.errors,
            "last_error": s3.last_error,
            "last_write_at": s3.last_write_at,
            "pending_bytes": sink.pending_bytes,
            "events_in": sink.events_in,
            "invalid": sink.invalid_out,
            "control_rejected": sink.control_rejected,
            "stopped_partitions": _stopped_partitions(self.app),
            "overflow": runtime.meter.drain_status(),
            **parked_view(runtime),
        }

    async def sink(self, request: Any) -> dict[str, Any]:
        if is_local(request):
            return self.local_sink()
        answers, status = await self.fan_out(request, "/sink/", {}, self.local_sink)
        merged = merge_sink(answers)
        merged["worker"] = self.url
        merged["generated_at"] = time.time()
        merged["workers"] = status
        merged["partial"] = any(s != "ok" for s in status.values())
        return merged

    # ------------------------------------------------------------------------------------ ready
    def readiness(self, max_lag: float, max_age: float) -> tuple[bool, dict[str, Any]]:
        reasons: list[str] = []
        app = self.app
        if not self.runtime.control.caught_up.is_set():
            reasons.append("control plane has not caught up with the control topic yet")
        assigned: list[int] = []
        if self.assigned_at is None:
            reasons.append("consumer has no partition assignment yet")
        else:
            if getattr(app, "rebalancing", False):
                reasons.append("consumer group is rebalancing")
            try:
                assigned = sorted(
                    tp.partition for tp in app.consumer.assignment() if tp.topic == self.settings.events_topic
                )
            except Exception as exc:  # noqa: BLE001
                reasons.append(f"consumer assignment unknown: {exc!r}")
        backlog: dict[str, Any] = {}
        try:
            backlog = self.runtime.sink.backlog()
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"sink backlog unknown: {exc!r}")
        consumer: Any = app.consumer
        committed_known: Mapping[Any, int] = getattr(consumer, "_committed_offset", {}) or {}
        partitions = {}
        for partition in assigned:
            info = backlog.get(str(partition))
            if info is not None:
                lag = info.get("read_lag", 0)
                age = info.get("oldest_unflushed_age_seconds", 0.0)
            else:  # not opened by the sink yet: nothing read since the committed offset
                tp = TP(self.settings.events_topic, partition)
                highwater = consumer.highwater(tp) or 0
                lag = max(0, highwater - int(committed_known.get(tp) or 0))
                age = 0.0
            partitions[str(partition)] = {"read_lag": lag, "oldest_unflushed_age_seconds": age}
            if lag > max_lag:
                reasons.append(f"partition {partition}: {lag} offsets behind (> {max_lag:g})")
            if age > max_age:
                reasons.append(f"partition {partition}: oldest unflushed window {age:.0f}s old (> {max_age:g}s)")
        body = {
            "status": "ready" if not reasons else "not ready",
            "reasons": reasons,
            "worker": self.url,
            "assigned_partitions": assigned,
            "partitions": partitions,
            "thresholds": {"max_lag": max_lag, "max_age_seconds": max_age},
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        return not reasons, body

    def default_max_age(self) -> float:
        s = self.settings
        # A window is open for its length plus the lateness in normal operation; beyond that by
        # more than the health threshold, the sink is not keeping up.
        return float(s.window_seconds + s.allowed_lateness_seconds + s.health_backlog_seconds)

    def default_max_lag(self) -> float:
        return 50_000.0  # records behind the high watermark: about two seconds of a busy partition


def parked_view(runtime: Runtime) -> dict[str, Any]:
    """The parked destinations of this worker (``streamapp.sink.parking``) for /sink/."""
    book = runtime.parking.book
    objects, nbytes = book.totals()
    return {
        "parked": book.snapshot(),
        "parked_projects": len(book.tenants),
        "parked_objects": objects,
        "parked_bytes": nbytes,
        "objects_parked": book.objects_parked,
        "objects_redelivered": book.objects_redelivered,
    }


def _ident(url: str) -> tuple[str, int]:
    parsed = URL(url)
    host = parsed.host or ""
    if host in ("localhost", "0.0.0.0", ""):
        host = "127.0.0.1"
    return host, int(parsed.port or 80)


# ------------------------------------------------------------------------------------------ pages
class ReadView(View):
    """A view behind the read token (required on non-loopback binds)."""

    views: Views  # set on the subclasses made by register_views

    async def dispatch(self, request: Any) -> Any:
        settings = self.views.settings
        if token_in_url(request):
            return self.json(
                {"error": "tokens in URLs are refused (they end up in logs): send Authorization: Bearer <token>"},
                status=400,
            )
        if not read_allowed(request, settings.read_token, settings.peer_token):
            return self.json(
                {"error": "unauthorized: send Authorization: Bearer <read token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="streamapp"'},
            )
        try:
            return await super().dispatch(request)
        except BadRequest as exc:
            return self.json({"error": str(exc)}, status=400)


def register_views(app: faust.App, runtime: Runtime) -> Views:
    """Mount the read views, /metrics and the dashboard on the worker's web server."""
    from streamapp.web.dashboard import register_dashboard
    from streamapp.web.metrics_view import register_metrics

    views = Views(app, runtime)

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: Any = None, **kwargs: Any) -> None:
        views.assigned_at = time.time()

    @app.page("/healthz")
    class Healthz(View):
        async def get(self, request: Request) -> Response:
            # A partition stopped at a batch it cannot decode is reported, and stays 200: the
            # process serves the rest, and a restart would meet the same batch again.
            stopped = _stopped_partitions(app)
            if stopped:
                errors = [s["error"] for s in stopped]
                return self.json({"status": "degraded", "worker": views.url, "errors": errors, "stopped": stopped})
            return self.json({"status": "ok", "worker": views.url})

    @app.page("/readyz")
    class Readyz(View):
        async def get(self, request: Request) -> Response:
            try:
                max_lag = query_float(request, "max_lag", views.default_max_lag())
                max_age = query_float(request, "max_age", views.default_max_age())
            except BadRequest as exc:
                return self.json({"error": str(exc)}, status=400)
            ready, body = views.readiness(max_lag, max_age)
            return self.json(body, status=200 if ready else 503)

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
            owner = None if is_local(request) else views.owner_of(project_id)
            if owner is not None:
                try:
                    body = await views.fetch(
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

    @app.page("/sink/")
    class Sink(ReadView):
        async def get(self, request: Request) -> Response:
            return self.json(await views.sink(request))

    for view_cls in (Rates, ProjectRates, Shed, Sink):
        view_cls.views = views
    register_metrics(app, runtime, views)
    register_dashboard(app, runtime, views)
    return views
