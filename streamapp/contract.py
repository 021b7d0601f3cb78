"""The event contract of the events topic, as pure functions.

A record on the events topic (what any Kafka producer writes):

* key: the project id, UTF-8.
* value: a JSON object, either one event
  ``{"project_id": str, "collection": str, "event": {...}}`` or a batch of one
  project's events for one collection
  ``{"project_id": str, "collection": str, "events": [{...}, ...]}``.
* ``event.keen.timestamp`` (ISO-8601) is the event time when present, else the
  Kafka record timestamp.

The app fills ``keen.id`` (derived from partition, offset and index, so it is
stable across replays) and ``keen.created_at`` (the record timestamp) when absent.

Records whose key starts with a NUL byte are control records written by the
workers themselves (watermark ticks, shed markers); no project id can start with
one, so they can never be confused with events. A worker obeys one only when its
``CONTROL_SIG_HEADER`` header signs it for its partition with the cluster secret
(see ``streamapp.control_records``); any other NUL-keyed record is dead-lettered.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

NAME_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_NAME = re.compile(NAME_PATTERN)
CONTROL_KEY_PREFIX = b"\x00"
TICK_KEY = b"\x00tick"
SHED_KEY = b"\x00shed"
CONTROL_SIG_HEADER = "streamapp-control-sig"  # HMAC of a control record (streamapp.control_records)
# Positions order events inside a partition: offset, then index inside a batch record.
INDEX_BITS = 20
MAX_BATCH_EVENTS = (1 << INDEX_BITS) - 1
# Client clocks may run ahead; event times further in the future than this past the
# record timestamp do not move the watermark (a bad clock must not close windows early).
MAX_FUTURE_SKEW_SECONDS = 300.0


class InvalidRecord(ValueError):
    """A record (or one event of a batch) that breaks the contract; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class ParsedRecord:
    project_id: str
    collection: str
    events: list[Any]  # raw event objects, not yet checked one by one


def position(offset: int, index: int = 0) -> int:
    """A single sortable integer for (offset, index inside the record)."""
    return (offset << INDEX_BITS) | index


def position_offset(pos: int) -> int:
    return pos >> INDEX_BITS


_valid_names: set[str] = set()


def is_valid_name(name: object) -> bool:
    # Hot path: the same few project ids and collections arrive over and over.
    if name in _valid_names:
        return True
    if isinstance(name, str) and _NAME.fullmatch(name) is not None:
        if len(_valid_names) > 100_000:
            _valid_names.clear()
        _valid_names.add(name)
        return True
    return False


def parse_record(value: bytes | None, max_record_bytes: int) -> ParsedRecord:
    """Decode and check a record's envelope; raise InvalidRecord with the reason."""
    if value is None:
        raise InvalidRecord("empty record value")
    if len(value) > max_record_bytes:
        raise InvalidRecord(f"record of {len(value)} bytes is over the {max_record_bytes} byte limit")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRecord(f"value is a JSON {type(doc).__name__}, not an object")
    project_id = doc.get("project_id")
    if not is_valid_name(project_id):
        raise InvalidRecord(f"bad project_id {project_id!r}: must match {NAME_PATTERN}")
    collection = doc.get("collection")
    if not is_valid_name(collection):
        raise InvalidRecord(f"bad collection {collection!r}: must match {NAME_PATTERN}")
    if "events" in doc:
        events = doc["events"]
        if not isinstance(events, list):
            raise InvalidRecord("'events' must be a list of objects")
        if len(events) > MAX_BATCH_EVENTS:
            raise InvalidRecord(f"batch of {len(events)} events is over {MAX_BATCH_EVENTS}")
    elif "event" in doc:
        events = [doc["event"]]
    else:
        raise InvalidRecord("record has neither 'event' nor 'events'")
    return ParsedRecord(project_id, collection, events)


def keen_id_prefix(partition: int, offset: int) -> str:
    """The first 18 of a keen.id's 24 hex digits (like Keen's ids); the event's index in its
    record makes the last 6, so an id is stable for a given source position."""
    return f"{partition:04x}{offset:014x}"


_iso_cache: dict[int, str] = {}


def iso_from_ms(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. ``2026-11-26T10:05:00.000Z``."""
    second, millis = divmod(ms, 1000)
    base = _iso_cache.get(second)
    if base is None:
        if len(_iso_cache) > 4096:  # bounded: timestamps mostly move forward
            _iso_cache.clear()
        base = _iso_cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{base}.{millis:03d}Z"


_seconds_cache: dict[str, float | None] = {}


def parse_iso_seconds(text: object) -> float | None:
    """Epoch seconds of an ISO-8601 timestamp; None when it is not one."""
    if not isinstance(text, str) or not 10 <= len(text) <= 40:
        return None
    # Events of one batch or second share timestamps: a small cache saves the parse.
    cached = _seconds_cache.get(text, _MISSING)
    if cached is not _MISSING:
        return cached  # type: ignore[return-value]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        value = None
    else:
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        value = parsed.timestamp()
    if len(_seconds_cache) > 8192:
        _seconds_cache.clear()
    _seconds_cache[text] = value
    return value


_MISSING = object()


@dataclass(frozen=True, slots=True)
class RecordStamps:
    """What the events of one record share: computed once per record, not per event."""

    id_prefix: str  # keen.id without the event's index
    created_at: str  # the record's timestamp, ISO-8601
    seconds: float  # the record's timestamp, epoch seconds


def record_stamps(partition: int, offset: int, record_ms: int) -> RecordStamps:
    return RecordStamps(keen_id_prefix(partition, offset), iso_from_ms(record_ms), record_ms / 1000.0)


def enrich_event(event: dict[str, Any], index: int, stamps: RecordStamps) -> float:
    """Fill the ``keen`` properties in place and return the event time in epoch seconds.

    ``keen.id`` is :func:`keen_id_prefix` plus the event's index (6 hex digits); a missing or invalid
    ``keen.timestamp`` becomes the record's timestamp, as does a missing ``keen.created_at``.
    """
    keen = event.get("keen")
    if type(keen) is not dict:
        keen = event["keen"] = {}
    event_time = parse_iso_seconds(keen.get("timestamp"))
    if event_time is None:
        event_time = stamps.seconds
        keen["timestamp"] = stamps.created_at
    if "id" not in keen:
        keen["id"] = f"{stamps.id_prefix}{index:06x}"
    if "created_at" not in keen:
        keen["created_at"] = stamps.created_at
    return event_time


def encode_record(project_id: str, collection: str, events: list[dict[str, Any]]) -> bytes:
    """A record value under the contract (batch form when more than one event)."""
    if len(events) == 1:
        return orjson.dumps({"project_id": project_id, "collection": collection, "event": events[0]})
    return orjson.dumps({"project_id": project_id, "collection": collection, "events": events})


def invalid_record_value(
    reason: str, *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> bytes:
    """The dead-letter record: the reason, where the record came from, and its bytes."""
    return orjson.dumps(
        {
            "reason": reason,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key.decode("utf-8", "replace") if key is not None else None,
            "value": value.decode("utf-8", "replace") if value is not None else None,
        }
    )
