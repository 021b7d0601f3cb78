"""Pure logic of the Keen-compatible ingestion API (no I/O, no clock reads: time is passed in).

* authentication: where the write key comes from, constant-time comparison;
* request validation: body -> JSON object, collection names, per-event checks;
* enrichment: ``keen.id`` / ``keen.timestamp`` / ``keen.created_at``;
* records: events of one collection -> batch records under the topic contract,
  split so that no record exceeds ``max_record_bytes``;
* per-event results of the batch endpoint, Keen's error bodies;
* admission of a shed project: the shed decision from the replicated state and
  the token-bucket check, and the ``Retry-After`` seconds.

The web views in :mod:`streamapp.api.ingest` only glue these to aiohttp and Kafka.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamapp.contract import (
    event_time_in_range,
    is_valid_name,
    iso_from_ms,
    name_rule,
    parse_iso_seconds,
    preview,
)
from streamapp.enrichment import AddonError, check_event_addons, fill_placeholders
from streamapp.metering.bucket import TokenBucket
from streamapp.metering.shed import ShedState, retry_after_seconds

# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answer in Keen's shape: ``{"message": ..., "error_code": ...}``."""

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> bytes:
        return error_body(self.message, self.error_code, **self.extra)

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the parse process too (see plan_request): rebuild with all fields in the parent.
        return (ApiError, (self.status, self.error_code, self.message), {"headers": self.headers, "extra": self.extra})


def error_body(message: str, error_code: str, **extra: Any) -> bytes:
    return orjson.dumps({"message": message, "error_code": error_code, **extra})


# Keen's error names (``error_code`` of a request error, ``error.name`` of a per-event error).
INVALID_API_KEY = "InvalidApiKeyError"
NOT_FOUND = "ResourceNotFoundError"
INVALID_EVENT = "InvalidEventError"
INVALID_COLLECTION = "InvalidCollectionNameError"
INVALID_JSON = "InvalidJsonError"
INVALID_PROJECT_ID = "InvalidProjectIdError"
TOO_LARGE = "RequestEntityTooLargeError"
EVENT_TOO_LARGE = "EventTooLargeError"
TOO_MANY_REQUESTS = "TooManyRequestsError"
UNAVAILABLE = "ServiceUnavailableError"
REQUEST_TIMEOUT = "RequestTimeoutError"
UNSUPPORTED_ENCODING = "UnsupportedContentEncodingError"

# --------------------------------------------------------------------------- auth


def write_key_from(authorization: str | None, api_key_param: str | None) -> str | None:
    """The key a Keen client sent: the raw ``Authorization`` header, else the ``api_key`` query parameter."""
    if authorization:
        return authorization.strip()
    if api_key_param:
        return api_key_param.strip()
    return None


def keys_match(provided: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected key (a project without one) never matches."""
    if not expected or provided is None:
        return False
    return hmac.compare_digest(provided.encode("utf-8", "replace"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --------------------------------------------------------------------------- request bodies


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ApiError 400 when it is not one."""
    if not body:
        raise ApiError(400, INVALID_JSON, "request body is empty: expected a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, INVALID_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, INVALID_JSON, f"request body is a JSON {type(doc).__name__}, expected an object")
    return doc


def check_collection(name: str) -> None:
    if not is_valid_name(name):
        raise ApiError(400, INVALID_COLLECTION, f"bad collection name {preview(name)}: {name_rule(name)}")


def check_batch(doc: dict[str, Any], max_events: int | None = None, max_collections: int | None = None) -> int:
    """Validate the shape of a batch body ``{collection: [event, ...]}``; return the number of events.

    A value that is not a list makes the whole body malformed (400); more than ``max_collections``
    collections or ``max_events`` events is a 413 for the whole request (nothing is written); bad
    collection names and bad events are reported by :func:`plan_batch` instead.
    """
    if max_collections is not None and len(doc) > max_collections:
        raise ApiError(
            413, TOO_LARGE, f"batch of {len(doc)} collections is over the limit of {max_collections} per request"
        )
    total = 0
    for name, events in doc.items():
        if not isinstance(events, list):
            raise ApiError(
                400,
                INVALID_JSON,
                f"batch body: the value of {name!r} is a JSON {type(events).__name__}, expected a list",
            )
        total += len(events)
    if max_events is not None and total > max_events:
        raise ApiError(413, TOO_LARGE, f"batch of {total} events is over the limit of {max_events} per request")
    return total


# --------------------------------------------------------------------------- browsers

#: A 1x1 transparent GIF: the image beacon's answer (the SDK checks that the image has a size).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: Request headers a browser may send to the write routes (Keen's SDKs send ``keen-sdk``).
CORS_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "content-encoding",
        "keen-sdk",
        "accept",
        "accept-language",
        "cache-control",
        "pragma",
        "x-requested-with",
    }
)
CORS_MAX_AGE_SECONDS = 86400


