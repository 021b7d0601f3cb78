"""The Keen-compatible write API: ``POST /3.0/projects/{id}/events[/{collection}]``, the image beacon.

* :mod:`.errors` - Keen's error answers and names;
* :mod:`.browser` - CORS and the image beacon;
* :mod:`.events` - validating, enriching and encoding one request's events;
* :mod:`.planning` - a whole request -> the records to write and the answer (runs in a separate
  process for big bodies);
* :mod:`.admission` - a shed project's token bucket and Retry-After;
* :mod:`.body` - reading a body within its bounds;
* :mod:`.ingest` - :class:`IngestApi`: the checks, the parse process, the producer;
* :mod:`.routes` - the routes on the worker's web server.

The write keys themselves are checked in :mod:`streamapp.web.auth` (every credential check is there).
"""

from streamapp.api.admission import Shed, admit, bucket_for, can_admit_any, retry_after_for, shed_decision, shed_error
from streamapp.api.browser import (
    CORS_ANSWER_HEADERS,
    PIXEL_GIF,
    SERVER_TIME_HEADER,
    decode_beacon_data,
    preflight_headers,
)
from streamapp.api.errors import (
    EVENT_TOO_LARGE,
    INVALID_API_KEY,
    INVALID_COLLECTION,
    INVALID_EVENT,
    INVALID_JSON,
    INVALID_PROJECT_ID,
    NOT_FOUND,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REQUESTS,
    UNAVAILABLE,
    UNSUPPORTED_ENCODING,
    ApiError,
    error_body,
    unavailable,
)
from streamapp.api.events import (
    Clock,
    EventRejected,
    check_batch,
    check_collection,
    encode_event,
    enrich,
    new_event_id,
    parse_object,
    uuid4_batch,
)
from streamapp.api.ingest import IngestApi
from streamapp.api.planning import (
    CREATED,
    CollectionPlan,
    PlannedRequest,
    RequestLimits,
    batch_response,
    build_records,
    max_event_bytes_for,
    plan_batch,
    plan_request,
    record_envelope,
)
from streamapp.api.routes import curl_example, register_api

__all__ = [
    "CORS_ANSWER_HEADERS",
    "CREATED",
    "EVENT_TOO_LARGE",
    "INVALID_API_KEY",
    "INVALID_COLLECTION",
    "INVALID_EVENT",
    "INVALID_JSON",
    "INVALID_PROJECT_ID",
    "NOT_FOUND",
    "PIXEL_GIF",
    "REQUEST_TIMEOUT",
    "SERVER_TIME_HEADER",
    "TOO_LARGE",
    "TOO_MANY_REQUESTS",
    "UNAVAILABLE",
    "UNSUPPORTED_ENCODING",
    "ApiError",
    "Clock",
    "CollectionPlan",
    "EventRejected",
    "IngestApi",
    "PlannedRequest",
    "RequestLimits",
    "Shed",
    "admit",
    "batch_response",
    "bucket_for",
    "build_records",
    "can_admit_any",
    "check_batch",
    "check_collection",
    "curl_example",
    "decode_beacon_data",
    "encode_event",
    "enrich",
    "error_body",
    "max_event_bytes_for",
    "new_event_id",
    "parse_object",
    "plan_batch",
    "plan_request",
    "preflight_headers",
    "record_envelope",
    "register_api",
    "retry_after_for",
    "shed_decision",
    "shed_error",
    "unavailable",
    "uuid4_batch",
]
