"""Keen-compatible event recording on the worker's own web server, with admission control.

The service behind the routes of :mod:`streamapp.api.routes` (every worker is an API node):

* ``POST /3.0/projects/{project_id}/events/{collection}``: one event -> 201 ``{"created": true}``
* ``POST /3.0/projects/{project_id}/events``: ``{collection: [event, ...]}`` -> 200 with per-event results
* ``GET /3.0/projects/{project_id}/events/{collection}?api_key=&data=``: the image beacon (base64
  event JSON in ``data``) -> a 1x1 GIF; the same checks as the POST;
* ``OPTIONS`` on both: CORS preflight (Keen's SDKs send ``keen-sdk``); every answer carries CORS headers.

``api_key`` works as a query parameter on every write route; ``${keen.ip}`` / ``${keen.user_agent}``
are filled here (see :mod:`streamapp.enrichment`).

Checks, cheapest first; everything up to the body read is a pure in-memory decision:

1. control plane caught up (else 503); write key present and valid for a known project (401,
   the same answer for an unknown project and a wrong key, so ids cannot be enumerated; keys are
   compared as SHA-256 hashes in constant time), collection name (400);
2. shed project: the replicated shed state (or an operator "shed" override) and a local
   per-project token bucket of ``limit_eps`` tokens/s (per worker): a request of n events costs n
   tokens, the bucket may go into debt, and while it holds no token -> 429 + a Retry-After that
   covers the debt;
3. Kafka back-pressure: at most ``api_max_inflight`` requests wait on Kafka acks; none more is
   admitted while no ack has arrived for ``STALL_SECONDS`` and the broker showed no other sign of
   life meanwhile (new records fetched by this worker's consumer; time in which this process did
   not run is not counted), and after a failed write only one request at a time probes Kafka until
   a write succeeds -> 503 + Retry-After at once;
4. body: a share of ``api_max_body_bytes_in_flight`` (else 503), read within
   ``api_body_read_timeout_seconds`` (else 408), over ``api_max_body_bytes`` (after gzip/deflate
   decompression too) -> 413; more than ``api_max_batch_events`` events or
   ``api_max_batch_collections`` collections -> 413; not JSON / not an object / bad event -> 400
   (batch: bad events are reported per event, a bad collection name once, the good ones are
   written). Bodies over ``INLINE_PLAN_BYTES`` (or with over ``INLINE_PLAN_OBJECTS`` objects) are
   parsed and encoded in a separate process, so a hostile body never holds the event loop (nor
   its GIL) (the body's bounds: :mod:`streamapp.api.body`; the plan: :mod:`streamapp.api.planning`);
5. produce (dedicated producer, acks=all) and answer only after Kafka acknowledged; no ack
   within ``api_produce_timeout_seconds`` -> 503 (the client retries: at-least-once).

Size: one class of about 430 lines on purpose: the checks above in their order, the parse process and
the producer's stall clock share its state (pure parts live in the modules named above).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import faust
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge

from streamapp import enrichment
from streamapp.api.admission import Shed, admit, bucket_for, can_admit_any, retry_after_for, shed_decision, shed_error
from streamapp.api.body import BodyBudget, read_request_body
from streamapp.api.browser import CORS_ANSWER_HEADERS, PIXEL_GIF, SERVER_TIME_HEADER, decode_beacon_data
from streamapp.api.errors import INVALID_API_KEY, INVALID_PROJECT_ID, ApiError, unavailable
from streamapp.api.events import check_collection
from streamapp.api.planning import PlannedRequest, RequestLimits, parse_process_init, plan_request, warm_up
from streamapp.contract import is_valid_name, name_rule, preview
from streamapp.control import ControlPlane, ProjectSettings
from streamapp.infra.producers import start_producer
from streamapp.metering.bucket import TokenBucket
from streamapp.settings import Settings
from streamapp.web.auth import key_matches, write_key_from

log = logging.getLogger(__name__)

#: No Kafka ack for this long while requests wait on one = Kafka is stalled: new requests get 503
#: at once instead of queueing behind the stuck ones (capped by the produce timeout). Only time in
#: which Kafka could have shown progress counts (see ``IngestApi.watch_kafka``).
STALL_SECONDS = 1.0
#: How often the API looks for other signs that Kafka is up (see ``IngestApi.watch_kafka``).
WATCH_SECONDS = 0.1
#: How long a request may wait for the API producer to finish starting (only right after start).
START_WAIT_SECONDS = 2.0
#: Bodies up to this size are planned on the event loop (well under a millisecond); bigger ones go
#: to the parse process. 64 KiB of the worst JSON (``{},`` repeated) is ~20k objects, a few ms.
INLINE_PLAN_BYTES = 64 * 1024
#: ... and with at most this many '{' (an upper bound of its events): enriching and encoding 5,000
#: tiny events (a 15 KB body) takes ~10 ms, 1,000 a couple.
INLINE_PLAN_OBJECTS = 1000


class IngestApi:
    """State of the API on one worker: its producer, the in-flight bound and the shed buckets."""

    def __init__(self, settings: Settings, control: ControlPlane, registry: CollectorRegistry, app: faust.App) -> None:
        """``registry``: where its Prometheus series go; ``app``: the Faust app, whose consumer's high
        watermarks tell :meth:`watch_kafka` that the broker is alive."""
        self.app = app
        self.settings = settings
        self.control = control
        self.topic = settings.events_topic
        self.max_inflight = settings.api_max_inflight
        self.timeout = settings.api_produce_timeout_seconds
        self.stall_seconds = min(STALL_SECONDS, self.timeout)
        self.producer: AIOKafkaProducer | None = None
        self.started = asyncio.Event()
        self.inflight = 0
        self._last_progress = 0.0  # monotonic time of the last ack (or of inflight going 0 -> 1)
        self._watched_at = 0.0  # monotonic time of watch_kafka's last look
        self._highwaters = -1  # sum of the events partitions' high watermarks at that look
        self._watch: asyncio.Task[None] | None = None
        self.failing = False  # the last write timed out or failed, and none succeeded since
        self.buckets: dict[str, TokenBucket] = {}
        self.trusted_proxies = enrichment.parse_trusted_proxies(settings.trusted_proxies)
        self.budget = BodyBudget(settings.api_max_body_bytes_in_flight)
        self.limits = RequestLimits(
            max_event_bytes=settings.max_event_bytes,
            max_record_bytes=settings.max_record_bytes,
            max_batch_events=settings.api_max_batch_events,
            max_batch_collections=settings.api_max_batch_collections,
        )
        self.parser: ProcessPoolExecutor | None = None
        self.m_requests = Counter(
            "streamapp_api_requests", "API requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.m_events = Counter("streamapp_api_events", "Events accepted by the API", registry=registry)
        self.m_inflight = Gauge("streamapp_api_inflight", "Requests waiting on Kafka acks", registry=registry)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the producer, retrying while the broker is not reachable."""
        settings = self.settings
        if self.producer is None:
            config = {
                "bootstrap_servers": settings.kafka_bootstrap,
                "client_id": f"{settings.app_id}-api",
                "acks": "all",
                "linger_ms": 0,
                "max_batch_size": max(1 << 20, settings.max_record_bytes + 4096),
                "max_request_size": max(2 << 20, settings.max_record_bytes * 2),
                "request_timeout_ms": max(1000, int(self.timeout * 1000)),
            }
            self.producer = await start_producer(config, "API", 1.0)
        self.started.set()
        log.info("API producer started (acks=all, max in-flight %s)", self.max_inflight)
        self._watch = asyncio.ensure_future(self.watch_kafka())
        self.parser = self.new_parser()
        with contextlib.suppress(Exception):  # warm it up: the first big body should not wait for a spawn
            await asyncio.get_running_loop().run_in_executor(self.parser, warm_up)

    @staticmethod
    def new_parser() -> ProcessPoolExecutor:
        # "spawn": the worker has threads (Kafka clients, RocksDB) that fork would copy half-way.
        return ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=parse_process_init
        )

    async def stop(self) -> None:
        producer, self.producer = self.producer, None
        self.started.clear()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        parser, self.parser = self.parser, None
        if parser is not None:
            parser.shutdown(wait=False, cancel_futures=True)
        if producer is not None:
            await producer.stop()

    async def watch_kafka(self) -> None:
        """Keep the stall clock honest: it should say "the broker is down", not "one slow second".

        A missing ack for ``STALL_SECONDS`` meant "Kafka is stalled" even when this worker's event
        loop had not run (acks sat unread in the socket: CPU contention, a long step) or when the
        broker was merely slow under load while serving fetches. Every ``WATCH_SECONDS``: time in
        which the loop did not run (beyond the watch interval) is not counted, and new records
        fetched by the consumer (the events partitions' high watermarks moved: the broker answers
        fetches and takes writes) count as progress. A stopped or unreachable broker shows neither,
        so it still gets 503s after ``STALL_SECONDS``.
        """
        self._watched_at = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            now = time.monotonic()
            late = now - self._watched_at - WATCH_SECONDS
            self._watched_at = now
            highwaters, before = self.events_highwaters(), self._highwaters
            self._highwaters = highwaters
            if not self.inflight:
                continue
            if before >= 0 and highwaters > before:
                self._last_progress = now
            elif late > WATCH_SECONDS:
                self._last_progress = min(now, self._last_progress + late)

    def events_highwaters(self) -> int:
        """Sum of the high watermarks this worker's consumer knows for its events partitions
        (updated by each fetch response); -1 when unknown."""
        try:
            consumer = self.app.consumer
            return sum(consumer.highwater(tp) or 0 for tp in consumer.assignment() if tp.topic == self.topic)
        except Exception:  # noqa: BLE001 - not started / no assignment yet: no signal
            return -1

    # ----------------------------------------------------------------- checks
    def project(self, request: web.Request, project_id: str) -> ProjectSettings:
        """503 / 401 checks; the project's settings when the write key is valid for it.

        An unknown project and a wrong key get the same 401 (and the same hash-and-compare work),
        so a caller cannot tell which project ids exist.
        """
        if not self.control.caught_up.is_set():
            raise unavailable("the control plane is still loading project settings")
        if not is_valid_name(project_id):  # e.g. "_manifests": reserved, whatever the control view holds
            raise ApiError(400, INVALID_PROJECT_ID, f"bad project id {preview(project_id)}: {name_rule(project_id)}")
        provided = write_key_from(request.headers.get("Authorization"), request.query.get("api_key"))
        if provided is None:
            raise ApiError(401, INVALID_API_KEY, "a write key is required (Authorization header or api_key)")
        project = self.control.view.projects.get(project_id)
        if not key_matches(project, provided, time.time()) or project is None:
            raise ApiError(401, INVALID_API_KEY, "the write key is not valid for this project")
        return project

    def shed_bucket(self, project_id: str, project: ProjectSettings, now: float) -> tuple[Shed, TokenBucket] | None:
        """The shed decision and the local bucket for a shed project; None when it is not shed."""
        view = self.control.view
        state = view.shed_states.get(project_id)
        override = view.overrides.get(project_id)
        if not state and not override:
            if self.buckets:
                self.buckets.pop(project_id, None)
            return None
        shed = shed_decision(
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
            bucket = self.buckets[project_id] = bucket_for(shed.limit_eps)
            bucket.take(now, 0)
        return shed, bucket

    def check_capacity(self) -> None:
        """503 at once when Kafka cannot take more: the bound is reached or acks stopped coming."""
        if self.inflight >= self.max_inflight:
            raise unavailable(f"{self.inflight} writes are waiting on Kafka (limit {self.max_inflight}); retry")
        if self.inflight:
            if self.failing:
                # The last write failed: one request at a time probes Kafka, the others fail fast.
                raise unavailable("Kafka is failing writes; retry")
            now = time.monotonic()
            # (watch_kafka held up as well: the loop itself was late, and acks may sit unread)
            if now - self._last_progress > self.stall_seconds and now - self._watched_at < 3 * WATCH_SECONDS:
                raise unavailable(f"Kafka has not acknowledged a write for over {self.stall_seconds:g}s; retry")

    async def read_body(self, request: web.Request) -> tuple[bytes, int]:
        """The (decompressed) body and the bytes it holds of the budget; the caller releases them
        (the bounds: :func:`streamapp.api.body.read_request_body`)."""
        return await read_request_body(
            request, self.budget, self.settings.api_max_body_bytes, self.settings.api_body_read_timeout_seconds
        )

    async def plan(
        self, body: bytes, project_id: str, collection: str | None, placeholders: tuple[str, str] | None = None
    ) -> PlannedRequest:
        """:func:`~streamapp.api.planning.plan_request`: on the loop for small bodies, in the parse
        process for big ones."""
        clock_ms = int(time.time() * 1000)
        parser = self.parser
        size = len(body)
        # (a body of up to 2 x INLINE_PLAN_OBJECTS bytes cannot hold more objects: no need to count)
        if (
            parser is None
            or size <= 2 * INLINE_PLAN_OBJECTS
            or (size <= INLINE_PLAN_BYTES and body.count(b"{") <= INLINE_PLAN_OBJECTS)
        ):
            return plan_request(body, project_id, collection, clock_ms, self.limits, placeholders)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                parser, plan_request, body, project_id, collection, clock_ms, self.limits, placeholders
            )
        except BrokenProcessPool:
            # The parse process died (e.g. killed for memory): replace it, the client retries.
            if self.parser is parser:
                self.parser = self.new_parser()
                parser.shutdown(wait=False, cancel_futures=True)
            raise unavailable("the request parser restarted; retry") from None

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
                raise unavailable("the API producer is not connected to Kafka yet") from None
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
            raise unavailable(
                f"Kafka did not acknowledge the write within {self.timeout:g}s; retry (it may still be written)"
            ) from None
        except KafkaError as exc:
            self.failing = True
            raise unavailable(f"Kafka refused the write ({type(exc).__name__}); retry") from None
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
        return await self.record(request, "event", project_id, collection, body)

    async def record_batch(self, request: web.Request, project_id: str) -> web.Response:
        return await self.record(request, "batch", project_id, None)

    async def record(
        self,
        request: web.Request,
        endpoint: str,
        project_id: str,
        collection: str | None,
        given_body: bytes | None = None,
    ) -> web.Response:
        """Both write endpoints: checks cheapest first, then body, plan, admission, produce.

        ``given_body``: the image beacon's event (from its query string), else the request body is read.
        """
        started = time.perf_counter()
        reserved = 0
        try:
            project = self.project(request, project_id)
            if collection is not None:
                check_collection(collection)
            now = time.monotonic()
            shed = self.shed_bucket(project_id, project, now)
            if shed is not None and not can_admit_any(shed[1], now):
                raise shed_error(project_id, shed[0], retry_after_for(shed[1], now, shed[0]))
            self.check_capacity()
            if given_body is None:
                body, reserved = await self.read_body(request)
            else:
                body = given_body
            planned = await self.plan(body, project_id, collection, self.placeholders(request, body))
            del body
            if shed is not None:
                now = time.monotonic()
                if not admit(shed[1], now, planned.events):
                    raise shed_error(project_id, shed[0], retry_after_for(shed[1], now, shed[0]))
            await self.produce(project_id, planned.records)
        except ApiError as exc:
            return self.respond(endpoint, exc.status, exc.body(), started, exc.headers)
        finally:
            self.budget.release(reserved)
        self.m_events.inc(planned.accepted)
        return self.respond(endpoint, 201 if collection is not None else 200, planned.body, started)

    def placeholders(self, request: web.Request, raw: bytes) -> tuple[str, str] | None:
        """What ``${keen.ip}`` / ``${keen.user_agent}`` stand for in this request (client address,
        User-Agent); None when the body has none (a byte search: such bodies are not walked)."""
        if enrichment.PLACEHOLDER_MARK not in raw:
            return None
        ip = enrichment.client_ip(request.remote, request.headers.get("X-Forwarded-For"), self.trusted_proxies)
        return ip, request.headers.get("User-Agent", "")

    async def record_pixel(self, request: web.Request, project_id: str, collection: str) -> web.Response:
        """The image beacon: ``GET ...?api_key=&data=<URL-encoded base64 of the event JSON>`` ->
        a 1x1 transparent GIF, or the error status with Keen's JSON error body."""
        started = time.perf_counter()
        try:
            body = decode_beacon_data(request.query.get("data"), self.settings.api_max_body_bytes)
        except ApiError as exc:
            return self.respond("event", exc.status, exc.body(), started, exc.headers)
        answer = await self.record_one(request, project_id, collection, body)
        if answer.status != 201:
            return answer
        return web.Response(
            body=PIXEL_GIF,
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