def preflight_headers(request_headers: Mapping[str, str]) -> dict[str, str]:
    """The answer to a CORS preflight: the requested headers that are in the allow-list (always
    Authorization and Content-Type), the write methods, and a day of caching."""
    allowed = ["Authorization", "Content-Type"]
    requested = request_headers.get("Access-Control-Request-Headers", "")
    for name in requested.split(",")[:32]:
        name = name.strip().lower()
        if name in CORS_ALLOWED_HEADERS and name not in ("authorization", "content-type") and name not in allowed:
            allowed.append(name)
    return {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ", ".join(allowed),
        "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS),
        "Vary": "Access-Control-Request-Headers",
    }


def decode_beacon_data(data: str | None, max_body_bytes: int) -> bytes:
    """The event JSON of an image beacon's ``data`` parameter (base64, standard or URL-safe; the
    query string is already URL-decoded). ApiError 400 when missing or not base64, 413 when too big."""
    if not data:
        raise ApiError(400, INVALID_JSON, "the image beacon needs a 'data' parameter: base64 of the event JSON")
    if len(data) > (max_body_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, TOO_LARGE, f"the 'data' parameter decodes to over the {max_body_bytes} byte limit")
    # A '+' sent without URL-encoding arrives as a space.
    text = data.strip().replace(" ", "+")
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text.encode("ascii"))
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, INVALID_JSON, "the 'data' parameter is not valid base64") from None


# --------------------------------------------------------------------------- enrichment


@dataclass(slots=True)
class Clock:
    """One request's notion of "now": epoch milliseconds and its ISO-8601 form."""

    ms: int
    iso: str = ""

    def __post_init__(self) -> None:
        if not self.iso:
            self.iso = iso_from_ms(self.ms)

    @classmethod
    def at(cls, epoch_seconds: float) -> Clock:
        return cls(int(epoch_seconds * 1000))


