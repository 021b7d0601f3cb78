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
(see ``streamapp.control.markers``); any other NUL-keyed record is dead-lettered.

Hostile input costs only its sender (each rule is checked before a field is used):

* identity: the key must equal the value's ``project_id`` (:func:`check_identity`), so the
  meter (which counts by key) and the sink (which routes by value) agree on whose record it is;
* names: project ids and collections match :data:`NAME_PATTERN`; a leading ``_`` is reserved
  (``_manifests``, ``_checkpoints`` live beside the projects in the export prefix);
* event time: years 1970-9999 only (:func:`event_time_in_range`); a ``keen.timestamp`` more than
  ``max_future_seconds`` ahead of the record's timestamp is windowed at the record's time, the
  client's value kept and the correction noted in ``keen.window_timestamp``;
* dead letters are bounded (:func:`invalid_record_value`): key and value are cut to a preview
  plus their size and sha256.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
import simdjson

# A leading "_" is reserved for the service's own prefixes (``_manifests``, ``_checkpoints``).
NAME_PATTERN = r"[A-Za-z0-9-][A-Za-z0-9_-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
CONTROL_KEY_PREFIX = b"\x00"
TICK_KEY = b"\x00tick"
SHED_KEY = b"\x00shed"
CONTROL_SIG_HEADER = "streamapp-control-sig"  # HMAC of a control record (streamapp.control.markers)
# Positions order events inside a partition: offset, then index inside a batch record.
INDEX_BITS = 20
MAX_BATCH_EVENTS = (1 << INDEX_BITS) - 1
# Client clocks may run ahead; event times past the record timestamp by more than this do not
# move the watermark (one tenant's clock must not close anyone's windows early).
MAX_FUTURE_SKEW_SECONDS = 1.0
# Event times the layout can name (keys sort as text): 1970-01-01 up to the end of year 9999.
MIN_EVENT_SECONDS = 0.0
END_EVENT_SECONDS = 253402300800.0  # 10000-01-01T00:00:00Z
# Dead letters carry at most this much of a record's key and value (JSON escaping can grow a
# byte sixfold: 64 KiB stays far below the producer's 1 MB request limit).
DEAD_LETTER_PREVIEW_BYTES = 64 * 1024
DEAD_LETTER_KEY_BYTES = 256
# Longest text of a hostile field quoted in a reason.
REASON_PREVIEW_CHARS = 80


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
    # Type first: a list or dict in a record must not reach the set lookup (TypeError).
    if type(name) is not str:
        return False
    # Hot path: the same few project ids and collections arrive over and over.
    if name in _valid_names:
        return True
    if _NAME.fullmatch(name) is not None:
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
        raise InvalidRecord(f"bad project_id {preview(project_id)}: {name_rule(project_id)}")
    collection = doc.get("collection")
    if not is_valid_name(collection):
        raise InvalidRecord(f"bad collection {preview(collection)}: {name_rule(collection)}")
    if "events" in doc:
        if "event" in doc:  # which one the producer meant is unknowable: neither is dropped silently
            raise InvalidRecord("record has both 'event' and 'events': one or the other")
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


class BatchEnvelope(NamedTuple):
    """What :func:`scan_batch` read of a batch record: its names and how many events it holds."""

    project_id: str
    collection: str
    events: int


# One parser, reused: each parse invalidates the previous document, so nothing read from it
# outlives scan_batch (the agents all run on one event loop thread).
_scanner = simdjson.Parser()
_SCANNED_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, MemoryError)


def scan_batch(value: bytes) -> BatchEnvelope | None:
    """The envelope of a batch record as :func:`parse_record` would read it, without building
    its events: simdjson checks the whole document and builds only the three top-level fields
    (0.27 ms against orjson's 2.2 ms for one of the replay's 500-pageview records). The meter
    counts a batch this way and the sink diverts a shed project's records this way: the two
    decodes of every spike record were ~40 % of an overloaded protected worker's main thread.

    ``None`` when the record is not a well-formed batch (no ``events`` list, an ``event`` beside it,
    bad names, over ``MAX_BATCH_EVENTS``) or when simdjson could read it differently from orjson
    (duplicate top-level keys: simdjson finds the first, orjson keeps the last; a byte order mark or
    leading space; anything simdjson refuses, such as integers over 64 bits): the caller then takes
    :func:`parse_record`'s path. Should simdjson accept a document that orjson refuses (none is
    known: both refuse lone surrogates, NaN, trailing bytes and numbers out of range), the names
    and count read here are still the document's, and the record fails later, in orjson, where its
    events are used: a diverted one is dead-lettered by the overflow drain, with its offset.
    """
    if value[:1] != b"{":
        return None
    try:
        doc = _scanner.parse(value)
        if type(doc) is not simdjson.Object:
            return None
        keys = list(doc.keys())
        if "events" not in keys or "event" in keys or len(set(keys)) != len(keys):
            return None
        project_id = doc["project_id"]
        collection = doc["collection"]
        events = doc["events"]
        if type(events) is not simdjson.Array or not (is_valid_name(project_id) and is_valid_name(collection)):
            return None
        count = len(events)
    except _SCANNED_ERRORS:  # not JSON simdjson reads (or no such field): the orjson path decides
        return None
    return BatchEnvelope(project_id, collection, count) if count <= MAX_BATCH_EVENTS else None


