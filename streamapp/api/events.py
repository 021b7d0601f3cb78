"""One request's events: the body as a JSON object, collection names, and each event validated,
enriched (``keen.id`` / ``keen.timestamp`` / ``keen.created_at``) and encoded.

Pure (time comes in as a :class:`Clock`; ids from :data:`new_event_id`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from streamapp.api.errors import EVENT_TOO_LARGE, INVALID_COLLECTION, INVALID_EVENT, INVALID_JSON, TOO_LARGE, ApiError
from streamapp.contract import event_time_in_range, is_valid_name, iso_from_ms, name_rule, parse_iso_seconds, preview
from streamapp.enrichment import AddonError, check_event_addons


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