def uuid4_batch(n: int) -> list[str]:
    """``n`` random version-4 UUID strings from one ``os.urandom`` call (~10x faster than ``uuid.uuid4``)."""
    raw = bytearray(os.urandom(16 * n))
    for i in range(6, 16 * n, 16):
        raw[i] = (raw[i] & 0x0F) | 0x40  # version 4
    for i in range(8, 16 * n, 16):
        raw[i] = (raw[i] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return [
        f"{h[j : j + 8]}-{h[j + 8 : j + 12]}-{h[j + 12 : j + 16]}-{h[j + 16 : j + 20]}-{h[j + 20 : j + 32]}"
        for j in range(0, 32 * n, 32)
    ]


class _UuidPool:
    """Hands out pre-generated UUIDs, refilling in chunks (the API makes one per event)."""

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk
        self._ids: list[str] = []

    def __call__(self) -> str:
        ids = self._ids
        if not ids:
            ids = self._ids = uuid4_batch(self.chunk)
        return ids.pop()


#: A new random UUID (version 4) per call: ``keen.id`` of an accepted event.
new_event_id: Callable[[], str] = _UuidPool()


class EventRejected(ValueError):
    """One event breaks the rules; ``name`` is Keen's error name for it."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(description)
        self.name = name
        self.description = description

    def result(self) -> dict[str, Any]:
        return {"success": False, "error": {"name": self.name, "description": self.description}}


def enrich(event: Any, clock: Clock, new_id: Callable[[], str] = new_event_id) -> dict[str, Any]:
    """Set the ``keen`` properties in place (id: new UUID; timestamp: the client's when it is a valid
    ISO-8601 time, else now; created_at: now) and return the event. Raises EventRejected."""
    if not isinstance(event, dict):
        raise EventRejected(INVALID_EVENT, f"an event must be a JSON object, not a JSON {type(event).__name__}")
    keen = event.get("keen")
    if keen is None:
        keen = event["keen"] = {}
    elif not isinstance(keen, dict):
        raise EventRejected(INVALID_EVENT, "the 'keen' property must be an object")
    if "addons" in keen:  # a bad add-on configuration is this event's 400, not the sink's surprise
        try:
            check_event_addons(event)
        except AddonError as exc:
            raise EventRejected(INVALID_EVENT, exc.reason) from None
    seconds = parse_iso_seconds(keen.get("timestamp"))
    if seconds is None:
        keen["timestamp"] = clock.iso
    elif not event_time_in_range(seconds):  # the sink would dead-letter it: say so at the door
        raise EventRejected(
            INVALID_EVENT, f"keen.timestamp {preview(keen['timestamp'])} is outside the years 1970-9999"
        )
    keen["created_at"] = clock.iso
    keen["id"] = new_id()
    return event


def encode_event(event: Any, clock: Clock, max_event_bytes: int, new_id: Callable[[], str] = new_event_id) -> bytes:
    """Enrich and serialize one event; EventRejected when invalid or over ``max_event_bytes``.

    The size limit applies to the enriched event (the client's JSON plus the ``keen`` properties).
    """
    enrich(event, clock, new_id)
    try:
        data = orjson.dumps(event)
    except TypeError as exc:  # e.g. integers beyond 64 bits
        raise EventRejected(INVALID_EVENT, f"event cannot be encoded: {exc}") from None
    if len(data) > max_event_bytes:
        raise EventRejected(EVENT_TOO_LARGE, f"event of {len(data)} bytes is over the {max_event_bytes} byte limit")
    return data


# --------------------------------------------------------------------------- records


def record_envelope(project_id: str, collection: str, single: bool) -> tuple[bytes, bytes]:
    """(head, tail) of a record value; ``head + event(s) + tail`` is what contract.encode_record makes."""
    head = b'{"project_id":' + orjson.dumps(project_id) + b',"collection":' + orjson.dumps(collection)
    if single:
        return head + b',"event":', b"}"
    return head + b',"events":[', b"]}"


def build_records(project_id: str, collection: str, encoded: list[bytes], max_record_bytes: int) -> list[bytes]:
    """Record values for already-encoded events of one collection, in order.

    One batch record when it fits in ``max_record_bytes``, else as few consecutive records as fit
    (the single-event form for a record of one event). An event too big for any record raises
    ValueError: callers limit events to :func:`max_event_bytes_for` first.
    """
    if not encoded:
        return []
    head, tail = record_envelope(project_id, collection, single=False)
    overhead = len(head) + len(tail)
    groups: list[list[bytes]] = []
    current: list[bytes] = []
    size = overhead
    for data in encoded:
        extra = len(data) + (1 if current else 0)
        if current and size + extra > max_record_bytes:
            groups.append(current)
            current, size, extra = [], overhead, len(data)
        current.append(data)
        size += extra
    groups.append(current)
    records = []
    for group in groups:
        if len(group) == 1:
            single_head, single_tail = record_envelope(project_id, collection, single=True)
            value = single_head + group[0] + single_tail
        else:
            value = head + b",".join(group) + tail
        if len(value) > max_record_bytes:
            raise ValueError(f"event of {len(group[0])} bytes cannot fit a {max_record_bytes} byte record")
        records.append(value)
    return records


def max_event_bytes_for(project_id: str, collection: str, max_event_bytes: int, max_record_bytes: int) -> int:
    """The event size limit, tightened so that one event always fits in one record."""
    head, tail = record_envelope(project_id, collection, single=True)
    return max(0, min(max_event_bytes, max_record_bytes - len(head) - len(tail)))


@dataclass(slots=True)
class CollectionPlan:
    """What a batch request does for one collection: the records to write and the per-event results."""

    collection: str
    records: list[bytes] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0


SUCCESS: dict[str, Any] = {"success": True}


def plan_batch(
    project_id: str,
    doc: dict[str, list[Any]],
    clock: Clock,
    *,
    max_event_bytes: int,
    max_record_bytes: int,
    new_id: Callable[[], str] = new_event_id,
) -> list[CollectionPlan]:
    """Validate, enrich and encode a batch body (already checked by :func:`check_batch`).

    Good events of a collection become one record (or several when over ``max_record_bytes``);
    each bad event gets a failed result; a badly named collection gets ONE failed result (not one
    per event: the answer must not grow with what the client repeated).
    """
    plans = []
    for collection, events in doc.items():
        plan = CollectionPlan(str(collection))
        if not is_valid_name(collection):
            rejected = EventRejected(
                INVALID_COLLECTION, f"bad collection name {preview(collection)}: {name_rule(collection)}"
            )
            plan.results = [rejected.result()]
            plans.append(plan)
            continue
        limit = max_event_bytes_for(project_id, collection, max_event_bytes, max_record_bytes)
        encoded: list[bytes] = []
        results = plan.results
        for event in events:
            try:
                encoded.append(encode_event(event, clock, limit, new_id))
            except EventRejected as exc:
                results.append(exc.result())
            else:
                results.append(SUCCESS)
        plan.accepted = len(encoded)
        plan.records = build_records(project_id, collection, encoded, max_record_bytes)
        plans.append(plan)
    return plans


def batch_response(plans: list[CollectionPlan]) -> dict[str, list[dict[str, Any]]]:
    """Keen's batch answer: ``{collection: [{"success": true} | {"success": false, "error": ...}, ...]}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for plan in plans:
        out.setdefault(plan.collection, []).extend(plan.results)
    return out


# --------------------------------------------------------------------------- whole requests


CREATED = b'{"created":true}'


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The per-request limits :func:`plan_request` applies (from Settings)."""

    max_event_bytes: int
    max_record_bytes: int
    max_batch_events: int
    max_batch_collections: int


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """A validated request: the records to write, the answer body, its event count and how many were accepted."""

    records: list[bytes]
    body: bytes
    events: int
    accepted: int


def plan_request(
    body: bytes,
    project_id: str,
    collection: str | None,
    clock_ms: int,
    limits: RequestLimits,
    placeholders: tuple[str, str] | None = None,
) -> PlannedRequest:
    """Parse, validate, enrich and encode one request body; ApiError when the whole request is refused.

    ``collection`` None is the batch endpoint. ``placeholders``: (client address, User-Agent) for
    ``${keen.ip}`` / ``${keen.user_agent}``, None when the body has none. Pure (time comes in as
    ``clock_ms``), and only plain data in and out, so the API runs it in a separate process for big
    bodies: parsing a hostile 10 MiB body takes seconds of CPU that must not hold the event loop.
    """
    doc = parse_object(body)
    if placeholders is not None:
        fill_placeholders(doc, *placeholders)
    clock = Clock(clock_ms)
    if collection is not None:
        limit = max_event_bytes_for(project_id, collection, limits.max_event_bytes, limits.max_record_bytes)
        try:
            data = encode_event(doc, clock, limit)
        except EventRejected as exc:
            raise ApiError(400, exc.name, exc.description) from None
        records = build_records(project_id, collection, [data], limits.max_record_bytes)
        return PlannedRequest(records, CREATED, 1, 1)
    count = check_batch(doc, limits.max_batch_events, limits.max_batch_collections)
    plans = plan_batch(
        project_id,
        doc,
        clock,
        max_event_bytes=limits.max_event_bytes,
        max_record_bytes=limits.max_record_bytes,
    )
    records = [record for plan in plans for record in plan.records]
    answer = orjson.dumps(batch_response(plans))
    return PlannedRequest(records, answer, count, sum(plan.accepted for plan in plans))


def warm_up() -> None:
    """Run once in the parse process at start: importing this module there is the slow part."""


def parse_process_init() -> None:
    """Initializer of the parse process: a lower CPU priority, so parsing a hostile body yields the
    CPU to the worker's event loop (and its honest requests) rather than competing with it."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)


# --------------------------------------------------------------------------- admission


@dataclass(frozen=True, slots=True)
class Shed:
    """A project whose excess is being rejected: its admitted rate, why, and the Retry-After seconds."""

    limit_eps: float
    reason: str
    retry_after: int


def shed_decision(
    project_id: str,
    state: Mapping[str, Any] | None,
    override: Mapping[str, Any] | None,
    *,
    quota_eps: float | None,
    default_eps: float,
    now: float,
    cooldown: float,
) -> Shed | None:
    """Is ``project_id`` shed (and enforcing) according to the replicated control view?

    * an operator "unshed" override wins: not shed;
    * a shed state from the meters (``ShedState.to_dict()``), unless in shadow mode: shed at the
      state's ``limit_eps`` (else the project's quota, else the default);
    * an operator "shed" override not yet turned into a shed state by a meter: shed at the quota.

    ``now`` is epoch seconds (the meters' clock); ``Retry-After`` comes from
    :func:`streamapp.metering.shed.retry_after_seconds`.
    """
    action = override.get("action") if override else None
    if action == "unshed":
        return None
    fallback_limit = quota_eps if quota_eps and quota_eps > 0 else default_eps
    if state and state.get("state") == "shed":
        if state.get("mode") == "shadow":
            return None
        try:
            parsed = ShedState.from_dict({**state, "project_id": project_id})
        except (TypeError, ValueError):
            parsed = ShedState(project_id, state="shed")
        limit = parsed.limit_eps if parsed.limit_eps > 0 else fallback_limit
        # The meter's state says only "manual shed": the operator's own words stay the answer's
        # reason once the meter has taken the override over, as they were before.
        reason = _manual_reason(override) if action == "shed" and parsed.manual == "shed" else parsed.reason or "shed"
        return Shed(limit, reason, retry_after_seconds(parsed, now, cooldown))
    if action == "shed":
        if override and override.get("mode") == "shadow":
            return None
        manual = ShedState(project_id, state="shed", manual="shed")
        return Shed(fallback_limit, _manual_reason(override), retry_after_seconds(manual, now, cooldown))
    return None


def _manual_reason(override: Mapping[str, Any] | None) -> str:
    reason = str(override.get("reason") or "manual shed") if override else "manual shed"
    return f"manual shed: {reason}"


def bucket_for(limit_eps: float) -> TokenBucket:
    """The local bucket of a shed project: ``limit_eps`` tokens/s and no stored burst (one token).

    No burst on purpose: a shed project is over its quota already, and a stored second's worth
    would let it pass ``limit x (T + 1)`` events in T seconds instead of ``limit x T`` plus one
    request.
    """
    return TokenBucket(rate=limit_eps, capacity=1.0)


def admit(bucket: TokenBucket, now: float, n: int) -> bool:
    """Admit a whole request of ``n`` events, charging ``n`` tokens, or refuse it and charge nothing.

    A request is admitted while the bucket holds a token; it then costs all its events, so the
    bucket may go into debt and refuses everything until the refill has paid the debt back.
    Over any span T the admitted events are at most ``rate x T`` plus one request, whatever
    the batch sizes.
    """
    if bucket.wait_time(now, 1) > 0:
        bucket.take(now, 0)  # keep the time origin moving
        return False
    bucket.charge(now, max(1, n))
    return True


def can_admit_any(bucket: TokenBucket, now: float) -> bool:
    """Cheap pre-check before reading the body: is there a token (no debt left)?"""
    return bucket.wait_time(now, 1) <= 0


def retry_after_for(bucket: TokenBucket, now: float, shed: Shed) -> int:
    """Retry-After seconds of a refused request: at least the time the bucket needs to pay its debt."""
    wait = bucket.wait_time(now, 1)
    if not math.isfinite(wait):
        return shed.retry_after
    return max(1, math.ceil(wait))


def shed_error(project_id: str, shed: Shed, retry_after: int | None = None) -> ApiError:
    """The 429 answer for a shed project's excess (``retry_after`` defaults to the shed's own)."""
    if retry_after is not None:
        shed = Shed(shed.limit_eps, shed.reason, retry_after)
    return ApiError(
        429,
        TOO_MANY_REQUESTS,
        f"project {project_id} is over its limit and being shed ({shed.reason}); "
        f"admitted rate {shed.limit_eps:g} events/s",
        headers={"Retry-After": str(shed.retry_after)},
        extra={"reason": shed.reason, "retry_after": shed.retry_after, "limit_eps": shed.limit_eps},
    )


def unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, UNAVAILABLE, message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


def curl_example(web: str, project_id: str, write_key: str, collection: str = "pageviews") -> str:
    """A working ``curl`` line recording one event (printed by the demo and the CLI)."""
    return (
        f"curl -sS -X POST '{web.rstrip('/')}/3.0/projects/{project_id}/events/{collection}' "
        f"-H 'Authorization: {write_key}' -H 'Content-Type: application/json' "
        """-d '{"page": "/home", "user": {"id": 42}}'"""
    )