def name_rule(name: object) -> str:
    """Why ``name`` is not a valid project id or collection (for error messages)."""
    if isinstance(name, str) and name.startswith("_"):
        return "names starting with '_' are reserved"
    return f"must be a string matching {NAME_PATTERN}"


def preview(value: object) -> str:
    """A bounded repr of a hostile value for a reason or an error message."""
    text = repr(value)
    if len(text) > REASON_PREVIEW_CHARS:
        return f"{text[:REASON_PREVIEW_CHARS]}... ({len(text)} chars)"
    return text


def check_identity(key: bytes | None, project_id: str) -> None:
    """One identity per record: the key must be the value's project id (raise InvalidRecord).

    The meter counts a record against its key and the sink routes it by its value; a record
    whose two disagree would let one project's events be counted (and shed) as another's.
    """
    if key is None or key != project_id.encode():
        shown = preview(key.decode("utf-8", "replace")) if key is not None else "no key"
        raise InvalidRecord(f"key {shown} is not the value's project_id {project_id!r}")


_COMPACT_HEAD = b'{"project_id":"'
_SPACED_HEAD = b'{"project_id": "'


def names_key_first(value: bytes, key: bytes) -> bool:
    """Whether ``value`` starts by naming ``key`` as its project (compact, or Python's json.dumps
    spacing): byte comparisons in place, nothing allocated or cached per project (100,000 invented
    ids must not cost a cache entry each)."""
    for head in (_COMPACT_HEAD, _SPACED_HEAD):
        if value.startswith(head):
            end = len(head) + len(key)
            return value.startswith(key, len(head)) and len(value) > end and value[end] == 0x22  # '"'
    return False


def value_names_project(value: bytes, key: bytes) -> bool:
    """Whether a record's value names the key's project, for the meter's hot path.

    O(1) for the usual record (``project_id`` first, as the API and most producers write it:
    :func:`names_key_first`); any other layout is decoded like the sink decodes it. Exact for any
    JSON object without duplicate members; a value that *starts* by naming the key but repeats
    ``project_id`` later is counted for the key (the sink dead-letters it: the key's own producer
    pays for its garbage, as for any invalid record).
    """
    if names_key_first(value, key):
        return True
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    if type(doc) is not dict:
        return False
    project_id = doc.get("project_id")
    return type(project_id) is str and project_id.encode() == key


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
    except (ValueError, OverflowError):
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


def event_time_in_range(seconds: float) -> bool:
    """Event times the S3 layout can name: years 1970 to 9999 (keys sort as text)."""
    return MIN_EVENT_SECONDS <= seconds < END_EVENT_SECONDS


def _dead_letter_field(doc: dict[str, Any], name: str, data: bytes | None, limit: int) -> None:
    """``data`` as text; cut to ``limit`` bytes plus its size and sha256 when longer."""
    if data is None:
        doc[name] = None
        return
    if len(data) <= limit:
        doc[name] = data.decode("utf-8", "replace")
        return
    doc[name] = data[:limit].decode("utf-8", "replace")
    doc[f"{name}_truncated"] = True
    doc[f"{name}_bytes"] = len(data)
    doc[f"{name}_sha256"] = hashlib.sha256(data).hexdigest()


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The key a dead letter is produced with: the record's, cut to a bounded length."""
    return key[:DEAD_LETTER_KEY_BYTES] if key is not None else None


def invalid_record_value(
    reason: str, *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> bytes:
    """The dead-letter record: the reason, where the record came from, and its bytes.

    Bounded whatever the record: a key over 256 bytes or a value over 64 KiB is cut to that
    preview plus ``{key,value}_truncated``, ``_bytes`` (original size) and ``_sha256``; the
    original stays in the source topic at the given partition and offset.
    """
    doc: dict[str, Any] = {
        "reason": reason[:1000].encode("utf-8", "replace").decode(),  # never a lone surrogate
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    _dead_letter_field(doc, "key", key, DEAD_LETTER_KEY_BYTES)
    _dead_letter_field(doc, "value", value, DEAD_LETTER_PREVIEW_BYTES)
    return orjson.dumps(doc)
