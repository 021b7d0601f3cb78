"""A whole write request planned: its events -> the records to write (under the topic contract, split
so that no record exceeds ``max_record_bytes``) and the answer (Keen's per-event results for a batch).

:func:`plan_request` is pure and takes and returns plain data only, so the API runs it in a separate
process for big bodies (see :mod:`streamapp.api.ingest`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamapp.api.errors import INVALID_COLLECTION, ApiError
from streamapp.api.events import (
    Clock,
    EventRejected,
    check_batch,
    encode_event,
    new_event_id,
    parse_object,
)
from streamapp.contract import is_valid_name, name_rule, preview
from streamapp.enrichment import fill_placeholders


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
