"""Keen-compatible event recording on the worker's own web server, with admission control.

Routes (every worker is an API node):

* ``POST /3.0/projects/{project_id}/events/{collection}``: one event -> 201 ``{"created": true}``
* ``POST /3.0/projects/{project_id}/events``: ``{collection: [event, ...]}`` -> 200 with per-event results
* ``GET /3.0/projects/{project_id}/events/{collection}?api_key=&data=``: the image beacon (base64
  event JSON in ``data``) -> a 1x1 GIF; the same checks as the POST;
* ``OPTIONS`` on both: CORS preflight (Keen's SDKs send ``keen-sdk``); every answer carries CORS headers.

``api_key`` works as a query parameter on every write route; ``${keen.ip}`` / ``${keen.user_agent}``
are filled here (see :mod:`streamapp.enrichment`).

Checks, cheapest first; everything up to the body read is a pure in-memory decision:

1. control plane caught up (else 503), project known (404), write key (401, constant time),
   collection name (400);
2. shed project: the replicated shed state (or an operator "shed" override) and a local
   per-project token bucket of ``limit_eps`` tokens/s (per worker) -> 429 + Retry-After;
3. Kafka back-pressure: at most ``api_max_inflight`` requests wait on Kafka acks; none more is
   admitted while no ack has arrived for ``STALL_SECONDS``, and after a failed write only one
   request at a time probes Kafka until a write succeeds -> 503 + Retry-After at once;
4. body: over ``api_max_body_bytes`` -> 413; not JSON / not an object / bad event -> 400
   (batch: bad events are reported per event, the good ones are written);
5. produce (dedicated producer, acks=all) and answer only after Kafka acknowledged; no ack
   within ``api_produce_timeout_seconds`` -> 503 (the client retries: at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import faust
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from streamapp import enrichment
from streamapp.contract import is_valid_name, name_rule, preview
from streamapp.control import ProjectSettings
from streamapp.metering.bucket import TokenBucket
from streamapp.runtime import Runtime
from streamapp.web import keen
from streamapp.web.keen import ApiError

log = logging.getLogger(__name__)

#: No Kafka ack for this long while requests wait on one = Kafka is stalled: new requests get 503
#: at once instead of queueing behind the stuck ones (capped by the produce timeout).
STALL_SECONDS = 1.0
#: How long a request may wait for the API producer to finish starting (only right after start).
START_WAIT_SECONDS = 2.0
SERVER_TIME_HEADER = "X-Streamapp-Server-Ms"
CREATED = b'{"created":true}'
#: On every answer of the write routes (errors too), so a browser SDK can read the error.
CORS_ANSWER_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After, " + SERVER_TIME_HEADER,
}


class IngestApi:
    """State of the API on one worker: its producer, the in-flight bound and the shed buckets."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.settings = settings
        self.control = runtime.control
        self.topic = settings.events_topic
        self.max_inflight = settings.api_max_inflight
        self.timeout = settings.api_produce_timeout_seconds
        self.stall_seconds = min(STALL_SECONDS, self.timeout)
        self.producer: AIOKafkaProducer | None = None
        self.started = asyncio.Event()
        self.inflight = 0
        self._last_progress = 0.0  # monotonic time of the last ack (or of inflight going 0 -> 1)
        self.failing = False  # the last write timed out or failed, and none succeeded since
        self.buckets: dict[str, TokenBucket] = {}
        self.trusted_proxies = enrichment.parse_trusted_proxies(settings.trusted_proxies)
        registry = runtime.metrics.registry
        self.m_requests = Counter(
            "streamapp_api_requests", "API requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.m_events = Counter("streamapp_api_events", "Events accepted by the API", registry=registry)
        self.m_inflight = Gauge("streamapp_api_inflight", "Requests waiting on Kafka acks", registry=registry)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the producer, retrying while the broker is not reachable."""
        settings = self.settings
        while self.producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                client_id=f"{settings.app_id}-api",
                acks="all",
                linger_ms=0,
                max_batch_size=max(1 << 20, settings.max_record_bytes + 4096),
                max_request_size=max(2 << 20, settings.max_record_bytes * 2),
                request_timeout_ms=max(1000, int(self.timeout * 1000)),
            )
            try:
                await producer.start()
            except KafkaError as exc:
                log.warning("API producer cannot start yet (%r); retrying", exc)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(1.0)
                continue
            self.producer = producer
        self.started.set()
        log.info("API producer started (acks=all, max in-flight %s)", self.max_inflight)

    async def stop(self) -> None:
        producer, self.producer = self.producer, None
        self.started.clear()
        if producer is not None:
            await producer.stop()

    # ----------------------------------------------------------------- checks
    def project(self, request: web.Request, project_id: str) -> ProjectSettings:
        """404 / 401 / 503 checks; the project's settings when the write key matches."""
        if not self.control.caught_up.is_set():
            raise keen.unavailable("the control plane is still loading project settings")
        if not is_valid_name(project_id):  # e.g. "_manifests": reserved, whatever the control view holds
            raise ApiError(
                400, keen.INVALID_PROJECT_ID, f"bad project id {preview(project_id)}: {name_rule(project_id)}"
            )
        project = self.control.view.projects.get(project_id)
        if project is None:
            raise ApiError(404, keen.NOT_FOUND, f"project {project_id!r} not found")
        provided = keen.write_key_from(request.headers.get("Authorization"), request.query.get("api_key"))
        if provided is None:
            raise ApiError(401, keen.INVALID_API_KEY, "a write key is required (Authorization header or api_key)")
        if not keen.keys_match(provided, project.write_key):
            raise ApiError(401, keen.INVALID_API_KEY, "the write key is not valid for this project")
        return project

    def shed_bucket(
        self, project_id: str, project: ProjectSettings, now: float
    ) -> tuple[keen.Shed, TokenBucket] | None:
        """The shed decision and the local bucket for a shed project; None when it is not shed."""
        view = self.control.view
        state = view.shed_states.get(project_id)
        override = view.overrides.get(project_id)
        if not state and not override:
            if self.buckets:
                self.buckets.pop(project_id, None)
            return None
        shed = keen.shed_decision(
            project_id,
            state,
            override,
            quota_eps=project.quota_eps,
            default_eps=self.settings.default_eps_limit,
            now=time.time(),
            cooldown=self.settings.shed_cooldown_seconds,
        )
        if shed is None:
            self.buckets.pop(project_id, None)
            return None
        bucket = self.buckets.get(project_id)
        if bucket is None or bucket.rate != shed.limit_eps:
            bucket = self.buckets[project_id] = keen.bucket_for(shed.limit_eps)
            bucket.take(now, 0)
        return shed, bucket

    def check_capacity(self) -> None:
        """503 at once when Kafka cannot take more: the bound is reached or acks stopped coming."""
        if self.inflight >= self.max_inflight:
            raise keen.unavailable(f"{self.inflight} writes are waiting on Kafka (limit {self.max_inflight}); retry")
        if self.inflight:
            if self.failing:
                # The last write failed: one request at a time probes Kafka, the others fail fast.
                raise keen.unavailable("Kafka is failing writes; retry")
            if time.monotonic() - self._last_progress > self.stall_seconds:
                raise keen.unavailable(f"Kafka has not acknowledged a write for over {self.stall_seconds:g}s; retry")

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.settings.api_max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(413, keen.TOO_LARGE, f"request body of {length} bytes is over the {limit} byte limit")
        content = request.content
        if length is not None:
            try:
                return await content.readexactly(length)
            except asyncio.IncompleteReadError:
                raise ApiError(400, keen.INVALID_JSON, "request body is shorter than its Content-Length") from None
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, keen.TOO_LARGE, f"request body is over the {limit} byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    # ----------------------------------------------------------------- produce
    async def produce(self, project_id: str, records: list[bytes]) -> None:
        """Write ``records`` keyed by the project; return only once Kafka acknowledged all of them."""
        if not records:
            return
        producer = self.producer
        if producer is None:
            try:
                await asyncio.wait_for(self.started.wait(), START_WAIT_SECONDS)
            except TimeoutError:
                raise keen.unavailable("the API producer is not connected to Kafka yet") from None
            producer = self.producer
            assert producer is not None
        self.check_capacity()
        if self.inflight == 0:
            self._last_progress = time.monotonic()
        self.inflight += 1
        self.m_inflight.inc()
        key = project_id.encode()
        try:
            async with asyncio.timeout(self.timeout):
                if len(records) == 1:
                    await (await producer.send(self.topic, records[0], key=key))
                else:
                    futures = [await producer.send(self.topic, value, key=key) for value in records]
                    await asyncio.gather(*futures)
        except TimeoutError:
            self.failing = True
            raise keen.unavailable(
                f"Kafka did not acknowledge the write within {self.timeout:g}s; retry (it may still be written)"
            ) from None
        except KafkaError as exc:
            self.failing = True
            raise keen.unavailable(f"Kafka refused the write ({type(exc).__name__}); retry") from None
        else:
            self._last_progress = time.monotonic()
            self.failing = False
        finally:
            self.inflight -= 1
            self.m_inflight.dec()

    # ----------------------------------------------------------------- endpoints
    async def record_one(
        self, request: web.Request, project_id: str, collection: str, body: bytes | None = None
    ) -> web.Response:
        """One event; ``body`` is given by the image beacon (GET), else read from the request."""
        started = time.perf_counter()
        try:
            project = self.project(request, project_id)
            keen.check_collection(collection)
            now = time.monotonic()
            shed = self.shed_bucket(project_id, project, now)
            if shed is not None and not keen.can_admit_any(shed[1], now):
                raise keen.shed_error(project_id, shed[0])
            self.check_capacity()
            raw = await self.read_body(request) if body is None else body
            event = self.fill_placeholders(request, raw, keen.parse_object(raw))
            clock = keen.Clock.at(time.time())
            settings = self.settings
            limit = keen.max_event_bytes_for(
                project_id, collection, settings.max_event_bytes, settings.max_record_bytes
            )
            try:
                data = keen.encode_event(event, clock, limit)
            except keen.EventRejected as exc:
                raise ApiError(400, exc.name, exc.description) from None
            if shed is not None and not keen.admit(shed[1], time.monotonic(), 1):
                raise keen.shed_error(project_id, shed[0])
            await self.produce(
                project_id, keen.build_records(project_id, collection, [data], settings.max_record_bytes)
            )
        except ApiError as exc:
            return self.respond("event", exc.status, exc.body(), started, exc.headers)
        self.m_events.inc()
        return self.respond("event", 201, CREATED, started)

    async def record_batch(self, request: web.Request, project_id: str) -> web.Response:
        started = time.perf_counter()
        try:
            project = self.project(request, project_id)
            now = time.monotonic()
            shed = self.shed_bucket(project_id, project, now)
            if shed is not None and not keen.can_admit_any(shed[1], now):
                raise keen.shed_error(project_id, shed[0])
            self.check_capacity()
            raw = await self.read_body(request)
            doc = self.fill_placeholders(request, raw, keen.parse_object(raw))
            count = keen.check_batch(doc)
            if shed is not None and count and not keen.admit(shed[1], time.monotonic(), count):
                raise keen.shed_error(project_id, shed[0])
            settings = self.settings
            plans = keen.plan_batch(
                project_id,
                doc,
                keen.Clock.at(time.time()),
                max_event_bytes=settings.max_event_bytes,
                max_record_bytes=settings.max_record_bytes,
            )
            records = [record for plan in plans for record in plan.records]
            await self.produce(project_id, records)
        except ApiError as exc:
            return self.respond("batch", exc.status, exc.body(), started, exc.headers)
        self.m_events.inc(sum(plan.accepted for plan in plans))
        return self.respond("batch", 200, orjson.dumps(keen.batch_response(plans)), started)

    def fill_placeholders(self, request: web.Request, raw: bytes, doc: dict[str, Any]) -> dict[str, Any]:
        """``${keen.ip}`` / ``${keen.user_agent}`` -> this request's client address and User-Agent
        (a byte search first: bodies without placeholders are not walked)."""
        if enrichment.PLACEHOLDER_MARK in raw:
            ip = enrichment.client_ip(request.remote, request.headers.get("X-Forwarded-For"), self.trusted_proxies)
            enrichment.fill_placeholders(doc, ip, request.headers.get("User-Agent", ""))
        return doc

    async def record_pixel(self, request: web.Request, project_id: str, collection: str) -> web.Response:
        """The image beacon: ``GET ...?api_key=&data=<URL-encoded base64 of the event JSON>`` ->
        a 1x1 transparent GIF, or the error status with Keen's JSON error body."""
        started = time.perf_counter()
        try:
            body = keen.decode_beacon_data(request.query.get("data"), self.settings.api_max_body_bytes)
        except ApiError as exc:
            return self.respond("event", exc.status, exc.body(), started, exc.headers)
        answer = await self.record_one(request, project_id, collection, body)
        if answer.status != 201:
            return answer
        return web.Response(
            body=keen.PIXEL_GIF,
            status=200,
            content_type="image/gif",
            headers={**CORS_ANSWER_HEADERS, "Cache-Control": "no-store"},
        )

    def respond(
        self, endpoint: str, status: int, body: bytes, started: float, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        elapsed = time.perf_counter() - started
        out = {SERVER_TIME_HEADER: f"{elapsed * 1000:.3f}", **CORS_ANSWER_HEADERS}
        if headers:
            out.update(headers)
        self.m_requests.labels(endpoint, str(status)).inc()
        return web.Response(body=body, status=status, content_type="application/json", headers=out)


async def ensure_control_topic(runtime: Runtime) -> None:
    """Declare the one-partition control topic (idempotent): the API answers only once the control
    plane has caught up with it, and a broker's auto-created topic could get the wrong partitions."""
    try:
        await runtime.topics.control.maybe_declare()
    except Exception as exc:  # noqa: BLE001 - the control plane keeps waiting; say why
        log.warning("could not declare the control topic: %r", exc)


#: Keen's JavaScript SDK sends image beacons of up to 16,000 URL characters; aiohttp's default
#: request line limit is 8,190 bytes.
MAX_REQUEST_LINE_BYTES = 16 * 1024 + 64


def allow_long_beacon_urls(app: faust.App) -> None:
    """Raise the web server's request line limit to what Keen's SDK sends (faust's aiohttp driver
    keeps the server options in its runner; a driver without one keeps aiohttp's 8 KiB)."""
    kwargs = getattr(getattr(app.web, "_runner", None), "_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs.setdefault("max_line_size", MAX_REQUEST_LINE_BYTES)


def register_api(app: faust.App, runtime: Runtime) -> IngestApi:
    api = IngestApi(runtime)
    runtime.api = api  # type: ignore[attr-defined]
    allow_long_beacon_urls(app)

    @app.page("/3.0/projects/{project_id}/events/{collection}")
    class KeenEvent(faust.web.View):
        async def post(self, request: web.Request, project_id: str, collection: str) -> web.Response:
            return await api.record_one(request, project_id, collection)

        async def get(self, request: web.Request, project_id: str, collection: str) -> web.Response:
            return await api.record_pixel(request, project_id, collection)

        async def options(self, request: web.Request, **kwargs: Any) -> web.Response:
            return web.Response(status=204, headers=keen.preflight_headers(request.headers))

    @app.page("/3.0/projects/{project_id}/events")
    class KeenBatch(faust.web.View):
        async def post(self, request: web.Request, project_id: str) -> web.Response:
            return await api.record_batch(request, project_id)

        async def options(self, request: web.Request, **kwargs: Any) -> web.Response:
            return web.Response(status=204, headers=keen.preflight_headers(request.headers))

    @app.task
    async def api_producer() -> None:
        await ensure_control_topic(runtime)
        await api.start()

    @app.on_before_shutdown.connect
    async def stop_api_producer(app: faust.App, **kwargs: object) -> None:
        await asyncio.shield(api.stop())

    return api
